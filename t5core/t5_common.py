"""Config, dtypes and the small building blocks shared by the encoder (RMSNorm, relative position buckets)."""
import math
from enum import Enum
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, field_serializer, field_validator, model_validator
from torch import FloatTensor, LongTensor, Tensor, nn

MAX_TOKENS = 8192  # the longest max_length / pad_to taken: far beyond T5's 512, small enough to allocate
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# 16-bit projection storage for float32 compute (T5Config.weight_dtype; t5_encoder.CastLinear)
CAST_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16"}


def parse_dtype(val: "str | torch.dtype") -> torch.dtype:
    """'bf16', 'bfloat16', 'torch.bfloat16' or torch.bfloat16 -> torch.bfloat16; anything else is a clear error."""
    if isinstance(val, torch.dtype):
        if val not in DTYPES.values():
            raise ValueError(f"unsupported dtype {val}; supported: {', '.join(DTYPES)}")
        return val
    name = str(val).lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {val!r}; supported: {', '.join(DTYPES)} (or bf16, fp16, fp32)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class T5AttnImpl(str, Enum):
    SDPA = "sdpa"
    Flex = "flex"


class T5FFNType(str, Enum):
    ReLU = "ReLU"  # T5 v1.0: wo(relu(wi x))
    GEGLU = "GEGLU"  # T5 v1.1, mT5, UMT5: wo(gelu(wi_0 x) * wi_1 x)


class GELUApprox(str, Enum):
    None_ = "none"
    Tanh = "tanh"


# name: (hidden_dim, heads, ff_dim, layers); head_dim 64, vocab 32128
V1_1_PRESETS = {"small": (512, 6, 1024, 8), "base": (768, 12, 2048, 12), "large": (1024, 16, 2816, 24),
                "xl": (2048, 32, 5120, 24), "xxl": (4096, 64, 10240, 24)}


# (lowest, highest) accepted for each size field: far beyond any released T5 (UMT5-XXL: vocab 256384, width 4096,
# ff 10240, 24 layers, 64 heads), yet small enough that a hostile config.json cannot ask for terabytes. Loading
# also checks every weight's shape against the config before anything is allocated.
CONFIG_LIMITS = {
    "vocab_size": (1, 1 << 22), "hidden_dim": (1, 1 << 16), "num_layers": (1, 1024), "n_head": (1, 1024),
    "kv_heads": (1, 1024), "head_dim": (1, 4096), "ff_dim": (1, 1 << 20),
    "relative_attention_num_buckets": (4, 4096), "relative_attention_max_distance": (2, 1 << 16),
}


