"""The T5_ENCODER value the nodes pass around, and its weights inside a ComfyUI ModelPatcher.

A T5Encoder is a load plan (file, dtype, attention, fused norms, float16 scales, ...) plus the tokenizer. The Fuse
Norms and FP16 Scale nodes return a new plan instead of changing weights: no node mutates an object that ComfyUI
keeps in its output cache, and no copy of the weights is ever made, because the weights are streamed from the file,
already fused and scaled, the first time an Encode node needs them. They then live in a ModelPatcher owned by that
T5Encoder, so ComfyUI's memory manager moves them to the GPU to encode and offloads them when it needs room, and
they are freed when ComfyUI drops the node output holding the T5Encoder. (Two differently configured encoders used
in one graph therefore hold two sets of weights.)

ComfyUI modules are imported inside functions: this package must import without ComfyUI.
"""
import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch

import t5core
from t5core import fp16_scales
from t5core.calibrate import calibrate_fp16_scales
from t5core.checkpoint import SAFETENSORS_SUFFIXES
from t5core.fp16_scales import Scales
from t5core.fp8 import FAST, fp8_matmul_support, log_compute_fallback, resolve_weight_dtype
from t5core.t5_common import CAST_DTYPES, dtype_name, parse_dtype
from t5core.weight_load import default_attention

from .lowvram import make_streamable

log = logging.getLogger("t5core.nodes")

# folder_paths entries listing the text-encoder folders' files of suffixes ComfyUI does not list there itself
EXTRA_FOLDERS = {".tensors": "t5core_tensors", ".gguf": "t5core_gguf"}


# -- model files ----------------------------------------------------------------------------------------------------
def _extra_folder(folder_paths, suffix: str) -> str:
    """Register the entry for `suffix` once; it shares the text-encoder folder list, so paths added later show up."""
    entry = EXTRA_FOLDERS[suffix]
    if entry not in folder_paths.folder_names_and_paths:
        paths = folder_paths.folder_names_and_paths["text_encoders"][0]
        folder_paths.folder_names_and_paths[entry] = (paths, {suffix})
    return entry


def weight_file_names() -> list[str]:
    """.safetensors / .sft files of models/text_encoders (and models/clip), plus tensorizer .tensors and GGUF
    files."""
    import folder_paths

    extra = [n for suffix in EXTRA_FOLDERS for n in folder_paths.get_filename_list(_extra_folder(folder_paths, suffix))]
    names = [n for n in folder_paths.get_filename_list("text_encoders") if n.lower().endswith(SAFETENSORS_SUFFIXES)]
    return sorted(names + extra)


def weight_file_path(name: str) -> str:
    import folder_paths

    suffix = Path(name).suffix.lower()
    folder = _extra_folder(folder_paths, suffix) if suffix in EXTRA_FOLDERS else "text_encoders"
    return folder_paths.get_full_path_or_raise(folder, name)


# -- tokenizer ------------------------------------------------------------------------------------------------------
def comfy_bundled_tokenizer() -> Optional[Path]:
    """ComfyUI's own T5 tokenizer folder (comfy/text_encoders/t5_tokenizer), found through the comfy package
    (a namespace package: it has no __init__.py, so no __file__, only __path__)."""
    import comfy

    folders = [Path(p) / "text_encoders" / "t5_tokenizer" for p in comfy.__path__]
    return next((f for f in folders if f.is_dir()), None)


def resolve_tokenizer(ckpt):
    """-> (tokenizer, where it came from): beside the weights, embedded in the file, or ComfyUI's bundled one."""
    if (tok := ckpt.own_tokenizer()) is not None:
        source = f"{ckpt.tokenizer.name} beside the weights" if ckpt.tokenizer is not None else "embedded in the checkpoint"
    elif (bundled := comfy_bundled_tokenizer()) is not None:
        tok, source = t5core.load_tokenizer(bundled), "ComfyUI's bundled T5 tokenizer"
    else:
        raise FileNotFoundError(f"no T5 tokenizer for {ckpt.path}: put its spiece.model or tokenizer.json beside it")
    vocab = ckpt.config.vocab_size
    # A tokenizer of another family (mT5 / UMT5 with 250k pieces vs T5's 32k) gives ids that are out of range or wrong.
    if tok.vocab_size > vocab or vocab > 2 * tok.vocab_size:
        raise ValueError(f"{ckpt.path} has a {vocab}-token vocabulary but the tokenizer ({source}) has "
                         f"{tok.vocab_size}: put the model's own spiece.model or tokenizer.json beside it")
    return tok, source


