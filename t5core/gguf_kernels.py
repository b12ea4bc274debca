"""Triton kernels that expand GGML blocks on the GPU: every quantized type t5core reads (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K). t5core.gguf's torch code does every type anywhere; this is its fast path on
NVIDIA GPUs, used by PackedWeight when Triton is installed.

One kernel for blocks as stored. A program expands ROWS groups of 32-weight runs: a [ROWS, 32] tile, a row per
group, whose columns are consecutive bytes of a block's code array, so that code loads and stores are unit-stride.
A group is the runs that share those bytes (a K type's nibbles or bit fields of the same 32 bytes: 2 or 4 runs;
other types: one run, a block), so each code byte is loaded once. Q4_K and Q5_K blocks (144 and 176 bytes) allow
their codes to be read as 4-byte words and worked on 4 bytes at a time; one-type Q8_0 weights, which loading
reorders into planes (PackedWeight.make_planar_), have a kernel of their own that does the same. Codes become
floats by bit operations (_exact), not by conversion instructions, which run at a fraction of the rate of float
arithmetic. Each element is computed as in t5core.gguf (products exact in float32, one rounding of d*q - m or
d*q + m), times the residual `scale` (a power of two) and rounded once to the output dtype: bit-identical to
`(dequantize(blocks, qtype, shape) * scale).to(dtype)`.

`expand(blocks, segments, shape, scale, dtype)` and `expand_q8_0_planes` are torch custom ops
(torch.library.triton_op), so torch.compile and CUDA graphs take them as they are."""
import functools
import logging

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .runtime import compiled_code_captures

log = logging.getLogger("t5core")

ROWS = 64  # groups of runs of 32 weights per program
WARPS = 4  # per program
RUNS = {10: 4, 11: 4, 12: 2, 13: 2, 14: 4}  # K types: the runs of 32 weights that share their code bytes
WORDS = (12, 13)  # Q4_K, Q5_K (blocks of 144 and 176 bytes): codes read as 4-byte words


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
def _exact(q, minus: tl.constexpr):
    """float32(q) - minus, exactly, for integers 0 <= q < 2**23 (minus an integer below 2**23): q under the exponent
    of 2**23, then a subtraction; full-rate float arithmetic where an int-to-float conversion runs at a fraction of
    that rate."""
    return (q.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + minus)


@triton.jit
def _byte_values(q, minus: tl.constexpr):
    """uint32 words [R, 8] -> their bytes [R, 32] (little-endian order), each less `minus`, as _exact: four
    bytes' bit operations in one."""
    b0 = _exact(q & 0xFF, minus)
    b1 = _exact((q >> 8) & 0xFF, minus)
    b2 = _exact((q >> 16) & 0xFF, minus)
    b3 = _exact(q >> 24, minus)
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (q.shape[0], 32))