def config_error_text(e: Exception) -> str:
    """A pydantic ValidationError (or any ValueError) -> one line naming each bad key."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"key {'.'.join(map(str, err['loc'])) or '(config)'!r}: "
                             f"{str(err['msg']).removeprefix('Value error, ')}"
                             + (f" (got {err['input']!r:.60})" if err.get("type") != "value_error" and "input" in err else "")
                             for err in errors())
        except Exception:  # noqa: BLE001 (fall back to the plain text)
            pass
    return " ".join(str(e).split())


class T5Config(BaseModel):
    """Encoder hyperparameters. Field names follow nai-t5, so its config.json files validate as they are."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="ignore")

    vocab_size: int
    hidden_dim: int
    num_layers: int
    n_head: int
    kv_heads: Optional[int] = None  # nai-t5's field; T5 has no grouped heads, so it must equal n_head
    head_dim: int
    ff_dim: int
    dropout: float = 0.0
    eps: float = 1e-6
    dtype: torch.dtype = torch.float32  # the compute dtype
    # Projection weights: None (in dtype), "fp8_e4m3fn" / "fp8_e5m2" / "fp8_e4m3fn_fast" (t5core.fp8), or
    # "float16" / "bfloat16" with dtype float32 (16-bit storage cast to float32 per call: t5_encoder.CastLinear)
    weight_dtype: Optional[str] = None
    ffn_type: T5FFNType = T5FFNType.GEGLU
    gelu_approx: GELUApprox = GELUApprox.Tanh
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # UMT5 keeps one relative-position table per layer; T5 and mT5 share block 0's.
    pos_emb_per_layer: bool = False
    scale_qk: bool = False
    pad_token_id: int = 0
    attn_impl: T5AttnImpl = T5AttnImpl.SDPA
    flex_kernel_options: dict[str, Any] = {}
    # False once the RMSNorm scales have been folded into the following projections.
    elementwise_affine: bool = True
    # Power-of-two factors already baked into the weights (t5core.fp16_scales); None means all 1.
    enc_attn_out_scales: Optional[list[float]] = None
    enc_ffn_out_scales: Optional[list[float]] = None

    @field_validator(*CONFIG_LIMITS)
    @classmethod
    def _in_range(cls, val: int, info) -> int:
        lo, hi = CONFIG_LIMITS[info.field_name]
        if not lo <= val <= hi:
            raise ValueError(f"{info.field_name} is {val}, outside [{lo}, {hi}]")
        return val

    @field_validator("eps")
    @classmethod
    def _eps_positive(cls, val: float) -> float:
        if not (math.isfinite(val) and 0 < val < 1):
            raise ValueError(f"eps (layer_norm_epsilon) is {val}; it must be a finite number in (0, 1)")
        return val

    @field_validator("enc_attn_out_scales", "enc_ffn_out_scales")
    @classmethod
    def _scales_finite(cls, val, info):
        if val is not None and not all(math.isfinite(s) and s > 0 for s in val):
            raise ValueError(f"{info.field_name} must be positive finite numbers, got {val}")
        return val

    @model_validator(mode="after")
    def _consistent(self) -> "T5Config":
        for name in ("enc_attn_out_scales", "enc_ffn_out_scales"):
            scales = getattr(self, name)
            if scales is not None and len(scales) != self.num_layers:
                raise ValueError(f"{name} has {len(scales)} entries for num_layers={self.num_layers}")
        if self.weight_dtype in CAST_DTYPES and self.dtype != torch.float32:
            raise ValueError(f"weight_dtype {self.weight_dtype!r} (16-bit storage) needs dtype float32, not {self.dtype}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(f"relative_attention_max_distance {self.relative_attention_max_distance} must exceed "
                             f"relative_attention_num_buckets / 4 ({self.relative_attention_num_buckets // 4})")
        return self

    @field_validator("dtype", mode="before")
    @classmethod
    def _parse_dtype(cls, val: Any) -> torch.dtype:
        return parse_dtype(val)

    @field_serializer("dtype")
    def _dump_dtype(self, val: torch.dtype) -> str:
        return dtype_name(val)

    @field_validator("weight_dtype")
    @classmethod
    def _check_weight_dtype(cls, val: Optional[str]) -> Optional[str]:
        from .fp8 import WEIGHT_DTYPES  # (fp8 imports this module)

        if val is not None and val not in WEIGHT_DTYPES and val not in CAST_DTYPES:
            raise ValueError(f"weight_dtype {val!r}: None, {', '.join([*WEIGHT_DTYPES, *CAST_DTYPES])}")
        return val

    @model_validator(mode="after")
    def _kv_heads_are_heads(self) -> "T5Config":
        if self.kv_heads is None:
            self.kv_heads = self.n_head
        elif self.kv_heads != self.n_head:
            raise ValueError(f"kv_heads {self.kv_heads} != n_head {self.n_head}: T5 encoders have no grouped heads")
        return self

    @classmethod
    def from_name(cls, name: str, **overrides) -> "T5Config":
        """T5 v1.1 encoder presets: small, base, large, xl, xxl."""
        if name.lower() not in V1_1_PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {list(V1_1_PRESETS)}")
        d, heads, ff, layers = V1_1_PRESETS[name.lower()]
        preset = dict(vocab_size=32128, hidden_dim=d, num_layers=layers, n_head=heads, head_dim=64,
                      ff_dim=ff)
        return cls(**{**preset, **overrides})

    @property
    def inner_dim(self) -> int:
        return self.n_head * self.head_dim