# -- float16 scales -------------------------------------------------------------------------------------------------
def scales_text(scales: Optional[Scales]) -> str:
    """The custom-scales syntax (t5core.fp16_scales.parse reads it); 'none' for no scaling."""
    return "none" if scales is None else str(scales)


# -- the T5_ENCODER value -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LoadPlan:
    path: str
    dtype: torch.dtype
    attention: Optional[str]  # "sdpa" / "flex"; None: t5core's default (sdpa)
    compile: bool
    cpu: bool  # load and offload device both the CPU
    fuse_norms: bool = False
    fp16_scales: Optional[Scales] = None  # float16 only; None: no scaling (or the scales baked into the file)
    # fp8 weights (t5core.fp8 names) or float16 / bfloat16 ones for float32 compute; None: as the file (GGUF blocks
    # stay)
    weight_dtype: Optional[str] = None


class T5Encoder:
    """What the T5_ENCODER sockets carry. See the module docstring for the ownership of the weights."""

    def __init__(self, plan: LoadPlan, ckpt, tokenizer, tokenizer_source: str) -> None:
        self.plan = plan
        self.ckpt = ckpt  # t5core.Checkpoint of plan.path, opened once (headers): the weights are read from it
        self.config = ckpt.config  # t5core.T5Config of the file (architecture, and any scales baked into it)
        self.tokenizer = tokenizer
        self.tokenizer_source = tokenizer_source
        self._patcher = None
        self._runtime = None  # t5core.Encoder around the patcher's model

    def with_plan(self, **changes) -> "T5Encoder":
        """A new encoder with a changed plan; it shares the tokenizer, never the weights."""
        return T5Encoder(dataclasses.replace(self.plan, **changes), self.ckpt, self.tokenizer, self.tokenizer_source)

    @property
    def baked_scales(self) -> bool:
        return bool(self.config.enc_ffn_out_scales or self.config.enc_attn_out_scales)

    def preset_scales(self) -> Optional[Scales]:
        """What a float16 load picks by itself: calibrated scales beside the file, else those in its config.json,
        else the preset for its size, else none."""
        return fp16_scales.resolve("auto", self.config, self.plan.path, self.ckpt.fp16_scales)

    def devices(self) -> tuple[torch.device, torch.device]:
        """(load device, offload device), as ComfyUI picks them for text encoders (CPU under --lowvram/--cpu)."""
        import comfy.model_management as mm

        if self.plan.cpu:
            return torch.device("cpu"), torch.device("cpu")
        return mm.text_encoder_device(), mm.text_encoder_offload_device()

    def attention(self) -> str:
        """The attention kernel: as planned, else t5core's choice for this model, device and compile setting."""
        return self.plan.attention or default_attention(self.config, self.plan.dtype, self.devices()[0],
                                                        self.plan.compile)

    def patcher(self):
        """The ModelPatcher holding the weights, loaded from the file on first use (onto the offload device)."""
        if self._patcher is None:
            from comfy.model_patcher import ModelPatcher
            from comfy.patcher_extension import CallbacksMP

            load_device, offload_device = self.devices()
            plan = self.plan
            runtime = t5core.load_encoder(self.ckpt, dtype=plan.dtype, device=offload_device,
                                          attn_impl=self.attention(), fuse_norms=plan.fuse_norms,
                                          fp16_scales=plan.fp16_scales, weight_dtype=plan.weight_dtype or "auto")
            runtime.flex_by_default = plan.attention is None and self.attention() == "flex"
            if plan.compile:  # regional: valid on whichever device ComfyUI moves the weights to (graphs on CUDA)
                runtime.compile_layers()
            make_streamable(runtime.model)  # ComfyUI may load it partially (nodes/lowvram.py)
            # size: ComfyUI's own count (module_size: the state dict, GGUF blocks included), which its partial
            # loads compare with the sizes of the modules they load
            self._patcher = ModelPatcher(runtime.model, load_device=load_device, offload_device=offload_device)
            self._patcher.add_callback(CallbacksMP.ON_DETACH, drop_graphs_when_unloaded(runtime))
            self._patcher.add_callback(CallbacksMP.ON_REGISTER_ALL_HOOK_PATCHES, refuse_weight_hooks)
            self._runtime = runtime
        return self._patcher

    def runtime(self):
        """The t5core.Encoder around the patcher's model, told where ComfyUI's memory manager has put the weights:
        partially loaded (model_lowvram: the modules left on the offload device copy their weights over per call),
        it runs eagerly on the load device; loaded whole, or not at all, where the weights are."""
        patcher = self.patcher()
        self._runtime.stream_weights(patcher.load_device if patcher.model.model_lowvram else None)
        return self._runtime

    def on_device(self):
        """The t5core.Encoder after ComfyUI's memory manager has loaded the weights for the load device: all of
        them, or as many as fit (the others stream)."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher()])
        return self.runtime()

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> float32 [B, L, D] on ComfyUI's intermediate device; no mask, as ComfyUI's T5."""
        import comfy.model_management as mm

        return self.on_device().encode(input_ids).to(mm.intermediate_device())

    def describe(self) -> str:
        """One line for the node UI: precision, attention, architecture, fusion, scales, tokenizer."""
        plan, cfg = self.plan, self.config
        size = fp16_scales.detect_size(cfg)
        parts = [str(plan.dtype).removeprefix("torch.") + (f", weights {plan.weight_dtype}" if plan.weight_dtype else ""),
                 self.attention(),
                 f"T5{' ' + size.upper() if size else ''} ({cfg.num_layers} layers, {cfg.hidden_dim} wide)"]
        if plan.compile:
            parts.append("compiled")
        if plan.fuse_norms or not cfg.elementwise_affine:
            parts.append("norms fused")
        if plan.dtype == torch.float16:
            parts.append("scales baked into the file" if self.baked_scales
                         else f"fp16 scales {scales_text(plan.fp16_scales)}")
        if plan.cpu:
            parts.append("on CPU")
        parts.append(f"tokenizer: {self.tokenizer_source}")
        return " · ".join(parts)


