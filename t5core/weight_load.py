"""The one load path: stream tensors from any checkpoint into T5EncoderStack, fusing and scaling on the way.

Each tensor goes file -> device -> (float32 when fusing) -> target dtype on its own, so host memory holds only the
few tensors being read ahead, and norm fusion / residual scaling cost one rounding in total.
"""
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from .calibrate import calibrate_fp16_scales
from .checkpoint import Checkpoint, CheckpointError, native_target, open_checkpoint
from .fp16_scales import Scales, combined_config, multiply_weight, resolve as resolve_scales, scale_residuals_enc
from .fp8 import FP8_DTYPES, WEIGHT_DTYPES, Fp8Linear, is_fp8, quantize_rows, resolve_weight_dtype
from .fuse_norm_scales import norm_consumers, scale_input_columns
from .runtime import Encoder
from .t5_common import T5AttnImpl, T5Config, parse_dtype
from .t5_encoder import T5EncoderStack

# projection weight -> the norm whose scale it absorbs when fusing
_FUSE_INTO = {"attn.qkv_proj.weight": "ln1.weight", "ffn.ff_in.weight": "ln2.weight"}


def _norm_key_for(native: str) -> Optional[str]:
    """'layers.3.attn.qkv_proj.weight' -> 'layers.3.ln1.weight'; None for weights no norm feeds."""
    m = re.match(r"^(layers\.\d+)\.(.+)$", native)
    return f"{m[1]}.{_FUSE_INTO[m[2]]}" if m and m[2] in _FUSE_INTO else None


_LAYER_OF = re.compile(r"^layers\.(\d+)\.")
_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # one tensor: transformers reads shared.weight


def plan_reads(params: dict, ckpt: Checkpoint, config: T5Config):
    """Which checkpoint tensor fills which parameter rows, with every shape checked, before anything is read or
    allocated (params may be meta tensors). -> ({key in ckpt: (parameter, part, parts)} in file order,
    {norm parameter: key in ckpt}). Weights the config has no room for (more layers, per-layer position tables)
    are an error naming both, never silently dropped; so are weights stored as integers (int8 quantizations, which
    would load as their raw codes) and fp8 weights whose scales are missing or of another convention."""
    work: dict[str, tuple[str, int, int]] = {}
    norm_keys: dict[str, str] = {}  # norm parameter name -> key in ckpt (their scales may be fused instead)
    where = ckpt.path
    for key in ckpt.keys:
        target = (key, 0, 1) if ckpt.native else native_target(key, config)
        if target is None:
            if (not ckpt.native and not config.pos_emb_per_layer and key.endswith("relative_attention_bias.weight")
                    and key.startswith("encoder.block.") and not key.startswith("encoder.block.0.")):
                raise CheckpointError(f"{where}: {key} is a per-layer position table (UMT5) but the config describes "
                                      f"a T5 with one shared table (model_type is not 'umt5')")
            continue  # decoder, lm_head, ComfyUI markers, buffers
        name, part, parts = target
        m = _LAYER_OF.match(name)
        if m and int(m[1]) >= config.num_layers:
            raise CheckpointError(f"{where}: {key} belongs to layer {m[1]}, but the config says num_layers="
                                  f"{config.num_layers}: the config and the weights disagree")
        if name.endswith(("ln1.weight", "ln2.weight")):
            norm_keys[name] = key
        if name not in params or (key == _EMBEDDINGS[1] and _EMBEDDINGS[0] in ckpt.keys):
            continue  # a norm fused away, or encoder.embed_tokens.weight beside shared.weight (checked equal)
        rows = params[name].shape[0] // parts
        if tuple(ckpt.shape(key)) != (rows, *params[name].shape[1:]):
            raise CheckpointError(
                f"{where}: {key} has shape {tuple(ckpt.shape(key))}, expected {(rows, *params[name].shape[1:])} "
                f"for {name} (config says vocab {config.vocab_size}, hidden {config.hidden_dim}, heads "
                f"{config.n_head}, ff {config.ff_dim})")
        _check_stored_dtype(ckpt, key)
        work[key] = target
    for name in params:
        found = [key for key, t in work.items() if t[0] == name]
        if not found:
            raise CheckpointError(f"{where}: missing weight for {name} (a truncated or non-T5-encoder checkpoint, "
                                  f"or a config that does not match the weights?)")
        if len(found) != work[found[0]][2]:
            raise CheckpointError(f"{where}: {name} needs {work[found[0]][2]} tensors, found {found}")
    return work, norm_keys


