"""The T5 encoder stack: fused QKV and gate/up projections, a float32 residual, SDPA or flex attention.

Shapes: B batch, L tokens, D hidden_dim, H heads, Dh head_dim, I = H*Dh, F ff_dim.
"""
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import BoolTensor, FloatTensor, LongTensor, Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.functional import scaled_dot_product_attention

from .t5_common import (RMSNorm, T5AttnImpl, T5Config, T5FFNType, check_token_ids, gelu_fn, offset_rows,
                         relative_offset_bias)

# Eager flex attention materialises the scores; on CUDA it must run compiled to be fast. On CPU the eager
# form is the intended (small-scale) path, so its "called without torch.compile" warning is noise.
_flex_compiled = torch.compile(flex_attention, dynamic=False)
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


# Flex's kernel options when the config names none. With flex's own defaults a padding block mask made the XXL
# attention kernel take 638-658 us a layer on an H200, against 55 us with these (the usage guide's); they were as
# fast or faster at every unpadded shape measured too (benchmarks/flex_pad_probe.py).
FLEX_KERNEL_OPTIONS = {"BLOCK_M": 128, "BLOCK_N": 64}

# torch.mm(..., out_dtype=) (torch >= 2.8): half-precision inputs, float32 output straight from the accumulator
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


class NonFiniteOutputError(FloatingPointError):
    """A float16 forward overflowed; the message names the first layer that produced inf/NaN."""


class F32OutLinear(nn.Linear):
    """A projection whose result is consumed in float32 (the residual add, the gated activation): on CUDA the
    half-precision matmul writes its fp32 accumulator directly, one rounding fewer. [.., K] -> [.., N] float32."""

    def forward(self, x: Tensor) -> FloatTensor:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE:
            return torch.mm(x.reshape(-1, x.shape[-1]), self.weight.t(), out_dtype=torch.float32).view(*x.shape[:-1], -1)
        return super().forward(x).float()


class T5SelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_bias_table: bool) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.scale = config.head_dim**-0.5 if config.scale_qk else 1.0
        self.kernel_options = dict(config.flex_kernel_options or FLEX_KERNEL_OPTIONS)
        self.qkv_proj = nn.Linear(config.hidden_dim, 3 * config.inner_dim, bias=False, dtype=config.dtype)
        self.o_proj = F32OutLinear(config.inner_dim, config.hidden_dim, bias=False, dtype=config.dtype)
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
        self.ff_in = F32OutLinear(config.hidden_dim, config.ff_dim * (2 if self.gated else 1), bias=False, dtype=config.dtype)
        self.ff_out = F32OutLinear(config.ff_dim, config.hidden_dim, bias=False, dtype=config.dtype)
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
        # Multipliers of the float32 residual (powers of two, see scale_residuals_enc); tensors, not Python
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
        dtype = self.attn.o_proj.weight.dtype
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
    where indexing with an [L, L] offset matrix took several (benchmarks/bias_table_probe.py)."""
    L = (rows.shape[-1] + 1) // 2
    hankel = rows.to(dtype).unfold(-1, L, 1)  # [n, H, L, L]: [.., L-1-q, k] = row[L-1-q+k]
    bias = hankel.flip(2).unsqueeze(1)  # [n, 1, H, L, L]: row[k - q + L - 1]
    if input_mask is not None:
        bias = bias.masked_fill(~input_mask.bool()[None, :, None, None, :], torch.finfo(dtype).min)
    return bias


def length_bucket(n: int) -> int:
    """The length a compiled encoder runs n tokens at: 16 up to 16 tokens, then four lengths per doubling (20,
    24, 28, 32, 40, ..., 448, 512, 640, ...). Compiled code and CUDA graphs are made per shape, and dynamo stops
    at a fixed number of shapes; these are 21 shapes up to 512 tokens, for at most 25% more tokens above 16."""
    if n <= 16:
        return 16
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


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


def _allow_many_compiled_shapes() -> None:
    """Every model and shape in the process shares one compiled code object (the layer's forward, or the CPU's
    _embed_and_layers), an entry per fixed shape, dtype and mask kind: dynamo's default limit of 8 entries made
    the ninth a hard error under fullgraph. encode() pads to 21 lengths up to 512 tokens (length_bucket), each
    with and without a mask, per batch size and model: raise the process's limit to at least 256."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)


