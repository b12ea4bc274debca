"""The T5 encoder stack: fused QKV and gate/up projections, a float32 residual, SDPA or flex attention.

Shapes: B batch, L tokens, D hidden_dim, H heads, Dh head_dim, I = H*Dh, F ff_dim.
"""
import warnings
from typing import Optional

import torch
from torch import BoolTensor, FloatTensor, LongTensor, Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.functional import scaled_dot_product_attention

from .fp16_scales import Scales
from .fp8 import FAST, WEIGHT_DTYPES, Fp8Linear
from .t5_common import (CAST_DTYPES, RMSNorm, T5AttnImpl, T5Config, T5FFNType, gelu_fn, f32_out_linear, offset_rows,
                        relative_offset_bias, split_gemms, split_linear)

# Eager flex attention materialises the scores; on CUDA it must run compiled to be fast. On CPU the eager
# form is the intended (small-scale) path, so its "called without torch.compile" warning is noise.
_flex_compiled = torch.compile(flex_attention, dynamic=False)
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


# Flex's kernel options when the config names none. With flex's own defaults a padding block mask made the XXL
# attention kernel take 638-658 us a layer on an H200, against 55 us with these (the usage guide's); they were as
# fast or faster at every unpadded shape measured too (BENCHMARKS.md).
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 128, "BLOCK_N": 64}


class F32OutLinear(nn.Linear):
    """A projection (no bias) whose result is consumed in float32 (the residual add, the gated activation):
    [.., K] -> [.., N] float32 (f32_out_linear)."""

    def forward(self, x: Tensor) -> FloatTensor:
        return f32_out_linear(x, self.weight)


class CastLinear(nn.Linear):
    """A bias-free projection whose weight is stored in float16 / bfloat16 for float32 compute (ComfyUI's
    manual_cast): [.., K] float32 -> [.., N] float32, the F32OutLinear contract. On a GPU with 16-bit tensor cores
    the activation is split in two 16-bit parts (split_linear: near float32's precision, two 16-bit matmuls); elsewhere
    the weight is cast to float32 in each call."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__(in_features, out_features, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        if split_gemms(x.device, self.weight.dtype):
            return split_linear(x, self.weight)
        return nn.functional.linear(x, self.weight.to(x.dtype))


def projection(config: T5Config, in_features: int, out_features: int, f32_out: bool = False,
               fp8_compute: bool = True) -> nn.Module:
    """A bias-free projection as config.weight_dtype says: in config.dtype (nn.Linear, or F32OutLinear for a
    float32 output), 16-bit weights for float32 compute (CastLinear), or fp8 weights (t5core.fp8.Fp8Linear, the
    same contract); fp8_compute=False keeps this projection out of fp8_e4m3fn_fast's fp8 matmuls."""
    if config.weight_dtype is None:
        return (F32OutLinear if f32_out else nn.Linear)(in_features, out_features, bias=False, dtype=config.dtype)
    if config.weight_dtype in CAST_DTYPES:
        return CastLinear(in_features, out_features, CAST_DTYPES[config.weight_dtype])
    return Fp8Linear(in_features, out_features, WEIGHT_DTYPES[config.weight_dtype], f32_out,
                     compute=fp8_compute and config.weight_dtype == FAST)


class T5SelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.scale = config.head_dim**-0.5 if config.scale_qk else 1.0
        self.kernel_options = dict(config.flex_kernel_options or FLEX_KERNEL_OPTIONS)
        self.qkv_proj = projection(config, config.hidden_dim, 3 * config.inner_dim)
        self.o_proj = projection(config, config.inner_dim, config.hidden_dim, f32_out=True)
        # UMT5 only: each layer owns its table [buckets, H]
        self.relative_attention_bias = (
            nn.Embedding(config.relative_attention_num_buckets, config.n_head, dtype=torch.float32)
            if has_bias_table
            else None
        )

    def forward(self, x: Tensor, bias: Tensor, block_mask: Optional[BlockMask], flex: bool,
                input_mask: Optional[BoolTensor] = None) -> Tensor:
        B, L, _ = x.shape
        qkv = self.qkv_proj(x).view(B, L, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        if flex:
            # bias: [H, 2L-1] float32, indexed by relative offset; the score stays float32 inside the kernel
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, kv_idx - q_idx + (L - 1)]

            attn = _flex_compiled if x.is_cuda else flex_attention
            out = attn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=self.scale,
                       kernel_options=self.kernel_options)
        else:
            if bias.dim() == 2:  # this layer's own offsets (UMT5): made dense here, where compiled code fuses it
                bias = dense_sdpa_bias(bias[None], input_mask, x.dtype)[0]
            # bias: [1 or B, H, L, L] in x.dtype, padding folded in
            out = scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))  # [B, L, D] float32


