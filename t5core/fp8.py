"""Float8 weights: stored as float8 with a float32 scale per output row, dequantized (or multiplied in fp8) inside
the layer's forward.

weight_dtype names follow ComfyUI's loaders:
- "fp8_e4m3fn" / "fp8_e5m2": fp8 storage. Each projection keeps weight [N, K] in float8 and scale [N] float32
  (w = weight * scale[:, None]); the forward dequantizes into the compute dtype just before the matmul, so memory
  holds the fp8 weights plus one projection's dequantized copy.
- "fp8_e4m3fn_fast": the same storage, and on CUDA GPUs with compute capability >= 8.9 the activations are
  quantized per token (e4m3, scale = row amax / 448) and multiplied in fp8 by torch._scaled_mm with row-wise
  scales and Hopper's fast accumulation (on the H200 4% faster at 1x512 and 7% at 8x512, with the same error to
  three digits). ff_out (T5's `wo`) keeps the dequantizing matmul: with all four projections' activations in fp8
  the error is 1.39x fp8 storage's on the H200, with three 1.28x, under the 1.3x t5core allows (both:
  benchmarks/2026-12-04_h200_fp8_variants.log). By projection, ff_in's fp8 input costs the most precision and
  `wo`'s the next (benchmarks/fp8_activation_error.py); ff_in stays in fp8 because it is the largest GEMM.
  Elsewhere (CPU, older GPUs) it is fp8 storage; Encoder.encode logs that once.

Row-wise scales make fused projections trivially right: q|k|v and gate|up rows keep their own parts' scales, so an
fp8 file's bytes and per-tensor scales are used as they are, never re-quantized.
"""
import functools
import logging
from typing import Optional

import torch
from torch import FloatTensor, Tensor, nn

from .t5_common import f32_out_linear

log = logging.getLogger("t5core")