class T5EncoderStack(nn.Module):
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
        self._offset_bias: Optional[Tensor] = None  # [1 or num_layers, H, 2M+1] float32, for every length
        self.cuda_graphs = True  # used by encode() once the layers are compiled
        self.sharded = False  # FSDP2 (t5core.distributed.load_fsdp)
        self._graphs: dict[tuple, tuple] = {}  # (B, L, padded) -> (graph, static (ids, mask), static output)
        self._graph_pool, self._graph_ptrs = None, None
        self._param_slots: Optional[list[tuple[dict, str]]] = None  # (owner's _parameters, name), see _weight_ptrs
        self._frozen_forward: Optional[Callable] = None  # CPU compile_for_inference: compiled _embed_and_layers
        self.apply_residual_scales_from_config()

    # -- residual scaling bookkeeping ----------------------------------------------------------------
    def apply_residual_scales_from_config(self) -> None:
        """Set per-layer residual multipliers and norm eps from config.enc_*_scales.

        Layer i multiplies the residual by its attention scale, then by its FFN scale; every norm reads the
        stream at the cumulative scale c so far, so its eps becomes eps * c**2 (RMSNorm(c x; c^2 eps) = RMSNorm(x))."""
        attn_scales, ffn_scales = self.config.residual_scales()
        self.unit_scale.fill_(1.0)  # buffers come uninitialised out of to_empty()
        c = 1.0
        for layer, sa, sf in zip(self.layers, attn_scales, ffn_scales):
            layer.ln1.eps.fill_(self.config.eps * c * c)
            c *= sa
            layer.ln2.eps.fill_(self.config.eps * c * c)
            c *= sf
            layer.attn_res_scale.fill_(sa)
            layer.ffn_res_scale.fill_(sf)
        self.ln.eps.fill_(self.config.eps * c * c)

    # -- position bias -------------------------------------------------------------------------------
    def bind_score_mods(self, seq_len: int) -> None:
        """Precompute the relative-position bias table (done lazily otherwise). One table serves every length,
        seq_len included: T5's buckets stop changing at relative_attention_max_distance."""
        self._offset_bias_table()

    def _offset_bias_table(self) -> Tensor:
        if self._offset_bias is None:
            tables = ([self.relative_attention_bias.weight] if self.relative_attention_bias is not None
                      else [layer.attn.relative_attention_bias.weight for layer in self.layers])
            cfg = self.config
            self._offset_bias = torch.stack([
                relative_offset_bias(t, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance)
                for t in tables
            ])
        return self._offset_bias

    def invalidate_caches(self) -> None:
        """Forget the cached position bias, CUDA graphs and the CPU's frozen compilation (which holds the old
        weights; the model runs eagerly until compiled again): call after changing weights in place."""
        self._offset_bias = None
        self._drop_graphs()
        self._param_slots = None
        self._frozen_forward = None

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._graph_pool = None  # the pool dies with its graphs: capturing into its stale handle fails

    def _apply(self, fn, *args, **kwargs):
        self.invalidate_caches()  # device or dtype moves
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self.invalidate_caches()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @torch.no_grad()
    def set_weight_dtype(self, dtype: torch.dtype) -> "T5EncoderStack":
        """Cast the projection and embedding weights (norms and bias tables stay float32), in place."""
        for mod in [self.vocab_embed, *(m for layer in self.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj,
                                                                                layer.ffn.ff_in, layer.ffn.ff_out))]:
            mod.weight.data = mod.weight.data.to(dtype)
        self.config = self.config.model_copy(update={"dtype": dtype})
        return self

    def compile_for_inference(self) -> "T5EncoderStack":
        """CUDA: regional compilation + CUDA graphs in encode(). CPU: the embedding, layers and final norm
        compiled whole with frozen weights, which inductor repacks for MKL's packed GEMM (10-20% faster than
        torch's CPU matmul at these shapes); weights must not change afterwards."""
        if self.vocab_embed.weight.is_cuda:
            return self.compile_layers()
        _allow_many_compiled_shapes()
        compiled = torch.compile(self._embed_and_layers, dynamic=False)

        def frozen_embed_and_layers(*args):
            # inductor reads `freezing` from its global config when it compiles (the first call at each shape);
            # torch.compile(options={"freezing": True}) does not reach it
            with torch._inductor.config.patch(freezing=True):
                return compiled(*args)

        self._frozen_forward = frozen_embed_and_layers
        return self

    @contextmanager
    def running_eagerly(self) -> Iterator["T5EncoderStack"]:
        """Forward without any compiled code (regional or the CPU's frozen compilation) inside the block: for
        hooks that must see every module run, as precision.trace_layers."""
        modules = [self, *self.layers]
        compiled, frozen = [m._compiled_call_impl for m in modules], self._frozen_forward
        try:
            for m in modules:
                m._compiled_call_impl = None
            self._frozen_forward = None
            yield self
        finally:
            for m, impl in zip(modules, compiled):
                m._compiled_call_impl = impl
            self._frozen_forward = frozen

    def compile_layers(self, **compile_kwargs) -> "T5EncoderStack":
        """Regional compilation: every layer runs the same compiled code (parameters are graph inputs), so the
        cost is one layer's compile, not the whole stack's. Shapes are fixed: encode() pads to length_bucket."""
        _allow_many_compiled_shapes()
        for layer in self.layers:
            layer.compile(**{"dynamic": False, "fullgraph": True, **compile_kwargs})
        return self

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: LongTensor,
        input_mask: Optional[BoolTensor] = None,
        block_mask: Optional[BlockMask] = None,
    ) -> FloatTensor:
        """input_ids [B, L] -> embeddings [B, L, D] float32.

        input_mask [B, L] (True = real token) masks padded keys; flex turns it into the padding block mask
        (make_self_attn_block_mask(input_mask)) unless given a block_mask, such as one that also drops pad
        queries."""
        B, L = input_ids.shape
        flex = self.config.attn_impl == T5AttnImpl.Flex
        dtype = self.layers[0].attn.o_proj.weight.dtype
        rows = offset_rows(self._offset_bias_table(), L)  # [n, H, 2L-1]: a few KB, made in every call
        if flex and input_mask is not None and block_mask is None:
            block_mask = make_self_attn_block_mask(input_mask)
        # SDPA with one table for all layers: the dense bias once per call. Per-layer tables (UMT5) become dense in
        # each layer: all at once they would take n*B*H*L*L.
        if not flex and len(rows) == 1:
            biases = dense_sdpa_bias(rows, input_mask, dtype)
        else:
            biases = rows
        return (self._frozen_forward or self._embed_and_layers)(input_ids, biases, block_mask, input_mask)

    def _embed_and_layers(self, input_ids: LongTensor, biases: Tensor, block_mask: Optional[BlockMask],
                          input_mask: Optional[BoolTensor]) -> FloatTensor:
        """The bias table stays outside (made on first use): this is what the CPU path compiles whole, and a cache
        filled inside a compiled region would fail its guards and compile it a second time."""
        flex = self.config.attn_impl == T5AttnImpl.Flex
        # only a layer that makes its own dense bias takes the mask: otherwise it is a guard without a use
        layer_mask = input_mask if not flex and biases.dim() == 3 else None
        x = self.vocab_embed(input_ids).float()  # [B, L, D]
        ffn_out, ffn_scale = torch.zeros_like(x), self.unit_scale  # nothing pending before the first layer
        for i, layer in enumerate(self.layers):
            bias = biases[i if len(biases) > 1 else 0]  # offsets [H, 2L-1], or SDPA's dense [1 or B, H, L, L]
            x, ffn_out = layer(x, ffn_out, ffn_scale, bias, block_mask, flex, layer_mask)
            ffn_scale = layer.ffn_res_scale
        return self.ln(x * ffn_scale + ffn_out)

    def encode(self, input_ids: LongTensor, attention_mask: Optional[BoolTensor] = None) -> FloatTensor:
        """input_ids [B, L] (+ mask [B, L], True = real token) -> [B, L, D] float32, with the right mask for the
        configured attention. Compiled CUDA models replay one CUDA graph per shape (no launch gaps); float16
        outputs are checked for overflow (the only host sync)."""
        check_token_ids(input_ids, self.config.vocab_size)  # CPU ids only: no device sync
        # FSDP2's all-gathers need version counters, which inference tensors lack: sharded models use no_grad
        with torch.no_grad() if self.sharded else torch.inference_mode():
            return self._encode(input_ids, attention_mask)

    def _encode(self, input_ids: LongTensor, attention_mask: Optional[BoolTensor]) -> FloatTensor:
        device = self.vocab_embed.weight.device
        L = input_ids.shape[1]
        padded = attention_mask is not None and not bool(attention_mask.all())  # tokenizer masks are on the CPU
        input_ids = input_ids.to(device, non_blocking=True)
        mask = attention_mask.to(device, non_blocking=True).bool() if padded else None
        bucket = length_bucket(L) if self._compiled() else L
        if bucket > L:  # masked keys change no real token's output, so the rows up to L are the unpadded ones
            run_mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask
            run_ids, run_mask = (nn.functional.pad(t, (0, bucket - L)) for t in (input_ids, run_mask))
        else:
            run_ids, run_mask = input_ids, mask
        if self._uses_cuda_graphs():
            out = self._graphed_forward(run_ids, run_mask)
        else:
            out = self(run_ids, input_mask=run_mask)
        out = out[:, :L].contiguous() if bucket > L else out
        if self.layers[0].attn.o_proj.weight.dtype == torch.float16:
            finite_rows = torch.isfinite(out).all(-1)  # [B, L]; pad rows do not count
            if not bool((finite_rows if mask is None else finite_rows | ~mask).all()):
                self._raise_non_finite(input_ids, mask)
        return out

    def _compiled(self) -> bool:
        return self._frozen_forward is not None or self.layers[0]._compiled_call_impl is not None

    def _uses_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self.vocab_embed.weight.is_cuda and self._compiled()

    def _graphed_forward(self, input_ids: LongTensor, mask: Optional[BoolTensor]) -> FloatTensor:
        with torch.cuda.device(input_ids.device):  # streams and capture on the model's GPU, not the current one
            return self._graphed_forward_here(input_ids, mask)

    def _graphed_forward_here(self, input_ids: LongTensor, mask: Optional[BoolTensor]) -> FloatTensor:
        # Weights moved piecemeal (e.g. by an offloading manager) invalidate captured addresses: recapture.
        # (Buffers move with their module's parameters and are otherwise updated in place.)
        ptrs = self._weight_ptrs()
        if ptrs != self._graph_ptrs:
            self._drop_graphs()
            self._graph_ptrs = ptrs
        key = (*input_ids.shape, mask is not None)
        if key not in self._graphs:
            static = (input_ids.clone(), None if mask is None else mask.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (compiles) off the capture
                for _ in range(2):
                    self(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                static_out = self(*static)
            self._graph_pool = graph.pool()
            self._graphs[key] = (graph, static, static_out)
        graph, (static_ids, static_mask), static_out = self._graphs[key]
        static_ids.copy_(input_ids)
        if mask is not None:
            static_mask.copy_(mask)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _weight_ptrs(self) -> tuple[int, ...]:
        """Every parameter's address, read through its owner's parameter dict: walking self.parameters() on
        every call cost 0.2 ms of host time at XXL on the H200's host, 2% of a 1x512 encode
        (benchmarks/overhead_probe.py). A parameter moved (.data) or replaced (setattr, as ComfyUI's patcher
        does) still shows; a replaced submodule needs invalidate_caches()."""
        if self._param_slots is None:
            self._param_slots = [(m._parameters, name) for m in self.modules() for name in m._parameters]
        return tuple(-1 if d[name] is None else d[name].data_ptr() for d, name in self._param_slots)

    def _raise_non_finite(self, input_ids: LongTensor, mask: Optional[BoolTensor]):
        """Rerun eagerly layer by layer to name where inf/NaN first appears (only on the failure path)."""
        from .precision import trace_layers  # precision imports this module

        report = trace_layers(self, input_ids, mask)
        bad = next((r for r in report if not r.finite), None)
        where = bad.name if bad is not None else "final_norm"
        if where.endswith((".attn", ".ffn")):  # an output projection: what residual scales shrink
            advice = ("calibrate residual scales (`python -m t5core calibrate MODEL`, or fp16_scales='calibrate') "
                      "or use bfloat16")
        else:  # QKV, FFN hidden: activations that residual scales do not reach
            advice = "residual scales cannot shrink this activation: use bfloat16 for this model"
        raise NonFiniteOutputError(f"float16 encoder produced inf/NaN, first at {where}: {advice}.")
