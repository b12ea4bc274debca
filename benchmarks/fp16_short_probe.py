# Experiment (2026-11-29, H200): float16 ran 8.7-9.3% behind bfloat16 at 1x512 in bench runs 16-17 but only
# 0.4% at 1x256 and 4.5-4.7% at 8x512, where fp16_power_probe.py blamed the power cap alone. Does 1x512 run
# other kernels in float16? (a) One profiled graph replay of the encoder in each dtype (bench's load: transformers'
# init, fused norms, float16 with the preset scales) at 1x256, 1x512 and 8x512: every kernel's count and time side
# by side. (b) encode() in 1.5 s segments, dtypes interleaved over 4 rounds, with nvidia-smi's SM clock and power.
# (c) The four projections alone at M = 512 with the encoder's output dtypes, weights rotating over three copies,
# each dtype's kernel names. Run: python3 benchmarks/fp16_short_probe.py
import statistics, sys, time
import torch
sys.path.insert(0, ".")
from gpu_base import ProjectionOperands, SmiSampler, kernel_ms, replay_kernels
from t5core.bench import Shape, build_hf_reference, make_inputs, time_calls
from t5core.hf import FastT5EncoderModel

dev = torch.device("cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = (Shape(1, 256), Shape(1, 512), Shape(8, 512))


def side_by_side(title: str, per_dtype: dict) -> None:
    bf, fp = per_dtype["bf16"], per_dtype["fp16"]
    total = {n: sum(ms for _, ms in k.values()) for n, k in per_dtype.items()}
    print(f"\n{title}: kernel time bf16 {total['bf16']:.3f} ms, fp16 {total['fp16']:.3f} ms "
          f"({total['fp16'] / total['bf16'] - 1:+.1%})")
    for name in sorted(set(bf) | set(fp), key=lambda k: -max(bf.get(k, (0, 0))[1], fp.get(k, (0, 0))[1])):
        b, f = bf.get(name, (0, 0.0)), fp.get(name, (0, 0.0))
        print(f"  bf16 {b[1]:7.3f} ms x{b[0]:3d} | fp16 {f[1]:7.3f} ms x{f[0]:3d} | {name[:100]}")


# (c) first: the projections alone, before the encoders fill the GPU
M, D, I, F = 512, 4096, 4096, 10240
projections = {  # name: (N, K, gate/up, output dtype; None: the input's)
    "QKV 4096->12288 (out bf16/fp16)": (3 * I, D, False, None), "attn-out 4096->4096 (out f32)": (D, I, False, torch.float32),
    "gate/up 4096->20480 (out f32)": (F, D, True, torch.float32), "FFN-out 10240->4096 (out f32)": (D, F, False, torch.float32)}
gemm_ms = {}
gemm_kernels = {}
for name, (N, K, geglu, out) in projections.items():
    for dn, dt in DTYPES.items():
        ops = ProjectionOperands(M, N, K, geglu, dev, dt)

        def call(ops=ops, out=out):
            return torch.mm(ops.x, ops.w().t(), out_dtype=out) if out is not None else torch.mm(ops.x, ops.w().t())

        call()
        gemm_kernels[(name, dn)] = sorted(k for k in replay_kernels(call) if "Memset" not in k)
        gemm_ms[(name, dn)] = (call, [])
for _ in range(3):
    for call, times in gemm_ms.values():
        times.append(kernel_ms(call, 0.3))
print(f"## fp16_short_probe, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
print("projections alone at M = 512 (back-to-back kernel time, median of 3 interleaved rounds):")
for name in projections:
    b, f = (statistics.median(gemm_ms[(name, d)][1]) * 1e3 for d in DTYPES)
    print(f"  {name}: bf16 {b:.1f} us, fp16 {f:.1f} us ({f / b - 1:+.1%})")
    for d in DTYPES:
        print(f"      {d}: {', '.join(k[:90] for k in gemm_kernels[(name, d)])}")
del gemm_ms
torch.cuda.empty_cache()

# (a) kernels of one replay per shape and dtype
hf = build_hf_reference("xxl", dev)
models = {n: FastT5EncoderModel.from_hf_model(hf, torch_dtype=dt, fuse_norms=True).encoder.compile_layers()
          for n, dt in DTYPES.items()}
del hf
torch.cuda.empty_cache()
inputs = {s.name: make_inputs(s, 32128, dev) for s in SHAPES}
for shape, inp in inputs.items():
    per_dtype = {}
    for n, m in models.items():
        m.encode(inp.ids, inp.mask)
        graph = m._graphs[(*inp.ids.shape, inp.mask is not None)][0]
        per_dtype[n] = replay_kernels(graph.replay)
    side_by_side(f"encoder {shape}, one graph replay", per_dtype)

# (b) encode() interleaved, with the clock
smi = SmiSampler()
segments = {}
for _ in range(4):
    for shape, inp in inputs.items():
        for n, m in models.items():
            start = time.time()
            ms = time_calls(lambda: m.encode(inp.ids, inp.mask), dev, 1.5, max_runs=5000)["ms"]
            segments.setdefault((shape, n), []).append((ms, start, time.time()))
smi.stop()
print("\nencode() in 1.5 s segments, 4 interleaved rounds (median ms; mean SM MHz and W over the segments):")
for shape in inputs:
    med = {}
    for n in DTYPES:
        runs = segments[(shape, n)]
        clocks = [smi.clock(s, e) for _, s, e in runs]
        med[n] = statistics.median(ms for ms, _, _ in runs)
        print(f"  {shape} {n}: {med[n]:.2f} ms (rounds {' '.join(f'{ms:.2f}' for ms, _, _ in runs)}), "
              f"{statistics.mean(c[0] for c in clocks):.0f} MHz, {statistics.mean(c[1] for c in clocks):.0f} W")
    print(f"  {shape} fp16 / bf16 - 1: {med['fp16'] / med['bf16'] - 1:+.1%}")
