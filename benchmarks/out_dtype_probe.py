# Experiment (H200): which projection outputs must stay float32 in the bfloat16 encoder. Ours writes the fp32
# accumulator of gate/up, attention-out and FFN-out (F32OutLinear); bf16 outputs halve those writes and the GEGLU
# read. Same weights (transformers' random init, XXL), compiled + CUDA graphs, interleaved rounds; error vs the
# float32 transformers encoder (TF32 off); kernel time by kind at 8x512; attention alone at 8x512 by backend.
# Run: python3 benchmarks/out_dtype_probe.py
import copy, statistics, sys
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, ".")
sys.path.insert(0, "benchmarks")
from gpu_base import reference_and_encoder
from t5core.bench import matmul_tflops, time_calls

dev = torch.device("cuda")
mm = matmul_tflops(dev)["tflops"]
print(f"matmul 8192^3 bf16: {mm:.1f} TFLOP/s", flush=True)
WORK = 4.845e12  # T5-XXL, one 512-token prompt

ids, ref, base = reference_and_encoder(dev)


def variant(bf16_out: tuple[str, ...]):
    """A copy of `base` sharing its weights, with the named projections writing bf16 (plain nn.Linear)."""
    m = copy.deepcopy(base, memo={id(p): p for p in base.parameters()})
    for layer in m.layers:
        for name in bf16_out:
            mod = layer.get_submodule(name)
            mod.__class__ = nn.Linear
    return m.compile_layers()


variants = {
    "shipped (fp32 out: ff_in, o, ff_out)": variant(()),
    "ff_in bf16": variant(("ffn.ff_in",)),
    "ff_in, o, ff_out bf16": variant(("ffn.ff_in", "attn.o_proj", "ffn.ff_out")),
}
for B in (1, 8):
    for name, m in variants.items():
        out = m.encode(ids[B]).float()
        err = ((out - ref[B]).norm() / ref[B].norm()).item()
        print(f"{B}x512 {name}: rel err {err:.3e}", flush=True)
    rounds = {name: [] for name in variants}
    for _ in range(5):
        for name, m in variants.items():
            rounds[name].append(time_calls(lambda: m.encode(ids[B]), dev, 0.5)["ms"])
    for name, ms in rounds.items():
        t = statistics.median(ms)
        print(f"{B}x512 {name}: {t:.2f} ms ({B * WORK / t / 1e9:.0f} TFLOP/s, {B * WORK / t / 1e9 / mm:.1%} of matmul) "
              f"rounds {' '.join(f'{x:.2f}' for x in ms)}", flush=True)


def kind(key: str) -> str:
    if key.startswith("nvjet") or "gemm" in key.lower():
        return "GEMM"
    if "sdpa" in key or "flash" in key or "attention" in key or "fmha" in key:
        return "attention"
    if key.startswith("triton"):
        return "pointwise/norm"
    return "other"


for name in list(variants)[:2]:
    m = variants[name]
    graph = m._graphs[(8, 512, False)][0]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    for e in prof.key_averages():
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.device_time_total / 1e3
    print(f"8x512 kernels, {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in sorted(by_kind.items())), flush=True)
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
        print(f"    {e.device_time_total / 1e3:7.3f} ms x{e.count:4d} {e.key[:100]}")
del variants
torch.cuda.empty_cache()

# attention alone, one layer at 8x512: what the T5 bias costs each backend
H, L, Dh = 64, 512, 64
q, k, v = (torch.randn(8, H, L, Dh, device=dev, dtype=torch.bfloat16) for _ in range(3))
table = torch.randn(H, 2 * L - 1, device=dev)  # relative-offset bias [H, 2L-1] float32
rel = torch.arange(L, device=dev)[None, :] - torch.arange(L, device=dev)[:, None] + L - 1
bias1 = table[:, rel][None].to(torch.bfloat16)  # [1, H, L, L]
bias8 = bias1.expand(8, -1, -1, -1).contiguous()


def offset_mod(score, b, h, qi, ki):
    return score + table[h, ki - qi + (L - 1)]


flex = torch.compile(flex_attention, dynamic=False)
cases = {
    "flash, no bias (floor)": (SDPBackend.FLASH_ATTENTION, None),
    "cuDNN, bias [1,H,L,L]": (SDPBackend.CUDNN_ATTENTION, bias1),
    "cuDNN, bias [8,H,L,L]": (SDPBackend.CUDNN_ATTENTION, bias8),
    "cuDNN, no bias": (SDPBackend.CUDNN_ATTENTION, None),
    "efficient, bias [1,H,L,L]": (SDPBackend.EFFICIENT_ATTENTION, bias1),
}
flops = 4 * 8 * H * L * L * Dh
for name, (backend, bias) in cases.items():
    try:
        with sdpa_kernel(backend):
            t = time_calls(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0),
                           dev, 0.5)["ms"]
        print(f"attention 8x512 {name}: {t * 1e3:.0f} us ({flops / t / 1e9:.0f} TFLOP/s)", flush=True)
    except Exception as e:
        print(f"attention 8x512 {name}: {type(e).__name__} {str(e)[:100]}")
for opts in (None, {"BLOCK_M": 128, "BLOCK_N": 64}, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8},
             {"BLOCK_M": 64, "BLOCK_N": 64, "num_stages": 3}, {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}):
    try:
        t = time_calls(lambda: flex(q, k, v, score_mod=offset_mod, scale=1.0, kernel_options=opts), dev, 0.5)["ms"]
        print(f"attention 8x512 flex offset score_mod {opts}: {t * 1e3:.0f} us ({flops / t / 1e9:.0f} TFLOP/s)", flush=True)
    except Exception as e:
        print(f"attention 8x512 flex {opts}: {type(e).__name__} {str(e)[:100]}")
