# Shared by the GPU probes: for out_dtype_probe.py and residual_epilogue_probe.py, transformers' own random init
# (t5core.bench.build_hf_reference) on the device, token ids for 1 and 8 prompts of 512 tokens, its float32
# outputs with TF32 off, and our bf16 encoder with fused norms built from the same weights; for the GEMM probes,
# kernel time of back-to-back calls.
import sys
sys.path.insert(0, ".")
import torch
from t5core.bench import build_hf_reference, time_calls
from t5core.hf import FastT5EncoderModel


def reference_and_encoder(dev: torch.device, size: str = "xxl"):
    """-> (ids {B: [B, 512] on the CPU}, float32 reference outputs {B: [B, 512, D]}, bf16 T5EncoderStack)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = build_hf_reference(size, dev)
    ids = {B: torch.randint(3, 32000, (B, 512), generator=torch.Generator().manual_seed(B)) for B in (1, 8)}
    with torch.inference_mode():
        ref = {B: hf(input_ids=x.to(dev)).last_hidden_state.float() for B, x in ids.items()}
    base = FastT5EncoderModel.from_hf_model(hf, torch_dtype=torch.bfloat16, fuse_norms=True).encoder
    del hf
    torch.cuda.empty_cache()
    return ids, ref, base


def kernel_ms(fn, seconds: float = 0.25) -> float:
    """Median ms of back-to-back calls on the current GPU (CUDA events, no sync between calls): kernel time,
    not latency."""
    return time_calls(fn, torch.device("cuda"), seconds=seconds, sync_each=False)["ms"]
