"""Small random T5 encoders built with transformers, shared by the tests (same weights for both sides)."""
from pathlib import Path

import torch
from transformers import MT5EncoderModel, T5EncoderModel, UMT5EncoderModel
from transformers import MT5Config, T5Config as HFT5Config, UMT5Config

# the real T5 v1.1 tokenizer (tokenizer.json), kept in the repository: tests read nothing outside it
TOKENIZER_DIR = Path(__file__).resolve().parent / "fixtures" / "t5-tokenizer"

KINDS = {
    # kind: (config class, model class, extra config)
    "t5-v1_1": (HFT5Config, T5EncoderModel, {"feed_forward_proj": "gated-gelu"}),
    "t5-v1_0": (HFT5Config, T5EncoderModel, {"feed_forward_proj": "relu"}),
    "mt5": (MT5Config, MT5EncoderModel, {"feed_forward_proj": "gated-gelu"}),
    "umt5": (UMT5Config, UMT5EncoderModel, {"feed_forward_proj": "gated-gelu"}),
}


def make_hf_encoder(kind: str = "t5-v1_1", vocab_size: int = 32128, d_model: int = 64, num_heads: int = 4,
                    d_kv: int = 16, d_ff: int = 96, num_layers: int = 3, seed: int = 0, std: float = 0.5):
    """A transformers encoder with random normal weights (never zeros), in eval mode."""
    config_cls, model_cls, extra = KINDS[kind]
    config = config_cls(vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, d_kv=d_kv, d_ff=d_ff,
                        num_layers=num_layers, num_decoder_layers=num_layers, dropout_rate=0.0, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, std / p.shape[1] ** 0.5)
    return model


def save_hf(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def run_python(code: str, cwd=None, **env: str) -> None:
    """Runs Python code in a process of its own, with `env` added to the environment and this repository
    importable; it must print OK last. The failure shows the head of its stderr (the error) and the tail."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    err = run.stderr if len(run.stderr) <= 4500 else run.stderr[:3000] + "\n...\n" + run.stderr[-1500:]
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), err


def run_under_malloc_async(code: str) -> None:
    """run_python under the cudaMallocAsync allocator (ComfyUI's default; chosen when CUDA starts, hence the
    process of its own). A failed CUDA graph capture can abort that process."""
    run_python(code, PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync")
