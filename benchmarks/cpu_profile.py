# CPU (T5 v1.1 base shape, float32, 1 x 128, this repo's 2-core dev box): the share of aten::mm in our eager
# forward (torch.profiler), and whether inductor's CPU GEMM templates (max-autotune, CPP backend) beat the
# shipped compile=True path (frozen weights, MKL packed GEMMs), interleaved with transformers eager. Run: python3 benchmarks/cpu_profile.py
import statistics, sys, tempfile, time
sys.path.insert(0, ".")
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import T5Config, T5EncoderModel
import t5core

torch.manual_seed(0)
hc = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu")
hf = T5EncoderModel(hc).eval(); d = tempfile.mkdtemp(); hf.save_pretrained(d)
ids = torch.randint(3, 32000, (1, 128))
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
    for f in fns.values():
        f(); f()
    times = {k: [] for k in fns}
    for _ in range(25):
        for k, f in fns.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
print({k: f"{v:.1f} ms" for k, v in med.items()}, {k: round(med["hf eager"] / v, 3) for k, v in med.items()})