class RMSNorm(nn.Module):
    """T5 LayerNorm: no mean subtraction, no bias, computed in float32.

    eps is a per-instance tensor: float16 residual scaling divides the stream by c, and the norm stays exactly
    invariant only if eps is divided by c**2 with it; as a tensor it changes no compiled code."""

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = True, device=None) -> None:
        super().__init__()
        self.register_buffer("eps", torch.tensor(eps, device=device), persistent=False)
        self.weight = nn.Parameter(torch.ones(dim, device=device)) if elementwise_affine else None

    def forward(self, x: FloatTensor) -> FloatTensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight.float()


# torch.mm(..., out_dtype=) (torch >= 2.8): half-precision inputs, float32 output straight from the accumulator
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


# Rounding a float32 to a 16-bit float's mantissa (10 / 7 bits) on its int32 bits: add half the dropped bits' range,
# then clear them (to nearest, ties away from zero; still a float32)
_ROUND_BITS = {torch.float16: 13, torch.bfloat16: 16}


@torch.compiler.assume_constant_result  # (dynamo cannot trace the flag's getter: read once per compile)
def _f32_out_mm(dtype: torch.dtype) -> bool:
    """Whether a CUDA matmul of `dtype` inputs can write float32: torch >= 2.8, and for float16 not with float16
    accumulation switched on (torch.backends.cuda.matmul.allow_fp16_accumulation, ComfyUI's --fast), which cuBLAS
    refuses with a float32 output."""
    return _MM_OUT_DTYPE and (dtype == torch.bfloat16 or not getattr(torch.backends.cuda.matmul,
                                                                       "allow_fp16_accumulation", False))


def f32_out_linear(x: Tensor, weight: Tensor) -> FloatTensor:
    """x [.., K] @ weight[N, K].T -> [.., N] float32. On CUDA a half-precision matmul writes its fp32 accumulator
    directly, one rounding fewer than rounding to x's dtype and casting back."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _f32_out_mm(x.dtype):
        return torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
    return nn.functional.linear(x, weight).float()


@torch.compiler.assume_constant_result
def split_gemms(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether CastLinear splits its activations for `dtype` weights on this device: a CUDA GPU whose tensor cores
    multiply that dtype (float16: compute capability 7.0 and up, bfloat16: 8.0; elsewhere two 16-bit matmuls cost
    more than one in float32) into float32 (_f32_out_mm)."""
    return (device.type == "cuda" and dtype in _ROUND_BITS and _f32_out_mm(dtype)
            and torch.cuda.get_device_capability(device) >= ((7, 0) if dtype == torch.float16 else (8, 0)))


def split_linear(x: FloatTensor, weight: Tensor) -> FloatTensor:
    """x [.., K] float32 @ weight[N, K].T, weight float16 / bfloat16 -> [.., N] float32, near float32's precision on
    16-bit tensor cores: each row of x is split into two parts in weight's dtype, x = (hi + lo / c) / s, and the
    stacked parts [2M, K] go through one matmul with float32 output. float16: s is the power of two that puts the
    row's largest |value| in (2^14, 2^15], inside float16's range, and c = 2^12; bfloat16 has float32's range: s = c =
    1. hi is x rounded to the 16-bit mantissa on its bits (an integer add and mask: inductor may drop a float16
    round trip inside one kernel, never a mask), exact in weight's dtype; lo rounds x - hi, so x is kept to about
    2^-22 (float16) / 2^-16 (bfloat16) of its size, against the weight's own 2^-11 / 2^-8 (the tensor cores' float32
    accumulation rounds more than a float32 matmul does, far less than that): float32 compute on the 16-bit weights
    (ComfyUI's manual cast), at twice a 16-bit matmul's cost instead of a float32 one's. Off CUDA the matmul runs in
    float32 on the same parts (the same products; a test's view of the GPU path)."""
    xs = x.reshape(-1, x.shape[-1]).float()  # [M, K]
    if weight.dtype == torch.float16:
        amax = xs.abs().amax(-1, keepdim=True)  # [M, 1]
        s = torch.exp2((15 - torch.ceil(torch.log2(amax))).clamp(max=100))  # rows of zeros: 2^100, not inf
        xs, c = xs * s, 2.0**12
    else:
        s, c = None, 1.0
    dropped = _ROUND_BITS[weight.dtype]
    hi = ((xs.view(torch.int32) + (1 << (dropped - 1))) & -(1 << dropped)).view(torch.float32)
    parts = torch.cat([hi, (xs - hi) * c]).to(weight.dtype)  # [2M, K]
    if x.is_cuda and _f32_out_mm(weight.dtype):
        y = torch.mm(parts, weight.t(), out_dtype=torch.float32)
    else:
        y = parts.float() @ weight.float().t()
    M = xs.shape[0]
    y = y[:M] + y[M:] * (1 / c)  # [M, N]
    return (y if s is None else y / s).view(*x.shape[:-1], -1)