WEIGHT_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FAST = "fp8_e4m3fn_fast"
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def is_fp8(t: Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def fp8_name(dtype: torch.dtype) -> str:
    """torch.float8_e4m3fn -> "fp8_e4m3fn"."""
    return "fp8_" + str(dtype).removeprefix("torch.float8_")


def quantize_rows(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, FloatTensor]:
    """w [N, K] (any float dtype) -> (weight [N, K] in fp8 `dtype`, scale [N] float32) with w ~ weight * scale[:, None]:
    scale = amax(|row|) / finfo(dtype).max, rows of zeros get scale 1."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    return to_fp8(w / scale[:, None], dtype), scale


def quantize_tensor(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, FloatTensor]:
    """w [N, K] -> (weight [N, K] fp8, scale [] float32): one scale for the whole tensor (ComfyUI's scaled fp8)."""
    w = w.float()
    amax = w.abs().amax()
    scale = amax / torch.finfo(dtype).max if amax > 0 else torch.ones_like(amax)
    return to_fp8(w / scale, dtype), scale


def per_tensor_scale(weight: Tensor, scale: FloatTensor, dtype: torch.dtype) -> tuple[Tensor, FloatTensor]:
    """fp8 rows weight [N, K] with scale [N] -> (weight [N, K], scale []) with one scale: the bytes as they are when
    every row has the same scale and dtype is theirs, else re-quantized from the dequantized rows."""
    if weight.dtype == dtype and bool((scale == scale[0]).all()):
        return weight, scale[0].clone()
    return quantize_tensor(dequantize(weight, scale, torch.float32), dtype)


def to_fp8(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Round to fp8, clamped to its range (a value rounding past the maximum must not become NaN)."""
    fmax = torch.finfo(dtype).max
    return x.clamp(-fmax, fmax).to(dtype)


def dequantize(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """weight [N, K] fp8, scale [N] float32 -> [N, K] in dtype, rounded once."""
    return (weight.float() * scale[:, None]).to(dtype)


def quantize_tokens(x: Tensor) -> tuple[Tensor, FloatTensor]:
    """x [M, K] -> (e4m3 [M, K], scale [M, 1] float32) with x ~ xq * scale, scale = amax(|row|) / 448: plain torch
    ops, which inductor fuses into the kernel that produces x."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    return to_fp8(x.float() / scale, torch.float8_e4m3fn), scale


@functools.cache
def fp8_matmul_support(device: torch.device) -> tuple[bool, bool]:
    """-> (torch._scaled_mm with row-wise scales runs on `device`, it can write float32). CUDA with compute
    capability >= 8.9 only; float32 output is probed once (cuBLAS has it, older fallbacks write only bf16)."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        return False, False
    a = torch.ones(32, 32, device=device, dtype=torch.float8_e4m3fn)
    scale = torch.ones(32, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=scale, scale_b=scale.t().contiguous(), out_dtype=torch.float32)
        return True, True
    except RuntimeError:
        return True, False


class Fp8Linear(nn.Module):
    """A bias-free projection with fp8 weights: [.., K] -> [.., N], a drop-in for nn.Linear (f32_out=False: the
    output in the input's dtype) or t5_encoder.F32OutLinear (f32_out=True: float32 output).

    weight [N, K] float8 and scale [N] float32 are both parameters (the runtime's CUDA graphs track their
    addresses; patchers move and count them). compute=True multiplies in fp8 where the weights' device can
    (fp8_matmul_support, re-checked whenever the module moves), else dequantizes."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, f32_out: bool = False,
                 compute: bool = False, device=None) -> None:
        super().__init__()
        if dtype not in FP8_DTYPES or (compute and dtype != torch.float8_e4m3fn):
            raise ValueError(f"Fp8Linear: unsupported weight dtype {dtype} (compute={compute})")
        self.in_features, self.out_features = in_features, out_features
        self.f32_out, self.compute = f32_out, compute
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(out_features, device=device), requires_grad=False)
        self._update_fp8_mm()

    def _update_fp8_mm(self) -> None:
        """fp8_mm: multiply in fp8 (compute, the weights' device can, shapes multiples of 16, as _scaled_mm
        needs); mm_out_dtype: what _scaled_mm writes (Python attributes: compiled code guards on them)."""
        can, f32 = fp8_matmul_support(self.weight.device)
        self.fp8_mm = self.compute and can and self.in_features % 16 == 0 and self.out_features % 16 == 0
        self.mm_out_dtype = torch.float32 if self.f32_out and f32 else torch.bfloat16

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(), .cuda(), to_empty(): the device may have changed
        self._update_fp8_mm()
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}, "
                f"f32_out={self.f32_out}, compute={self.compute}")

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8_mm and x.is_cuda:
            return self.fp8_matmul(x)
        w = dequantize(self.weight, self.scale, x.dtype)
        return f32_out_linear(x, w) if self.f32_out else nn.functional.linear(x, w)

    def fp8_matmul(self, x: Tensor) -> Tensor:
        """x [.., K] -> [.., N] through torch._scaled_mm: x quantized per token (quantize_tokens), scale_a [M, 1]
        and scale_b [1, N] float32. float32 out where f32_out and the device can, else bf16 (cast to the output
        dtype)."""
        xq, scale_a = quantize_tokens(x.reshape(-1, x.shape[-1]))
        out = torch._scaled_mm(xq, self.weight.t(), scale_a=scale_a, scale_b=self.scale[None, :],
                               out_dtype=self.mm_out_dtype, use_fast_accum=True)
        out = out.to(torch.float32 if self.f32_out else x.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def resolve_weight_dtype(requested, compute_dtype: torch.dtype, stored: torch.dtype, where) -> Optional[str]:
    """load_encoder's weight_dtype -> T5Config.weight_dtype (None: projections in the compute dtype).

    "auto" keeps an fp8 file's weights fp8 and loads others in the compute dtype; "fp8_e4m3fn", "fp8_e4m3fn_fast"
    and "fp8_e5m2" quantize other files as they stream in, and take an fp8 file of that dtype as it is (never
    re-quantized: another fp8 dtype is an error); the compute dtype's own name expands an fp8 file; with float32
    compute, "float16" / "bfloat16" store other files' projections in 16 bits (an fp8 file's: an error)."""
    from .t5_common import dtype_name, parse_dtype

    requested = "auto" if requested is None else str(requested).removeprefix("torch.")
    if requested == "auto":
        return fp8_name(stored) if stored in FP8_DTYPES else None
    if requested in WEIGHT_DTYPES:
        if stored in FP8_DTYPES and stored != WEIGHT_DTYPES[requested]:
            raise ValueError(f"{where} stores {fp8_name(stored)} weights: weight_dtype={requested!r} would "
                             f"re-quantize them; use 'auto' (keep them) or the compute dtype (expand them)")
        return requested
    try:
        wanted = parse_dtype(requested)
    except ValueError:
        wanted = None
    if wanted == compute_dtype:
        return None
    if wanted is not None and compute_dtype == torch.float32:  # float16 / bfloat16 storage
        if stored in FP8_DTYPES:
            raise ValueError(f"{where} stores {fp8_name(stored)} weights: weight_dtype={requested!r} would "
                             f"re-quantize them; use 'auto' (keep them) or 'float32' (expand them)")
        return dtype_name(wanted)
    raise ValueError(f"unknown weight_dtype {requested!r}: use auto, {', '.join(WEIGHT_DTYPES)}, the compute dtype "
                     f"({dtype_name(compute_dtype)}) to expand fp8 weights, or float16 / bfloat16 with float32 compute")


def log_compute_fallback(device: torch.device) -> None:
    """The one line saying fp8_e4m3fn_fast runs as fp8 storage on this device."""
    _log_once(str(device))


@functools.cache
def _log_once(device: str) -> None:
    log.warning("t5core: %s on %s: fp8 matmuls need a CUDA GPU with compute capability >= 8.9; using fp8 "
                "storage (weights dequantized before each matmul)", FAST, device)
