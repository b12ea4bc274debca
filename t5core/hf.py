"""transformers / diffusers adapter: FastT5EncoderModel, a drop-in for transformers' T5EncoderModel.

Pipelines (Flux, SD3, PixArt, Chroma, ...) call `text_encoder(input_ids, attention_mask=..., output_hidden_states=...)`
and read `[0]` and `.dtype`; diffusers saves and reloads components through `save_pretrained` / `from_pretrained`
and records them as (module, class name) in model_index.json. Subclassing PreTrainedModel (imported here at module
level, where diffusers looks it up by name) is what makes diffusers accept, save and reload this class.

This module is the only one in t5core that imports transformers: `import t5core` works without it.
"""
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PreTrainedModel
from transformers import T5Config as HFT5Config
from transformers.modeling_outputs import BaseModelOutput

from .checkpoint import (Checkpoint, CheckpointError, TensorDictSource, config_from_hf, hf_config_dict, native_target,
                         open_checkpoint)
from .t5_common import DTYPES, T5Config, parse_dtype
from .runtime import Encoder
from .t5_encoder import T5EncoderStack
from .save import save_hf_folder
from .fp16_scales import Scales, resolve as resolve_scales
from .weight_load import build_empty, load_checkpoint_into, load_encoder, pick_attention

HF_T5_CLASSES = ("T5EncoderModel", "MT5EncoderModel", "UMT5EncoderModel")
DENOISER_SLOTS = ("transformer", "unet", "prior", "decoder")
# Arguments diffusers / transformers callers pass to from_pretrained that mean nothing for local files.
_HUB_AND_LOADER_KWARGS = {"low_cpu_mem_usage", "use_safetensors", "local_files_only", "cache_dir", "revision", "token",
                          "force_download", "proxies", "trust_remote_code", "offload_state_dict", "_from_auto"}
# Features this class does not have: accepted only when unset.
_UNSUPPORTED_KWARGS = ("max_memory", "offload_folder", "quantization_config", "variant")


