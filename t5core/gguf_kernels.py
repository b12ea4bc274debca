"""Triton kernels that expand GGML blocks on the GPU: every quantized type t5core reads (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). t5core.gguf's torch code does every type anywhere; this is its fast path on
NVIDIA GPUs, used by PackedWeight when Triton is installed (Q8_0 weights that loading reordered into planes keep
the torch code, already at memory speed there).

One kernel for all types. A program expands ROWS runs of 32 consecutive weights: a [ROWS, 32] tile whose columns
are consecutive bytes of a block's code array (or nibbles or bit fields of them), so that code loads and stores
are unit-stride. Each element is computed as in t5core.gguf (products exact in float32, one rounding of d*q - m
or d*q + m), times the residual `scale` (a power of two) and rounded once to the output dtype: bit-identical to
`(dequantize(blocks, qtype, shape) * scale).to(dtype)`.

`expand(blocks, segments, shape, scale, dtype)` is a torch custom op (torch.library.triton_op), so torch.compile
and CUDA graphs take it as it is."""
import functools
import logging

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .runtime import compiled_code_captures

log = logging.getLogger("t5core")

ROWS = 64  # runs of 32 weights per program


@torch.compiler.assume_constant_result
def runs_on(device: torch.device) -> bool:
    """Whether the kernel runs on `device`: an NVIDIA GPU of compute capability 7.0 or newer (Triton's and
    inductor's floor; on ROCm and older GPUs the torch code runs, as everywhere else) where a kernel launches, and
    not inside a CUDA graph capture where Triton kernels cannot be captured (runtime.compiled_code_captures: under
    cudaMallocAsync, ComfyUI's default allocator, launching it there aborted the process on an H200): the torch
    code is captured there."""
    return (device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device) >= (7, 0)
            and launches(torch.cuda.current_device() if device.index is None else device.index)
            and not (torch.cuda.is_current_stream_capturing() and not compiled_code_captures()))


