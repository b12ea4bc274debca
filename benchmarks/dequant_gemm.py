"""A Triton GEMM that reads compressed weights and dequantizes them in registers: y [M, N] float32 = x [M, K] @ W.T,
W [N, K] kept as GGUF Q8_0, Q4_K, Q5_K or Q6_K blocks, as stored (blocks_mm: t5core.gguf.PackedWeight's bytes, rows
of mixed types included) or split into planes of one field each (dequant_mm on planes_from_blocks), or as fp8 rows
with a float32 scale per row (t5core.fp8's storage). t5core's compressed paths today write a bf16 copy of each
weight in every call and hand it to cuBLAS: at 1 x 512 on an H200 that copy costs more than the GEMM saves
(BENCHMARKS.md: GGUF Q8_0 1.57x bf16's time, Q5_K 2.9x; fp8 storage 1.37x). Here the weight is read once, compressed.

Each tile of W is dequantized exactly as t5core does it (the float32 value of the code times its scales, times the
layer's residual factor, rounded once to x's dtype), so the products are those of the dequantized weight; only the
accumulation order differs from cuBLAS.

    python benchmarks/dequant_gemm.py                       # checks every format against t5core's dequantization
    TRITON_INTERPRET=1 python benchmarks/dequant_gemm.py    # the same on the CPU, in Triton's interpreter (slow;
                                                            # DEQUANT_GEMM_WT=1: the weight as first operand,
                                                            # DEQUANT_GEMM_BK: the K tile, 32 / 64 / 128)
    python benchmarks/dequant_gemm.py --time                # ms per XXL projection at M=512: planes, blocks as
                                                            # stored, t5core today, cuBLAS on bf16
    python benchmarks/dequant_gemm.py --resources all       # no GPU needed: registers and spills of each tile
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import triton
import triton.language as tl

from t5core.precision import relative_error

# planes (planes_from_blocks) or fp8 rows; "..._blocks": GGUF's own blocks, read as they are stored
FORMATS = {"q8_0": 0, "q4_k": 1, "q5_k": 2, "q6_k": 3, "fp8": 4,
           "q8_0_blocks": 5, "q4_k_blocks": 6, "q5_k_blocks": 7, "q6_k_blocks": 8}
GGML = {"q8_0": 8, "q4_k": 12, "q5_k": 13, "q6_k": 14}  # t5core.gguf.QTYPES ids


@triton.jit
def _nibbles(byte_ptr, j, i):
    """[BN, S, 32] codes of sub-blocks j [S] (8 per 256: the low then high nibbles of 32 bytes each pair shares),
    byte_ptr [BN, 1, 1] their 128 bytes, i [32]: 4-bit codes as int32."""
    b = tl.load(byte_ptr + (j[None, :, None] // 2) * 32 + i[None, None, :]).to(tl.int32)
    return (b >> ((j[None, :, None] % 2) * 4)) & 15


@triton.jit
def _k_scale_min(s_ptr, j):
    """The 6-bit scales and mins of sub-blocks j [S] from a Q4_K / Q5_K block's 12 packed bytes at s_ptr [BN, 1]:
    float32 [BN, S] each (t5core.gguf._k_scales)."""
    a = tl.load(s_ptr + j[None, :] % 4).to(tl.int32)
    m = tl.load(s_ptr + 4 + j[None, :] % 4).to(tl.int32)
    h = tl.load(s_ptr + 8 + j[None, :] % 4).to(tl.int32)
    low = j[None, :] < 4
    sc = tl.where(low, a & 63, (h & 15) | ((a >> 6) << 4))
    mn = tl.where(low, m & 63, (h >> 4) | ((m >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _weight_tile(rn, k0, K, q_ptr, d_ptr, sc_ptr, mn_ptr, qh_ptr, FMT: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    """W[rn, k0:k0+BK] as float32 [BN, BK]: each code times its scales, as t5core.gguf dequantizes it (exact in
    float32; Q4_K / Q5_K: one rounding of d*q - m). rn: row indices clamped into the weight (rows past N are read
    again and never stored). Fields that hold for a whole block or sub-block are loaded once per row and broadcast.
    Planes: planes_from_blocks; blocks as stored: q_ptr the bytes, d_ptr the same bytes as float16."""
    n = rn[:, None]  # [BN, 1]
    i32 = tl.arange(0, 32)
    if FMT == 0 or FMT == 5:  # Q8_0: [BN, BK/32, 32] codes, a float16 d per 32
        c = k0 // 32 + tl.arange(0, BK // 32)  # blocks
        if FMT == 0:
            q = tl.load(q_ptr + n[:, :, None] * K + c[None, :, None] * 32 + i32[None, None, :])
            d = tl.load(d_ptr + n * (K // 32) + c[None, :])
        else:
            base = n * (K // 32 * 34) + c[None, :] * 34  # [BN, BK/32] bytes
            q = tl.load(q_ptr + base[:, :, None] + 2 + i32[None, None, :]).to(tl.int8, bitcast=True)
            d = tl.load(d_ptr + base // 2)
        w = tl.reshape(q.to(tl.float32) * d.to(tl.float32)[:, :, None], (BN, BK))
    elif FMT == 1 or FMT == 2 or FMT == 6 or FMT == 7:  # Q4_K / Q5_K: 8 sub-blocks of 32 per block of 256
        j = (k0 % 256) // 32 + tl.arange(0, BK // 32)  # sub-blocks of this tile (BK divides 256)
        blk = n * (K // 256) + k0 // 256  # [BN, 1]
        if FMT <= 2:  # planes
            d = tl.load(d_ptr + blk * 2).to(tl.float32)
            dmin = tl.load(d_ptr + blk * 2 + 1).to(tl.float32)
            sc = tl.load(sc_ptr + blk * 8 + j[None, :]).to(tl.float32)  # [BN, S]
            mn = tl.load(mn_ptr + blk * 8 + j[None, :]).to(tl.float32)
            q = _nibbles(q_ptr + blk[:, :, None] * 128, j, i32)
            if FMT == 2:
                qh = tl.load(qh_ptr + blk[:, :, None] * 32 + i32[None, None, :]).to(tl.int32)  # [BN, 1, 32]
                q = q | (((qh >> j[None, :, None]) & 1) << 4)
        else:  # blocks as stored: d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
            base = blk * (144 if FMT == 6 else 176)
            d = tl.load(d_ptr + base // 2).to(tl.float32)
            dmin = tl.load(d_ptr + base // 2 + 1).to(tl.float32)
            sc, mn = _k_scale_min(q_ptr + base + 4, j)
            q = _nibbles(q_ptr + base[:, :, None] + (16 if FMT == 6 else 48), j, i32)
            if FMT == 7:
                qh = tl.load(q_ptr + base[:, :, None] + 16 + i32[None, None, :]).to(tl.int32)
                q = q | (((qh >> j[None, :, None]) & 1) << 4)
        w3 = (d * sc)[:, :, None] * q.to(tl.float32) - (dmin * mn)[:, :, None]
        w = tl.reshape(w3, (BN, BK))
    elif FMT == 3 or FMT == 8:  # Q6_K: 16 sub-blocks of 16 per 256, signed 6-bit codes
        t = (k0 % 256) // 16 + tl.arange(0, BK // 16)  # sub-blocks of this tile
        u = tl.arange(0, 16)
        e = t[None, :, None] * 16 + u[None, None, :]  # [1, T, 16]: index in the block
        blk = n * (K // 256) + k0 // 256  # [BN, 1]
        if FMT == 3:  # planes: ql [.., 128], qh [.., 64], int8 scales [.., 16], d [..]
            ql_ptr, qh_ptr, s_ptr = q_ptr + blk * 128, qh_ptr + blk * 64, sc_ptr + blk * 16
            d = tl.load(d_ptr + blk).to(tl.float32)
        else:  # blocks as stored: ql[128], qh[64], scales[16], d
            base = blk * 210
            ql_ptr, qh_ptr, s_ptr = q_ptr + base, q_ptr + base + 128, q_ptr + base + 192
            d = tl.load(d_ptr + (base + 208) // 2).to(tl.float32)
        h = e // 128
        lo = (tl.load(ql_ptr[:, :, None] + h * 64 + e % 64).to(tl.int32) >> (((e % 128) // 64) * 4)) & 15
        hi = (tl.load(qh_ptr[:, :, None] + h * 32 + e % 32).to(tl.int32) >> (((e % 128) // 32) * 2)) & 3
        sc = tl.load(s_ptr + t[None, :]).to(tl.int8, bitcast=True).to(tl.float32)  # [BN, T]
        w3 = ((lo | (hi << 4)) - 32).to(tl.float32) * (d * sc)[:, :, None]
        w = tl.reshape(w3, (BN, BK))
    else:  # fp8: codes [N, K], float32 scale per row [N]
        w = tl.load(q_ptr + n * K + k0 + tl.arange(0, BK)[None, :]).to(tl.float32) * tl.load(d_ptr + n)
    return w


# Hopper-sized tiles: (BM, BN, BK, warps, stages, WT). WT: the dequantized weight tile as the dot's first operand,
# which Hopper's wgmma can take from registers (else the second, taken from shared memory). The tiles that ptxas
# compiles without spilling registers for most formats (`--resources all`, no GPU needed); autotuned per (M, N, K,
# format) on first use.
# BM = 64 tiles keep all SMs busy at 256 tokens (Flux), where 128 x 128 tiles make 64 CTAs for N = 4096.
TILES = [(128, 128, 32, 8, 3, False), (128, 128, 32, 8, 3, True), (128, 128, 32, 8, 4, True),
         (64, 256, 32, 8, 3, False), (64, 256, 32, 8, 3, True), (128, 128, 64, 8, 3, False),
         (128, 128, 64, 8, 3, True), (64, 128, 64, 8, 4, True), (128, 64, 32, 8, 4, True),
         (64, 128, 32, 8, 3, True), (64, 128, 32, 8, 4, False)]
CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "WT": wt}, num_warps=w, num_stages=st)
           for bm, bn, bk, w, st, wt in TILES]


@triton.jit
def _dequant_mm(x_ptr, out_ptr, M, N, K, ldo, col, q_ptr, d_ptr, sc_ptr, mn_ptr, qh_ptr, factor_ptr,
                FMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                WT: tl.constexpr):
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
    acc = tl.zeros((BN, BM) if WT else (BM, BN), dtype=tl.float32)
    x_ptrs = x_ptr + rm[:, None] * K + rk[None, :]
    for k0 in range(0, K, BK):
        a = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)  # [BM, BK]
        x_ptrs += BK
        w = (_weight_tile(rn_in, k0, K, q_ptr, d_ptr, sc_ptr, mn_ptr, qh_ptr, FMT, BN, BK) * factor).to(a.dtype)
        if WT:
            acc = tl.dot(w, tl.trans(a), acc)  # [BN, BM]
        else:
            acc = tl.dot(a, tl.trans(w), acc)  # [BM, BN]
    if WT:
        tl.store(out_ptr + rm[None, :] * ldo + col + rn[:, None], acc, mask=(rm[None, :] < M) & (rn[:, None] < N))
    else:
        tl.store(out_ptr + rm[:, None] * ldo + col + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


# Triton's interpreter (the CPU check) has no autotuner: there one small tile
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_tuned = _dequant_mm if INTERPRET else triton.autotune(configs=CONFIGS, key=["M", "N", "K", "FMT"])(_dequant_mm)
_FIXED = dict(BM=32, BN=64, BK=int(os.environ.get("DEQUANT_GEMM_BK", 64)), GROUP_M=2,
              WT=os.environ.get("DEQUANT_GEMM_WT") == "1") if INTERPRET else {}


def _launch(xs: torch.Tensor, out: torch.Tensor, col: int, N: int, fmt: str, ptrs: list,
            factor: torch.Tensor) -> None:
    """out[:, col:col + N] = xs [M, K] @ W.T, W of N rows (out passed whole: compiled code hands a user kernel no
    view to mutate); ptrs: the five weight pointers of the format."""
    M, K = xs.shape
    if K % (256 if "_k" in fmt else 64):
        raise ValueError(f"dequant_mm: K={K} must be a multiple of 64 (256 for the K types)")

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _tuned[grid](xs, out, M, N, K, out.stride(0), col, *ptrs, factor, FMT=FORMATS[fmt], **_FIXED)


def dequant_mm(x: torch.Tensor, fmt: str, planes: dict, factor: torch.Tensor, N: int) -> torch.Tensor:
    """x [.., K] (bfloat16 / float16) @ W.T -> [.., N] float32. planes: the format's tensors (q, d[, sc, mn, qh]);
    factor: float32 scalar tensor. K must be a multiple of 64 (of 256 for the K types)."""
    K = x.shape[-1]
    xs = x.reshape(-1, K).contiguous()
    out = torch.empty(xs.shape[0], N, dtype=torch.float32, device=x.device)
    q = planes["q"]
    _launch(xs, out, 0, N, fmt, [q, planes["d"], *(planes.get(k, q) for k in ("sc", "mn", "qh"))], factor)
    return out.view(*x.shape[:-1], N)


def blocks_mm(x: torch.Tensor, segments: list, blocks: torch.Tensor, factor: torch.Tensor, N: int) -> torch.Tensor:
    """x [.., K] @ W.T -> [.., N] float32, W kept as GGUF blocks as stored (t5core.gguf.PackedWeight: blocks uint8,
    segments [(GGML type, first row, rows, first byte, bytes)], rows of different types in one weight): each
    segment's rows computed by one launch into its columns of the output."""
    K = x.shape[-1]
    xs = x.reshape(-1, K).contiguous()
    out = torch.empty(xs.shape[0], N, dtype=torch.float32, device=x.device)
    flat = blocks.reshape(-1)
    names = {g: f for f, g in GGML.items()}
    for qtype, row, rows, start, n in segments:
        seg = flat[start:start + n]
        _launch(xs, out, row, rows, names[qtype] + "_blocks", [seg, seg.view(torch.float16), seg, seg, seg],
                factor)
    return out.view(*x.shape[:-1], N)