class T5FFN(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gated = config.ffn_type == T5FFNType.GEGLU
        # gated: rows [0, F) are wi_0 (gate), rows [F, 2F) are wi_1 (up)
        self.ff_in = projection(config, config.hidden_dim, config.ff_dim * (2 if self.gated else 1), f32_out=True)
        # fp8_e4m3fn_fast keeps wo's matmul in config.dtype: fp8 gated activations cost the most precision (t5core.fp8)
        self.ff_out = projection(config, config.ff_dim, config.hidden_dim, f32_out=True, fp8_compute=False)
        self.act = gelu_fn(config.gelu_approx) if self.gated else torch.relu

    def forward(self, x: Tensor) -> FloatTensor:
        h = self.ff_in(x)  # [B, L, 2F] or [B, L, F] float32
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.ff_out(h.to(x.dtype))  # [B, L, D] float32


class T5EncoderLayer(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.ln1 = RMSNorm(config.hidden_dim, config.eps, config.elementwise_affine)
        self.attn = T5SelfAttention(config, has_bias_table=config.pos_emb_per_layer)
        self.ln2 = RMSNorm(config.hidden_dim, config.eps, config.elementwise_affine)
        self.ffn = T5FFN(config)
        self.dtype = config.dtype  # what the norms' float32 output is cast to before each projection
        # Multipliers of the float32 residual (powers of two, t5core.fp16_scales); tensors, not Python
        # floats, so one compiled layer serves every layer whatever its scale.
        self.register_buffer("attn_res_scale", torch.ones(()), persistent=False)
        self.register_buffer("ffn_res_scale", torch.ones(()), persistent=False)

    def forward(self, x: FloatTensor, prev_ffn_out: FloatTensor, prev_ffn_scale: Tensor, bias: Tensor,
                block_mask: Optional[BlockMask] = None, flex: bool = False,
                input_mask: Optional[BoolTensor] = None) -> tuple[FloatTensor, FloatTensor]:
        """x [B, L, D] float32: the stream before the previous layer's FFN residual, which is added here, where
        it fuses with ln1 into one kernel (a separate add would cost a kernel and a pass over the stream per layer).
        -> (stream after attention, FFN output), both [B, L, D] float32: the stream after this layer is
        x_out * self.ffn_res_scale + ffn_out."""
        dtype = self.dtype
        x = x * prev_ffn_scale + prev_ffn_out
        x = x * self.attn_res_scale + self.attn(self.ln1(x).to(dtype), bias, block_mask, flex, input_mask)
        return x, self.ffn(self.ln2(x).to(dtype))

    def stream_after(self, out: tuple[FloatTensor, FloatTensor]) -> FloatTensor:
        """The residual stream after this layer, from its forward's output."""
        return out[0] * self.ffn_res_scale + out[1]


def dense_sdpa_bias(rows: Tensor, input_mask: Optional[BoolTensor], dtype: torch.dtype) -> Tensor:
    """offset_rows [n, H, 2L-1] -> [n, 1 or B, H, L, L] additive masks in dtype, padded keys at dtype's min.

    The bias depends on key - query only (Toeplitz). The row's windows of L entries (unfold: unit strides over
    query and key) are its mirror image (Hankel), and one flip copies it out: a single pass over the output,
    where indexing with an [L, L] offset matrix took several."""
    L = (rows.shape[-1] + 1) // 2
    hankel = rows.to(dtype).unfold(-1, L, 1)  # [n, H, L, L]: [.., L-1-q, k] = row[L-1-q+k]
    bias = hankel.flip(2).unsqueeze(1)  # [n, 1, H, L, L]: row[k - q + L - 1]
    if input_mask is not None:
        bias = bias.masked_fill(~input_mask.bool()[None, :, None, None, :], torch.finfo(dtype).min)
    return bias


def make_self_attn_block_mask(mask: BoolTensor, mask_pad_queries: bool = False, block_size: int = 128) -> BlockMask:
    """Padding block mask from a [B, L] key mask (True = real token). Blocks made only of padding are skipped.

    mask_pad_queries also drops pad-query rows: their outputs become meaningless (zeros), real rows are unchanged.
    Built from block-level any/all of the mask with plain tensor ops (no mask_mod evaluation over L x L, no host
    sync), so it costs microseconds and can be captured in a CUDA graph."""
    B, L = mask.shape
    n = -(-L // block_size)
    pad = (0, n * block_size - L)  # positions past L do not exist: they count for "all", not for "any"
    real_any = nn.functional.pad(mask.bool(), pad, value=False).view(B, n, block_size).any(-1)  # [B, n]
    real_all = nn.functional.pad(mask.bool(), pad, value=True).view(B, n, block_size).all(-1)  # [B, n]
    key_any, key_all = real_any[:, None, :], real_all[:, None, :]  # [B, 1(q), n(kv)]
    if mask_pad_queries:
        q_any, q_all = real_any[:, :, None], real_all[:, :, None]  # [B, n(q), 1]
        partial_or_full, full = key_any & q_any, key_all & q_all
    else:
        partial_or_full, full = key_any.expand(B, n, n), key_all.expand(B, n, n)
    partial = partial_or_full & ~full

    def to_blocks(sel: Tensor):  # [B, n, n] bool -> counts [B, 1, n], indices [B, 1, n, n] (selected first)
        counts = sel.sum(-1, dtype=torch.int32)
        order = torch.argsort(sel.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None], order[:, None]

    def keep_real_keys(b, h, q_idx, kv_idx):
        return mask[b, kv_idx]

    def keep_real_pairs(b, h, q_idx, kv_idx):
        return mask[b, kv_idx] & mask[b, q_idx]

    return BlockMask.from_kv_blocks(*to_blocks(partial), *to_blocks(full), BLOCK_SIZE=block_size,
                                    mask_mod=keep_real_pairs if mask_pad_queries else keep_real_keys, seq_lengths=(L, L))


class T5EncoderStack(nn.Module):
    """Token ids -> embeddings: the math only. How it runs (compiled, CUDA graphs, length buckets, the float16
    overflow check) is t5core.runtime's business."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.vocab_embed = nn.Embedding(config.vocab_size, config.hidden_dim, dtype=config.dtype)
        self.relative_attention_bias = (
            None if config.pos_emb_per_layer
            else nn.Embedding(config.relative_attention_num_buckets, config.n_head, dtype=torch.float32)
        )
        self.layers = nn.ModuleList([T5EncoderLayer(config) for _ in range(config.num_layers)])
        self.ln = RMSNorm(config.hidden_dim, config.eps)  # final norm keeps its scale: nothing follows to fold it into
        # The first layer's "previous FFN scale". A buffer like the layers' own scales: a tensor made in
        # inference mode has other dispatch keys, which made the first layer a second compiled entry per shape.
        self.register_buffer("unit_scale", torch.ones(()), persistent=False)
        self.apply_residual_scales_from_config()

    def apply_residual_scales_from_config(self) -> None:
        """Set per-layer residual multipliers and norm eps from config.enc_*_scales (t5core.fp16_scales).

        Layer i multiplies the residual by its attention scale, then by its FFN scale; every norm reads the
        stream at the cumulative scale c so far, so its eps becomes eps * c**2 (RMSNorm(c x; c^2 eps) = RMSNorm(x))."""
        scales = Scales.from_config(self.config)
        self.unit_scale.fill_(1.0)  # buffers come uninitialised out of to_empty()
        c = 1.0
        for layer, sa, sf in zip(self.layers, scales.attn, scales.ffn):
            layer.ln1.eps.fill_(self.config.eps * c * c)
            c *= sa
            layer.ln2.eps.fill_(self.config.eps * c * c)
            c *= sf
            layer.attn_res_scale.fill_(sa)
            layer.ffn_res_scale.fill_(sf)
        self.ln.eps.fill_(self.config.eps * c * c)

    def bind_score_mods(self, seq_len: int) -> None:
        """The usage guide's call after loading weights. Nothing is bound ahead: every forward gathers the bias for
        its own length from one [H, 2*max_distance+1] table (T5's buckets stop changing at max_distance), so any
        seq_len works; it is only checked."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"bind_score_mods: seq_len must be a positive int, got {seq_len!r}")

    @torch.no_grad()
    def set_weight_dtype(self, dtype: torch.dtype) -> "T5EncoderStack":
        """Cast the projection and embedding weights (norms and bias tables stay float32), in place. Weights kept
        as GGUF blocks (t5core.gguf) stay as they are: they dequantize to the layer's dtype on use. 16-bit storage
        for float32 compute (CastLinear) is refused: load the model again in the dtype wanted."""
        if self.config.weight_dtype in CAST_DTYPES:
            raise ValueError(f"set_weight_dtype: the projections store {self.config.weight_dtype} weights for float32 "
                             f"compute; load the model again with the dtype and weight_dtype wanted")
        for mod in [self.vocab_embed, *(m for layer in self.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj,
                                                                                layer.ffn.ff_in, layer.ffn.ff_out))]:
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                mod.weight.data = mod.weight.data.to(dtype)
        if not isinstance(self.vocab_embed, nn.Embedding):  # a packed table: its rows come out in `dtype`
            self.vocab_embed.dtype = dtype
        for layer in self.layers:
            layer.dtype = dtype
        self.config = self.config.model_copy(update={"dtype": dtype})
        return self

    def offset_bias(self, device: Optional[torch.device] = None) -> Tensor:
        """[1 or num_layers, H, 2*max_distance + 1] float32 on `device` (None: the tables'): the bias by relative
        offset, from the bucket tables (an offloading manager may have left some of them elsewhere)."""
        tables = ([self.relative_attention_bias.weight] if self.relative_attention_bias is not None
                  else [layer.attn.relative_attention_bias.weight for layer in self.layers])
        device = tables[0].device if device is None else device
        cfg = self.config
        return relative_offset_bias(torch.stack([t.to(device) for t in tables]), cfg.relative_attention_num_buckets,
                                    cfg.relative_attention_max_distance)

    def forward(
        self,
        input_ids: Optional[LongTensor],
        input_mask: Optional[BoolTensor] = None,
        block_mask: Optional[BlockMask] = None,
        embeds: Optional[FloatTensor] = None,
        num_layers: Optional[int] = None,
    ) -> FloatTensor:
        """input_ids [B, L] -> embeddings [B, L, D] float32.

        input_mask [B, L] (True = real token) masks padded keys; flex turns it into the padding block mask
        (make_self_attn_block_mask(input_mask)) unless given a block_mask, such as one that also drops pad
        queries. embeds [B, L, D] replace vocab_embed(input_ids) (pass input_ids=None): token embeddings with
        others spliced in, as ComfyUI's textual inversions. num_layers runs only the first layers, then the final
        norm (ComfyUI's "hidden layer" output)."""
        inputs = input_ids if embeds is None else embeds
        L = inputs.shape[1]
        flex = self.config.attn_impl == T5AttnImpl.Flex
        rows = offset_rows(self.offset_bias(inputs.device), L)  # [n, H, 2L-1]: a few KB
        if flex and input_mask is not None and block_mask is None:
            block_mask = make_self_attn_block_mask(input_mask)
        # SDPA with one table for all layers: the dense bias once per call. Per-layer tables (UMT5) become dense in
        # each layer: all at once they would take n*B*H*L*L.
        biases = dense_sdpa_bias(rows, input_mask, self.config.dtype) if not flex and len(rows) == 1 else rows
        # only a layer that makes its own dense bias takes the mask: otherwise it is a guard without a use
        layer_mask = input_mask if not flex and biases.dim() == 3 else None
        x = (self.vocab_embed(input_ids) if embeds is None else embeds).float()  # [B, L, D]
        ffn_out, ffn_scale = torch.zeros_like(x), self.unit_scale  # nothing pending before the first layer
        for i, layer in enumerate(self.layers[:num_layers]):
            bias = biases[i if len(biases) > 1 else 0]  # offsets [H, 2L-1], or SDPA's dense [1 or B, H, L, L]
            x, ffn_out = layer(x, ffn_out, ffn_scale, bias, block_mask, flex, layer_mask)
            ffn_scale = layer.ffn_res_scale
        return self.ln(x * ffn_scale + ffn_out)
