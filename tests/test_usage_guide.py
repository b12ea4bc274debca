"""The usage guide's snippets, with nai_t5_wrapper replaced by t5core, as the example scripts run them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import t5core
from t5core.demo import build_demo_model
from tiny_models import rel_err

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("guide") / "t5-small")


@pytest.mark.parametrize("script", ["t5_encoder_basic.py", "t5_encoder_fast.py", "t5_encoder_fast_float16.py"])
def test_example_runs(script, t5_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(t5_dir)], capture_output=True,
                          text=True, env=env, cwd=ROOT / "examples", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "embedding" in done.stdout


def test_tensorizer_load_into_module_matches_load_encoder(t5_dir):
    """The basic snippet: T5Config.model_validate + TensorDeserializer.load_into_module."""
    import json

    from tensorizer import TensorDeserializer

    config = t5core.T5Config.model_validate(json.loads((t5_dir / "config.json").read_text()))
    t5_enc = t5core.T5EncoderStack(config).eval()
    deserializer = TensorDeserializer(t5_dir / "enc.tensors", lazy_load=True, dtype=torch.float32, device="cpu")
    deserializer.load_into_module(t5_enc)
    deserializer.close()
    tok = t5core.load_tokenizer(t5_dir)
    ids, mask = tok(["illustration of a nice tree", "a cat"])
    with torch.inference_mode():
        out = t5_enc(input_ids=ids, input_mask=mask)
    ref = t5core.load_encoder(t5_dir).encode(ids, mask)
    assert torch.equal(out[mask], ref[mask])


def test_flex_config_update_and_bind_score_mods(t5_dir):
    """config.model_copy(update={'attn_impl': Flex, 'flex_kernel_options': ...}), bind_score_mods, block mask."""
    from t5core.t5_common import T5AttnImpl

    config = t5core.open_checkpoint(t5_dir).config.model_copy(update={
        "attn_impl": T5AttnImpl.Flex, "flex_kernel_options": {"BLOCK_M": 128, "BLOCK_N": 64}})
    t5_enc = t5core.T5EncoderStack(config).eval()
    t5core.FusingDeserializer(t5_dir / "enc.tensors", lazy_load=True, dtype=torch.float32, device="cpu").load_into_module(t5_enc)
    t5_enc.bind_score_mods(seq_len=16)
    tok = t5core.load_tokenizer(t5_dir)
    ids, mask = tok(["illustration of a nice tree", "a cat"], pad_to=16)
    block_mask = t5core.make_self_attn_block_mask(mask=mask, mask_pad_queries=True)
    with torch.inference_mode():
        emb = t5_enc(input_ids=ids, block_mask=block_mask)
    ref = t5core.load_encoder(t5_dir).encode(ids, mask)
    assert rel_err(emb[mask], ref[mask]) <= 1e-5


def test_whole_model_compile_snippet(t5_dir):
    """t5_enc = torch.compile(t5_enc, dynamic=False, fullgraph=True) at a fixed shape."""
    encoder = t5core.load_encoder(t5_dir)
    t5_enc = encoder.model
    tok = t5core.load_tokenizer(t5_dir)
    ids, mask = tok(["illustration of a nice tree"], pad_to=32)
    t5_enc.bind_score_mods(seq_len=32)
    compiled = torch.compile(t5_enc, dynamic=False, fullgraph=True)
    with torch.inference_mode():
        assert rel_err(compiled(input_ids=ids, input_mask=mask)[mask], encoder.encode(ids, mask)[mask]) <= 1e-5