def _check_stored_dtype(ckpt: Checkpoint, key: str) -> None:
    dtype = ckpt.stored_dtype(key)
    if not dtype.is_floating_point:
        raise CheckpointError(f"{ckpt.path}: {key} is stored as {str(dtype).removeprefix('torch.')}, not floating point "
                              f"(an int8 / bitsandbytes quantization?): t5core reads float weights only")
    if dtype in FP8_DTYPES:
        ckpt.fp8_scale_key(key)  # raises for a missing or foreign scale


def _check_checkpoint_values(ckpt: Checkpoint, norm_keys: dict[str, str]) -> None:
    """What the headers cannot show, from small or duplicate tensors: a config.json saying the norms are fused
    (saved as unit scales) over norm weights that are not, and two different token embeddings."""
    if ckpt.config.elementwise_affine is False:
        for key in norm_keys.values():
            if not bool((ckpt.get(key) == 1).all()):
                raise CheckpointError(f"{ckpt.path}: {key} holds norm scales other than 1 but the config says the norms "
                                      f"are fused (elementwise_affine false): the config.json does not belong to these "
                                      f"weights")
    if not ckpt.native and all(k in ckpt.keys for k in _EMBEDDINGS) and not torch.equal(*map(ckpt.get, _EMBEDDINGS)):
        raise CheckpointError(f"{ckpt.path}: {_EMBEDDINGS[0]} and {_EMBEDDINGS[1]} differ: which token embedding is "
                              f"meant is unclear")