@triton.jit
def _store(ptr, w, mask):
    """w rounded once (to nearest even) to ptr's dtype, stored."""
    tl.store(ptr, w.to(ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _expand_kernel(src, src_start, out, out_start, scale_ptr, n_groups, QTYPE: tl.constexpr, BLOCK: tl.constexpr,
                   NBYTES: tl.constexpr, RUNS: tl.constexpr, ROWS: tl.constexpr):
    """From byte src_start of src: blocks of BLOCK weights in NBYTES; from element out_start of out: n_groups groups
    of RUNS runs of 32 weights (offsets, not views: inductor has mishandled views with a storage offset passed to
    user kernels, pytorch/pytorch#192226). Row g of the tile = group g, the runs that share code bytes (K types:
    the nibbles or bit fields of the same 32 bytes; others: one run, a block); column l = byte l of those."""
    g = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    l = tl.arange(0, 32)[None, :]  # [1, 32]
    mask = g < n_groups
    src += src_start
    out += out_start + g * (32 * RUNS) + l  # [ROWS, 32]: the group's first run
    block = src + (g // (BLOCK // (32 * RUNS))) * NBYTES
    h = (g % (BLOCK // (32 * RUNS))).to(tl.int32)  # the group within its block (0 for 32-weight blocks)
    scale = tl.load(scale_ptr)
    if QTYPE == 8:  # Q8_0: d qs[32] (int8); code + 128 = the byte with its top bit flipped
        q = tl.load(block + 2 + l, mask=mask, other=0) ^ 0x80
        _store(out, _exact(q, 128) * (_f16(block, mask) * scale), mask)
    elif QTYPE <= 7:  # Q4_0: d qs[16]; Q4_1: d m qs[16]; Q5_0: d qh[4] qs[16]; Q5_1: d m qh[4] qs[16]
        codes = 2 + 2 * (QTYPE % 2) + 4 * (QTYPE // 6)  # after d, m (Q4_1, Q5_1) and qh (Q5_0, Q5_1)
        q = (tl.load(block + codes + l % 16, mask=mask, other=0) >> (4 * (l // 16))) & 0x0F
        if QTYPE >= 6:  # bit l of the little-endian uint32 qh
            qh = tl.load(block + codes - 4 + l // 8, mask=mask, other=0)
            q = q | (((qh >> (l % 8)) & 1) << 4)
        if QTYPE == 2 or QTYPE == 6:
            w = _exact(q, 8 if QTYPE == 2 else 16) * (_f16(block, mask) * scale)
        else:
            w = (_f16(block, mask) * scale) * _exact(q, 0) + _f16(block + 2, mask) * scale
        _store(out, w, mask)
    elif QTYPE <= 11:  # Q2_K: scales[16] qs[64] d dmin; Q3_K: hmask[32] qs[64] scales[12] d
        # h: the half block, whose runs j = 0..3 take 2 bits of each of its 32 code bytes
        qs = tl.load(block + (16 if QTYPE == 10 else 32) + 32 * h + l, mask=mask, other=0)
        if QTYPE == 11:
            hm = tl.load(block + l, mask=mask, other=0)  # every run's top bit: bit 4h + j
        for j in tl.static_range(4):
            i = 8 * h + 2 * j + l // 16  # the scale of weights l of run j: one per 16
            ql = (qs >> (2 * j)) & 3
            if QTYPE == 10:
                sc = tl.load(block + i, mask=mask, other=0)  # a 4-bit scale and a 4-bit min
                d = (_f16(block + 80, mask) * scale) * _exact(sc & 0x0F, 0)
                w = d * _exact(ql, 0) - (_f16(block + 82, mask) * scale) * _exact(sc >> 4, 0)
            else:  # 6-bit scales: the low nibble from bytes 0..7, the top two bits from bytes 8..11
                low = (tl.load(block + 96 + i % 8, mask=mask, other=0) >> (4 * (i // 8))) & 0x0F
                top = (tl.load(block + 104 + i % 4, mask=mask, other=0) >> (2 * (i // 4))) & 3
                q = ql | (((hm >> (4 * h + j)) & 1) << 2)
                w = ((_f16(block + 108, mask) * scale) * _exact(low | (top << 4), 32)) * _exact(q, 4)
            _store(out + 32 * j, w, mask)
    elif QTYPE == 14:  # Q6_K: ql[128] qh[64] scales[16] (int8) d
        # h: the half block, whose runs t = 0..3 take a nibble of ql_a or ql_b and 2 bits of qh
        ql_a = tl.load(block + 64 * h + l, mask=mask, other=0)  # low nibbles: t = 0, high: t = 2
        ql_b = tl.load(block + 64 * h + 32 + l, mask=mask, other=0)  # t = 1, 3
        qh = tl.load(block + 128 + 32 * h + l, mask=mask, other=0)  # 2 top bits per run
        d = _f16(block + 208, mask) * scale
        for t in tl.static_range(4):
            if t % 2 == 0:
                ql = ql_a
            else:
                ql = ql_b
            q = ((ql >> (4 * (t // 2))) & 0x0F) | (((qh >> (2 * t)) & 3) << 4)
            sc = tl.load(block + 192 + 8 * h + 2 * t + l // 16, mask=mask, other=0) ^ 0x80  # int8 + 128
            _store(out + 32 * t, (d * _exact(sc, 128)) * _exact(q, 32), mask)
    else:  # Q4_K: d dmin scales[12] qs[128]; Q5_K: d dmin scales[12] qh[32] qs[128]
        # h: the pair of runs 2h, 2h + 1, whose 32 code bytes (low nibbles, high) are read as 8 words [R, 8] and
        # worked on 4 bytes at a time
        w8 = tl.arange(0, 8)[None, :]
        qs = tl.load((block + (16 if QTYPE == 12 else 48) + 32 * h).to(tl.pointer_type(tl.uint32)) + w8, mask=mask,
                     other=0)
        if QTYPE == 13:
            qh = tl.load((block + 16).to(tl.pointer_type(tl.uint32)) + w8, mask=mask, other=0)  # run s's top bit: bit s
        d = _f16(block, mask) * scale
        dmin = _f16(block + 2, mask) * scale
        for k in tl.static_range(2):
            q = (qs >> (4 * k)) & 0x0F0F0F0F
            if QTYPE == 13:
                q = q | (((qh >> (2 * h + k)) & 0x01010101) << 4)
            sc, mn = _scale_min(block + 4, 2 * h + k, mask)
            _store(out + 32 * k, (d * sc) * _byte_values(q, 0) - dmin * mn, mask)


@triton.jit
def _expand_q8_0_planes_kernel(src, out, scale_ptr, n_blocks, d_at, ROWS: tl.constexpr):
    """_expand_kernel's Q8_0 for a weight whose blocks PackedWeight.make_planar_ reordered into planes: every
    block's 32 int8 codes from byte 0 (read as 8 aligned words), its float16 d from d_at. Row g of the tile: block
    g."""
    g = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]  # [ROWS, 1]
    mask = g < n_blocks
    q = tl.load(src.to(tl.pointer_type(tl.uint32)) + g * 8 + tl.arange(0, 8)[None, :], mask=mask, other=0)
    w = _byte_values(q ^ 0x80808080, 128) * (_f16(src + d_at + g * 2, mask) * tl.load(scale_ptr))  # code + 128
    _store(out + g * 32 + tl.arange(0, 32)[None, :], w, mask)


@triton_op("t5core::gguf_expand_q8_0_planes", mutates_args=())
def expand_q8_0_planes(planes: torch.Tensor, shape: list[int], scale: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """A planar Q8_0 weight's bytes (PackedWeight.make_planar_) -> (weight * scale).to(dtype) of `shape`."""
    out = torch.empty(shape, dtype=dtype, device=planes.device)
    if planes.storage_offset() % 4:  # codes are read as 4-byte words
        planes = planes.clone()
    n = out.numel()
    wrap_triton(_expand_q8_0_planes_kernel)[(triton.cdiv(n // 32, ROWS),)](planes, out, scale, n // 32, n, ROWS=ROWS,
                                                                         num_warps=WARPS)
    return out


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
        runs = RUNS.get(qtype, 1)
        n_groups = rows * cols // (32 * runs)
        src = blocks
        if qtype in WORDS and (blocks.storage_offset() + byte0) % 4:  # after an odd count of 210 or 110-byte blocks
            src, byte0 = blocks.reshape(-1)[byte0:byte0 + rows * cols // block * nbytes].clone(), 0
        wrap_triton(_expand_kernel)[(triton.cdiv(n_groups, ROWS),)](src, byte0, out, row0 * cols, scale, n_groups,
                                                                  QTYPE=qtype, BLOCK=block, NBYTES=nbytes, RUNS=runs,
                                                                  ROWS=ROWS, num_warps=WARPS)
    return out

