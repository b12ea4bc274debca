# Interleaved CPU comparison (T5 v1.1 base shape, float32, 1 x 128): ours eager, ours compile=True (frozen weights,
# MKL packed GEMMs), transformers eager, alternating every round so the VM's drift hits all alike; plus the
# encoder's GEMMs alone (12 layers of the fused QKV / out / gate-up / FFN-out shapes at M = 128, own weights per
# layer) through torch's matmul, as transformers runs them, and through MKL's packed GEMM, as compile=True runs them.
# Run: python3 benchmarks/cpu_interleaved.py
import sys, time
import torch
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import t5core
from cpu_base import base_model, interleaved_median_ms
hf, d, ids = base_model()
eager = t5core.load_encoder(d, fuse_norms=True)
comp = t5core.load_encoder(d, fuse_norms=True, compile=True)
x, h = torch.randn(128, 768), torch.randn(128, 2048)
layers = [[torch.randn(2304, 768), torch.randn(768, 768), torch.randn(4096, 768), torch.randn(768, 2048)]
          for _ in range(12)]  # own weights per layer, as in the model: 340 MB streamed per forward
packed = [[(w, torch.ops.mkl._mkl_reorder_linear_weight(w, 128)) for w in ws] for ws in layers]
def gemms_only():
    for qkv, o, ff_in, ff_out in layers:
        for w in (qkv, o, ff_in):
            torch.nn.functional.linear(x, w)
        torch.nn.functional.linear(h, ff_out)
def packed_gemms_only():
    for qkv, o, ff_in, ff_out in packed:
        for w, p in (qkv, o, ff_in):
            torch.ops.mkl._mkl_linear(x, p, w, None, 128)
        torch.ops.mkl._mkl_linear(h, ff_out[1], ff_out[0], None, 128)
fns = {"ours eager": lambda: eager.encode(ids), "ours compile": lambda: comp.encode(ids), "hf eager": lambda: hf(input_ids=ids),
       "GEMMs alone": gemms_only, "GEMMs alone, MKL packed": packed_gemms_only}
with torch.inference_mode():
    t = time.perf_counter(); comp.encode(ids); print("compile", time.perf_counter() - t)
med = interleaved_median_ms(fns, rounds=40)
print({k: f"{v:.1f} ms" for k, v in med.items()})
print({k: f"{med['hf eager'] / v:.3f}x" for k, v in med.items()}, "(hf eager / each)")