def relative_position_bucket(rel_pos: LongTensor, num_buckets: int = 32, max_distance: int = 128) -> LongTensor:
    """Bidirectional T5 buckets for offsets key - query: half the buckets per direction, the first half of
    those exact, the rest log-spaced up to max_distance. Same float32 arithmetic as the reference, so bucket
    boundaries agree exactly."""
    num_buckets //= 2
    buckets = (rel_pos > 0).long() * num_buckets
    dist = rel_pos.abs()
    max_exact = num_buckets // 2
    log_bucket = max_exact + (
        torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return buckets + torch.where(dist < max_exact, dist, log_bucket)


def relative_offset_bias(tables: Tensor, num_buckets: int, max_distance: int) -> FloatTensor:
    """Bucket tables [n, buckets, heads] -> bias by relative offset, [n, heads, 2*max_distance + 1] float32: entry
    j is the bias for key - query = j - max_distance. Buckets stop changing at max_distance, so one table serves
    every sequence length (see offset_rows). All tables in one gather: UMT5's 24 one by one made 414 more kernels per
    encode, about 1 ms of WAN's 11.4 ms at XXL on an H100 (BENCHMARKS.md)."""
    if max_distance <= num_buckets // 4:  # buckets are exact up to num_buckets // 4: they would not saturate
        raise ValueError(f"relative_attention_max_distance {max_distance} must exceed num_buckets / 4 "
                         f"({num_buckets // 4})")
    offsets = torch.arange(-max_distance, max_distance + 1, device=tables.device)
    buckets = relative_position_bucket(offsets, num_buckets, max_distance)  # [2M+1]
    return tables.float()[:, buckets].transpose(1, 2).contiguous()  # [n, H, 2M+1]


def offset_rows(tables: Tensor, seq_len: int) -> Tensor:
    """relative_offset_bias tables [.., 2M+1] -> the bias for every offset of seq_len tokens [.., 2L-1]: entry j
    for key - query = j - (L-1); offsets past max_distance M read the tables' end entries."""
    M = (tables.shape[-1] - 1) // 2
    offsets = torch.arange(1 - seq_len, seq_len, device=tables.device)
    return tables[..., offsets.clamp(-M, M) + M]


def gelu_fn(approx: GELUApprox):
    return lambda x: nn.functional.gelu(x, approximate="tanh" if approx == GELUApprox.Tanh else "none")


def check_token_ids(input_ids: Tensor, vocab_size: int) -> None:
    """Token ids must index the embedding: a clear ValueError instead of an IndexError deep inside (or a CUDA
    device assert). Checked only for CPU tensors (tokenizers give CPU ids), so it never adds a device sync."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a [batch, length] tensor with at least one prompt and one token, "
                         f"got shape {tuple(input_ids.shape)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids: expected integer token ids, got {input_ids.dtype}")
    if input_ids.device.type == "cpu":
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids: token id {bad} is outside the model's vocabulary [0, {vocab_size}); "
                             f"is the tokenizer the model's own?")
