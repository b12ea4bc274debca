"""Where the examples find a model: argv[1] (a folder with enc.tensors + config.json, as `python -m t5core convert`
writes), or a random T5 v1.1 small built on the spot so the examples run anywhere."""
import sys
import tempfile
from pathlib import Path


def t5_dir() -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    from t5core.demo import build_demo_model

    return build_demo_model(Path(tempfile.mkdtemp()) / "t5-small-random")
