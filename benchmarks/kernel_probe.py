# Experiment (2026-11-28, H200): GEMM shapes of one XXL layer, SDPA backends vs flex attention (kernel options,
# offset-table vs full bias score_mod), and the whole encoder compiled with and without CUDA graph replay, with a
# kernel-time profile. Run from the repo root: python3 benchmarks/kernel_probe.py
import time, math, torch, sys
sys.path.insert(0, '.')
from t5core.bench import time_calls
from t5core.t5_common import T5Config, T5AttnImpl
from t5core.t5_encoder import T5EncoderStack
from torch.nn.attention.flex_attention import flex_attention
from torch.nn.functional import scaled_dot_product_attention as sdpa
from torch.nn.attention import sdpa_kernel, SDPBackend
dev = 'cuda'
def bench(fn, n=None, warm=None):  # median ms with CUDA events, each call synchronized (t5core.bench's timer)
    return time_calls(fn, torch.device(dev), seconds=0.5)["ms"]
out = []
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
mm = bench(lambda: a @ b); rate = 2*8192**3/mm/1e9; out.append(f"matmul 8192^3 {mm:.3f} ms {rate:.0f} TFLOP/s"); del a, b
# GEMMs of one XXL layer at M=512
for M in (512, 4096):
    tot = 0
    for (K, N) in [(4096, 12288), (4096, 4096), (4096, 20480), (10240, 4096)]:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16); w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        t = bench(lambda: torch.nn.functional.linear(x, w)); tot += t
        out.append(f"gemm M={M} K={K} N={N}: {t*1e3:.0f} us {2*M*K*N/t/1e9:.0f} TFLOP/s")
    out.append(f"layer gemms M={M}: {tot*1e3:.0f} us x24 = {24*tot:.2f} ms")
# attention alone
H, L, D = 64, 512, 64
q, k, v = (torch.randn(1, H, L, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
bias_full = torch.randn(1, H, L, L, device=dev, dtype=torch.bfloat16)
table = torch.randn(H, 2*L-1, device=dev)
for name, be in [('default', None), ('efficient', SDPBackend.EFFICIENT_ATTENTION), ('cudnn', SDPBackend.CUDNN_ATTENTION), ('math', SDPBackend.MATH)]:
    try:
        if be is None: t = bench(lambda: sdpa(q, k, v, attn_mask=bias_full, scale=1.0))
        else:
            with sdpa_kernel([be]): t = bench(lambda: sdpa(q, k, v, attn_mask=bias_full, scale=1.0))
        out.append(f"sdpa {name}: {t*1e3:.0f} us")
    except Exception as e: out.append(f"sdpa {name}: {type(e).__name__}")
def sm_off(score, b, h, qi, ki): return score + table[h, ki - qi + (L - 1)]
bias_f32 = bias_full[0].float()
def sm_full(score, b, h, qi, ki): return score + bias_f32[h, qi, ki]
fc = torch.compile(flex_attention, dynamic=False)
for opts in [None, {'BLOCK_M': 64, 'BLOCK_N': 64}, {'BLOCK_M': 128, 'BLOCK_N': 64}, {'BLOCK_M': 128, 'BLOCK_N': 128}, {'BLOCK_M': 64, 'BLOCK_N': 128}, {'BLOCK_M': 128, 'BLOCK_N': 64, 'num_warps': 8}, {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_stages': 3}]:
    for smn, sm in [('offset', sm_off), ('full', sm_full)]:
        try:
            t = bench(lambda: fc(q, k, v, score_mod=sm, scale=1.0, kernel_options=opts))
            out.append(f"flex {smn} {opts}: {t*1e3:.0f} us")
        except Exception as e: out.append(f"flex {smn} {opts}: {type(e).__name__} {str(e)[:80]}")
# full model with cuda graph
cfg = T5Config.from_name('xxl', dtype=torch.bfloat16)
ids1 = torch.randint(3, 32000, (1, 512), device=dev)
for impl in [T5AttnImpl.SDPA, T5AttnImpl.Flex]:
    with torch.device(dev):
        m = T5EncoderStack(cfg.model_copy(update={'attn_impl': impl})).eval()
    with torch.no_grad():
        for n_, p in m.named_parameters(): p.normal_(0, 0.02)
    m.compile_layers()
    with torch.inference_mode():
        t = bench(lambda: m(ids1)); out.append(f"model {impl.value} compiled 1x512: {t:.2f} ms")
        m.bind_score_mods(512)
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3): m(ids1)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            o = m(ids1)
        t = bench(lambda: g.replay()); out.append(f"model {impl.value} compiled+graph 1x512: {t:.2f} ms ({4.845e12/t/1e9/rate*100:.0f}% of matmul)")
        # profile one eager forward's kernel time breakdown
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay(); torch.cuda.synchronize()
        rows = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages()), key=lambda r: -r[1])[:8]
        for r in rows: out.append(f"   {r[1]/1e3:8.2f} ms x{r[2]:4d} {r[0][:90]}")
    del m, g; torch.cuda.empty_cache()
print("\n".join(out))
