# Experiment (2026-11-28, H200): the Triton projections of benchmarks/triton_gemm.py (plain / residual-add / GEGLU
# epilogues) against cuBLAS at the XXL layer's shapes, M = 512 and 4096, over a set of tile configs. Prints the best
# tile per shape. Run from the repo root: python3 benchmarks/gemm_probe.py
import sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, '.'); sys.path.insert(0, 'benchmarks')
import triton_gemm as gemm
from gpu_base import ProjectionOperands, kernel_ms as gpu_ms
from t5core.bench import matmul_tflops

dev = torch.device('cuda')
torch.manual_seed(0)
def say(s):
    print(s, flush=True)

say(f"matmul 8192^3: {matmul_tflops(dev)['tflops']:.0f} TFLOP/s")

T = gemm.TileConfig
CFGS = [T(128, 128, 64, 8, 8, 3), T(128, 128, 64, 8, 8, 4), T(128, 128, 64, 8, 4, 4), T(128, 128, 64, 8, 4, 3),
        T(128, 256, 64, 8, 8, 3), T(64, 128, 64, 8, 4, 4), T(64, 256, 64, 8, 8, 3), T(128, 64, 64, 8, 4, 4),
        T(128, 128, 128, 8, 8, 2), T(64, 128, 128, 8, 4, 3)]
GEGLU_CFGS = [T(128, 64, 64, 8, 4, 4), T(128, 64, 64, 8, 8, 4), T(128, 64, 64, 8, 8, 3), T(128, 128, 64, 8, 8, 3),
              T(64, 128, 64, 8, 4, 4), T(64, 64, 64, 8, 4, 4), T(128, 128, 64, 8, 8, 2), T(64, 128, 64, 8, 8, 3)]
SHAPES = [("qkv", gemm.PLAIN, 12288, 4096), ("attn-out", gemm.RESIDUAL, 4096, 4096),
          ("gate-up", gemm.GEGLU, 10240, 4096), ("ffn-out", gemm.RESIDUAL, 4096, 10240)]
best = {}
summary = []
for M in (512, 4096):
    for name, ep, N, K in SHAPES:
        ops = ProjectionOperands(M, N, K, ep == gemm.GEGLU, dev)
        x, res, scale, w, ws, flops = ops.x, ops.res, ops.scale, ops.w, ops.copies, ops.flops
        # references: what the unfused path runs (cuBLAS GEMM, plus the epilogue as separate kernels)
        if ep == gemm.PLAIN:
            cublas = gpu_ms(lambda: F.linear(x, w())); cublas_all = cublas
            ref = lambda: F.linear(x.float(), ws[0].float()).to(x.dtype)
        else:
            cublas = gpu_ms(lambda: torch.mm(x, w().t(), out_dtype=torch.float32))
            if ep == gemm.RESIDUAL:
                cublas_all = gpu_ms(lambda: res * scale + torch.mm(x, w().t(), out_dtype=torch.float32))
                ref = lambda: res * scale + x.float() @ ws[0].float().t()
            else:
                def unfused():
                    h = torch.mm(x, w().t(), out_dtype=torch.float32); g, u = h.chunk(2, -1)
                    return (F.gelu(g, approximate='tanh') * u).to(x.dtype)
                cublas_all = gpu_ms(unfused)
                ref = lambda: (F.gelu(x.float() @ ws[0][:N].float().t(), approximate='tanh') * (x.float() @ ws[0][N:].float().t())).to(x.dtype)
        r = ref()
        say(f"M={M} {name} N={N} K={K}: cuBLAS gemm {cublas*1e3:.1f} us ({flops/cublas/1e9:.0f} TFLOP/s), unfused path {cublas_all*1e3:.1f} us")
        results = []
        for cfg in (GEGLU_CFGS if ep == gemm.GEGLU else CFGS):
            o = torch.empty(M, N, device=dev, dtype=torch.float32 if ep == gemm.RESIDUAL else torch.bfloat16)
            def run(cfg=cfg, o=o):
                ww = w()
                gemm._launch(x, ww, o, res if ep == gemm.RESIDUAL else o, scale if ep == gemm.RESIDUAL else o,
                             N if ep == gemm.GEGLU else 0, ep, cfg)
                return o
            try:
                t0 = time.perf_counter(); ops.first_copy_next(); run(); torch.cuda.synchronize(); comp = time.perf_counter() - t0
                err = ((o.float() - r.float()).norm() / r.float().norm()).item()
                ms = gpu_ms(run)
                results.append((ms, cfg, err))
                say(f"   {tuple(cfg)}: {ms*1e3:6.1f} us {flops/ms/1e9:4.0f} TFLOP/s  err {err:.1e}  compile {comp:.1f}s")
            except Exception as e:
                say(f"   {tuple(cfg)}: {type(e).__name__} {str(e)[:100]}")
        ok = [r_ for r_ in results if r_[2] < 2e-2]
        if ok:
            ms, cfg, err = min(ok, key=lambda r_: r_[0])
            best[(ep, N, K, M <= 1024)] = cfg
            summary.append(f"M={M:5d} {name:9s} cuBLAS {cublas*1e3:6.1f} us / unfused {cublas_all*1e3:6.1f} us | triton {ms*1e3:6.1f} us "
                           f"({flops/ms/1e9:.0f} TFLOP/s) {tuple(cfg)} -> {cublas_all/ms:.2f}x")
        del ops, ws, x, res, w
        torch.cuda.empty_cache()
say("\n".join(summary))
say("best tiles: " + ", ".join(f"{k}: {tuple(v)}" for k, v in best.items()))
