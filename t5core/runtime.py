"""How an encoder runs, around the plain model (t5_encoder.T5EncoderStack): eagerly, or compiled at fixed shapes
(prompts padded to length buckets) with one CUDA graph per shape; inference mode; the float16 overflow check.

    enc = Encoder(model).compile()          # what t5core.load_encoder(..., compile=True) returns
    emb = enc.encode(input_ids, attention_mask)   # [B, L] (+ [B, L]) -> [B, L, D] float32
    emb = enc.encode(None, attention_mask, embeds=x)   # input embeddings [B, L, D] instead of token ids
"""
import contextlib
import ctypes
import functools
import logging
import sys
from typing import Callable, Optional

import torch
from torch import BoolTensor, FloatTensor, LongTensor, Tensor, nn

from . import fp8
from .t5_common import T5AttnImpl, check_token_ids
from .t5_encoder import T5EncoderStack

log = logging.getLogger("t5core")


class NonFiniteOutputError(FloatingPointError):
    """A float16 forward overflowed; the message names the first layer that produced inf/NaN."""


def length_bucket(n: int) -> int:
    """The length a compiled encoder runs n tokens at: 16 up to 16 tokens, then four lengths per doubling (20,
    24, 28, 32, 40, ..., 448, 512, 640, ...). Compiled code and CUDA graphs are made per shape, and dynamo stops
    at a fixed number of shapes; these are 21 shapes up to 512 tokens, for at most 25% more tokens above 16."""
    if n <= 16:
        return 16
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def allow_many_compiled_shapes() -> None:
    """Every model and shape in the process shares one compiled code object (the layer's forward, or the CPU's
    whole forward), an entry per fixed shape, dtype and mask kind: dynamo's default limit of 8 entries made the
    ninth a hard error under fullgraph. encode() pads to 21 lengths up to 512 tokens (length_bucket), each with
    and without a mask, per batch size and model: raise the process's limit to at least 256."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)


class Encoder:
    """A T5EncoderStack and the way it runs. `model` is the nn.Module (move it, offload it, hook it); this object
    holds only what depends on how it runs: compiled code and CUDA graphs, recaptured when weights move."""

    def __init__(self, model: T5EncoderStack, sharded: bool = False, source_path=None,
                 flex_by_default: bool = False) -> None:
        self.model = model
        self.sharded = sharded  # FSDP2 (t5core.distributed.load_fsdp): all-gathers need no_grad, not inference mode
        self.source_path = source_path  # the weights' file or folder, where calibrated scales are saved
        self._frozen: Optional[Callable] = None  # CPU: the whole forward compiled with its weights frozen in
        self._regional = False  # compile_layers() ran: the layers hold compiled code
        self._compile_kwargs: dict = {}  # compile_layers()'s
        self._cpp_wrapper = False  # the layers are compiled with inductor's C++ wrapper (see compile_layers)
        self._graphs: dict[tuple, tuple] = {}  # (B, L, padded) -> (graph, static (ids, mask), static output)
        self._graph_pool, self._graph_ptrs = None, None
        self._capture_streams: dict[torch.device, torch.cuda.Stream] = {}  # warm-up and capture, per device
        self._param_slots: Optional[list[tuple[dict, str]]] = None  # (owner's _parameters/_buffers, name): _weight_ptrs
        self.stream_to: Optional[torch.device] = None  # see stream_weights
        # flex attention was t5core's pick (weight_load.default_attention), not the caller's: if the compiled layers
        # cannot be captured after all (the C++ wrapper's fallback below), SDPA's eager layers are captured instead
        self.flex_by_default = flex_by_default

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where encode() runs: the weights' device (that of a buffer every model has: its embedding may be GGUF
        blocks), or the device they are streamed to."""
        return self.model.unit_scale.device if self.stream_to is None else self.stream_to

    def stream_weights(self, device: Optional[torch.device]) -> None:
        """device: not all weights are on it, and the layers that hold the others copy them to it for each call (an
        offloading manager's partial load, such as ComfyUI's --lowvram): encode() then runs there eagerly, at the
        prompt's own length, without compiled code or CUDA graphs (which would capture weights about to move), and
        the graphs captured so far are dropped, freeing their memory. None: all weights are on the model's device
        again; the fast path recaptures graphs for their addresses."""
        if device is not None:
            self.drop_graphs()
        self.stream_to = device

    # -- compiling -----------------------------------------------------------------------------------
    def compile(self) -> "Encoder":
        """CUDA: regional compilation (compile_layers) and a CUDA graph per shape in encode(). CPU: the whole
        forward compiled with frozen weights, which inductor repacks for MKL's packed GEMM (10-20% faster than
        torch's CPU matmul at these shapes); weights must not change afterwards (or call reset()). Weights kept as
        GGUF blocks, fp8 or 16-bit for float32 compute are not frozen: freezing would fold their dequantization (or
        cast) into constant float32 weights."""
        if self.device.type == "cuda":
            return self.compile_layers()
        allow_many_compiled_shapes()
        compiled = torch.compile(self.model, dynamic=False)
        # freezing would fold the dequantization of GGUF blocks or fp8 weights (or the cast of 16-bit ones) into
        # full-size constants
        freezing = not self._packed and self.config.weight_dtype is None

        def frozen(*args, **kwargs):
            # inductor reads `freezing` from its global config when it compiles (the first call at each shape);
            # torch.compile(options={"freezing": True}) does not reach it
            with torch._inductor.config.patch(freezing=freezing):
                return compiled(*args, **kwargs)

        self._frozen = frozen
        return self

    def compile_layers(self, **compile_kwargs) -> "Encoder":
        """Regional compilation: every layer runs the same compiled code (parameters are graph inputs), so the
        cost is one layer's compile, not the whole stack's, and it stays valid wherever the weights move.

        Under cudaMallocAsync (ComfyUI's default allocator), where kernels launched from inductor's Python code
        cannot be captured in CUDA graphs (compiled_code_captures), inductor's C++ wrapper launches them, and
        those captures work: WAN's 1x512 in 10.98 ms against 16.79 for the captured eager layers on an H100
        (BENCHMARKS.md). It needs a C++ compiler and Python's headers at the first encode of each shape; where it
        cannot build, encode() logs why and falls back to the Python wrapper."""
        allow_many_compiled_shapes()
        self._compile_kwargs = compile_kwargs
        # inductor's options (cpp_wrapper) cannot be given beside a `mode`
        inductor = compile_kwargs.get("backend", "inductor") == "inductor" and "mode" not in compile_kwargs
        self._cpp_wrapper = inductor and torch.cuda.is_available() and not compiled_code_captures()
        self._compile_each_layer()
        return self

    def _compile_each_layer(self) -> None:
        kwargs = {"dynamic": False, "fullgraph": True, **self._compile_kwargs}
        if self._cpp_wrapper:
            kwargs["options"] = {"cpp_wrapper": True, **kwargs.get("options", {})}
        for layer in self.model.layers:
            layer.compile(**kwargs)
        self._regional = True

    def _captures_compiled(self) -> bool:
        """Whether CUDA graphs can capture the compiled layers (else they capture the eager ones)."""
        return compiled_code_captures() or self._cpp_wrapper

    @property
    def compiled(self) -> bool:
        """Runs compiled code now: compiled, and no weight is being streamed (stream_weights)."""
        return (self._frozen is not None or self._regional) and self.stream_to is None

    def reset(self) -> None:
        """Forget CUDA graphs and the CPU's frozen compilation (which holds the old weights; the model runs
        eagerly until compiled again): call after changing weights in place."""
        self.drop_graphs()
        self._param_slots = None
        self._frozen = None

    def drop_graphs(self) -> None:
        """Free the CUDA graphs and their memory pool (an offloading manager that moves the weights away calls
        this); the next compiled encode captures again."""
        devices = {out.device for _, _, out in self._graphs.values()}  # where they ran (the weights may be gone)
        self._graphs.clear()
        self._graph_pool = None  # the pool dies with its graphs: capturing into its stale handle fails
        self._graph_ptrs = None
        if devices and not compiled_code_captures():
            for device in devices:
                torch.cuda.synchronize(device)  # their memory is freed in stream order: after the last replay
                trim_graph_memory(device)

    # -- encoding ------------------------------------------------------------------------------------
    def encode(self, input_ids: Optional[LongTensor], attention_mask: Optional[BoolTensor] = None,
               embeds: Optional[FloatTensor] = None, num_layers: Optional[int] = None) -> FloatTensor:
        """input_ids [B, L] (+ mask [B, L], True = real token) -> [B, L, D] float32. Compiled models run at
        length_bucket(L) (added keys masked, output cut back to L); compiled CUDA models replay one CUDA graph per
        shape; float16 outputs are checked for overflow (the only host sync). embeds [B, L, D] (with input_ids
        None) are input embeddings instead of token ids; num_layers stops after that many layers (then the final
        norm), see T5EncoderStack.forward."""
        if embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)  # CPU ids only: no device sync
        elif input_ids is not None or embeds.dim() != 3 or embeds.shape[-1] != self.config.hidden_dim:
            raise ValueError(f"embeds: expected [batch, length, {self.config.hidden_dim}] input embeddings and no "
                             f"input_ids, got shape {tuple(embeds.shape)}")
        # while streaming, layers compiled by compile_layers() run as written (their weights are copied in per call)
        eager = torch.compiler.set_stance("force_eager") if self.stream_to is not None else contextlib.nullcontext()
        with torch.no_grad() if self.sharded else torch.inference_mode(), eager:
            return self._encode(input_ids, attention_mask, embeds, num_layers)

    def _encode(self, input_ids: Optional[LongTensor], attention_mask: Optional[BoolTensor],
                embeds: Optional[FloatTensor] = None, num_layers: Optional[int] = None) -> FloatTensor:
        if self.config.weight_dtype == fp8.FAST and not fp8.fp8_matmul_support(self.device)[0]:
            fp8.log_compute_fallback(self.device)
        x = input_ids if embeds is None else embeds  # what the model reads: [B, L] ids or [B, L, D] embeddings
        L = x.shape[1]
        padded = attention_mask is not None and not bool(attention_mask.all())  # tokenizer masks are on the CPU
        x = x.to(self.device, non_blocking=True)
        mask = attention_mask.to(self.device, non_blocking=True).bool() if padded else None
        bucket = length_bucket(L) if self.compiled else L
        if bucket > L:  # masked keys change no real token's output, so the rows up to L are the unpadded ones
            run_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
            run_mask = nn.functional.pad(run_mask, (0, bucket - L))
            run_x = nn.functional.pad(x, (0, bucket - L) if embeds is None else (0, 0, 0, bucket - L))
        else:
            run_x, run_mask = x, mask
        try:
            out = self._forward(run_x, run_mask, embeds is not None, num_layers)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # InductorError included
            if not self._cpp_wrapper:
                raise
            to_sdpa = self.flex_by_default and self.config.attn_impl == T5AttnImpl.Flex
            log.warning("t5core: inductor's C++ wrapper could not build the compiled layers (%s); they are compiled "
                        "with its Python wrapper instead, whose kernels CUDA graphs cannot capture under "
                        "cudaMallocAsync: slower encodes%s", (str(e).strip().splitlines() or [type(e).__name__])[0],
                        " (attention: SDPA instead of flex, whose eager layers are captured)" if to_sdpa else "")
            if to_sdpa:
                self.model.config = self.config.model_copy(update={"attn_impl": T5AttnImpl.SDPA})
            self._cpp_wrapper = False
            self._compile_each_layer()
            out = self._forward(run_x, run_mask, embeds is not None, num_layers)
        out = out[:, :L].contiguous() if bucket > L else out
        if self.config.dtype == torch.float16:
            finite_rows = torch.isfinite(out).all(-1)  # [B, L]; pad rows do not count
            if not bool((finite_rows if mask is None else finite_rows | ~mask).all()):
                raise NonFiniteOutputError(overflow_report(self.model, **self._inputs(x, embeds is not None),
                                                           mask=mask))
        return out

    def _forward(self, x: Tensor, mask: Optional[BoolTensor], is_embeds: bool,
                 num_layers: Optional[int]) -> FloatTensor:
        if self.compiled and self.device.type == "cuda" and self._graphs_ok():
            return self._graphed_forward(x, mask, is_embeds, num_layers)
        forward = self._frozen if self.compiled and self._frozen is not None else self.model
        return forward(**self._inputs(x, is_embeds), input_mask=mask, num_layers=num_layers)

    @staticmethod
    def _inputs(x: Tensor, is_embeds: bool) -> dict[str, Optional[Tensor]]:
        """The model's input_ids and embeds, from what _encode runs: ids [B, L] or embeddings [B, L, D]."""
        return {"input_ids": None, "embeds": x} if is_embeds else {"input_ids": x, "embeds": None}

    # -- CUDA graphs ---------------------------------------------------------------------------------
    def _graphs_ok(self) -> bool:
        """Compiled CUDA encodes replay graphs: of the compiled layers, or, where they cannot be captured
        (_captures_compiled), of the eager ones. But there flex attention (eager, an unfused score matrix) and
        GGUF blocks (eager, many passes over each weight, and the Triton kernel cannot launch inside such a
        capture) run compiled, without graphs."""
        return self._captures_compiled() or not (self.config.attn_impl == T5AttnImpl.Flex or self._packed)

    @functools.cached_property
    def _packed(self) -> bool:
        """Whether the model keeps weights as GGUF blocks (fixed at load; read once, not on every encode)."""
        from .gguf import is_packed

        return is_packed(self.model)

    def _graphed_forward(self, x: Tensor, mask: Optional[BoolTensor], is_embeds: bool = False,
                         num_layers: Optional[int] = None) -> FloatTensor:
        """x: token ids [B, L], or input embeddings [B, L, D] when is_embeds."""
        with torch.cuda.device(x.device):  # streams and capture on the model's GPU, not the current one
            # Weights or buffers moved piecemeal (e.g. by an offloading manager) invalidate captured addresses:
            # recapture. (Buffers are otherwise updated in place.)
            ptrs = self._weight_ptrs()
            if ptrs != self._graph_ptrs:
                self.drop_graphs()
                self._graph_ptrs = ptrs
            key = (*x.shape, mask is not None, is_embeds, num_layers)
            if key not in self._graphs:
                log.info("t5core: capturing a CUDA graph for %d x %d tokens%s", x.shape[0], x.shape[1],
                         " (the first time at this shape the layers compile: up to a minute or two with empty caches)"
                         if self._captures_compiled() else "")
                self._graphs[key] = self._capture(x.clone(), None if mask is None else mask.clone(), is_embeds,
                                                  num_layers)
            graph, (static_x, static_mask), static_out = self._graphs[key]
            static_x.copy_(x)
            if mask is not None:
                static_mask.copy_(mask)
            graph.replay()
            return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: Tensor, mask: Optional[BoolTensor], is_embeds: bool = False,
                 num_layers: Optional[int] = None) -> tuple:
        inputs = self._inputs(x, is_embeds)

        def stance():  # the compiled layers where they can be captured, else the eager layers
            return contextlib.nullcontext() if self._captures_compiled() else torch.compiler.set_stance("force_eager")

        # Warm-up and capture on one stream of our own: the libraries' per-stream workspaces (cuBLAS's) are made
        # by the warm-up, not inside the capture, where they would be graph memory that outlives the graph
        # (under cudaMallocAsync; a block pinning the private pool under torch's allocator).
        if x.device not in self._capture_streams:
            self._capture_streams[x.device] = torch.cuda.Stream(x.device)
        side = self._capture_streams[x.device]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), stance():  # warm-up (compiles) off the capture
            for _ in range(2):
                warm = self.model(**inputs, input_mask=mask, num_layers=num_layers)
        torch.cuda.current_stream().wait_stream(side)
        # the output buffer is allocated outside the capture: freed with the graph, one allocated inside it is an
        # "uncaptured free of a captured allocation", which cudaMallocAsync warns about
        out = torch.empty_like(warm)
        del warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=side), stance():
            out.copy_(self.model(**inputs, input_mask=mask, num_layers=num_layers))
        self._graph_pool = graph.pool()
        return graph, (x, mask), out

    def _weight_ptrs(self) -> tuple[int, ...]:
        """Every parameter's and buffer's address (weights kept as GGUF blocks are buffers; so are norm eps and
        residual scales, which an offloading manager moves with their modules), read through its owner's dict:
        walking parameters() on every call cost 0.2 ms of host time at XXL on the H200's host, 2% of a 1x512
        encode. A tensor moved (.data) or replaced (setattr, as ComfyUI's patcher does) still shows; a replaced
        submodule needs reset()."""
        if self._param_slots is None:
            self._param_slots = [(d, name) for m in self.model.modules() for d in (m._parameters, m._buffers)
                                 for name in d]
        return tuple(-1 if d[name] is None else d[name].data_ptr() for d, name in self._param_slots)


