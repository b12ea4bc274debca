# Experiment (H200): is the matmul rate that the bench divides by the rate the GPU holds while it runs the encoder?
# Times an 8192^3 bf16 matmul (a) in 0.5 s bursts on an idle GPU, as the bench's first measure does, (b) in 2 s
# segments interleaved with 2 s segments of the encoder at 1x512 and 8x512, (c) over 10 s of each alone, while
# nvidia-smi samples the SM clock, power and throttle reasons every 100 ms (also to $OUT/smi.csv when OUT is set).
# Each segment's clock is the mean of the samples inside it. Run: python3 benchmarks/clock_probe.py
import statistics, sys, time
import torch
sys.path.insert(0, ".")
from gpu_base import SmiSampler
from t5core.bench import build_hf_reference, matmul_tflops, time_calls
from t5core.hf import FastT5EncoderModel

dev = torch.device("cuda")
WORK = 4.845e12  # T5-XXL, one 512-token prompt
smi = SmiSampler()
segments = []  # (kind, value, start, end)


def segment(kind, fn):
    start = time.time()
    value = fn()
    segments.append((kind, value, start, time.time()))
    return value


time.sleep(2)  # idle: the GPU drops to its base state, as before a bench run
burst = [segment("burst matmul 0.5 s", lambda: matmul_tflops(dev)["tflops"]) for _ in range(3)]
n = 8192
a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
mm = lambda s: 2 * n**3 / time_calls(lambda: torch.mm(a, b), dev, s, sync_each=False, max_runs=5000)["ms"] / 1e9

hf = build_hf_reference("xxl", dev)
enc = FastT5EncoderModel.from_hf_model(hf, torch_dtype=torch.bfloat16, fuse_norms=True).encoder.compile_layers()
del hf
torch.cuda.empty_cache()
ids = {B: torch.randint(3, 32000, (B, 512), generator=torch.Generator().manual_seed(B)).to(dev) for B in (1, 8)}
for B in ids:
    enc.encode(ids[B])
encoder = lambda B, s: time_calls(lambda: enc.encode(ids[B]), dev, s, max_runs=5000)["ms"]
for _ in range(4):
    segment("matmul, in rounds", lambda: mm(2.0))
    for B in ids:
        segment(f"{B}x512, in rounds", lambda: encoder(B, 2.0))
segment("matmul, 10 s alone", lambda: mm(10.0))
segment("8x512, 10 s alone", lambda: encoder(8, 10.0))
time.sleep(0.5)
smi.stop()

print("| segment | value | SM MHz | W | throttle |\n|---|---|---|---|---|")
kinds = {}
for kind, value, start, end in segments:
    mhz, watts, reasons = smi.clock(start, end)
    kinds.setdefault(kind, []).append((value, mhz))
    unit = "TFLOP/s" if "matmul" in kind else "ms"
    print(f"| {kind} | {value:.1f} {unit} | {mhz:.0f} | {watts:.0f} | {' '.join(reasons)} |")
med = {k: (statistics.median(v for v, _ in xs), statistics.mean(m for _, m in xs)) for k, xs in kinds.items()}
print("\n==== summary ====")
mm_burst = med["burst matmul 0.5 s"][0]
mm_rounds, mhz_mm = med["matmul, in rounds"]
print(f"matmul 8192^3: burst {mm_burst:.1f} TFLOP/s (first {burst[0]:.1f}); in rounds {mm_rounds:.1f} at {mhz_mm:.0f} MHz; "
      f"10 s alone {med['matmul, 10 s alone'][0]:.1f} at {med['matmul, 10 s alone'][1]:.0f} MHz")
for B in ids:
    ms, mhz = med[f"{B}x512, in rounds"]
    tf = B * WORK / ms / 1e9
    print(f"{B}x512 in rounds: {ms:.2f} ms at {mhz:.0f} MHz = {tf:.0f} TFLOP/s: {tf / mm_burst:.1%} of the burst, "
          f"{tf / mm_rounds:.1%} of the matmul in rounds, {tf / mm_rounds * mhz_mm / mhz:.1%} at the matmul's clock")
ms, mhz = med["8x512, 10 s alone"]
mm10, mhz10 = med["matmul, 10 s alone"]
tf = 8 * WORK / ms / 1e9
print(f"8x512 10 s alone: {ms:.2f} ms at {mhz:.0f} MHz = {tf / mm10:.1%} of the 10 s matmul, "
      f"{tf / mm10 * mhz10 / mhz:.1%} at the matmul's clock")
