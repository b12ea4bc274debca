"""Triton kernels that expand Q4_K / Q5_K / Q6_K blocks on the GPU (t5core.gguf's torch code does every type
anywhere; this is its fast path for the K quants on CUDA, used by PackedWeight when Triton is installed).

One kernel for the three types. A program expands ROWS sub-blocks of 32 weights: a [ROWS, 32] tile whose columns
are consecutive bytes of the block's code array, so every load of codes and every store is unit-stride. Each
element is computed as in t5core.gguf (products exact in float32, one rounding of d*q - m), times the residual
`scale` (a power of two) and rounded once to the output dtype: bit-identical to
`(dequantize(blocks, qtype, shape) * scale).to(dtype)`.

`expand(blocks, segments, shape, scale, dtype)` is a torch custom op (torch.library.triton_op), so torch.compile
and CUDA graphs take it as it is."""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

Q4_K, Q5_K, Q6_K = 12, 13, 14
BLOCK_BYTES = {Q4_K: 144, Q5_K: 176, Q6_K: 210}
ROWS = 64  # sub-blocks of 32 weights per program


@torch.compiler.assume_constant_result
def runs_on(device: torch.device) -> bool:
    """Whether the kernel runs on `device`: an NVIDIA GPU of compute capability 7.0 or newer (Triton's and
    inductor's floor; on ROCm and older GPUs the torch code runs, as everywhere else)."""
    return device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (7, 0)


@triton.jit
def _f16(ptr, mask):
    """The little-endian float16 at `ptr` (a uint8 pointer, any alignment), as float32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_min(sc_ptr, s, mask):
    """Sub-block s's 6-bit scale and min of Q4_K / Q5_K, from the 12 bytes at sc_ptr (llama.cpp's
    get_scale_min_k4). s: [R, 1] in 0..7."""
    lo = s < 4
    a = tl.load(sc_ptr + s, mask=mask, other=0)  # s < 4: the scale; s >= 4: the min's top bits
    m = tl.load(sc_ptr + s + 4, mask=mask, other=0)  # s < 4: the min; s >= 4: the low nibbles of both
    hs = tl.load(sc_ptr + s - 4, mask=mask & (s >= 4), other=0)  # s >= 4: the scale's top bits
    scale = tl.where(lo, a & 0x3F, (m & 0x0F) | ((hs >> 6) << 4))
    mins = tl.where(lo, m & 0x3F, (m >> 4) | ((a >> 6) << 4))
    return scale.to(tl.float32), mins.to(tl.float32)


@triton.jit
def _expand_kernel(src, src_start, out, out_start, scale_ptr, n_sub, QTYPE: tl.constexpr, NBYTES: tl.constexpr,
                   ROWS: tl.constexpr):
    """From byte src_start of src: uint8 blocks of NBYTES; from element out_start of out: n_sub * 32 elements
    (offsets, not views: inductor has mishandled views with a storage offset passed to user kernels,
    pytorch/pytorch#192226). Row r of the tile = sub-block r (block r // 8, s = r % 8: weights 32s .. 32s + 31 of
    the block); column l = weight 32s + l."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    l = tl.arange(0, 32)[None, :]  # [1, 32]
    mask = r < n_sub
    src += src_start
    out += out_start
    block = src + (r // 8) * NBYTES
    s = (r % 8).to(tl.int32)
    if QTYPE == 14:  # Q6_K: ql[128] qh[64] scales[16] (int8) d; s = 4 * half + t
        half = s // 4
        t = s % 4
        ql = tl.load(block + 64 * half + 32 * (t % 2) + l, mask=mask, other=0)
        qh = tl.load(block + 128 + 32 * half + l, mask=mask, other=0)
        q = ((ql >> (4 * (t // 2))) & 0x0F) | (((qh >> (2 * t)) & 3) << 4)
        sc = tl.load(block + 192 + 8 * half + 2 * t + l // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = (_f16(block + 208, mask) * sc.to(tl.float32)) * (q.to(tl.float32) - 32.0)
    else:  # Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128]; s = 2 * pair + nibble
        codes = 16 if QTYPE == 12 else 48
        qs = tl.load(block + codes + 32 * (s // 2) + l, mask=mask, other=0)
        q = (qs >> (4 * (s % 2))) & 0x0F
        if QTYPE == 13:
            qh = tl.load(block + 16 + l, mask=mask, other=0)
            q = q | (((qh >> s) & 1) << 4)
        sc, mn = _scale_min(block + 4, s, mask)
        w = (_f16(block, mask) * sc) * q.to(tl.float32) - _f16(block + 2, mask) * mn
    w = w * tl.load(scale_ptr)
    tl.store(out + r * 32 + l, w.to(out.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton_op("t5core::gguf_expand", mutates_args=())
def expand(blocks: torch.Tensor, segments: list[int], shape: list[int], scale: torch.Tensor,
           dtype: torch.dtype) -> torch.Tensor:
    """uint8 blocks -> (weight * scale).to(dtype) of `shape`. segments: (qtype, first row, rows, first byte) for each
    run of rows, flattened; every qtype in BLOCK_BYTES, every row a whole number of blocks."""
    out = torch.empty(shape, dtype=dtype, device=blocks.device)
    cols = shape[-1]
    for i in range(0, len(segments), 4):
        qtype, row0, rows, byte0 = segments[i:i + 4]
        n_sub = rows * cols // 32
        wrap_triton(_expand_kernel)[(triton.cdiv(n_sub, ROWS),)](
            blocks, byte0, out, row0 * cols, scale, n_sub,
            QTYPE=qtype, NBYTES=BLOCK_BYTES[qtype], ROWS=ROWS)
    return out