class FastT5EncoderModel(PreTrainedModel):
    """A T5 / mT5 / UMT5 encoder running on t5core's T5EncoderStack (fused projections, float32 residual,
    SDPA or flex attention), with transformers' T5EncoderModel interface.

    `.encoder` is the T5EncoderStack (the nn.Module) and `.runtime` the t5core.runtime.Encoder that runs it.
    `.config` is a transformers T5Config describing the architecture."""

    config_class = HFT5Config
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    _no_split_modules = ["T5EncoderLayer"]

    def __init__(self, config, encoder: Optional[T5EncoderStack] = None) -> None:
        super().__init__(config)
        self.encoder = encoder if encoder is not None else T5EncoderStack(config_from_hf(config.to_dict()))
        self.runtime = Encoder(self.encoder)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Never re-initialise: weights come from a checkpoint (or torch defaults when built from a config)."""

    # -- the properties pipelines read ---------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The weight dtype (norms and position-bias tables stay float32 and must not be reported)."""
        return self.encoder.config.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.vocab_embed

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                output_hidden_states: bool = False, return_dict: bool = True, inputs_embeds: Optional[Tensor] = None,
                output_attentions: bool = False, **kwargs):
        """input_ids [B, L], attention_mask [B, L] (1 = real token) -> BaseModelOutput with last_hidden_state
        [B, L, D] in self.dtype, as transformers' T5 returns. Runs without autograd (inference only).

        output_hidden_states=True adds transformers' layout: (embeddings, outputs of layers 1..N-1, final output)."""
        if inputs_embeds is not None or input_ids is None:
            raise NotImplementedError("FastT5EncoderModel takes input_ids only, not inputs_embeds")
        if output_attentions:
            raise NotImplementedError("FastT5EncoderModel cannot return attention weights (its attention kernels never form them)")
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be [batch, seq_len] (1 = real token), got shape {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.bool()
        states = self._hidden_states(input_ids, attention_mask) if output_hidden_states else None
        if states is not None:
            last = states[-1]
        else:
            # Outside inference mode a converted copy is an ordinary tensor: later autograd (e.g. a trained
            # transformer reading these embeddings) can save it for backward.
            last = self.runtime.encode(input_ids, attention_mask).to(self.dtype, copy=True)  # [B, L, D]
        if not return_dict:
            return (last,) if states is None else (last, states)
        return BaseModelOutput(last_hidden_state=last, hidden_states=states)

    def _hidden_states(self, input_ids: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, ...]:
        """Every layer's output [B, L, D] in self.dtype, divided by the float16 residual scale in effect there."""
        outs: list[Tensor] = []
        hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(mod.stream_after(out)))
                 for layer in self.encoder.layers]
        device = self.encoder.unit_scale.device
        try:  # eagerly: hooks see every layer (a compiled region or a graph replay runs none)
            with torch.inference_mode(), torch.compiler.set_stance("force_eager"):
                last = self.encoder(input_ids.to(device), input_mask=None if mask is None else mask.to(device))
        finally:
            for h in hooks:
                h.remove()
        scales = Scales.from_config(self.encoder.config)
        stream_scale, states = 1.0, []
        for out, sa, sf in zip(outs[:-1], scales.attn, scales.ffn):
            stream_scale *= sa * sf
            states.append(out / stream_scale)
        with torch.inference_mode():
            embeddings = self.encoder.vocab_embed(input_ids.to(device))
        return tuple(t.to(self.dtype, copy=True) for t in (embeddings, *states, last))

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, subfolder: Optional[str] = None,
                        torch_dtype=None, dtype=None, attn_impl: Optional[str] = None, fuse_norms: bool = False,
                        fp16_scales="auto", compile: bool = False, device=None, device_map=None,
                        weight_dtype="auto", **kwargs) -> "FastT5EncoderModel":
        """Load any checkpoint t5core.load_encoder reads: a Hugging Face folder, a diffusers repo (its T5 subfolder
        is found, or pass subfolder="text_encoder_2"), a ComfyUI single file, a tensorizer folder.

        torch_dtype / dtype: the compute dtype, float32, bfloat16 or float16; None or "auto" keeps the stored
        dtype (float8 files compute in bfloat16), as transformers does. device / device_map ({"": device} or a
        device string) place the weights; attn_impl: "sdpa" or "flex" (None: flex for a compiled UMT5 in 16 bits on
        CUDA, else sdpa). fuse_norms, fp16_scales, compile and weight_dtype ("auto": float8 files keep fp8 weights;
        "fp8_e4m3fn", "fp8_e5m2", "fp8_e4m3fn_fast", or the compute dtype to expand them; t5core.fp8; "float16" /
        "bfloat16" with float32 compute) are t5core.load_encoder's options; a float16 load with fp16_scales="auto"
        reuses scales saved by save_pretrained, which writes fp8 weights as ComfyUI's scaled fp8 file. Hub names are
        not downloaded: pass a local path."""
        if model_args:
            raise TypeError(f"from_pretrained takes no positional arguments after the path, got {model_args}")
        _check_loader_kwargs(kwargs)
        path = Path(pretrained_model_name_or_path).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"{path}: no such file or folder. FastT5EncoderModel reads local files only; download a Hub model "
                f"first (huggingface_hub.snapshot_download) and pass its folder")
        ckpt = open_checkpoint(path, subfolder=subfolder)  # headers only; errors name the file and problem
        dtype = _requested_dtype(torch_dtype, dtype) or _stored_dtype(ckpt)
        encoder = load_encoder(ckpt, dtype=dtype, device=_device_from(device, device_map), attn_impl=attn_impl,
                               fuse_norms=fuse_norms, fp16_scales=fp16_scales, compile=compile,
                               weight_dtype=weight_dtype)
        return cls._wrap(encoder, name_or_path=str(path / subfolder if subfolder else path))

    @classmethod
    def from_hf_model(cls, hf_model: PreTrainedModel, torch_dtype=None, attn_impl: Optional[str] = None,
                      fuse_norms: bool = False, fp16_scales="auto", compile: bool = False) -> "FastT5EncoderModel":
        """Convert a loaded transformers T5/mT5/UMT5 encoder, on its device, in its dtype unless torch_dtype says.

        Without fuse_norms and float16 residual scales, the weights are shared, not copied: embedding and output
        projections are the same tensors, and hf_model's q/k/v and wi_0/wi_1 become views of the fused
        projections here (hf_model keeps working). Otherwise the weights are converted into new tensors."""
        if type(hf_model).__name__ not in HF_T5_CLASSES:
            raise TypeError(f"expected a transformers {' / '.join(HF_T5_CLASSES)}, got {type(hf_model).__name__}")
        device = hf_model.device
        if device.type == "meta":
            raise ValueError(f"{type(hf_model).__name__} has its weights on the meta device (sequential CPU offload?): "
                             "convert it before enabling offload")
        dtype = _requested_dtype(torch_dtype, None) or hf_model.dtype
        config = config_from_hf(hf_model.config.to_dict())
        impl, flex_by_default = pick_attention(attn_impl, config, dtype, device, compile)
        config = config.model_copy(update={"dtype": dtype, "attn_impl": impl})
        scales = resolve_scales(fp16_scales, config) if dtype == torch.float16 else None
        if fuse_norms or (scales is not None and not scales.is_unit):
            encoder = build_empty(config, device)
            load_checkpoint_into(encoder, _module_checkpoint(hf_model), fuse_norm_scales=fuse_norms,
                                 norm_fusion_via_f32=True, scales=scales)
        else:
            encoder = _share_weights(hf_model, config)
        runtime = Encoder(encoder, flex_by_default=flex_by_default)
        return cls._wrap(runtime.compile() if compile else runtime, name_or_path=hf_model.name_or_path)

    @classmethod
    def _wrap(cls, runtime: Encoder, name_or_path: str) -> "FastT5EncoderModel":
        config = _hf_config(runtime.config)
        config._name_or_path = name_or_path
        model = cls(config, encoder=runtime.model)
        model.runtime = runtime  # keeps how it was compiled
        return model.eval()

    # -- saving --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write config.json + model.safetensors in Hugging Face T5 form (t5core.save.save_hf_folder):
        transformers' T5EncoderModel (or UMT5EncoderModel) reads the folder, and so does from_pretrained here,
        which restores fused norms and, for float16, the residual scales."""
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("push_to_hub: save to a folder and upload it with huggingface_hub")
        save_hf_folder(self.encoder, save_directory)


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------
def swap_text_encoder(pipe, **load_kwargs):
    """Replace every transformers T5 encoder of a built diffusers pipeline by a FastT5EncoderModel, in place.

    Finds the slot(s) by class (text_encoder_2 for Flux, text_encoder_3 for SD3, text_encoder for PixArt, Chroma,
    IF, AuraFlow, Wan, ...), keeps device and dtype (unless torch_dtype is given), shares weights where possible
    (see FastT5EncoderModel.from_hf_model, which takes load_kwargs) and re-applies model CPU offload if it was on.
    Returns pipe."""
    models = {name: comp for name, comp in pipe.components.items() if isinstance(comp, nn.Module)}
    slots = [name for name, comp in models.items() if type(comp).__name__ in HF_T5_CLASSES]
    if not slots:
        if any(isinstance(comp, FastT5EncoderModel) for comp in models.values()):
            return pipe  # swapped already
        found = {name: type(comp).__name__ for name, comp in models.items()}
        raise ValueError(f"{type(pipe).__name__} has no transformers T5 encoder to swap (its models: {found})")
    offload_device = getattr(pipe, "_offload_device", None) if getattr(pipe, "_all_hooks", None) else None
    for name in slots:
        old = getattr(pipe, name)
        _check_dtype_matches_denoiser(pipe, name, _requested_dtype(load_kwargs.get("torch_dtype"), None) or old.dtype)
        setattr(pipe, name, FastT5EncoderModel.from_hf_model(old, **load_kwargs))  # also updates model_index
    if offload_device is not None:
        pipe.enable_model_cpu_offload(device=offload_device)  # hooks were on the old module
    return pipe


def _check_dtype_matches_denoiser(pipe, slot: str, dtype: torch.dtype) -> None:
    """Pipelines cast the T5 output to the encoder's dtype and feed it to the denoiser as is: a mismatch would fail
    deep inside the transformer with an unrelated-looking matmul error, so refuse it here."""
    name = next((n for n in DENOISER_SLOTS if isinstance(getattr(pipe, n, None), nn.Module)), None)
    if name is not None and getattr(pipe, name).dtype != dtype:
        have = getattr(pipe, name).dtype
        raise ValueError(
            f"{slot} would run in {dtype} but pipe.{name} is {have}: {type(pipe).__name__} casts the T5 output to the "
            f"encoder's dtype and feeds it to the {name}. Pass torch_dtype={have} to swap_text_encoder, or convert "
            f"the pipeline first (pipe.to({dtype}))")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _hf_config(config: T5Config):
    """The transformers config for an encoder, describing its standard (unfused, unscaled) form."""
    plain = config.model_copy(update={"elementwise_affine": True, "enc_attn_out_scales": None, "enc_ffn_out_scales": None})
    d = hf_config_dict(plain)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _check_loader_kwargs(kwargs: dict) -> None:
    for key in _UNSUPPORTED_KWARGS:
        if kwargs.get(key) is not None:
            raise NotImplementedError(f"FastT5EncoderModel.from_pretrained does not support {key}={kwargs[key]!r}")
    unknown = set(kwargs) - _HUB_AND_LOADER_KWARGS - set(_UNSUPPORTED_KWARGS)
    if unknown:
        raise TypeError(f"FastT5EncoderModel.from_pretrained got unexpected arguments {sorted(unknown)}")


def _requested_dtype(torch_dtype, dtype) -> Optional[torch.dtype]:
    """torch_dtype (transformers 4 name) or dtype (transformers 5 / diffusers) -> a dtype, or None for the stored one."""
    given = [d for d in (torch_dtype, dtype) if d is not None and d != "auto"]
    if len(given) == 2 and parse_dtype(given[0]) != parse_dtype(given[1]):
        raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree: pass one")
    return parse_dtype(given[0]) if given else None


def _stored_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The dtype the checkpoint's projection weights are stored in; float8 files compute in bfloat16."""
    stored = ckpt.projection_dtype()
    if stored in DTYPES.values():
        return stored
    return torch.bfloat16 if stored.is_floating_point else torch.float32