def drop_graphs_when_unloaded(runtime):
    """An ON_DETACH callback: unloaded (unpatch_all, the weights sent to the offload device to make room for a
    diffusion model), the CUDA graphs' memory goes with the weights. ComfyUI's load_models_gpu also detaches every
    model it is about to load, the loaded ones included, without unpatching (their weights stay put): graphs dropped
    then were captured again on every encode (a recapture per prompt, measured on the H200)."""
    def callback(patcher, unpatch_all: bool) -> None:
        if unpatch_all:
            runtime.drop_graphs()
    return callback


def refuse_weight_hooks(patcher, hooks, target_dict, model_options, registered) -> None:
    """ComfyUI's weight hooks (CreateHookLora, SetClipHooks) patch a CLIP's patcher by ComfyUI's weight names, which
    t5core's model does not have (a LoRA loader's patches are translated, nodes/clip.py: hooks are not): an error,
    not a LoRA silently left out."""
    import comfy.hooks

    if hooks.get_type(comfy.hooks.EnumHookType.Weight):
        raise ValueError("T5 Encoder to CLIP (fast): weight hooks (a hook LoRA on the CLIP) are not supported by "
                         "t5core's T5; apply the LoRA with a LoRA loader node")


# -- what the nodes do ----------------------------------------------------------------------------------------------
WEIGHT_DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")


def check_option(what: str, value, choices) -> None:
    """A node option outside its list (an edited or old workflow) -> a ValueError naming the input and choices."""
    if value not in choices:
        raise ValueError(f"{what}: unknown option {value!r}; choose one of {list(choices)}")