# --------------------------------------------------------------------------------------------------
# Random weights in each format, their float32 value, and the check / timing
# --------------------------------------------------------------------------------------------------
def planes_from_blocks(fmt: str, blocks: torch.Tensor, N: int, K: int) -> dict:
    """GGUF blocks (uint8, N rows of K / block_size blocks) -> one contiguous plane per field, made once at load:
      q8_0  d float16 [N, K/32], q int8 [N, K] (the same 34 bytes per 32 weights);
      q4_k  d (d, dmin) float16 [N, K/256, 2], sc, mn: the 6-bit scales and mins as bytes [.., 8], q [.., 128]
            (148 bytes per 256 weights instead of 144); q5_k: the same and qh [.., 32] (180 instead of 176);
      q6_k  d float16 [N, K/256], sc int8 [.., 16], q (low nibbles) [.., 128], qh [.., 64] (the same 210)."""
    from t5core.gguf import QTYPES, _k_scales

    _, block, size = QTYPES[GGML[fmt]]
    b = blocks.reshape(N, K // block, size)

    def plane(a, b_, dtype=torch.uint8):
        return b[..., a:b_].contiguous().view(dtype)

    if fmt == "q8_0":
        return {"d": plane(0, 2, torch.float16).view(N, -1), "q": plane(2, 34, torch.int8).view(N, K)}
    if fmt == "q6_k":
        return {"q": plane(0, 128), "qh": plane(128, 192), "sc": plane(192, 208, torch.int8),
                "d": plane(208, 210, torch.float16).view(N, -1)}
    sc, mn = _k_scales(b[..., 4:16])
    planes = {"d": plane(0, 4, torch.float16), "sc": sc.contiguous(), "mn": mn.contiguous()}
    if fmt == "q4_k":
        return {**planes, "q": plane(16, 144)}
    return {**planes, "qh": plane(16, 48), "q": plane(48, 176)}


def random_blocks(fmt: str, N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """Random GGUF blocks [N, bytes per row] with small float16 scales (any bytes are valid codes), or for fp8 a
    random weight quantized per row: (codes, scales)."""
    from t5core.gguf import QTYPES

    if fmt == "fp8":
        w = torch.randn(N, K, generator=gen) * 0.02
        scale = w.abs().amax(1) / torch.finfo(torch.float8_e4m3fn).max
        return (w / scale[:, None]).to(torch.float8_e4m3fn), scale
    _, block, size = QTYPES[GGML[fmt]]
    b = torch.randint(0, 256, (N, K // block, size), generator=gen, dtype=torch.uint8)
    at = {"q8_0": (0,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}[fmt]  # the float16 scale fields
    for a in at:
        b[..., a:a + 2] = (torch.rand(N, K // block, 1, generator=gen) * 1e-3).half().view(torch.uint8)
    return b.view(N, -1)


def weight_and_planes(fmt: str, N: int, K: int, device, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """(the float32 weight [N, K] as t5core dequantizes it, the kernel's planes on `device`; for GGUF types also
    "blocks", the blocks as stored)."""
    from t5core.fp8 import dequantize as fp8_dequantize
    from t5core.gguf import dequantize

    blocks = random_blocks(fmt, N, K, gen)
    if fmt == "fp8":
        codes, scale = blocks
        return fp8_dequantize(codes, scale, torch.float32), {"q": codes.to(device), "d": scale.to(device)}
    w = dequantize(blocks, GGML[fmt], (N, K))
    planes = {k: v.to(device) for k, v in planes_from_blocks(fmt, blocks, N, K).items()}
    return w, {**planes, "blocks": blocks.to(device)}


def check(device, dtype) -> None:
    """Each format, planes and blocks as stored, and a weight whose rows mix two types (an _M file's fused QKV),
    against float64 products of t5core's own dequantization."""
    gen = torch.Generator().manual_seed(0)
    M, N, K = (40, 200, 512) if INTERPRET else (300, 1000, 2048)  # N: not a multiple of the tiles
    factor = torch.tensor(0.5, device=device)
    x = torch.randn(M, K, generator=gen).to(device, dtype)

    def report(what, got, w):
        want = x.double() @ (w.to(device) * factor).to(dtype).double().t()
        err = relative_error(got, want)
        print(f"{what}, {dtype}: {tuple(got.shape)} {got.dtype}, rel. error vs float64 on t5core's dequantized "
              f"weight {err:.1e}", flush=True)
        assert err < 1e-5, (what, err)

    mixed = []
    for fmt in FORMATS:
        if fmt.endswith("_blocks"):
            continue
        w, p = weight_and_planes(fmt, N, K, device, gen)
        report(fmt, dequant_mm(x, fmt, p, factor, N), w)
        if fmt != "fp8":
            b = p["blocks"]
            report(fmt + " blocks", blocks_mm(x, [(GGML[fmt], 0, N, 0, b.numel())], b, factor, N), w)
            mixed.append((fmt, w, b))
    (f1, w1, b1), (f2, w2, b2) = mixed[2], mixed[3]  # Q5_K rows, then Q6_K rows
    segments = [(GGML[f1], 0, N, 0, b1.numel()), (GGML[f2], N, N, b1.numel(), b2.numel())]
    report(f"{f1} + {f2} rows", blocks_mm(x, segments, torch.cat([b1.reshape(-1), b2.reshape(-1)]), factor, 2 * N),
           torch.cat([w1, w2]))


def time_projections(device) -> None:
    """ms per XXL projection at M = 512 (bf16 x), per format: this kernel on planes and on the blocks as stored,
    t5core's path today (the weight dequantized to bf16 by compiled torch code, then cuBLAS with float32 output),
    and cuBLAS on a bf16 weight (the autotuned tiles printed)."""
    from t5core.fp8 import dequantize as fp8_dequantize
    from t5core.gguf import dequantize

    gen = torch.Generator().manual_seed(0)
    M, factor = 512, torch.tensor(1.0, device=device)

    @torch.compile(dynamic=False)
    def today(x, fmt, p, N, K):
        w = (fp8_dequantize(p["q"], p["d"], torch.float32) if fmt == "fp8" else
             dequantize(p["blocks"], GGML[fmt], (N, K))) * factor
        return torch.mm(x, w.to(x.dtype).t(), out_dtype=torch.float32)

    def bench(f):
        return triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")

    rows = []
    for name, N, K in [("qkv", 12288, 4096), ("o", 4096, 4096), ("ff_in", 20480, 4096), ("wo", 4096, 10240)]:
        x = torch.randn(M, K, generator=gen).to(device, torch.bfloat16)
        w = torch.randn(N, K, generator=gen).to(device, torch.bfloat16)
        cublas = bench(lambda: torch.mm(x, w.t(), out_dtype=torch.float32))
        for fmt in [f for f in FORMATS if not f.endswith("_blocks")]:
            p = weight_and_planes(fmt, N, K, device, gen)[1]
            planes = bench(lambda: dequant_mm(x, fmt, p, factor, N))
            stored = (bench(lambda: blocks_mm(x, [(GGML[fmt], 0, N, 0, p["blocks"].numel())], p["blocks"], factor, N))
                      if fmt != "fp8" else planes)
            rows.append((f"{name} {K}->{N}", fmt, planes, stored, bench(lambda: today(x, fmt, p, N, K)), cublas,
                         2 * M * N * K))
        print(f"{name}: tiles {_tuned.cache}", flush=True)
    print("\n| projection | format | Triton, planes ms | Triton, blocks as stored ms | today: dequantize + cuBLAS ms "
          "| cuBLAS on bf16 ms | TFLOP/s best Triton / cuBLAS |\n|---|---|---|---|---|---|---|")
    for proj, fmt, planes, stored, now, cublas, flop in rows:
        print(f"| {proj} | {fmt} | {planes:.3f} | {stored:.3f} | {now:.3f} | {cublas:.3f} | "
              f"{flop / min(planes, stored) / 1e9:.0f} / {flop / cublas / 1e9:.0f} |")


# the weight pointers' types (q, d, sc, mn, qh) where not bytes and float16 ones, for compiling without a GPU
_POINTERS = {"q8_0": ["*i8", "*fp16"] + ["*i8"] * 3, "q6_k": ["*u8", "*fp16", "*i8", "*u8", "*u8"],
             "fp8": ["*fp8e4nv", "*fp32"] + ["*fp8e4nv"] * 3}
_BYTES = ["*u8", "*fp16", "*u8", "*u8", "*u8"]


def resources(fmts: list[str]) -> None:
    """Compile every (format, tile config) for sm_90 without a GPU (Triton's own ptxas) and print what ptxas gives
    each thread: registers, and the stack that spilled registers take (STACK > 0: slower, the autotuner would pick
    another). How CONFIGS was chosen."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args = ["x_ptr", "out_ptr", "M", "N", "K", "ldo", "col", "q_ptr", "d_ptr", "sc_ptr", "mn_ptr", "qh_ptr", "factor_ptr"]
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    for fmt in fmts:
        ptrs = _POINTERS.get(fmt, _BYTES)
        for c in CONFIGS:
            const = {k: FORMATS[fmt] if k == "FMT" else c.kwargs[k] for k in ("FMT", "BM", "BN", "BK", "GROUP_M", "WT")}
            sig = {**dict(zip(args, ["*bf16", "*fp32", "i32", "i32", "i32", "i32", "i32", *ptrs, "*fp32"])),
                   **{k: "constexpr" for k in const}}
            names = list(sig)
            src = ASTSource(fn=_dequant_mm, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                    options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True,
                                       text=True).stdout
            regs, stack = (re.search(rf"{k}:(\d+)", usage)[1] for k in ("REG", "STACK"))
            print(f"{fmt:12} BM {c.kwargs['BM']:3} BN {c.kwargs['BN']:3} BK {c.kwargs['BK']:3} warps {c.num_warps} "
                  f"stages {c.num_stages} WT {int(c.kwargs['WT'])}: {regs} registers, {stack} bytes of spill stack",
                  flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--resources", default=None, metavar="FORMATS",
                    help="compile the tile configs for sm_90 on this machine (no GPU needed) and print registers and "
                         "spills per format: comma-separated, or 'all'")
    args = ap.parse_args()
    if args.resources:
        resources(list(FORMATS) if args.resources == "all" else args.resources.split(","))
        sys.exit()
    dev = "cpu" if INTERPRET else "cuda"
    # (the interpreter reads bfloat16 tensors wrongly: numpy has no bfloat16)
    for dtype in (torch.float16,) if dev == "cpu" else (torch.bfloat16, torch.float16):
        check(dev, dtype)
    if args.time:
        time_projections(dev)
