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
import importlib
import importlib.util
import logging
import sys
from fractions import Fraction
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger("t5core.nodes")

TENSORS_FOLDER = "t5core_tensors"  # folder_paths entry listing tensorizer files in the text-encoder folders
WEIGHT_SUFFIXES = (".safetensors", ".sft")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BUNDLED = Path(__file__).resolve().parents[1] / "t5core" / "__init__.py"
Scales = tuple[Optional[tuple[float, ...]], Optional[tuple[float, ...]]]  # (attention-out, FFN-out) per layer


def t5core():
    """The t5core library: already imported, else this repository's copy, else an installed one.

    The copy is loaded under its own name, t5core, rather than by putting the repository on sys.path, where its
    `nodes` package would shadow ComfyUI's `nodes` module. Imported on first use, so that the nodes register even
    when a dependency is missing."""
    if "t5core" in sys.modules:
        return sys.modules["t5core"]
    try:
        if not _BUNDLED.is_file():
            return importlib.import_module("t5core")
        spec = importlib.util.spec_from_file_location("t5core", _BUNDLED,
                                                      submodule_search_locations=[str(_BUNDLED.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["t5core"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            for name in [n for n in sys.modules if n == "t5core" or n.startswith("t5core.")]:
                del sys.modules[name]
            raise
        return module
    except ImportError as e:
        raise ImportError(f"the t5core library cannot be imported ({e}); run `pip install -r requirements.txt` "
                          f"with ComfyUI's Python") from e


def lib(submodule: str):
    """A t5core submodule, e.g. lib("calibrate")."""
    t5core()
    return importlib.import_module(f"t5core.{submodule}")


# -- model files ----------------------------------------------------------------------------------------------------
def _tensors_folder(folder_paths) -> str:
    """Register the tensorizer entry once; it shares the text-encoder folder list, so paths added later show up."""
    if TENSORS_FOLDER not in folder_paths.folder_names_and_paths:
        paths = folder_paths.folder_names_and_paths["text_encoders"][0]
        folder_paths.folder_names_and_paths[TENSORS_FOLDER] = (paths, {".tensors"})
    return TENSORS_FOLDER


def weight_file_names() -> list[str]:
    """.safetensors / .sft files of models/text_encoders (and models/clip), plus tensorizer .tensors files."""
    import folder_paths

    tensors = folder_paths.get_filename_list(_tensors_folder(folder_paths))
    names = [n for n in folder_paths.get_filename_list("text_encoders") if n.lower().endswith(WEIGHT_SUFFIXES)]
    return sorted(names + tensors)


def weight_file_path(name: str) -> str:
    import folder_paths

    folder = _tensors_folder(folder_paths) if name.lower().endswith(".tensors") else "text_encoders"
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
    load_tokenizer = lib("tokenizer").load_tokenizer
    if ckpt.tokenizer is not None:
        tok, source = load_tokenizer(ckpt.tokenizer), f"{ckpt.tokenizer.name} beside the weights"
    elif ckpt.tokenizer_bytes:
        tok, source = load_tokenizer(ckpt.tokenizer_bytes), "embedded in the checkpoint"
    elif (bundled := comfy_bundled_tokenizer()) is not None:
        tok, source = load_tokenizer(bundled), "ComfyUI's bundled T5 tokenizer"
    else:
        raise FileNotFoundError(f"no T5 tokenizer for {ckpt.path}: put its spiece.model or tokenizer.json beside it")
    vocab = ckpt.config.vocab_size
    # A tokenizer of another family (mT5 / UMT5 with 250k pieces vs T5's 32k) gives ids that are out of range or wrong.
    if tok.vocab_size > vocab or vocab > 2 * tok.vocab_size:
        raise ValueError(f"{ckpt.path} has a {vocab}-token vocabulary but the tokenizer ({source}) has "
                         f"{tok.vocab_size}: put the model's own spiece.model or tokenizer.json beside it")
    return tok, source


# -- float16 scales -------------------------------------------------------------------------------------------------
def format_scales(scales: Scales) -> str:
    """'1,1,0.5' (FFN-out) or 'ATTN;FFN' when attention scales are not all 1: the custom-scales syntax."""
    attn, ffn = scales

    def text(values):
        return ",".join(format(v, "g") for v in values)

    if attn and any(a != 1 for a in attn):
        return f"{text(attn)};{text(ffn or [1.0] * len(attn))}"
    return text(ffn) if ffn else "none"


def parse_scales(text: str, num_layers: int) -> Scales:
    """'1,1,1/2,...' (FFN-out, one per layer) or 'ATTN;FFN'; every scale a power of two."""
    check_scales = lib("residual_scale").check_scales

    def values(part: str, what: str) -> tuple[float, ...]:
        try:
            parsed = [float(Fraction(v.strip())) for v in part.replace("\n", ",").split(",") if v.strip()]
        except (ValueError, ZeroDivisionError, OverflowError) as e:
            raise ValueError(f"custom scales: cannot read {part.strip()!r} ({e}); write e.g. 1,1,0.5,...") from e
        return tuple(check_scales(parsed, num_layers, what))

    if text.count(";") > 1:
        raise ValueError("custom scales: expected 'FFN scales' or 'ATTN scales;FFN scales'")
    if ";" in text:
        attn, ffn = text.split(";")
        return values(attn, "attention-out scales"), values(ffn, "FFN-out scales")
    return None, values(text, "FFN-out scales")


def preset_scales(path: str, config) -> Scales:
    """Calibrated scales saved beside the file, else the preset for the detected size, else none."""
    attn, ffn = lib("calibrate").load_calibrated_scales(path) or lib("checkpoint_info").suggested_scales(config)
    return (tuple(attn) if attn else None), (tuple(ffn) if ffn else None)


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


class T5Encoder:
    """What the T5_ENCODER sockets carry. See the module docstring for the ownership of the weights."""

    def __init__(self, plan: LoadPlan, config, tokenizer, tokenizer_source: str) -> None:
        self.plan = plan
        self.config = config  # t5core.T5Config of the file (architecture, and any scales baked into it)
        self.tokenizer = tokenizer
        self.tokenizer_source = tokenizer_source
        self._patcher = None

    def with_plan(self, **changes) -> "T5Encoder":
        """A new encoder with a changed plan; it shares the tokenizer, never the weights."""
        return T5Encoder(dataclasses.replace(self.plan, **changes), self.config, self.tokenizer, self.tokenizer_source)

    @property
    def baked_scales(self) -> bool:
        return bool(self.config.enc_ffn_out_scales or self.config.enc_attn_out_scales)

    def devices(self) -> tuple[torch.device, torch.device]:
        """(load device, offload device), as ComfyUI picks them for text encoders (CPU under --lowvram/--cpu)."""
        import comfy.model_management as mm

        if self.plan.cpu:
            return torch.device("cpu"), torch.device("cpu")
        return mm.text_encoder_device(), mm.text_encoder_offload_device()

    def attention(self) -> str:
        """The attention kernel: as planned, else SDPA (t5core's default, which needs no Triton)."""
        return self.plan.attention or "sdpa"

    def patcher(self):
        """The ModelPatcher holding the weights, loaded from the file on first use (onto the offload device)."""
        if self._patcher is None:
            from comfy.model_patcher import ModelPatcher

            load_device, offload_device = self.devices()
            plan = self.plan
            model = t5core().load_encoder(plan.path, dtype=plan.dtype, device=offload_device,
                                          attn_impl=self.attention(), fuse_norms=plan.fuse_norms,
                                          fp16_scales=plan.fp16_scales)
            if plan.compile:  # regional: valid on whichever device ComfyUI moves the weights to (graphs on CUDA)
                model.compile_layers()
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            self._patcher = ModelPatcher(model, load_device=load_device, offload_device=offload_device, size=size)
        return self._patcher

    def model_on_device(self):
        """The T5EncoderStack, moved to the load device by ComfyUI's memory manager."""
        import comfy.model_management as mm

        patcher = self.patcher()
        # Whole model: its plain nn.Linear layers cannot stream weights the way ComfyUI's cast layers do.
        mm.load_models_gpu([patcher], force_full_load=True)
        return patcher.model

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> float32 [B, L, D] on ComfyUI's intermediate device; no mask, as ComfyUI's T5."""
        import comfy.model_management as mm

        return self.model_on_device().encode(input_ids).to(mm.intermediate_device())

    def describe(self) -> str:
        """One line for the node UI: precision, attention, architecture, fusion, scales, tokenizer."""
        plan, cfg = self.plan, self.config
        size = lib("checkpoint_info").detect_size(cfg)
        parts = [str(plan.dtype).removeprefix("torch."), self.attention(),
                 f"T5{' ' + size.upper() if size else ''} ({cfg.num_layers} layers, {cfg.hidden_dim} wide)"]
        if plan.compile:
            parts.append("compiled")
        if plan.fuse_norms or not cfg.elementwise_affine:
            parts.append("norms fused")
        if plan.dtype == torch.float16:
            parts.append("scales baked into the file" if self.baked_scales
                         else f"fp16 scales {format_scales(plan.fp16_scales or (None, None))}")
        if plan.cpu:
            parts.append("on CPU")
        parts.append(f"tokenizer: {self.tokenizer_source}")
        return " · ".join(parts)


# -- what the nodes do ----------------------------------------------------------------------------------------------
def check_option(what: str, value, choices) -> None:
    """A node option outside its list (an edited or old workflow) -> a ValueError naming the input and choices."""
    if value not in choices:
        raise ValueError(f"{what}: unknown option {value!r}; choose one of {list(choices)}")


def load(name: str, weight_dtype: str, attention: str, compile: bool, device: str) -> T5Encoder:
    check_option("weight_dtype", weight_dtype, ("auto", *DTYPES))
    check_option("attention", attention, ("auto", "flex", "sdpa"))
    check_option("device", device, ("default", "cpu"))
    check_option("compile", compile, (True, False))
    path = weight_file_path(name)
    ckpt = t5core().open_checkpoint(path)  # reads the header only: rejects non-T5 files before any weight is read
    tokenizer, source = resolve_tokenizer(ckpt)
    plan = LoadPlan(path=str(path), dtype=torch.float32, attention=None if attention == "auto" else attention,
                    compile=compile, cpu=device == "cpu")
    encoder = T5Encoder(plan, ckpt.config, tokenizer, source)
    if weight_dtype == "auto":
        dtype = torch.bfloat16 if _bf16_ok(encoder.devices()[0]) else torch.float32
    else:
        dtype = DTYPES[weight_dtype]
    scales = preset_scales(str(path), ckpt.config) if dtype == torch.float16 and not encoder.baked_scales else None
    return encoder.with_plan(dtype=dtype, fp16_scales=scales)


def _bf16_ok(device: torch.device) -> bool:
    import comfy.model_management as mm

    return device.type != "cpu" and mm.should_use_bf16(device)


def fuse_norms(encoder: T5Encoder) -> T5Encoder:
    return encoder.with_plan(fuse_norms=True)


def to_fp16(encoder: T5Encoder, mode: str, custom_scales: str) -> tuple[T5Encoder, str]:
    """-> (float16 encoder, the scales in the custom-scales syntax)."""
    if encoder.baked_scales:
        if mode != "preset":
            log.warning("t5core: %s already has float16 scales baked in; using them (mode %r ignored)",
                        encoder.plan.path, mode)
        cfg = encoder.config
        baked = (tuple(cfg.enc_attn_out_scales or ()) or None, tuple(cfg.enc_ffn_out_scales or ()) or None)
        return encoder.with_plan(dtype=torch.float16, fp16_scales=None), format_scales(baked)
    if mode == "preset":
        scales = preset_scales(encoder.plan.path, encoder.config)
        if scales == (None, None):
            log.warning("t5core: no float16 preset for a %d-layer, %d-wide T5: no scaling (use auto-calibrate if "
                        "the output overflows)", encoder.config.num_layers, encoder.config.hidden_dim)
    elif mode == "custom":
        scales = parse_scales(custom_scales, encoder.config.num_layers)
    elif mode == "auto-calibrate":
        scales = calibrated_scales(encoder)
    else:
        check_option("mode", mode, ("preset", "custom", "auto-calibrate"))
    return encoder.with_plan(dtype=torch.float16, fp16_scales=scales), format_scales(scales)


def calibrated_scales(encoder: T5Encoder) -> Scales:
    """Measure activations in float32 on varied prompts (t5core.calibrate) and pick scales with headroom."""
    import comfy.model_management as mm

    plan = encoder.plan
    if plan.dtype == torch.float32:
        reference = encoder  # its float32 weights stay loaded for whoever else uses this encoder
    else:  # a temporary float32 copy, dropped (and offloaded) as soon as the scales are known
        reference = encoder.with_plan(dtype=torch.float32, fp16_scales=None, compile=False)
    attn, ffn = lib("calibrate").calibrate_fp16_scales(reference.model_on_device(), encoder.tokenizer)
    if reference is not encoder:
        del reference
        mm.soft_empty_cache()
    return tuple(attn), tuple(ffn)