def load(name: str, weight_dtype: str, attention: str, compile: bool, device: str) -> T5Encoder:
    check_option("weight_dtype", weight_dtype, WEIGHT_DTYPE_CHOICES)
    check_option("attention", attention, ("auto", "flex", "sdpa"))
    check_option("device", device, ("default", "cpu"))
    check_option("compile", compile, (True, False))
    path = weight_file_path(name)
    ckpt = t5core.open_checkpoint(path)  # reads the header only: rejects non-T5 files before any weight is read
    tokenizer, source = resolve_tokenizer(ckpt)
    plan = LoadPlan(path=str(path), dtype=torch.float32, attention=None if attention == "auto" else attention,
                    compile=compile, cpu=device == "cpu")
    encoder = T5Encoder(plan, ckpt, tokenizer, source)
    fp8_choice = weight_dtype.startswith("fp8")
    if weight_dtype == "auto" or fp8_choice:  # compute in bf16 where the GPU supports it
        dtype = torch.bfloat16 if _bf16_ok(encoder.devices()[0]) else torch.float32
    else:
        dtype = parse_dtype(weight_dtype)  # bf16 / fp16 / fp32: the compute dtype
    # fp8 files keep their fp8 weights and GGUF files their blocks (as ComfyUI keeps them); fp8_* quantize others.
    # (A GGUF file's blocks are not fp8: no tensor is read to know it.)
    stored = torch.float32 if ckpt.format == "gguf" else ckpt.projection_dtype()
    wdtype = resolve_weight_dtype(weight_dtype if fp8_choice else "auto", dtype, stored, ckpt.path)
    if dtype == torch.float32 and not fp8_choice and stored in CAST_DTYPES.values():
        wdtype = dtype_name(stored)  # as ComfyUI: the file's 16-bit weights, float32 compute (CastLinear)
    if wdtype == FAST and not fp8_matmul_support(encoder.devices()[0])[0]:
        log_compute_fallback(encoder.devices()[0])  # at load; once per device (encode would say it otherwise)
    scales = encoder.preset_scales() if dtype == torch.float16 and not encoder.baked_scales else None
    return encoder.with_plan(dtype=dtype, fp16_scales=scales, weight_dtype=wdtype)


def _bf16_ok(device: torch.device) -> bool:
    import comfy.model_management as mm

    return device.type != "cpu" and mm.should_use_bf16(device)


def fuse_norms(encoder: T5Encoder) -> T5Encoder:
    return encoder.with_plan(fuse_norms=True)


def to_fp16(encoder: T5Encoder, mode: str, custom: str) -> tuple[T5Encoder, str]:
    """-> (float16 encoder, the scales in the custom-scales syntax)."""
    if encoder.baked_scales:
        if mode != "preset":
            log.warning("t5core: %s already has float16 scales baked in; using them (mode %r ignored)",
                        encoder.plan.path, mode)
        baked = Scales.from_config(encoder.config)
        return in_float16(encoder, None), scales_text(baked)
    if mode == "preset":
        scales = encoder.preset_scales()
        if scales is None:
            log.warning("t5core: no float16 preset for a %d-layer, %d-wide T5: no scaling (use auto-calibrate if "
                        "the output overflows)", encoder.config.num_layers, encoder.config.hidden_dim)
    elif mode == "custom":
        scales = fp16_scales.resolve(custom, encoder.config)  # '1,1,1/2,...' (FFN-out) or 'ATTN;FFN'
    elif mode == "auto-calibrate":
        scales = calibrated_scales(encoder)
    else:
        check_option("mode", mode, ("preset", "custom", "auto-calibrate"))
    return in_float16(encoder, scales), scales_text(scales)


def in_float16(encoder: T5Encoder, scales: Optional[Scales]) -> T5Encoder:
    """The encoder computing in float16; 16-bit weight storage (float32 compute only) gives way to float16 weights."""
    weight_dtype = None if encoder.plan.weight_dtype in CAST_DTYPES else encoder.plan.weight_dtype
    return encoder.with_plan(dtype=torch.float16, fp16_scales=scales, weight_dtype=weight_dtype)


def calibrated_scales(encoder: T5Encoder) -> Scales:
    """Measure activations in float32 on varied prompts (t5core.calibrate) and pick scales with headroom."""
    import comfy.model_management as mm

    plan = encoder.plan
    if plan.dtype == torch.float32:
        reference = encoder  # its float32 weights stay loaded for whoever else uses this encoder
    else:  # a temporary float32 copy, dropped (and offloaded) as soon as the scales are known
        reference = encoder.with_plan(dtype=torch.float32, fp16_scales=None, compile=False)
    runtime = reference.on_device()  # loaded whole, or partially (the rest streams to runtime.device)
    scales = calibrate_fp16_scales(runtime.model, encoder.tokenizer, device=runtime.device)
    if reference is not encoder:
        del reference
        mm.soft_empty_cache()
    return scales
