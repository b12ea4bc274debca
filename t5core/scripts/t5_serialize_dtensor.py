"""Write a checkpoint (tensorizer or any other format t5core reads) as a sharded torch.distributed.checkpoint
folder, which t5core.distributed.load_fsdp reads at any world size. Each rank writes its own shard file:

  torchrun --nproc-per-node 4 t5core/scripts/t5_serialize_dtensor.py enc-tensorizer/ enc-dcp/ --dtype bfloat16

The same as `torchrun ... -m t5core convert SRC OUT --format dcp` (see its --help for fusion and float16 scales).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `t5core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from t5core.__main__ import main

if __name__ == "__main__":
    main(["convert", *sys.argv[1:], "--format", "dcp"])
