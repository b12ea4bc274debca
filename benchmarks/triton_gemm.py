"""Triton GEMMs with fused epilogues, tried for the encoder's projections on Hopper (not used by t5core).

    plain:     out[M, N] = x[M, K] @ w[N, K]^T in x's dtype                            (QKV)
    residual:  out[M, N] f32 = residual[M, N] f32 * scale + x @ w^T                   (attention-out, FFN-out)
    geglu:     out[M, F] x.dtype = gelu_tanh(x @ w[:F]^T) * (x @ w[F:]^T)            (fused wi_0 / wi_1)

benchmarks/gemm_probe.py and gemm_probe_tma.py time them against cuBLAS at the XXL shapes; cuBLAS won in the
encoder (BENCHMARKS.md), so t5core keeps torch.mm. Kept so the experiment can be rerun.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

PLAIN, RESIDUAL, GEGLU = 0, 1, 2


class TileConfig(NamedTuple):
    block_m: int
    block_n: int  # geglu: columns of each of the two halves
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# (epilogue, N, K, M <= 1024) -> tile: the one shape where this kernel beat cuBLAS in isolation (gemm_probe.py)
TILES: dict[tuple[int, int, int, bool], TileConfig] = {
    (RESIDUAL, 4096, 4096, True): TileConfig(128, 128, 64, 8, 8, 4),  # XXL attention-out: 36 vs 47 us at M = 512
}


def tile_for(epilogue: int, m: int, n: int, k: int) -> Optional[TileConfig]:
    return TILES.get((epilogue, n, k, m <= 1024))


if triton is not None:

    @triton.jit
    def grouped_tile(pid, M, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Program id -> (tile row, tile column), GROUP_M tile rows at a time, so neighbouring programs share w
        tiles in L2."""
        n_tiles_n = N // BLOCK_N
        in_group = GROUP_M * n_tiles_n
        first_m = (pid // in_group) * GROUP_M
        group_size = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        return first_m + (pid % in_group) % group_size, (pid % in_group) // group_size

    @triton.jit
    def _gemm_kernel(x_ptr, w_ptr, out_ptr, res_ptr, scale_ptr, M, N: tl.constexpr, K: tl.constexpr,
                     up_row: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # x [M, K], w [rows, K], out / residual [M, N], all row-major. Grouped tile order keeps w in L2.
        # Only M varies at run time; N, K and the gate/up split are per-projection constants.
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows = tl.where(offs_m < M, offs_m, 0)  # rows past M read row 0 and are never stored: no load masks
        x_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + offs_n[None, :] * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N], w^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, K, BLOCK_K):
            a = tl.load(x_ptrs)
            acc = tl.dot(a, tl.load(w_ptrs), acc)
            if EPILOGUE == 2:
                acc_up = tl.dot(a, tl.load(w_ptrs + up_row * K), acc_up)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out_offs = offs_m[:, None] * N + offs_n[None, :]
        keep = offs_m[:, None] < M
        if EPILOGUE == 1:
            acc = tl.load(res_ptr + out_offs, mask=keep) * tl.load(scale_ptr) + acc
        if EPILOGUE == 2:  # gelu_tanh(g) = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3))
            acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)) * acc_up
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=keep)

    def _launch(x: Tensor, w: Tensor, out: Tensor, res: Tensor, scale: Tensor, up_row: int, epilogue: int,
                tile: TileConfig) -> None:
        M, K = x.shape
        N = out.shape[1]
        grid = (triton.cdiv(M, tile.block_m) * (N // tile.block_n),)
        _gemm_kernel[grid](
            x, w, out, res, scale, M, N, K, up_row, EPILOGUE=epilogue, BLOCK_M=tile.block_m,
            BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m, num_warps=tile.num_warps,
            num_stages=tile.num_stages)


def linear(x: Tensor, w: Tensor) -> Tensor:
    """x [M, K] half, w [N, K] half -> x @ w^T, [M, N] in x's dtype."""
    out = x.new_empty(x.shape[0], w.shape[0])
    _launch(x, w, out, out, out, 0, PLAIN, tile_for(PLAIN, x.shape[0], w.shape[0], x.shape[1]))
    return out


def linear_add_residual(x: Tensor, w: Tensor, residual: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] half, w [N, K] half, residual [M, N] f32, scale [] f32 -> residual * scale + x @ w^T, f32."""
    out = torch.empty_like(residual)
    _launch(x, w, out, residual, scale, 0, RESIDUAL, tile_for(RESIDUAL, x.shape[0], w.shape[0], x.shape[1]))
    return out


def linear_geglu(x: Tensor, w: Tensor) -> Tensor:
    """x [M, K] half, w [2F, K] half (gate rows, then up rows) -> gelu_tanh(x @ w[:F]^T) * (x @ w[F:]^T), [M, F]
    in x's dtype."""
    f = w.shape[0] // 2
    out = x.new_empty(x.shape[0], f)
    _launch(x, w, out, out, out, f, GEGLU, tile_for(GEGLU, x.shape[0], f, x.shape[1]))
    return out