def _device_from(device, device_map) -> torch.device:
    if device_map is None:
        return torch.device(device if device is not None else "cpu")
    if isinstance(device_map, dict) and set(device_map) == {""}:
        device_map = device_map[""]
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    if not isinstance(device_map, (str, torch.device)) or str(device_map) in ("auto", "balanced", "sequential"):
        raise NotImplementedError(f"device_map={device_map!r}: FastT5EncoderModel loads onto one device; pass device=")
    if device is not None and torch.device(device) != torch.device(device_map):
        raise ValueError(f"device={device} and device_map={device_map} disagree")
    return torch.device(device_map)


def _module_checkpoint(hf_model: PreTrainedModel) -> Checkpoint:
    tensors = {k: v.detach() for k, v in hf_model.state_dict().items()}
    return Checkpoint(path=Path(f"<{type(hf_model).__name__} in memory>"), format="memory",
                      source=TensorDictSource(tensors), keys={k: k for k in tensors},
                      config=config_from_hf(hf_model.config.to_dict()))


@torch.no_grad()
def _share_weights(hf_model: PreTrainedModel, config: T5Config) -> T5EncoderStack:
    """A T5EncoderStack using hf_model's tensors where dtype and device allow (see from_hf_model).

    Only names are kept between parameters, so each replaced HF projection is freed as soon as its fused
    successor exists: the peak is one fused parameter more than hf_model, not a second model."""
    device = hf_model.device
    sources: dict[str, dict[int, str]] = {}  # native name -> {part: HF name}; tied embeddings appear once
    for key, _ in hf_model.named_parameters():
        if (target := native_target(key, config)) is not None:
            sources.setdefault(target[0], {}).setdefault(target[1], key)
    with torch.device("meta"):
        encoder = T5EncoderStack(config)
    state = {}
    for name, param in encoder.named_parameters():
        keys = [k for _, k in sorted(sources[name].items())]
        same_dtype = all(hf_model.get_parameter(k).dtype == param.dtype for k in keys)
        parts = [hf_model.get_parameter(k).detach().to(param.dtype) for k in keys]  # no copy when same_dtype
        state[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
        del parts
        if len(keys) > 1 and same_dtype:  # the HF projections become views of the fused one
            for key, view in zip(keys, state[name].chunk(len(keys))):
                _set_parameter(hf_model, key, view)
    encoder.load_state_dict(state, assign=True)
    for module in encoder.modules():  # the residual-scale buffers are not in a state dict: make them real
        for bname, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                module.register_buffer(bname, torch.ones(buf.shape, dtype=buf.dtype, device=device), persistent=False)
    encoder.apply_residual_scales_from_config()
    return encoder.eval()


def _set_parameter(model: nn.Module, dotted: str, tensor: Tensor) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(tensor, requires_grad=old.requires_grad))
