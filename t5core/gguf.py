"""GGUF T5 / UMT5 encoder files (llama.cpp naming, as city96's t5-v1_1-xxl-encoder-gguf and the WAN UMT5 GGUFs
use), with weights that may stay compressed in memory until they are used.

Three layers, usable on their own:
- `dequantize(blocks, qtype, shape, dtype)`: GGML blocks (a uint8 tensor [rows, bytes_per_row]) -> a float tensor,
  in plain torch ops (CPU, CUDA, torch.compile). Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
  Q3_K, Q4_K, Q5_K, Q6_K. Bit-identical to `gguf.quants.dequantize` (see `dequantize`'s docstring for why this
  holds under any evaluation order, FMA contraction included).
- `PackedWeight`: an nn.Module holding such blocks (a uint8 buffer, so `model.to(dtype)` leaves it alone) that
  dequantizes on call; `PackedWeight.cat` fuses q/k/v or gate/up row-wise, even when their types differ. On NVIDIA
  GPUs with Triton installed, quantized blocks expand through t5core.gguf_kernels (the same bits).
- `GGUFSource` / `open_gguf(path)`: a checkpoint source in Hugging Face T5 key naming (like the sources in
  checkpoint.py), the T5Config from the file's metadata checked against its shapes, and the `tokenizer.ggml.*`
  fields.

The `gguf` package (pip install "t5core[gguf]") is needed only to read files; it is imported inside functions.
"""
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, all_finite, native_target, raise_non_finite
from .t5_common import GELUApprox, T5Config, T5FFNType, config_error_text
from .t5_encoder import T5EncoderStack, f32_out_linear

try:  # Triton: the fast path of the quantized types on NVIDIA GPUs
    from . import gguf_kernels
except ImportError:
    gguf_kernels = None

QK_K = 256
Q8_0 = 8
# GGML type id -> (name, elements per block, bytes per block); ids and sizes as in ggml.h / gguf.constants
QTYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", QK_K, 84), 11: ("Q3_K", QK_K, 110), 12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176),
    14: ("Q6_K", QK_K, 210),
}
_QTYPE_BY_NAME = {name: i for i, (name, _, _) in QTYPES.items()}
# quantized type id -> byte offsets of the float16 fields (d; dmin or m) in one block: the only values a block holds
# that can be NaN or infinite
_FLOAT_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 10: (80, 82), 11: (108,), 12: (0, 2), 13: (0, 2),
                 14: (208,)}
SUPPORTED_TYPES = tuple(name for name, _, _ in QTYPES.values())


def qtype_id(qtype: Union[int, str]) -> int:
    """GGML type as an int: from an int, a gguf.GGMLQuantizationType, or a name such as 'Q4_K'."""
    if isinstance(qtype, str):
        if qtype.upper() not in _QTYPE_BY_NAME:
            raise ValueError(f"unsupported GGML type {qtype!r}; supported: {', '.join(SUPPORTED_TYPES)}")
        return _QTYPE_BY_NAME[qtype.upper()]
    q = int(qtype)
    if q not in QTYPES:
        raise ValueError(f"unsupported GGML type {type_name(q)}; supported: {', '.join(SUPPORTED_TYPES)}")
    return q


def type_name(qtype: int) -> str:
    """'Q4_K' for 12; for ids t5core cannot dequantize, the gguf package's name when it knows one."""
    if int(qtype) in QTYPES:
        return QTYPES[int(qtype)][0]
    try:
        from gguf import GGMLQuantizationType

        return f"{GGMLQuantizationType(int(qtype)).name} (type {int(qtype)})"
    except Exception:
        return f"unknown type {int(qtype)}"


def bytes_per_row(qtype, cols: int) -> int:
    """Bytes of one row of `cols` elements; cols must be a whole number of blocks."""
    name, block, size = QTYPES[qtype_id(qtype)]
    if cols % block:
        raise ValueError(f"{name} stores rows in blocks of {block} elements; a row of {cols} is not a whole number of blocks")
    return cols // block * size


# --------------------------------------------------------------------------------------------------
# Dequantization: per type, blocks [R, NB, bytes per block] uint8 -> [R, NB, elements per block] float32
# --------------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The little-endian float16 at byte `at` of each block, as float32 [R, NB, 1]."""
    return b[..., at:at + 2].contiguous().view(torch.float16).float()


def _bits(x: torch.Tensor, width: int) -> torch.Tensor:
    """The 8 // width fields of `width` bits of each byte, low bits first, stacked on a new dim before the last:
    [..., n] -> [..., 8 // width, n]. (Shifts from arange on the device: no host-to-device copy, CUDA-graph safe.)"""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=x.device).view(-1, 1)
    return (x.unsqueeze(-2) >> shifts) & ((1 << width) - 1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[R, NB, n] bytes -> [R, NB, 2n]: the n low nibbles, then the n high nibbles."""
    return _bits(qs, 4).flatten(-2)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[R, NB, 4] bytes (a little-endian uint32) -> bit j for j in 0..31, as [R, NB, 32]."""
    return _bits(qh, 1).transpose(-1, -2).flatten(-2)


# Offsets are taken in uint8 and reinterpreted as int8 ((q - 8) mod 256 read as int8 is q - 8), and the uint8 /
# int8 codes multiply float32 scales by type promotion, so no float copy of the codes is made; types with a min
# use addcmul(-m, d, q) = -m + d*q, which IEEE defines identically to d*q - m (signed zeros included).
def _q8_0(b):
    return b[..., 2:].view(torch.int8) * _f16(b, 0)


def _q4_0(b):
    return (_nibbles(b[..., 2:18]) - 8).view(torch.int8) * _f16(b, 0)


def _q4_1(b):
    return torch.addcmul(_f16(b, 2), _f16(b, 0), _nibbles(b[..., 4:20]))


def _q5_0(b):
    q = _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6]) << 4)
    return (q - 16).view(torch.int8) * _f16(b, 0)