@functools.cache
def launches(index: int) -> bool:
    """Whether a kernel compiles and launches on cuda:index: one Q4_0 block expanded. Triton builds its launcher
    with a C compiler, which a slim container may lack; then one logged line, and the torch code runs."""
    device = torch.device("cuda", index)
    try:
        block = torch.zeros(18, dtype=torch.uint8, device=device)  # Q4_0: 32 weights in 18 bytes
        expand(block, [2, 32, 18, 0, 1, 0], [1, 32], torch.ones((), device=device), torch.float32)
        return True
    except Exception as e:  # any failure of the environment: the torch code computes the same bits
        log.warning("t5core: GGUF weights on %s expand with torch code: Triton could not run its kernel (%s: %s)",
                    device, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False


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
def _expand_kernel(src, src_start, out, out_start, scale_ptr, n_runs, QTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   NBYTES: tl.constexpr, ROWS: tl.constexpr):
    """From byte src_start of src: blocks of BLOCK weights in NBYTES; from element out_start of out: n_runs * 32
    weights (offsets, not views: inductor has mishandled views with a storage offset passed to user kernels,
    pytorch/pytorch#192226). Row r of the tile = run r of 32 weights (BLOCK 32: block r; BLOCK 256: block r // 8,
    s = r % 8, its weights 32s .. 32s + 31); column l = weight l of the run."""
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    l = tl.arange(0, 32)[None, :]  # [1, 32]
    mask = r < n_runs
    src += src_start
    out += out_start
    block = src + (r // (BLOCK // 32)) * NBYTES
    s = (r % (BLOCK // 32)).to(tl.int32)  # 0 for 32-weight blocks
    if QTYPE == 8:  # Q8_0: d qs[32] (int8)
        q = tl.load(block + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * _f16(block, mask)
    elif QTYPE <= 7:  # Q4_0: d qs[16]; Q4_1: d m qs[16]; Q5_0: d qh[4] qs[16]; Q5_1: d m qh[4] qs[16]
        codes = 2 + 2 * (QTYPE % 2) + 4 * (QTYPE // 6)  # after d, m (Q4_1, Q5_1) and qh (Q5_0, Q5_1)
        q = (tl.load(block + codes + l % 16, mask=mask, other=0) >> (4 * (l // 16))) & 0x0F
        if QTYPE >= 6:  # bit l of the little-endian uint32 qh
            qh = tl.load(block + codes - 4 + l // 8, mask=mask, other=0)
            q = q | (((qh >> (l % 8)) & 1) << 4)
        if QTYPE == 2 or QTYPE == 6:
            w = (q.to(tl.float32) - (8.0 if QTYPE == 2 else 16.0)) * _f16(block, mask)
        else:
            w = _f16(block, mask) * q.to(tl.float32) + _f16(block + 2, mask)
    elif QTYPE <= 11:  # Q2_K: scales[16] qs[64] d dmin; Q3_K: hmask[32] qs[64] scales[12] d; s = 4 * half + j
        half = s // 4
        j = s % 4
        i = 8 * half + 2 * j + l // 16  # the scale of weights l of the run: one per 16
        ql = (tl.load(block + (16 if QTYPE == 10 else 32) + 32 * half + l, mask=mask, other=0) >> (2 * j)) & 3
        if QTYPE == 10:
            sc = tl.load(block + i, mask=mask, other=0)  # a 4-bit scale and a 4-bit min
            d = _f16(block + 80, mask) * (sc & 0x0F).to(tl.float32)
            w = d * ql.to(tl.float32) - _f16(block + 82, mask) * (sc >> 4).to(tl.float32)
        else:  # 6-bit scales: the low nibble from bytes 0..7, the top two bits from bytes 8..11
            low = (tl.load(block + 96 + i % 8, mask=mask, other=0) >> (4 * (i // 8))) & 0x0F
            top = (tl.load(block + 104 + i % 4, mask=mask, other=0) >> (2 * (i // 4))) & 3
            hm = (tl.load(block + l, mask=mask, other=0) >> (4 * half + j)) & 1
            q = (ql | (hm << 2)).to(tl.float32) - 4.0
            w = (_f16(block + 108, mask) * ((low | (top << 4)).to(tl.float32) - 32.0)) * q
    elif QTYPE == 14:  # Q6_K: ql[128] qh[64] scales[16] (int8) d; s = 4 * half + t
        half = s // 4
        t = s % 4
        ql = tl.load(block + 64 * half + 32 * (t % 2) + l, mask=mask, other=0)
        qh = tl.load(block + 128 + 32 * half + l, mask=mask, other=0)
        q = ((ql >> (4 * (t // 2))) & 0x0F) | (((qh >> (2 * t)) & 3) << 4)
        sc = tl.load(block + 192 + 8 * half + 2 * t + l // 16, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = (_f16(block + 208, mask) * sc.to(tl.float32)) * (q.to(tl.float32) - 32.0)
    else:  # Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128]; s = 2 * pair + nibble
        qs = tl.load(block + (16 if QTYPE == 12 else 48) + 32 * (s // 2) + l, mask=mask, other=0)
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
    """uint8 blocks -> (weight * scale).to(dtype) of `shape`. segments: (qtype, weights per block, bytes per block,
    first row, rows, first byte) for each run of rows, flattened; every qtype a quantized one of t5core.gguf.QTYPES
    with its sizes there, every row a whole number of blocks."""
    out = torch.empty(shape, dtype=dtype, device=blocks.device)
    cols = shape[-1]
    for i in range(0, len(segments), 6):
        qtype, block, nbytes, row0, rows, byte0 = segments[i:i + 6]
        n_runs = rows * cols // 32
        wrap_triton(_expand_kernel)[(triton.cdiv(n_runs, ROWS),)](
            blocks, byte0, out, row0 * cols, scale, n_runs, QTYPE=qtype, BLOCK=block, NBYTES=nbytes, ROWS=ROWS)
    return out