def file_backed_parameters(model: T5EncoderStack) -> dict:
    """The parameters a checkpoint tensor fills: all but fp8 projections' scales (filled with their weights)."""
    scales = {f"{n}.scale" for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    return {n: p for n, p in model.named_parameters() if n not in scales}


@torch.no_grad()
def stream_into_module(
    model: T5EncoderStack,
    ckpt: Checkpoint,
    fuse_norm_scales: bool = False,
    norm_fusion_via_f32: bool = True,
    weight_factors: Optional[dict[str, float]] = None,
) -> None:
    """Fill every parameter of `model` (on its device and dtypes) from `ckpt`.

    fuse_norm_scales folds the checkpoint's norm scales into the QKV / FFN-input projections (the model's norms
    must then be scale-free); weight_factors multiplies named parameters (residual scaling).

    fp8 projections (t5core.fp8.Fp8Linear) take an fp8 tensor's bytes and scale as they are, each part of a fused
    projection its own rows' scales; other tensors are fused and scaled in float32 and quantized per row one by
    one, so memory never holds more than one tensor in a wider dtype. Residual factors multiply the float32
    scales (exact: powers of two). Fusing norm scales into an fp8 file's weights would re-quantize them: refused."""
    fp8_scale_of = {f"{n}.weight": m.scale for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    params = file_backed_parameters(model)
    weight_factors = weight_factors or {}
    for name, factor in weight_factors.items():
        if name not in params:  # a projection kept as GGUF blocks (t5core.gguf.PackedLinear): scaled on use
            multiply_weight(model, name, factor)
    if not fuse_norm_scales and model.config.elementwise_affine is False and ckpt.config.elementwise_affine:
        raise CheckpointError(f"{ckpt.path}: the model has no norm scales but the checkpoint does: pass fuse_norm_scales=True")
    work, norm_keys = plan_reads(params, ckpt, model.config)
    _check_checkpoint_values(ckpt, norm_keys)
    targets = {}  # key in ckpt -> the parameter rows it fills
    scale_targets: dict[str, torch.Tensor] = {}  # key in ckpt -> the fp8 scale rows it fills
    for key, (name, part, parts) in work.items():
        rows = params[name].shape[0] // parts
        targets[key] = params[name][part * rows:(part + 1) * rows]
        if name in fp8_scale_of:
            scale_targets[key] = fp8_scale_of[name][part * rows:(part + 1) * rows]
            stored = ckpt.stored_dtype(key)
            if stored in FP8_DTYPES and stored != targets[key].dtype:
                raise CheckpointError(f"{ckpt.path}: {key} is {stored}, the model's {name} {targets[key].dtype}: "
                                      f"loading would re-quantize it (load with weight_dtype='auto')")
            if stored in FP8_DTYPES and fuse_norm_scales and _norm_key_for(name):
                raise CheckpointError(f"{ckpt.path}: fusing norm scales into float8 {key} would re-quantize it: load "
                                      f"without fuse_norms, or expand the weights (weight_dtype = the compute dtype)")
    # norm scales are tiny: read them first, so the big tensors can follow in file order
    norm_scales = ({name: ckpt.get(key, device=model.ln.weight.device) for name, key in norm_keys.items()}
                   if fuse_norm_scales else {})
    device = next(iter(params.values())).device
    # tensors that need no fusion may be read straight into their rows (no second copy on the device): fp8 weights
    # (their residual factor goes onto the scale) and, stored in the parameter's dtype, the others, multiplied by
    # their power-of-two residual factor in place (exact, as in float32)
    direct = {k: v for k, v in targets.items() if _norm_key_for(work[k][0]) not in norm_scales
              and (weight_factors.get(work[k][0], 1.0) == 1.0 or k in scale_targets
                   or ckpt.stored_dtype(k) == v.dtype)}
    for key, t in ckpt.iter_tensors(list(work), device, into=direct, keep_fp8=frozenset(scale_targets)):
        name = work[key][0]
        norm_name = _norm_key_for(name)
        if key in scale_targets:
            if is_fp8(t):  # stored fp8: its bytes and its scales, as they are
                weight, scale = t, ckpt.fp8_scale(key, tuple(t.shape)).to(device)
            else:
                t = t.float() * norm_scales[norm_name].float() if norm_name in norm_scales else t
                weight, scale = quantize_rows(t, targets[key].dtype)
            if weight is not direct.get(key):
                targets[key].copy_(weight)
            scale_targets[key].copy_(scale * weight_factors.get(name, 1.0))
            del t, weight
            continue
        if t is direct.get(key):  # already in place
            if weight_factors.get(name, 1.0) != 1.0:
                t.mul_(weight_factors[name])
            continue
        if norm_name in norm_scales:
            t = scale_input_columns(t if norm_fusion_via_f32 else t.to(targets[key].dtype), norm_scales[norm_name],
                                    norm_fusion_via_f32)
        factor = weight_factors.get(name, 1.0)
        if factor != 1.0:
            t = t.float() * factor
        targets[key].copy_(t)
        del t


def build_empty(config: T5Config, device, ckpt: Optional[Checkpoint] = None) -> T5EncoderStack:
    """A model with uninitialised storage on `device`: loading overwrites every parameter anyway. With `ckpt`,
    its shapes are checked against the config first, so nothing is allocated for a config the weights do not back."""
    with torch.device("meta"):
        model = T5EncoderStack(config)
    if ckpt is not None:
        plan_reads(file_backed_parameters(model), ckpt, config)
    model = model.to_empty(device=device)
    model.apply_residual_scales_from_config()
    return model.eval()


def load_checkpoint_into(
    model: T5EncoderStack,
    ckpt: Checkpoint,
    fuse_norm_scales: bool = False,
    norm_fusion_via_f32: bool = True,
    scales: Optional[Scales] = None,
) -> T5EncoderStack:
    """Stream ckpt into model with optional fusion and float16 residual scales; updates model.config to match.
    The weights arrive with the checkpoint's scales baked in: new scales multiply onto those."""
    baked = {k: getattr(ckpt.config, k) for k in ("enc_attn_out_scales", "enc_ffn_out_scales")}
    config, factors = combined_config(model.config.model_copy(update=baked), scales)
    if fuse_norm_scales:
        for norm, _ in norm_consumers(model):
            norm.weight = None
        config = config.model_copy(update={"elementwise_affine": False})
    stream_into_module(model, ckpt, fuse_norm_scales, norm_fusion_via_f32, factors)
    model.config = config
    model.apply_residual_scales_from_config()
    return model


class FusingDeserializer:
    """Drop-in for tensorizer's TensorDeserializer that can fuse norm scales and apply float16 residual
    scales while loading. Reads every format open_checkpoint knows, not only tensorizer files, always lazily
    (tensor by tensor, straight into the model): lazy_load=False, TensorDeserializer's read-everything-first, is
    refused rather than ignored."""

    def __init__(self, path, lazy_load: bool = True, dtype: Optional[torch.dtype] = None, device=None, subfolder=None):
        if not lazy_load:
            raise ValueError("FusingDeserializer: lazy_load=False is not supported (it streams tensor by tensor)")
        self.ckpt = open_checkpoint(path, subfolder=subfolder)
        self.dtype = dtype
        self.device = device

    def _check_model(self, model: T5EncoderStack) -> None:
        """The deserializer's dtype and device win, as in the usage guide: a model built from a config (on `meta`,
        or anywhere) takes them before the weights stream in, whatever dtype its config recorded."""
        if self.dtype is not None and parse_dtype(self.dtype) != model.config.dtype:
            model.set_weight_dtype(parse_dtype(self.dtype))
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=self.device or "cpu")  # every parameter is overwritten; buffers are refilled
        elif self.device is not None:
            model.to(self.device)

    def load_into_module(self, model: T5EncoderStack) -> T5EncoderStack:
        """Fill `model` (built from a config, on any device including meta) with this file's weights."""
        self._check_model(model)
        return load_checkpoint_into(model, self.ckpt)

    def load_with_fusions(
        self,
        model: T5EncoderStack,
        fuse_norm_scales: bool = False,
        norm_fusion_via_f32: bool = False,
        enc_attn_out_scales: Optional[Sequence[float]] = None,
        enc_ffn_out_scales: Optional[Sequence[float]] = None,
    ) -> T5EncoderStack:
        """load_into_module, folding the norm scales into the projections and multiplying power-of-two residual
        scales (per layer; None: all 1) onto the weights on the way."""
        self._check_model(model)
        scales = (Scales.of(enc_attn_out_scales, enc_ffn_out_scales, model.config.num_layers)
                  if enc_attn_out_scales is not None or enc_ffn_out_scales is not None else None)
        return load_checkpoint_into(model, self.ckpt, fuse_norm_scales, norm_fusion_via_f32, scales)

    def close(self) -> None:
        self.ckpt = None


def default_attention(config: T5Config, dtype: torch.dtype, device, compile: bool) -> str:
    """The attention kernel when none is named: flex for a compiled UMT5 computing in 16 bits on a CUDA GPU, SDPA
    otherwise. UMT5 has a bias table per layer, which SDPA needs as a dense [B, H, L, L] mask made in every layer
    and flex reads inside its kernel (WAN's 1 x 512: 5% faster on an H100, BENCHMARKS.md); with T5's one table the
    dense bias is made once per encode and SDPA is as fast or faster. In float32 flex's kernel is 6.6x slower than
    SDPA's (WAN on an H100: 39.9 against 6.1 ms per encode). Uncompiled, SDPA needs no Triton."""
    return ("flex" if compile and torch.device(device).type == "cuda" and config.pos_emb_per_layer
            and dtype in (torch.float16, torch.bfloat16) else "sdpa")


def pick_attention(attn_impl: Optional[str], config: T5Config, dtype: torch.dtype, device,
                   compile: bool) -> tuple[T5AttnImpl, bool]:
    """-> (the attention kernel: attn_impl, else default_attention; whether it is flex by t5core's pick rather
    than the caller's, Encoder's flex_by_default)."""
    impl = T5AttnImpl(attn_impl or default_attention(config, dtype, device, compile))
    return impl, attn_impl is None and impl == T5AttnImpl.Flex


def load_encoder(
    path,
    dtype="float32",
    device="cpu",
    attn_impl: Optional[str] = None,
    fuse_norms: bool = False,
    fp16_scales="auto",
    compile: bool = False,
    subfolder: Optional[str] = None,
    format: Optional[str] = None,
    weight_dtype=None,
) -> Encoder:
    """Load a T5 encoder from any supported checkpoint, ready to `.encode(input_ids, attention_mask)`; the
    nn.Module is its `.model` (t5core.runtime.Encoder). path: a file or folder, or a Checkpoint that
    open_checkpoint returned (its subfolder and format already chosen).

    dtype: float32 / bfloat16 / float16. attn_impl: "sdpa" or "flex"; None: default_attention (flex for a compiled
    UMT5 in 16 bits on CUDA, else SDPA). Compiled, the two are within 2-4% for T5 v1.1 (BENCHMARKS.md); on CUDA flex
    always compiles its kernel with Triton, SDPA uncompiled needs no Triton.
    fuse_norms: fold norm scales into the projections while loading.
    fp16_scales (float16 only; t5core.fp16_scales): "auto" (scales baked into the checkpoint, else calibrated
    ones saved beside it, else ones recorded in its config.json, else the preset for its size), "calibrate"
    (measure now on varied prompts), None, Scales, text ('1,1,1/2,...' or 'ATTN;FFN'), a list of FFN-out scales,
    or an (attn_out_scales, ffn_out_scales) pair.
    compile: torch.compile for fixed-shape speed (CUDA: one layer compiled and reused, CUDA graphs; CPU: frozen
    weights, except for weights kept as GGUF blocks, fp8 or 16-bit with float32 compute).
    format: None detects the format; "dcp" reads a torch.distributed.checkpoint folder, whose metadata is a pickle:
    only for folders you trust (see open_checkpoint).
    weight_dtype (None or "auto" by default): a GGUF file's quantized weights stay as their blocks, dequantized in
    each layer just before use (t5core.gguf.build_packed), an fp8 file's stay fp8 (t5core.fp8), others load in
    dtype. "bf16" / "fp16" / "fp32" (the same as dtype) expands GGUF and fp8 files once at load. "fp8_e4m3fn" /
    "fp8_e5m2": fp8 weights with a float32 scale per row, quantized as they stream in unless the file's are fp8
    already (another fp8 type is an error: no re-quantizing); "fp8_e4m3fn_fast": also fp8 matmuls on CUDA GPUs of
    compute capability >= 8.9. The embedding, norms and bias tables are never fp8. With dtype float32, "float16" /
    "bfloat16" ("fp16" / "bf16") store the projections in 16 bits, cast to float32 in each call (ComfyUI's float16
    weights on the CPU: half float32's memory): a float16 file's weights as they are, others rounded once at load
    (fuse_norms folds in float32, then rounds once); not for GGUF or fp8 files."""
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    auto = weight_dtype in (None, "auto")
    if isinstance(path, Checkpoint) and (subfolder or format):
        raise ValueError(f"{path.path}: subfolder and format are open_checkpoint's arguments; this checkpoint is open")
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path, subfolder=subfolder, format=format)
    gguf = ckpt.format == "gguf"
    if (not auto and str(weight_dtype) not in WEIGHT_DTYPES and parse_dtype(weight_dtype) != dtype
            and (dtype != torch.float32 or gguf)):  # 16-bit storage: float32 compute, not for GGUF blocks
        raise ValueError(f"weight_dtype={weight_dtype!r} expands the weights to the model's dtype, which is {dtype}: "
                         f"pass dtype={weight_dtype!r} too"
                         + ("" if gguf else " (or dtype='float32': 16-bit weights with float32 compute)"))
    packed = gguf and auto
    if packed and fuse_norms:
        raise ValueError(f"{ckpt.path}: fuse_norms=True cannot fold norm scales into GGUF blocks kept compressed (that "
                         f"would mean re-quantizing): pass weight_dtype={str(dtype).removeprefix('torch.')!r} to expand "
                         f"the weights at load, or fuse_norms=False")
    impl, flex_by_default = pick_attention(attn_impl, ckpt.config, dtype, device, compile)
    wdtype = None if packed else resolve_weight_dtype(weight_dtype, dtype, ckpt.projection_dtype(), ckpt.path)
    config = ckpt.config.model_copy(update={"dtype": dtype, "attn_impl": impl, "weight_dtype": wdtype})
    baked = config.enc_ffn_out_scales or config.enc_attn_out_scales
    scaled = dtype == torch.float16 and fp16_scales is not None and not baked
    if scaled and fp16_scales == "calibrate" and wdtype is not None:  # measure in float32, then load fp8 with them
        stored_fp8 = ckpt.projection_dtype() in FP8_DTYPES  # measured as stored; GGUF blocks expanded (fuse_norms)
        model = load_encoder(ckpt, "float32", device, attn_impl, fuse_norms, None,
                             weight_dtype=None if stored_fp8 else "float32").model
        found = calibrate_fp16_scales(model, ckpt.tokenizer_or_bundled())
        del model
        return load_encoder(ckpt, dtype, device, attn_impl, fuse_norms, found, compile, weight_dtype=weight_dtype)
    if scaled and fp16_scales == "calibrate":
        model = load_encoder(ckpt, "float32", device, attn_impl, fuse_norms, None,
                             weight_dtype=None if packed else "float32").model
        found = calibrate_fp16_scales(model, ckpt.tokenizer_or_bundled())
        scale_residuals_enc(model, found.attn, found.ffn)
        model.set_weight_dtype(torch.float16)
    else:  # the sidecar is read only for float16 loads: float32 never touches it
        scales = resolve_scales(fp16_scales, ckpt.config, ckpt.path, ckpt.fp16_scales) if scaled else None
        if packed:
            from .gguf import build_packed

            model = build_packed(config, ckpt.source, device)
        else:
            model = build_empty(config, device, ckpt)
        load_checkpoint_into(model, ckpt, fuse_norm_scales=fuse_norms, norm_fusion_via_f32=True, scales=scales)
    encoder = Encoder(model, source_path=Path(ckpt.path), flex_by_default=flex_by_default)
    return encoder.compile() if compile else encoder