def _q5_1(b):
    q = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8]) << 4)
    return torch.addcmul(_f16(b, 2), _f16(b, 0), q)


def _q2_k(b):  # scales[16] qs[64] d dmin
    R, NB = b.shape[:2]
    sc = b[..., 0:16]
    dl = (_f16(b, 80) * (sc & 0x0F)).unsqueeze(-1)  # [R, NB, 16, 1]
    ml = (_f16(b, 82) * (sc >> 4)).unsqueeze(-1)
    q = _bits(b[..., 16:80].reshape(R, NB, 2, 32), 2).reshape(R, NB, 16, 16)
    return torch.addcmul(-ml, dl, q).reshape(R, NB, QK_K)


def _q3_k(b):  # hmask[32] qs[64] scales[12] d
    R, NB = b.shape[:2]
    sc = b[..., 96:108]
    low = _bits(sc[..., 0:8], 4).flatten(-2)  # 16 low nibbles
    high = _bits(sc[..., 8:12], 2).flatten(-2)  # 16 two-bit pieces
    scale = ((low | (high << 4)) - 32).view(torch.int8)
    dl = (_f16(b, 108) * scale).unsqueeze(-1)  # [R, NB, 16, 1]
    ql = _bits(b[..., 32:96].reshape(R, NB, 2, 32), 2).reshape(R, NB, 16, 16)
    hm = _bits(b[..., 0:32], 1).reshape(R, NB, 16, 16)
    q = ((ql | (hm << 2)) - 4).view(torch.int8)  # ql - 4, or ql where the high bit is set
    return (q * dl).reshape(R, NB, QK_K)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and eight 6-bit mins of Q4_K / Q5_K, from their 12 bytes."""
    a, m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scale = torch.cat([a & 0x3F, (hi & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mins = torch.cat([m & 0x3F, (hi >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale, mins


def _q4_k(b):  # d dmin scales[12] qs[128]
    R, NB = b.shape[:2]
    sc, mn = _k_scales(b[..., 4:16])
    d = (_f16(b, 0) * sc).unsqueeze(-1)  # [R, NB, 8, 1]
    dm = (_f16(b, 2) * mn).unsqueeze(-1)
    q = _bits(b[..., 16:144].reshape(R, NB, 4, 32), 4).reshape(R, NB, 8, 32)
    return torch.addcmul(-dm, d, q).reshape(R, NB, QK_K)


def _q5_k(b):  # d dmin scales[12] qh[32] qs[128]
    R, NB = b.shape[:2]
    sc, mn = _k_scales(b[..., 4:16])
    d = (_f16(b, 0) * sc).unsqueeze(-1)
    dm = (_f16(b, 2) * mn).unsqueeze(-1)
    ql = _bits(b[..., 48:176].reshape(R, NB, 4, 32), 4).reshape(R, NB, 8, 32)
    qh = _bits(b[..., 16:48], 1)  # [R, NB, 8, 32]
    return torch.addcmul(-dm, d, ql | (qh << 4)).reshape(R, NB, QK_K)


def _q6_k(b):  # ql[128] qh[64] scales[16] (int8) d
    R, NB = b.shape[:2]
    d = (_f16(b, 208) * b[..., 192:208].view(torch.int8)).unsqueeze(-1)  # [R, NB, 16, 1]
    ql = _bits(b[..., 0:128].reshape(R, NB, 2, 64), 4).reshape(R, NB, 8, 32)
    qh = _bits(b[..., 128:192].reshape(R, NB, 2, 32), 2).reshape(R, NB, 8, 32)
    q = ((ql | (qh << 4)) - 32).view(torch.int8)
    return (q.reshape(R, NB, 16, 16) * d).reshape(R, NB, QK_K)


_DEQUANT = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k}
_PLAIN = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}


def dequantize(blocks: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGML blocks -> a float tensor of `shape` in `dtype`.

    blocks: uint8, [rows, bytes_per_row] (any shape with that many bytes in row-major order is accepted), on any
    device; rows = prod(shape[:-1]) (output features), each row a whole number of blocks of shape[-1] elements.
    qtype: an int, a gguf.GGMLQuantizationType or a name ('Q4_K').

    Exactness: every product here is exact in float32 (an fp16 scale has at most 11 significant bits and is
    multiplied by integers of at most 12 significant bits together, the most being Q6_K's int8 scale times its
    6-bit code less 32; 23 <= 24), so each element is its exact value rounded once (types with a min: d*q - m)
    or not rounded at all (the rest). So the result is bit-identical to gguf.quants.dequantize, signed zeros
    included, whatever order the products are taken in and whether or not a compiler contracts d*q - m into an
    FMA (Triton and C++ may): tested eager and with inductor on CPU, and on CUDA against the Triton kernel. Only
    NaN payloads (from NaN / inf fp16 scales, which real files do not have) could differ. Other dtypes: the
    float32 result rounded once, as gguf's float32 output converted."""
    q = qtype_id(qtype)
    shape = tuple(int(s) for s in shape)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    per_row = bytes_per_row(q, cols)
    if blocks.dtype != torch.uint8:
        raise TypeError(f"dequantize: blocks must be uint8, got {blocks.dtype}")
    if blocks.numel() != rows * per_row:
        raise ValueError(f"dequantize: {QTYPES[q][0]} {shape} needs {rows * per_row} bytes "
                         f"({rows} rows of {per_row}), got {blocks.numel()} (blocks shape {tuple(blocks.shape)})")
    b = blocks.reshape(rows, per_row)
    if q in _PLAIN:  # a float16 / bfloat16 value converts to any float dtype with one rounding, as via float32
        if not torch.compiler.is_compiling() and b.storage_offset() % QTYPES[q][2]:
            b = b.clone()  # view(dtype) needs aligned bytes (a slice of a segmented PackedWeight may not be)
        return b.view(_PLAIN[q]).reshape(shape).to(dtype)
    name, block, size = QTYPES[q]
    out = _DEQUANT[q](b.reshape(rows, cols // block, size))
    return out.reshape(shape).to(dtype)


# --------------------------------------------------------------------------------------------------
# A weight that stays compressed
# --------------------------------------------------------------------------------------------------
class PackedWeight(nn.Module):
    """Rows of a float weight kept as GGML blocks, dequantized on call: `w()` or `w(torch.bfloat16)`.

    One type: `blocks` is uint8 [rows, bytes_per_row]. Row segments of different types (a K_M file's attn_v in
    Q6_K next to attn_q / attn_k in Q4_K, fused into one QKV weight): `blocks` is the segments' bytes one after
    the other (1-D) and `segments` says where each starts. One-type Q8_0 after make_planar_ (as loading leaves it):
    the same bytes as two planes, codes then scales. `blocks` is a buffer: `.to(device)` moves it and `.to(dtype)`
    leaves it alone (it is not floating point)."""

    def __init__(self, blocks: torch.Tensor, qtype, shape, segments=None) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        rows = math.prod(self.shape[:-1])  # 1 for a vector
        # (qtype, first row, rows, first byte, bytes) per segment
        self.segments = segments or [(qtype_id(qtype), 0, rows, 0, blocks.numel())]
        if segments is None:
            per_row = bytes_per_row(qtype, self.shape[-1])
            if blocks.numel() != rows * per_row:
                raise ValueError(f"PackedWeight: {type_name(qtype_id(qtype))} {self.shape} needs "
                                 f"{rows * per_row} bytes, got {blocks.numel()}")
            blocks = blocks.reshape(rows, per_row)
        self.register_buffer("blocks", blocks)
        self.planar = False  # a Q8_0 weight whose bytes make_planar_ reordered
        # expand with gguf_kernels where it runs (when every segment is quantized)
        self.use_kernel = gguf_kernels is not None and all(q in _DEQUANT for q, *_ in self.segments)

    @torch.no_grad()
    def make_planar_(self) -> None:
        """Reorder a one-type Q8_0 weight's bytes in place into two planes: every int8 code [rows, cols], then
        every float16 scale [rows, cols // 32]. The same bytes, but dequantizing reads unit-stride aligned arrays
        (gguf_kernels.expand_q8_0_planes: 4-byte words) instead of 34-byte records, 2-byte aligned (BENCHMARKS.md).
        Other types are left as they are."""
        if self.qtype != Q8_0 or self.planar:
            return
        records = self.blocks.view(-1, 34)  # [rows * cols // 32, 34]: float16 scale, 32 codes
        self.blocks.view(-1).copy_(torch.cat([records[:, 2:].reshape(-1), records[:, :2].reshape(-1)]))
        self.planar = True

    def _planes(self, rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A planar weight's codes [R, cols // 32, 32] int8 and scales [R, cols // 32, 1] float32 (rows: all, or
        those indexed)."""
        n, cols = math.prod(self.shape[:-1]), self.shape[-1]
        flat = self.blocks.view(-1)
        codes = flat[:n * cols].view(torch.int8).view(n, cols // 32, 32)
        scales = flat[n * cols:].view(torch.float16).view(n, cols // 32, 1)
        if rows is not None:
            codes, scales = codes[rows], scales[rows]
        return codes, scales.float()

    @property
    def qtype(self) -> Optional[int]:
        """The GGML type, or None for a weight whose segments differ in type."""
        return self.segments[0][0] if len(self.segments) == 1 else None

    def forward(self, dtype: torch.dtype = torch.float32, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight times `scale` (float32, 0-d, a power of two; None: 1), rounded once to `dtype`."""
        if self.use_kernel and gguf_kernels.runs_on(self.blocks.device):
            one = torch.ones((), device=self.blocks.device) if scale is None else scale
            if self.planar:
                return gguf_kernels.expand_q8_0_planes(self.blocks, list(self.shape), one, dtype)
            segments = [x for q, row, rows, byte, _ in self.segments for x in (q, *QTYPES[q][1:], row, rows, byte)]
            return gguf_kernels.expand(self.blocks, segments, list(self.shape), one, dtype)
        if self.planar:  # int8 codes times float32 scales (times a power of two): exact, as _q8_0; one pass
            codes, scales = self._planes()
            return (codes * (scales if scale is None else scales * scale)).reshape(self.shape).to(dtype)
        if len(self.segments) == 1:
            w = dequantize(self.blocks, self.segments[0][0], self.shape)
        else:
            flat = self.blocks.view(-1)
            w = torch.cat([dequantize(flat[start:start + n], q, (rows, *self.shape[1:]))
                           for q, _, rows, start, n in self.segments])
        return (w if scale is None else w * scale).to(dtype)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows `ids` only, dequantized (an embedding lookup that never expands the whole table)."""
        if len(self.segments) != 1:
            raise ValueError("PackedWeight.embedding needs a single-type weight")
        flat = ids.reshape(-1)
        if self.planar:
            codes, scales = self._planes(flat)
            return (codes * scales).to(dtype).reshape(*ids.shape, *self.shape[1:])
        rows = dequantize(self.blocks[flat], self.segments[0][0], (flat.numel(), *self.shape[1:]), dtype)
        return rows.reshape(*ids.shape, *self.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        types = "+".join(f"{type_name(q)}[{rows}]" for q, _, rows, _, _ in self.segments)
        return f"shape={self.shape}, {types}{', planar' if self.planar else ''}, {self.nbytes} bytes"

    @classmethod
    def cat(cls, parts: list["PackedWeight"]) -> "PackedWeight":
        """Row-wise concatenation (q, k, v -> qkv; gate, up -> ff_in). Parts of one type give a one-type weight whose
        blocks are torch.cat of theirs; mixed types give a segmented weight."""
        cols = {p.shape[1:] for p in parts}
        if len(cols) != 1:
            raise ValueError(f"PackedWeight.cat: parts differ in columns: {sorted(cols)}")
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        if all(p.qtype is not None for p in parts) and len({p.qtype for p in parts}) == 1:
            return cls(torch.cat([p.blocks for p in parts]), parts[0].qtype, shape)
        segments, row, byte = [], 0, 0
        for p in parts:
            for q, r0, rows, b0, n in p.segments:
                segments.append((q, row + r0, rows, byte + b0, n))
            row, byte = row + p.shape[0], byte + p.nbytes
        return cls(torch.cat([p.blocks.reshape(-1) for p in parts]), None, shape, segments)


class PackedLinear(nn.Module):
    """What replaces a projection of T5EncoderStack whose weight stays GGML blocks: x [.., K] -> [.., N] in x's dtype
    (as nn.Linear, no bias), or float32 when f32_out (as F32OutLinear, through the same f32_out_linear). Each call
    dequantizes the weight in float32, multiplies it by `scale` (a float16 residual factor, a power of two: exact)
    and rounds it once to x's dtype: the weight an expanded load of that dtype holds."""

    def __init__(self, packed: PackedWeight, f32_out: bool) -> None:
        super().__init__()
        self.packed = packed
        self.f32_out = f32_out
        self.register_buffer("scale", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.packed(x.dtype, self.scale)
        return f32_out_linear(x, w) if self.f32_out else F.linear(x, w)


class PackedEmbedding(nn.Module):
    """What replaces vocab_embed when the table stays GGML blocks: ids [..] -> rows [.., D] in `dtype`, dequantizing
    only the rows looked up (set_weight_dtype sets `dtype`)."""

    def __init__(self, packed: PackedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.packed = packed
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.packed.embedding(ids, self.dtype)


def is_packed(model: nn.Module) -> bool:
    """Does the model keep any weight as GGML blocks?"""
    return any(isinstance(m, PackedWeight) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# GGUF names -> Hugging Face T5 names
# --------------------------------------------------------------------------------------------------
_BLOCK_NAMES = {  # llama.cpp encoder tensor (gguf.constants MODEL_TENSOR.ENC_*) -> Hugging Face suffix
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o", "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo", "ffn_norm": "layer.1.layer_norm",
}
_ENC_BLOCK = re.compile(r"^enc\.blk\.(\d+)\.([a-z_0-9]+)\.weight$")


def hf_name(gguf_name: str, gated: bool = True) -> Optional[str]:
    """'enc.blk.3.attn_q.weight' -> 'encoder.block.3.layer.0.SelfAttention.q.weight'; None for tensors that are not
    encoder weights (dec.*, output.weight). Without ffn_gate (T5 v1.0) ffn_up is the single `wi`."""
    if gguf_name == "token_embd.weight":
        return "shared.weight"
    if gguf_name == "enc.output_norm.weight":
        return "encoder.final_layer_norm.weight"
    m = _ENC_BLOCK.match(gguf_name)
    if m is None or m[2] not in _BLOCK_NAMES:
        return None
    suffix = _BLOCK_NAMES[m[2]] if (gated or m[2] != "ffn_up") else "layer.1.DenseReluDense.wi"
    return f"encoder.block.{m[1]}.{suffix}.weight"


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFTensor:
    name: str  # GGUF name
    qtype: int
    shape: tuple[int, ...]  # Hugging Face order (GGUF's ne reversed): (out_features, in_features)
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)


def _import_gguf(path):
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package: pip install 't5core[gguf]'") from e
    return gguf


# metadata value type -> (name, struct / numpy format; a string's is its length field's)
_GGUF_VALUE_TYPES = {0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"), 4: ("u32", "<I"),
                     5: ("i32", "<i"), 6: ("f32", "<f"), 7: ("bool", "?"), 8: ("string", "<Q"), 9: ("array", None),
                     10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d")}
_MAX_NAME = 65535  # bytes of a key or tensor name (GGUF's limit for keys)
# Array elements in all metadata together (a string each is a Python object): a UMT5 tokenizer (256384 tokens,
# scores, types, its charsmap) has about 1M.
_MAX_VALUES = 1 << 21


@dataclass(frozen=True)
class _Field:
    """A metadata value: types (its value type; (9, item type) for an array) and value (a number or bool; a
    string as its bytes; an array of numbers as a numpy array, of strings as a list of bytes)."""

    types: tuple[int, ...]
    value: object


class _HeaderReader:
    """A GGUF header, read from a memory map of the file: every length and count is checked against the bytes
    left (count x the fewest bytes one element takes) before it is read or looped over, so a crafted header can
    neither allocate nor loop beyond the file's size. Problems raise ValueError naming the key or tensor.
    (gguf.GGUFReader trusts the counts it reads, and keeps a numpy view per array element: 3 s and 250 MB for
    the T5 tokenizer's fields.)"""

    def __init__(self, buf) -> None:
        self.buf, self.pos, self.values = buf, 0, 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise ValueError(f"{what}: {n} bytes needed from byte {self.pos}, but the file has {len(self.buf)}: "
                             f"truncated in its header, or corrupt")

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def number(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def name(self, what: str) -> str:
        n = self.number("<Q", what)
        if n > _MAX_NAME:
            raise ValueError(f"{what} is {n} bytes long (at most {_MAX_NAME})")
        return self.take(n, what).decode("utf-8", "replace")

    def value_type(self, what: str) -> int:
        t = self.number("<I", what)
        if t not in _GGUF_VALUE_TYPES:
            raise ValueError(f"{what} has unknown value type {t}")
        return t

    def field(self, what: str) -> _Field:
        t = self.value_type(what)
        if t == 8:
            n = self.number("<Q", what)
            return _Field((8,), self.take(n, f"{what} (a string of {n} bytes)"))
        if t != 9:
            return _Field((t,), self.number(_GGUF_VALUE_TYPES[t][1], what))
        item, n = self.value_type(what), self.number("<Q", what)
        if item == 9:
            raise ValueError(f"{what} is an array of arrays, which t5core does not read")
        kind, fmt = _GGUF_VALUE_TYPES[item]
        least = struct.calcsize(fmt)
        self.need(n * least, f"{what} (an array of {n} {kind})")
        self.values += n
        if self.values > _MAX_VALUES:
            raise ValueError(f"{what}: an array of {n} {kind} brings the metadata past {_MAX_VALUES} values, "
                             f"more than any T5 tokenizer needs")
        if item == 8:
            return _Field((9, 8), [self.take(self.number("<Q", what), what) for _ in range(n)])
        return _Field((9, item), np.frombuffer(self.take(n * least, what), dtype=np.dtype(fmt)))


def _read_header(path: Path) -> tuple[dict[str, _Field], dict[str, GGUFTensor]]:
    """-> (metadata fields, {gguf name: GGUFTensor}); every problem a CheckpointError naming the file and the key
    or tensor. Each tensor's type is checked, its rows against its blocks, and its extent against the file's size
    and the next tensor's start."""
    gguf = _import_gguf(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not a readable GGUF file: no such file")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        try:
            fields, infos, data_start = _walk(_HeaderReader(buf))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from e
        finally:
            if size:
                buf.close()
    tensors = {}
    for name, dims, qtype, off in infos:
        shape = tuple(reversed(dims))
        if qtype in QTYPES:
            _, block, tsize = QTYPES[qtype]
        elif qtype in gguf.GGML_QUANT_SIZES:  # a GGML type t5core does not dequantize: an error if the encoder needs it
            block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        else:
            raise CheckpointError(f"{path}: not a readable GGUF file: tensor {name!r} has {type_name(qtype)}, which is "
                                  f"not a GGML type")
        if dims and dims[0] % block:
            raise CheckpointError(f"{path}: tensor {name!r} ({type_name(qtype)}, shape {list(shape)}): rows of "
                                  f"{dims[0]} elements are not whole blocks of {block}; its byte size disagrees with "
                                  f"its type and shape")
        t = GGUFTensor(name, qtype, shape, data_start + off, math.prod(dims) // block * tsize)
        if t.offset + t.nbytes > size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ({t.type_name}, shape {list(shape)}) ends at "
                                  f"byte {t.offset + t.nbytes} but the file has {size} bytes; re-download it")
        tensors[name] = t
    spans = sorted(tensors.values(), key=lambda t: t.offset)
    for t, after in zip(spans, spans[1:]):
        if t.offset + t.nbytes > after.offset:
            raise CheckpointError(f"{path}: tensor {t.name!r} ({t.type_name}, shape {list(t.shape)}) needs {t.nbytes} "
                                  f"bytes from byte {t.offset}, but the next tensor ({after.name!r}) starts at byte "
                                  f"{after.offset}: its byte size disagrees with its type and shape, or the file is "
                                  f"corrupt")
    return fields, tensors


def _walk(h: _HeaderReader) -> tuple[dict[str, _Field], list, int]:
    """The header's metadata fields, tensor infos (name, dims, type, offset) and where the tensor data starts."""
    if h.take(min(len(h.buf), 4), "the magic") != b"GGUF":
        raise ValueError("not a GGUF file (no GGUF magic)")
    version = h.number("<I", "the version")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (big-endian or unsupported); t5core reads little-endian versions "
                         f"2 and 3")
    n_tensors, n_kv = h.number("<Q", "the tensor count"), h.number("<Q", "the metadata count")
    h.need(n_kv * 13, f"the metadata count {n_kv} (13 bytes or more an entry)")
    fields, key = {}, None
    for i in range(n_kv):
        key = h.name(f"the name of metadata entry {i}" + (f" (after {key!r})" if key else ""))
        if key in fields:
            raise ValueError(f"metadata key {key!r} appears twice")
        fields[key] = h.field(f"metadata key {key!r}")
    alignment = fields.get("general.alignment", _Field((4,), 32))
    if alignment.types != (4,) or not alignment.value or alignment.value & (alignment.value - 1):
        raise ValueError(f"general.alignment is {alignment.value!r:.40}, not a power of two (u32)")
    h.need(n_tensors * 24, f"the tensor count {n_tensors} (24 bytes or more a tensor's info)")
    infos, names = [], set()
    for i in range(n_tensors):
        name = h.name(f"the name of tensor {i}")
        what = f"tensor {name!r}"
        if name in names:
            raise ValueError(f"{what} appears twice")
        names.add(name)
        n_dims = h.number("<I", what)
        h.need(n_dims * 8 + 12, f"{what} ({n_dims} dimensions)")
        dims = [h.number("<Q", what) for _ in range(n_dims)]
        infos.append((name, dims, h.number("<I", what), h.number("<Q", what)))
    return fields, infos, h.pos + (-h.pos) % alignment.value


def _scalar(field: _Field, key: str, path: Path):
    """A metadata scalar as Python's int, float, bool or str; a string that is not UTF-8 is a CheckpointError
    naming the key."""
    if field.types != (8,):
        return field.value
    try:
        return field.value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: metadata {key} is not valid UTF-8 ({e})") from e


_INT_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})  # metadata value types of integers
# tokenizer.ggml.* scalars and the Python type each must have
_TOKENIZER_SCALARS = {"model": str, "pre": str, "add_space_prefix": bool, "remove_extra_whitespaces": bool,
                      "add_bos_token": bool, "add_eos_token": bool, "bos_token_id": int, "eos_token_id": int,
                      "unknown_token_id": int, "padding_token_id": int}
_KIND_NAMES = {str: "a string", bool: "a bool", int: "an integer"}


def tokenizer_fields(path, fields: Optional[dict[str, _Field]] = None) -> Optional[dict]:
    """The tokenizer a GGUF file carries in `tokenizer.ggml.*`, or None: {"model": "t5" (SentencePiece unigram)
    or "llama" (BPE) ..., "tokens": [str], "scores": [float], "token_types": [int] (1 normal, 2 unknown,
    3 control, 4 user-defined, 5 unused, 6 byte), "add_space_prefix", "remove_extra_whitespaces",
    "precompiled_charsmap" (bytes), "bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"}
    (keys present in the file only; tokens decode as UTF-8, undecodable bytes as surrogate escapes). fields: the
    file's metadata, when already read. Every field is checked (its value type; scores and types, one per token;
    finite scores; types 1-6; ids that name a token): a CheckpointError names the file and the key."""
    path = Path(path)
    f = _read_header(path)[0] if fields is None else fields
    if "tokenizer.ggml.tokens" not in f:
        return None

    def fail(key, why):
        raise CheckpointError(f"{path}: tokenizer.ggml.{key} {why}")

    def array(key, kinds, what):
        field = f.get(f"tokenizer.ggml.{key}")
        if field is not None and (field.types[0] != 9 or not kinds.issuperset(field.types[1:])):
            kind = " of ".join(_GGUF_VALUE_TYPES[t][0] for t in field.types)
            fail(key, f"has value type {kind}; expected an array of {what}")
        return field

    def per_token(key, kinds, what, dtype):
        field = array(key, kinds, what)
        if field is None:
            return None
        values = field.value.astype(dtype)
        if len(values) != len(tokens):
            fail(key, f"has {len(values)} entries but tokenizer.ggml.tokens has {len(tokens)}")
        return values

    tok = array("tokens", {8}, "strings")
    tokens = [t.decode("utf-8", "surrogateescape") for t in tok.value]
    out = {"tokens": tokens}
    scores = per_token("scores", _INT_TYPES | {6, 12}, "numbers", np.float32)
    if scores is not None:
        if not np.isfinite(scores).all():
            i = int(np.flatnonzero(~np.isfinite(scores))[0])
            fail("scores", f"has {scores[i]} for token {i}; scores must be finite float32 numbers")
        out["scores"] = scores.tolist()
    types = per_token("token_type", _INT_TYPES, "integers", np.int64)
    if types is not None:
        if not ((types >= 1) & (types <= 6)).all():
            i = int(np.flatnonzero((types < 1) | (types > 6))[0])
            fail("token_type", f"has {types[i]} for token {i}; token types are 1 to 6")
        out["token_types"] = types.tolist()
    charsmap = array("precompiled_charsmap", {0, 1}, "bytes")
    if charsmap is not None:
        out["precompiled_charsmap"] = charsmap.value.tobytes()
    for key, kind in _TOKENIZER_SCALARS.items():
        field = f.get(f"tokenizer.ggml.{key}")
        if field is None:
            continue
        value = _scalar(field, f"tokenizer.ggml.{key}", path)
        if type(value) is not kind:
            fail(key, f"is {value!r:.60}; expected {_KIND_NAMES[kind]}")
        if kind is int and not 0 <= value < len(tokens):
            fail(key, f"is {value}, not a token id (tokenizer.ggml.tokens has {len(tokens)})")
        out[key] = value
    return out


def spiece_model_bytes(fields: dict) -> Optional[bytes]:
    """The SentencePiece tokenizer a GGUF file carries (tokenizer_fields, model 't5') as a serialized sentencepiece
    Unigram model, what t5core.load_tokenizer reads (as it reads the `spiece_model` ComfyUI files embed): pieces with
    their scores and types (GGUF's token types are sentencepiece's), the precompiled character map, the space and
    whitespace options, and the unk / eos / pad ids. The unused pieces llama.cpp appends to fill the embedding
    ('[PAD1]', ...) are left out, so the <extra_id_*> tokens load_tokenizer adds get T5's ids. None for other
    tokenizer models (BPE)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    if fields.get("model") != "t5":
        return None
    tokens, types = fields["tokens"], fields.get("token_types") or [1] * len(fields["tokens"])
    scores = fields.get("scores") or [0.0] * len(tokens)
    n = len(tokens)
    while n and types[n - 1] == sp_pb.ModelProto.SentencePiece.UNUSED:
        n -= 1
    proto = sp_pb.ModelProto()
    for piece, score, kind in zip(tokens[:n], scores[:n], types[:n], strict=True):
        proto.pieces.add(piece=piece.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), score=score,
                         type=kind)
    spec = proto.trainer_spec
    spec.model_type = sp_pb.TrainerSpec.UNIGRAM
    spec.unk_id = fields.get("unknown_token_id", 2)
    spec.eos_id = fields.get("eos_token_id", 1)
    spec.pad_id = fields.get("padding_token_id", 0)
    spec.bos_id = -1
    norm = proto.normalizer_spec
    norm.name = "nmt_nfkc"
    norm.precompiled_charsmap = fields.get("precompiled_charsmap", b"")
    norm.add_dummy_prefix = bool(fields.get("add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(fields.get("remove_extra_whitespaces", True))
    norm.escape_whitespaces = True
    return proto.SerializeToString()


class GGUFSource:
    """A GGUF T5 / UMT5 encoder as a checkpoint source in Hugging Face naming ('shared.weight',
    'encoder.block.0.layer.0.SelfAttention.q.weight', ...): keys, shape, get (dequantized float32), nbytes and
    read_range (the raw blocks), packed (a PackedWeight). Reads are plain reads of byte ranges (no memory map kept
    open), each with its own handle. Decoder tensors of full T5 files are left out."""

    def __init__(self, path) -> None:
        self.path = Path(path).expanduser()
        fields, tensors = _read_header(self.path)
        arch = fields.get("general.architecture")
        self.architecture = arch = None if arch is None else _scalar(arch, "general.architecture", self.path)
        if arch not in ("t5encoder", "t5"):
            raise CheckpointError(f"{self.path}: a GGUF {arch!r} model, not a T5 encoder (general.architecture "
                                  f"'t5encoder' or 't5'); t5core reads T5 / UMT5 encoder GGUF files only")
        if "enc.blk.0.attn_q.weight" not in tensors:
            sample = ", ".join(list(tensors)[:3]) or "no tensors"
            raise CheckpointError(f"{self.path}: a GGUF {arch!r} file without encoder tensors "
                                  f"('enc.blk.0.attn_q.weight' missing); its tensors start: {sample}")
        gated = "enc.blk.0.ffn_gate.weight" in tensors
        self.entries: dict[str, GGUFTensor] = {}
        for name, t in tensors.items():
            key = hf_name(name, gated)
            if key is None:
                continue
            if t.qtype not in QTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has type {type_name(t.qtype)}, which t5core "
                                      f"cannot dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
            self.entries[key] = t
        self.metadata = {k: _scalar(v, k, self.path) for k, v in fields.items()
                         if v.types[0] != 9 and not k.startswith("tokenizer.")}
        self.tokenizer = tokenizer_fields(self.path, fields)

    # --- the source interface -------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32  # what get() dequantizes to; the blocks' own type is qtype()

    def qtype(self, key: str) -> int:
        return self.entries[key].qtype

    def nbytes(self, key: str) -> int:
        return self.entries[key].nbytes

    def read_range(self, key: str, start: int, out: torch.Tensor) -> None:
        """Bytes [start, start + out.numel()) of tensor `key`'s blocks into `out` (a contiguous uint8 CPU tensor)."""
        t = self.entries[key]
        with open(self.path, "rb") as fh:
            fh.seek(t.offset + start)
            if fh.readinto(memoryview(out.numpy())) != out.numel():
                raise CheckpointError(f"{self.path}: short read for tensor {t.name!r}; the file is truncated")

    def raw(self, key: str) -> torch.Tensor:
        """Tensor `key`'s blocks as uint8 [rows, bytes_per_row]."""
        t = self.entries[key]
        buf = torch.empty(t.nbytes, dtype=torch.uint8)
        self.read_range(key, 0, buf)
        rows = math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1
        return buf.view(rows, -1)

    def packed(self, key: str, device="cpu") -> PackedWeight:
        t = self.entries[key]
        return PackedWeight(self.raw(key).to(device), t.qtype, t.shape)

    def get(self, key: str) -> torch.Tensor:
        t = self.entries[key]
        return dequantize(self.raw(key), t.qtype, t.shape, torch.float32)


def config_from_gguf(source: GGUFSource) -> T5Config:
    """T5Config from the tensors' shapes, checked against the `{arch}.*` metadata where present; every tensor's
    shape is checked against it. Errors name the file, the tensor or metadata key, and both values."""
    from gguf import Keys

    path, e = source.path, source.entries
    arch = source.architecture

    def need(gname: str) -> GGUFTensor:
        key = hf_name(gname, gated)
        if key not in e:
            raise CheckpointError(f"{path}: tensor {gname!r} is missing; a truncated or incomplete T5 encoder GGUF")
        return e[key]

    def matrix(gname: str) -> tuple[int, int]:
        shape = need(gname).shape
        if len(shape) != 2 or 0 in shape:
            raise CheckpointError(f"{path}: tensor {gname!r} has shape {shape}, not a non-empty matrix")
        return shape

    gated = any(k.endswith("DenseReluDense.wi_0.weight") for k in e)
    blocks = sorted({int(m[1]) for t in e.values() if (m := _ENC_BLOCK.match(t.name))})
    n_layers = len(blocks)
    if blocks != list(range(n_layers)):
        missing = sorted(set(range(max(blocks) + 1)) - set(blocks))
        raise CheckpointError(f"{path}: encoder blocks {missing} have no tensors (found blocks {blocks[0]}..{blocks[-1]})")
    vocab, d_model = matrix("token_embd.weight")
    inner = matrix("enc.blk.0.attn_q.weight")[0]
    buckets, heads = matrix("enc.blk.0.attn_rel_b.weight")
    ff = matrix("enc.blk.0.ffn_up.weight")[0]
    umt5 = hf_name("enc.blk.1.attn_rel_b.weight") in e
    meta = source.metadata

    def meta_check(key_template: str, value: int, what: str):
        key = key_template.format(arch=arch)
        if key in meta and meta[key] != value:
            raise CheckpointError(f"{path}: metadata {key} = {meta[key]} but {what} = {value}")

    meta_check(Keys.LLM.EMBEDDING_LENGTH, d_model, "token_embd.weight's width")
    meta_check(Keys.LLM.FEED_FORWARD_LENGTH, ff, "enc.blk.0.ffn_up.weight's rows")
    meta_check(Keys.LLM.BLOCK_COUNT, n_layers, "the number of encoder blocks in the file")
    meta_check(Keys.Attention.HEAD_COUNT, heads, "enc.blk.0.attn_rel_b.weight's heads")
    meta_check(Keys.Attention.REL_BUCKETS_COUNT, buckets, "enc.blk.0.attn_rel_b.weight's buckets")
    if inner % heads:
        raise CheckpointError(f"{path}: enc.blk.0.attn_q.weight has {inner} rows, not a multiple of {heads} heads")
    meta_check(Keys.Attention.KEY_LENGTH, inner // heads, "attn_q rows / heads")
    eps_keys = [k.format(arch=arch) for k in (Keys.Attention.LAYERNORM_RMS_EPS, Keys.Attention.LAYERNORM_EPS)]
    eps_key = next((k for k in eps_keys if k in meta), None)
    eps = meta[eps_key] if eps_key else 1e-6
    if type(eps) not in (int, float) or not (math.isfinite(eps) and 0 < eps < 1):
        raise CheckpointError(f"{path}: metadata {eps_key} is {eps!r:.60}; it must be a finite number in (0, 1)")
    try:
        config = T5Config(
            vocab_size=vocab, hidden_dim=d_model, num_layers=n_layers, n_head=heads, kv_heads=heads,
            head_dim=inner // heads, ff_dim=ff, eps=eps,
            ffn_type=T5FFNType.GEGLU if gated else T5FFNType.ReLU, gelu_approx=GELUApprox.Tanh,
            relative_attention_num_buckets=buckets, pos_emb_per_layer=umt5,
            pad_token_id=(source.tokenizer or {}).get("padding_token_id", 0),
        )
    except ValueError as e:  # pydantic's ValidationError included: a size out of range, the pad id past the vocab
        raise CheckpointError(f"{path}: the architecture from its tensor shapes and metadata is invalid: "
                              f"{config_error_text(e)}") from e
    expected = {"token_embd.weight": (vocab, d_model), "enc.output_norm.weight": (d_model,)}
    for i in range(n_layers):
        b = f"enc.blk.{i}."
        expected.update({b + "attn_q.weight": (inner, d_model), b + "attn_k.weight": (inner, d_model),
                         b + "attn_v.weight": (inner, d_model), b + "attn_o.weight": (d_model, inner),
                         b + "attn_norm.weight": (d_model,), b + "ffn_norm.weight": (d_model,),
                         b + "ffn_up.weight": (ff, d_model), b + "ffn_down.weight": (d_model, ff)})
        if gated:
            expected[b + "ffn_gate.weight"] = (ff, d_model)
        if umt5 or i == 0:
            expected[b + "attn_rel_b.weight"] = (buckets, heads)
    for gname, shape in expected.items():
        t = need(gname)
        if t.shape != shape:
            raise CheckpointError(f"{path}: tensor {gname!r} has shape {t.shape}, expected {shape} (d_model {d_model}, "
                                  f"{heads} heads of {inner // heads}, ff {ff})")
    return config


def open_gguf(path) -> tuple[GGUFSource, T5Config, Optional[dict]]:
    """-> (GGUFSource in Hugging Face key naming, T5Config, tokenizer fields or None). Reads only the header."""
    source = GGUFSource(path)
    config, fields = config_from_gguf(source), source.tokenizer
    if fields and len(fields["tokens"]) > config.vocab_size:  # llama.cpp writes one token per embedding row
        raise CheckpointError(f"{source.path}: tokenizer.ggml.tokens has {len(fields['tokens'])} tokens, more than "
                              f"the {config.vocab_size} rows of token_embd.weight")
    return source, config, fields


_PACKABLE = ("vocab_embed", "attn.qkv_proj", "attn.o_proj", "ffn.ff_in", "ffn.ff_out")


def _packed_modules(source: GGUFSource, config: T5Config) -> dict[str, list[str]]:
    """T5EncoderStack module name -> its tensors' keys in row order, for the projections and the embedding that
    stay GGML blocks: those with a part that expanding to config.dtype would make bigger (every quantized type;
    F16 / BF16 under float32). The rest (and norms, bias tables) load as plain tensors."""
    groups: dict[str, list] = {}
    for key in source.keys():
        target = native_target(key, config)
        if target is not None and target[0].removesuffix(".weight").endswith(_PACKABLE):
            name, part, parts = target
            groups.setdefault(name.removesuffix(".weight"), [None] * parts)[part] = key

    def grows(key: str) -> bool:
        q = source.qtype(key)
        return q not in _PLAIN or _PLAIN[q].itemsize < config.dtype.itemsize

    return {name: keys for name, keys in groups.items() if any(grows(k) for k in keys)}


def all_finite_blocks(blocks: torch.Tensor, qtype: int) -> torch.Tensor:
    """-> a 0-d bool tensor (no host sync): no NaN or infinite value in one tensor's `blocks` (uint8, whole
    blocks): every value of F32 / F16 / BF16, the float16 scale fields of quantized types."""
    if qtype in _PLAIN:
        return all_finite(blocks.view(_PLAIN[qtype]))
    rows = blocks.view(-1, QTYPES[qtype][2])  # [blocks, bytes per block]
    return all_finite(torch.cat([rows[:, at:at + 2] for at in _FLOAT_FIELDS[qtype]], 1).view(torch.float16))


@torch.no_grad()
def build_packed(config: T5Config, source: GGUFSource, device) -> T5EncoderStack:
    """A T5EncoderStack on `device` whose quantized projections are PackedLinear and whose quantized embedding is a
    PackedEmbedding, their blocks read from the file as they are (the gpt-fast way: built on meta, modules swapped,
    then allocated). Every parameter left (norms, bias tables, plain-float projections) is uninitialised: stream
    the checkpoint into it (weight_load.load_checkpoint_into), which skips the packed modules. NaN or infinite
    values in the blocks are a CheckpointError naming the tensor, as for other weights."""
    from .t5_encoder import F32OutLinear

    with torch.device("meta"):
        model = T5EncoderStack(config)
    packed = _packed_modules(source, config)
    for name, keys in packed.items():
        parts = [PackedWeight(torch.empty(source.nbytes(k), dtype=torch.uint8, device="meta"), source.qtype(k),
                              source.shape(k)) for k in keys]
        weight = PackedWeight.cat(parts) if len(parts) > 1 else parts[0]
        old = model.get_submodule(name)
        model.set_submodule(name, PackedEmbedding(weight, config.dtype) if name == "vocab_embed"
                            else PackedLinear(weight, isinstance(old, F32OutLinear)))
    model = model.to_empty(device=device)
    model.apply_residual_scales_from_config()
    finite = []  # (tensor name, flag): one host sync at the end
    for name, keys in packed.items():
        module = model.get_submodule(name)
        if isinstance(module, PackedLinear):
            module.scale.fill_(1.0)
        flat, at = module.packed.blocks.view(-1), 0  # parts lie one after the other (PackedWeight.cat)
        for key in keys:
            n = source.nbytes(key)
            if flat.device.type == "cpu":
                source.read_range(key, 0, flat[at:at + n])
            else:
                flat[at:at + n].copy_(source.raw(key).view(-1))
            finite.append((source.entries[key].name, all_finite_blocks(flat[at:at + n], source.qtype(key))))
            at += n
        module.packed.make_planar_()
    raise_non_finite(source.path, finite)
    return model.eval()