@functools.cache  # (the allocator is chosen once per process)
def compiled_code_captures() -> bool:
    """Whether Triton kernels launched from Python (inductor's default wrapper, t5core.gguf_kernels) can be captured
    in a CUDA graph: not under cudaMallocAsync (PYTORCH_CUDA_ALLOC_CONF backend:cudaMallocAsync, which ComfyUI sets
    unless started with --disable-cuda-malloc). There the capture allocates its intermediates as graph memory, not
    yet mapped while capturing, and the Python launchers refuse their pointers ("CUDA driver error: invalid
    argument" on an H200, then an abort); inductor's C++ wrapper and torch's eager kernels capture fine there
    (compile_layers, BENCHMARKS.md)."""
    return torch.cuda.get_allocator_backend() != "cudaMallocAsync"


@functools.cache
def _cuda_driver():
    """The CUDA driver library (libcuda / nvcuda), or None."""
    try:
        return ctypes.WinDLL("nvcuda.dll") if sys.platform == "win32" else ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _driver_call(device: torch.device, name: str, *args) -> bool:
    """driver.<name>(the driver's handle of cuda:N, *args) -> it succeeded; False without the driver or the call."""
    driver, handle = _cuda_driver(), ctypes.c_int()
    try:
        return (driver is not None and driver.cuDeviceGet(ctypes.byref(handle), device.index) == 0
                and getattr(driver, name)(handle, *args) == 0)
    except AttributeError:  # a driver older than the call
        return False


