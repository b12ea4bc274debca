# Experiment (2026-11-28, H200): where the XXL encoder's 1x512 time goes beyond kernel time. Times encode()
# (as bench does: CUDA events, synchronized per call), the captured CUDA graph replayed alone, and back to back;
# lists the 12 longest kernels of one forward with counts (kernel launches per layer). Run: python3 benchmarks/overhead_probe.py
import sys
import torch
sys.path.insert(0, '.')
from torch.profiler import profile, ProfilerActivity
from gpu_base import random_xxl_encoder
from t5core.bench import time_calls
from t5core.t5_common import T5AttnImpl

dev = torch.device('cuda')
for impl in (T5AttnImpl.SDPA, T5AttnImpl.Flex):
    m = random_xxl_encoder(dev, impl).compile_layers()
    for B in (1, 8):
        ids = torch.randint(3, 32000, (B, 512))
        m.encode(ids)
        graph = m._graphs[(B, 512, False)][0]
        enc = time_calls(lambda: m.encode(ids), dev, 1.0)["ms"]
        ids_dev = ids.to(dev)
        enc_dev = time_calls(lambda: m.encode(ids_dev), dev, 1.0)["ms"]
        rep = time_calls(graph.replay, dev, 1.0)["ms"]
        rep_b2b = time_calls(graph.replay, dev, 1.0, sync_each=False)["ms"]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay(); torch.cuda.synchronize()
        ev = prof.key_averages()
        ktime = sum(e.device_time_total for e in ev) / 1e3
        nk = sum(e.count for e in ev)
        print(f"{impl.value} {B}x512: encode(cpu ids) {enc:.2f} ms, encode(gpu ids) {enc_dev:.2f} ms, graph replay {rep:.2f} ms, "
              f"replay back-to-back {rep_b2b:.2f} ms; kernel time {ktime:.2f} ms in {nk} kernels "
              f"({nk / 24:.1f} per layer); gaps = replay - kernels = {rep_b2b - ktime:.2f} ms", flush=True)
        for e in sorted(ev, key=lambda e: -e.device_time_total)[:12]:
            print(f"    {e.device_time_total / 1e3:7.3f} ms x{e.count:4d} {e.key[:110]}")
    del m, graph
    torch.cuda.empty_cache()
