"""A Triton GEMM that reads compressed weights and dequantizes them in registers: y [M, N] float32 = x [M, K] @ W.T,
W [N, K] kept as Q8_0 or Q5_K planes (gguf_gpu.PlanarLinear's layout) or as fp8 rows with a float32 scale per row
(t5core.fp8's storage). t5core's compressed paths today write a bf16 copy of each weight in every call and hand it
to cuBLAS: at 1 x 512 on an H200 that copy costs more than the GEMM saves (BENCHMARKS.md: GGUF Q8_0 1.57x bf16's
time, Q5_K 2.9x; fp8 storage 1.37x). Here the weight is read once, compressed.

Each tile of W is dequantized exactly as t5core does it (the float32 value of the code times its scales, times the
layer's residual factor, rounded once to x's dtype), so the products are those of the dequantized weight; only the
accumulation order differs from cuBLAS.

    python benchmarks/dequant_gemm.py                       # checks every format against torch (GPU)
    TRITON_INTERPRET=1 python benchmarks/dequant_gemm.py    # the same on the CPU, in Triton's interpreter (slow)
    python benchmarks/dequant_gemm.py --time                # ms and TFLOP/s per XXL projection at M=512, vs cuBLAS
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import triton
import triton.language as tl

FORMATS = {"q8_0": 0, "q5_k": 1, "fp8": 2}


@triton.jit
def _weight_tile(rn, kk, K, q_ptr, d_ptr, sc_ptr, mn_ptr, qh_ptr, FMT: tl.constexpr):
    """W[rn, kk] as float32 [BN, BK]: the code times its scales (exact in float32; Q5_K: one rounding of d*q - m).
    rn: row indices clamped into the weight (rows past N are read again and never stored)."""
    n, k = rn[:, None], kk[None, :]
    if FMT == 0:  # Q8_0: codes int8 [N, K], d float16 [N, K/32]
        q = tl.load(q_ptr + n * K + k).to(tl.float32)
        d = tl.load(d_ptr + n * (K // 32) + k // 32).to(tl.float32)
        w = q * d
    elif FMT == 1:  # Q5_K: d, dmin float16 [N, K/256, 2]; scales, mins uint8 [.., 8]; qh [.., 32]; qs [.., 128]
        blk = n * (K // 256) + k // 256  # [BN, BK]
        j = (k % 256) // 32  # sub-block
        i = k % 32
        d = tl.load(d_ptr + blk * 2).to(tl.float32)
        dmin = tl.load(d_ptr + blk * 2 + 1).to(tl.float32)
        sc = tl.load(sc_ptr + blk * 8 + j).to(tl.float32)
        mn = tl.load(mn_ptr + blk * 8 + j).to(tl.float32)
        lo = (tl.load(q_ptr + blk * 128 + (j // 2) * 32 + i).to(tl.int32) >> ((j % 2) * 4)) & 15
        hi = (tl.load(qh_ptr + blk * 32 + i).to(tl.int32) >> j) & 1
        w = (d * sc) * (lo | (hi << 4)).to(tl.float32) - dmin * mn
    else:  # fp8: codes [N, K], float32 scale per row [N]
        w = tl.load(q_ptr + n * K + k).to(tl.float32) * tl.load(d_ptr + n)
    return w


# Hopper-sized tiles; autotuned per (M, N, K, format) on first use
CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
           for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                                     (128, 64, 64, 4, 4), (128, 128, 128, 8, 2), (64, 256, 64, 8, 3)]]


@triton.jit
def _dequant_mm(x_ptr, out_ptr, M, N, K, q_ptr, d_ptr, sc_ptr, mn_ptr, qh_ptr, factor_ptr,
                FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)  # tiles in groups of GROUP_M rows of tiles: a group shares its weight columns
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rn_in = tl.minimum(rn, N - 1)
    rk = tl.arange(0, BK)
    factor = tl.load(factor_ptr)  # the layer's residual factor (a power of two)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=rm[:, None] < M, other=0.0)
        w = (_weight_tile(rn_in, kk, K, q_ptr, d_ptr, sc_ptr, mn_ptr, qh_ptr, FMT) * factor).to(a.dtype)
        acc = tl.dot(a, tl.trans(w), acc)
    tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


# Triton's interpreter (the CPU check) has no autotuner: there one small tile
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_tuned = _dequant_mm if INTERPRET else triton.autotune(configs=CONFIGS, key=["M", "N", "K", "FMT"])(_dequant_mm)
_FIXED = dict(BM=32, BN=64, BK=64, GROUP_M=2) if INTERPRET else {}


def dequant_mm(x: torch.Tensor, fmt: str, planes: dict, factor: torch.Tensor, N: int) -> torch.Tensor:
    """x [.., K] (bfloat16 / float16) @ W.T -> [.., N] float32. planes: the format's tensors (q, d[, sc, mn, qh]);
    factor: float32 scalar tensor. K must be a multiple of 128 (of 256 for Q5_K)."""
    K = x.shape[-1]
    xs = x.reshape(-1, K).contiguous()
    M = xs.shape[0]
    if K % (256 if fmt == "q5_k" else 128):
        raise ValueError(f"dequant_mm: K={K} must be a multiple of 128 (256 for Q5_K)")
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    q, d = planes["q"], planes["d"]
    sc, mn, qh = (planes.get(k, q) for k in ("sc", "mn", "qh"))

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _tuned[grid](xs, out, M, N, K, q, d, sc, mn, qh, factor, FMT=FORMATS[fmt], **_FIXED)
    return out.view(*x.shape[:-1], N)


# --------------------------------------------------------------------------------------------------
# Random weights in each format, their float32 value, and the check / timing
# --------------------------------------------------------------------------------------------------
def random_planes(fmt: str, N: int, K: int, device, gen: torch.Generator) -> dict:
    def u8(*shape, hi=256):
        return torch.randint(0, hi, shape, generator=gen, dtype=torch.uint8).to(device)

    if fmt == "q8_0":
        return {"q": torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8).to(device),
                "d": (torch.rand(N, K // 32, generator=gen) * 1e-3).half().to(device)}
    if fmt == "q5_k":
        NB = K // 256
        return {"d": (torch.rand(N, NB, 2, generator=gen) * 1e-3).half().to(device), "sc": u8(N, NB, 8, hi=64),
                "mn": u8(N, NB, 8, hi=64), "qh": u8(N, NB, 32), "q": u8(N, NB, 128)}
    w = torch.randn(N, K, generator=gen) * 0.02
    scale = w.abs().amax(1) / torch.finfo(torch.float8_e4m3fn).max
    return {"q": (w / scale[:, None]).to(torch.float8_e4m3fn).to(device), "d": scale.to(device)}


def reference_weight(fmt: str, p: dict) -> torch.Tensor:
    """float32 [N, K], with torch ops (the layout of t5core.gguf's _q5_k on planes)."""
    if fmt == "q8_0":
        N, K = p["q"].shape
        return (p["q"].view(N, K // 32, 32).float() * p["d"].float()[..., None]).view(N, K)
    if fmt == "fp8":
        return p["q"].float() * p["d"][:, None]
    N, NB = p["d"].shape[:2]
    shifts4 = torch.tensor([0, 4], dtype=torch.uint8, device=p["q"].device).view(2, 1)
    lo = ((p["q"].view(N, NB, 4, 1, 32) >> shifts4) & 15).reshape(N, NB, 8, 32)
    shifts1 = torch.arange(8, dtype=torch.uint8, device=p["q"].device).view(8, 1)
    hi = (p["qh"].unsqueeze(-2) >> shifts1) & 1  # [N, NB, 8, 32]
    d = (p["d"][..., 0:1].float() * p["sc"]).unsqueeze(-1)
    dm = (p["d"][..., 1:2].float() * p["mn"]).unsqueeze(-1)
    return torch.addcmul(-dm, d, (lo | (hi << 4)).float()).view(N, NB * 256)


def check(device, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    M, N, K = (40, 200, 512) if INTERPRET else (300, 1000, 2048)  # N: not a multiple of the tiles
    factor = torch.tensor(0.5, device=device)
    for fmt in FORMATS:
        p = random_planes(fmt, N, K, device, gen)
        x = torch.randn(M, K, generator=gen).to(device, dtype)
        w = (reference_weight(fmt, p) * factor).to(dtype)
        want = x.double() @ w.double().t()
        got = dequant_mm(x, fmt, p, factor, N)
        err = float((got.double() - want).norm() / want.norm())
        print(f"{fmt}, {dtype}: {tuple(got.shape)} {got.dtype}, rel. error vs float64 on the same dequantized weight "
              f"{err:.1e}", flush=True)
        assert err < 1e-5, (fmt, err)


def time_projections(device) -> None:
    """ms per XXL projection at M = 512 (bf16 x): cuBLAS on a bf16 weight, and this kernel on each format (its
    autotuned tiles printed)."""
    gen = torch.Generator().manual_seed(0)
    M, factor = 512, torch.tensor(1.0, device=device)
    print("| projection | cuBLAS bf16 ms | " + " | ".join(f"{f} ms" for f in FORMATS) + " | TFLOP/s (cuBLAS / best) |")
    print("|---|---|" + "---|" * len(FORMATS) + "---|")
    for name, N, K in [("qkv", 12288, 4096), ("o", 4096, 4096), ("ff_in", 20480, 4096), ("wo", 4096, 10240)]:
        x = torch.randn(M, K, generator=gen).to(device, torch.bfloat16)
        w = torch.randn(N, K, generator=gen).to(device, torch.bfloat16)
        calls = {"cuBLAS": lambda: torch.mm(x, w.t(), out_dtype=torch.float32)}
        for fmt in FORMATS:
            p = random_planes(fmt, N, K, device, gen)
            calls[fmt] = (lambda p, fmt: lambda: dequant_mm(x, fmt, p, factor, N))(p, fmt)
        ms = {k: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median") for k, f in calls.items()}
        print(f"{name}: tiles {_tuned.cache}", flush=True)
        flop = 2 * M * N * K
        best = min(ms[f] for f in FORMATS)
        print(f"| {name} {K}->{N} | {ms['cuBLAS']:.3f} | " + " | ".join(f"{ms[f]:.3f}" for f in FORMATS)
              + f" | {flop / ms['cuBLAS'] / 1e9:.0f} / {flop / best / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", action="store_true")
    args = ap.parse_args()
    dev = "cpu" if INTERPRET else "cuda"
    # (the interpreter reads bfloat16 tensors wrongly: numpy has no bfloat16)
    for dtype in (torch.float16,) if dev == "cpu" else (torch.bfloat16, torch.float16):
        check(dev, dtype)
    if args.time:
        time_projections(dev)