def trim_graph_memory(device: torch.device) -> None:
    """Under cudaMallocAsync a graph's temporaries are CUDA graph memory, which stays reserved after the graph is
    destroyed until cuDeviceGraphMemTrim (torch's empty_cache trims only the allocator's own pool): give it back to
    the device (cuda:N). Best effort."""
    _driver_call(device, "cuDeviceGraphMemTrim")


def graph_memory(device: torch.device) -> int:
    """Bytes of CUDA graph memory the driver holds for `device` (cuda:N; CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT),
    which torch's memory counters leave out; 0 where the driver cannot say."""
    value = ctypes.c_uint64()
    return value.value if _driver_call(device, "cuDeviceGetGraphMemAttribute", 2, ctypes.byref(value)) else 0


def overflow_report(model: T5EncoderStack, input_ids: Optional[LongTensor], embeds: Optional[FloatTensor],
                    mask: Optional[BoolTensor]) -> str:
    """Rerun eagerly layer by layer and say where inf/NaN first appears, and what to do (the failure path only)."""
    from .precision import trace_layers

    bad = next((r for r in trace_layers(model, input_ids, mask, embeds) if not r.finite), None)
    where = bad.name if bad is not None else "final_norm"
    if where.endswith((".attn", ".ffn")):  # an output projection: what residual scales shrink
        advice = ("calibrate residual scales (`python -m t5core calibrate MODEL`, or fp16_scales='calibrate') "
                  "or use bfloat16")
    else:  # QKV, FFN hidden: activations that residual scales do not reach
        advice = "residual scales cannot shrink this activation: use bfloat16 for this model"
    return f"float16 encoder produced inf/NaN, first at {where}: {advice}."
