# CPU (T5 v1.1 base shape, float32, 1 x 128, this repo's 2-core dev box): the share of aten::mm in our eager
# forward (torch.profiler), and whether inductor's CPU GEMM templates (max-autotune, CPP backend) beat the
# shipped compile=True path (frozen weights, MKL packed GEMMs), interleaved with transformers eager. Run: python3 benchmarks/cpu_profile.py
import sys
sys.path.insert(0, "."); sys.path.insert(0, "benchmarks")
import torch
from torch.profiler import ProfilerActivity, profile
import t5core
from cpu_base import base_model, interleaved_median_ms

hf, d, ids = base_model()
eager = t5core.load_encoder(d, fuse_norms=True)
comp = t5core.load_encoder(d, fuse_norms=True, compile=True)
tuned = t5core.load_encoder(d, fuse_norms=True, compile=True)
with torch.inference_mode():
    # compile=True freezes the weights; the first call here compiles with the GEMM templates tried too
    with torch._inductor.config.patch(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"):
        tuned.encode(ids)
    for _ in range(3):
        eager.encode(ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            eager.encode(ids)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key == "aten::mm")
    print(f"ours eager: aten::mm is {mm / total:.0%} of profiled self CPU time")
fns = {"ours compile=True": lambda: comp.encode(ids), "ours max-autotune CPP": lambda: tuned.encode(ids),
       "hf eager": lambda: hf(input_ids=ids)}
med = interleaved_median_ms(fns, rounds=25)
print({k: f"{v:.1f} ms" for k, v in med.items()}, {k: round(med["hf eager"] / v, 3) for k, v in med.items()})
