# Experiment (2026-11-29, H200): why float16 runs 4-8% behind bfloat16 at 8x512 and pad8x256 in the bench when
# the kernels are the same. Suspect: the 700 W power cap. Float16 carries 10 mantissa bits to bfloat16's 7, so the
# same GEMM toggles more bits, draws more power per clock and is clocked lower.
# (a) 8192^3 torch.mm and the gate/up GEMM of pad8x256 (2048 x 4096 x 20480) in each dtype, on the same
#     randn(0, 1) values, 2 s segments interleaved over 4 rounds, with nvidia-smi's SM clock and power per segment;
# (b) the XXL encoder (transformers' init, fused norms; float16 with the preset scales, as bench loads it) in
#     each dtype at 8x512 and pad8x256 through encode(), 2 s segments interleaved, and one profiled replay each
#     (kernel count and kernel time).
# Run: python3 benchmarks/fp16_power_probe.py
# (In the logged run the first 8192^3 segment of each dtype also paid cuBLAS's first-call setup, so time_calls
# sized it at its minimum of 5 calls, too short for a clock sample: those rows read nan. The warm-up call
# before the rounds came after it.)
import statistics, sys, time
import torch
sys.path.insert(0, ".")
from torch.profiler import ProfilerActivity, profile
from gpu_base import SmiSampler
from t5core.bench import Shape, build_hf_reference, make_inputs, time_calls
from t5core.hf import FastT5EncoderModel

dev = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
smi = SmiSampler()
segments = {}  # (what, dtype) -> [(value, start, end)]


def segment(what, name, fn):
    start = time.time()
    value = fn()
    segments.setdefault((what, name), []).append((value, start, time.time()))


gen = torch.Generator(device=dev).manual_seed(0)
gemms = {"mm 8192^3": (8192, 8192, 8192), "gate/up 2048x4096x20480": (2048, 4096, 20480)}
operands = {(g, n): [torch.randn(shape, generator=gen, device=dev).to(dt) for shape in ((m, k), (k, nn))]
            for g, (m, k, nn) in gemms.items() for n, dt in DTYPES.items()}
for a, b in operands.values():
    torch.mm(a, b)  # cuBLAS's first-call setup, outside the timed segments
for _ in range(4):
    for g, (m, k, nn) in gemms.items():
        for name in DTYPES:
            a, b = operands[(g, name)]
            segment(g, name, lambda: 2 * m * k * nn / time_calls(lambda: torch.mm(a, b), dev, 2.0, sync_each=False,
                                                                    max_runs=20000)["ms"] / 1e9)
del operands

hf = build_hf_reference("xxl", dev)
models = {n: FastT5EncoderModel.from_hf_model(hf, torch_dtype=dt, fuse_norms=True).encoder.compile_layers()
          for n, dt in DTYPES.items()}
del hf
torch.cuda.empty_cache()
inputs = {s.name: make_inputs(s, 32128, dev) for s in (Shape(8, 512, False), Shape(8, 256, True))}
kernels = {}
for shape, inp in inputs.items():
    for name, m in models.items():
        m.encode(inp.ids, inp.mask)
        graph = m._graphs[(*inp.ids.shape, inp.mask is not None)][0]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        ev = prof.key_averages()
        kernels[(shape, name)] = (sum(e.count for e in ev), sum(e.device_time_total for e in ev) / 1e3)
for _ in range(3):
    for shape, inp in inputs.items():
        for name, m in models.items():
            segment(f"encoder {shape}", name, lambda: time_calls(lambda: m.encode(inp.ids, inp.mask), dev, 2.0,
                                                                 max_runs=5000)["ms"])
smi.stop()
rows = {key: [(v, *smi.clock(start, end)[:2]) for v, start, end in runs] for key, runs in segments.items()}

print(f"\n## fp16_power_probe, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
print("| what | dtype | median (TFLOP/s for GEMMs, ms for the encoder) | SM MHz | W | fp16 / bf16 − 1 |")
print("|---|---|---|---|---|---|")
for what in dict.fromkeys(w for w, _ in rows):
    med = {n: (statistics.median(v for v, _, _ in rows[(what, n)]), statistics.mean(c for _, c, _ in rows[(what, n)]),
               statistics.mean(w for _, _, w in rows[(what, n)])) for n in DTYPES}
    for n, (v, mhz, watts) in med.items():
        change = med["fp16"][0] / med["bf16"][0] - 1 if n == "fp16" else 0.0
        print(f"| {what} | {n} | {v:.2f} | {mhz:.0f} | {watts:.0f} | {change:+.1%} |" if n == "fp16" else
              f"| {what} | {n} | {v:.2f} | {mhz:.0f} | {watts:.0f} | |")
print("\n| encoder, one profiled replay | dtype | kernels | kernel ms |\n|---|---|---|---|")
for (shape, name), (count, ms) in kernels.items():
    print(f"| {shape} | {name} | {count} | {ms:.2f} |")
