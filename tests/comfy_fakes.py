"""Small stand-ins for the ComfyUI modules the nodes touch, with ComfyUI's signatures (read from its source):
folder_paths, comfy (its package folder holds the bundled T5 tokenizer), comfy.model_management,
comfy.model_patcher (with its partial loading), comfy.patcher_extension, comfy.ops (the cast-weights mixin), comfy.float
(its rounding, 32- and 16-bit), comfy.sd (CLIP, with toy CLIP-L / CLIP-G encoders) and, optionally, comfy_api.latest.

install(root, ...) puts them into sys.modules; the caller removes them again (see the fixtures in the tests).
"""
import os
import shutil
import sys
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

CPU = torch.device("cpu")


# -- folder_paths ---------------------------------------------------------------------------------------------------
def make_folder_paths(models_dir: Path) -> types.ModuleType:
    fp = types.ModuleType("folder_paths")
    fp.supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
    fp.models_dir = str(models_dir)
    fp.folder_names_and_paths = {
        "text_encoders": ([str(models_dir / "text_encoders"), str(models_dir / "clip")], fp.supported_pt_extensions),
        "embeddings": ([str(models_dir / "embeddings")], fp.supported_pt_extensions),
    }

    def map_legacy(folder_name: str) -> str:
        return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)

    def get_folder_paths(folder_name: str) -> list[str]:
        return fp.folder_names_and_paths[map_legacy(folder_name)][0][:]

    def get_filename_list(folder_name: str) -> list[str]:
        folders, extensions = fp.folder_names_and_paths[map_legacy(folder_name)]
        found = set()
        for folder in folders:
            for dirpath, _, files in os.walk(folder, followlinks=True):
                for f in files:
                    rel = os.path.relpath(os.path.join(dirpath, f), folder)
                    if not extensions or os.path.splitext(rel)[-1].lower() in extensions:
                        found.add(rel)
        return sorted(found)

    def get_full_path(folder_name: str, filename: str):
        folder_name = map_legacy(folder_name)
        if folder_name not in fp.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for folder in fp.folder_names_and_paths[folder_name][0]:
            if os.path.isfile(os.path.join(folder, filename)):
                return os.path.join(folder, filename)
        return None

    def get_full_path_or_raise(folder_name: str, filename: str) -> str:
        path = get_full_path(folder_name, filename)
        if path is None:
            raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
        return path

    for f in (map_legacy, get_folder_paths, get_filename_list, get_full_path, get_full_path_or_raise):
        setattr(fp, f.__name__, f)
    return fp


# -- comfy.model_management -----------------------------------------------------------------------------------------
def make_model_management() -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = []
    mm.load_calls = []  # test hook: (models, force_full_load) of every load_models_gpu call
    # test hook: the bytes of weights load_models_gpu lets a model put on the load device, as it computes them from
    # free memory under --lowvram or on a full GPU (0.1 under --novram); None: the model fits
    mm.weight_budget = None
    mm.cast_calls = []  # test hook: every tensor cast_to was given (what streamed layers copied for a call)

    def get_torch_device():
        return CPU  # this machine has no GPU: ComfyUI then runs everything on the CPU

    def text_encoder_device():
        return get_torch_device()

    def text_encoder_offload_device():
        return CPU

    def intermediate_device():
        return CPU

    def should_use_bf16(device=None, model_params=0, prioritize_performance=True, manual_cast=False):
        return not (device is not None and device.type == "cpu")

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        mm.load_calls.append((list(models), force_full_load))
        for patcher in models:
            # as ComfyUI's: every loaded model sharing the weights (is_clone, which the patcher itself is) is taken
            # off the list and detached without unpatching, its weights left where they are, then loaded again
            for other in [m for m in mm.current_loaded_models if m.model is patcher.model]:
                mm.current_loaded_models.remove(other)
                other.detach(unpatch_all=False)
            mm.current_loaded_models.insert(0, patcher)
            budget = 1e32 if force_full_load or mm.weight_budget is None else mm.weight_budget
            patcher.partially_load(patcher.load_device, budget)  # LoadedModel.model_load

    def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False, stream=None):
        mm.cast_calls.append(weight)
        if (device is None or weight.device == device) and not copy and (dtype is None or weight.dtype == dtype):
            return weight
        return weight.to(device=device, dtype=dtype, copy=True)

    def device_supports_non_blocking(device):
        return True

    def load_model_gpu(model):
        return load_models_gpu([model])

    def soft_empty_cache(force=False):
        pass

    for f in (get_torch_device, text_encoder_device, text_encoder_offload_device, intermediate_device,
              should_use_bf16, load_models_gpu, load_model_gpu, soft_empty_cache, cast_to,
              device_supports_non_blocking):
        setattr(mm, f.__name__, f)
    return mm


# -- comfy.model_patcher, comfy.patcher_extension, comfy.ops -------------------------------------------------------
class CallbacksMP:  # comfy.patcher_extension.CallbacksMP, the members the nodes use
    ON_DETACH = "on_detach_after"
    ON_REGISTER_ALL_HOOK_PATCHES = "on_register_all_hook_patches"


class CastWeightBiasOp:  # comfy.ops.CastWeightBiasOp: what ComfyUI's layers that can stream their weights carry
    comfy_cast_weights = False
    weight_function = []
    bias_function = []


def module_size(module) -> int:  # comfy.model_management.module_size
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


class ModelPatcher:
    """comfy.model_patcher.ModelPatcher's loading (weight patches recorded, not applied): load() puts the largest modules first
    onto the device while they fit in lowvram_model_memory; a module that can stream (comfy_cast_weights) and does
    not fit stays behind with comfy_cast_weights set, and the model is then model_lowvram."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if getattr(model, "device", None) is None:
            model.device = offload_device
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.parent = None
        self.patches, self.callbacks = {}, {}
        self.model_size()
        for name, value in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0), ("model_lowvram", False)):
            if not hasattr(model, name):
                setattr(model, name, value)

    def model_size(self):
        if self.size <= 0:
            self.size = module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.parent = self
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.callbacks = {k: list(v) for k, v in self.callbacks.items()}
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        """Records the patches for weights the model has (by name, or (name, offset[, function])) as ComfyUI does:
        (strength_patch, patch, strength_model, offset, function) by weight name -> their keys; not applied here
        (tools/check_against_comfyui.py runs ComfyUI's)."""
        names = self.model.state_dict().keys()
        added = [k for k in patches if (k if isinstance(k, str) else k[0]) in names]
        for k in added:
            name, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], (*k[2:], None)[0])
            self.patches.setdefault(name, []).append((strength_patch, patches[k], strength_model, offset, function))
        return added

    def get_key_patches(self):
        return {k: [(1.0, v)] for k, v in self.model.state_dict().items()}

    def add_callback(self, call_type, callback):
        self.callbacks.setdefault(call_type, []).append(callback)

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def _load_list(self):
        """(size, name, module) of the modules holding parameters, none in a submodule, or able to stream."""
        out = []
        for name, m in self.model.named_modules():
            own = [n for n, _ in m.named_parameters(recurse=False)]
            if any(n not in own for n, _ in m.named_parameters()):
                continue  # a container: its leaves are listed
            if hasattr(m, "comfy_cast_weights") or own:
                out.append((module_size(m), name, m))
        return out

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        loaded, streamed = 0, 0
        for size, _, m in sorted(self._load_list(), key=lambda x: x[:2], reverse=True):
            if not full_load and hasattr(m, "comfy_cast_weights") and loaded + size >= lowvram_model_memory:
                streamed += 1
                if not hasattr(m, "prev_comfy_cast_weights"):
                    m.prev_comfy_cast_weights, m.comfy_cast_weights = m.comfy_cast_weights, True
                continue
            wipe_lowvram_weight(m)
            if full_load or loaded + size < lowvram_model_memory:
                loaded += size
                m.to(device_to)
        self.model.model_lowvram = streamed > 0
        if not streamed and full_load:
            self.model.to(device_to)
            loaded = self.model_size()
        self.model.device = device_to
        self.model.model_loaded_weight_memory = loaded

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        current = self.model.model_loaded_weight_memory
        full_load = current + extra_memory > self.model_size()
        self.load(device_to, current + extra_memory, force_patch_weights, full_load=full_load)
        return self.model.model_loaded_weight_memory - current

    def detach(self, unpatch_all=True):
        if unpatch_all:  # unpatch_model(offload_device)
            for m in self.model.modules():
                wipe_lowvram_weight(m)
            self.model.model_lowvram = False
            self.model.to(self.offload_device)
            self.model.device = self.offload_device
            self.model.model_loaded_weight_memory = 0
        for callback in self.callbacks.get(CallbacksMP.ON_DETACH, []):
            callback(self, unpatch_all)
        return self.model

    def current_loaded_device(self):
        return self.model.device


def wipe_lowvram_weight(m):
    if hasattr(m, "prev_comfy_cast_weights"):
        m.comfy_cast_weights = m.prev_comfy_cast_weights
        del m.prev_comfy_cast_weights


# -- comfy.sd: CLIP with toy CLIP encoders ---------------------------------------------------------------------------
class ToyTextModel(torch.nn.Module):
    """The weights of a toy CLIP encoder (where ComfyUI's SDClipModel keeps its CLIPTextModel: `transformer`)."""

    def __init__(self, width: int, seed: int, device=None):
        super().__init__()
        if str(device) == "meta":  # as ComfyUI builds a model it loads weights into later: nothing allocated
            table, proj = torch.empty(49408, width, device="meta"), torch.empty(width, width, device="meta")
        else:
            gen = torch.Generator().manual_seed(seed)
            table, proj = torch.randn(49408, width, generator=gen), torch.randn(width, width, generator=gen) / width**0.5
        self.table, self.proj = torch.nn.Parameter(table, requires_grad=False), torch.nn.Parameter(proj, requires_grad=False)


class ToyClipEncoder(torch.nn.Module):
    """Shaped like ComfyUI's SDClipModel: the options a family gives it (here, whether the pooled vector is projected)
    around `transformer` (the weights); set/reset_clip_options and encode_token_weights -> (z [1, 77k, C], pooled)."""

    def __init__(self, width: int, seed: int, return_projected_pooled: bool = True, device=None):
        super().__init__()
        self.transformer = ToyTextModel(width, seed, device)
        self.options_default = (return_projected_pooled, None)
        self.return_projected_pooled, self.layer_idx = self.options_default

    def set_clip_options(self, options):
        self.return_projected_pooled = options.get("projected_pooled", self.return_projected_pooled)
        self.layer_idx = options.get("layer", self.layer_idx)

    def reset_clip_options(self):
        self.return_projected_pooled, self.layer_idx = self.options_default

    def encode_token_weights(self, token_weight_pairs):
        ids = torch.tensor([[t for t, _ in section] for section in token_weight_pairs])  # [sections, 77]
        weights = torch.tensor([[w for _, w in section] for section in token_weight_pairs])
        z = self.transformer.table[ids] * weights[..., None]  # [sections, 77, C]
        pooled = z[:1, (ids[0] == 49407).nonzero()[0, 0]]  # first section's end token, [1, C]
        if self.return_projected_pooled:
            pooled = pooled @ self.transformer.proj
        return z.reshape(1, -1, z.shape[-1]), pooled


class ToyClipTokenizer:
    """77-token CLIP sections: start, one id per word (weights ignored), end, padding."""

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        words = [49406] + [hash(w) % 49000 + 1 for w in text.split()][:75] + [49407]
        return [[(t, 1.0) for t in words + [0] * (77 - len(words))]]


class ClipOptionsToParts:
    """set/reset_clip_options passed on to the encoders named in PARTS that are present (as ComfyUI's containers do)."""
    PARTS = ("clip_l", "clip_g")

    def _parts(self):
        return [p for p in (getattr(self, name) for name in self.PARTS) if p is not None]

    def set_clip_options(self, options):
        for p in self._parts():
            p.set_clip_options(options)

    def reset_clip_options(self):
        for p in self._parts():
            p.reset_clip_options()


class ToyContainer(ClipOptionsToParts, torch.nn.Module):
    """A cond_stage_model holding some of clip_l / clip_g / t5xxl, like SD1ClipModel, FluxClipModel, SD3ClipModel."""

    def __init__(self, parts: dict):
        super().__init__()
        self.clip_l, self.clip_g, self.t5xxl = parts.get("l"), parts.get("g"), parts.get("t5xxl")


class ToyTokenizerSet:
    def __init__(self, keys):
        self.keys = keys

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {k: ToyClipTokenizer().tokenize_with_weights(text) for k in self.keys}


class CLIP:
    """comfy.sd.CLIP: the model built from target.params and model_options (initial / load / offload device, dtype),
    its tokenizer, a ModelPatcher around it; tokenize, encode_from_tokens(_scheduled), clone, load_model."""

    def __init__(self, target=None, embedding_directory=None, no_init=False, tokenizer_data={}, parameters=0,
                 model_options={}):
        if no_init:
            return
        import comfy.model_management as mm

        params = target.params.copy()
        load_device = model_options.get("load_device", mm.text_encoder_device())
        offload_device = model_options.get("offload_device", mm.text_encoder_offload_device())
        params["dtype"] = model_options.get("dtype", torch.float32)
        params["device"] = model_options.get("initial_device", offload_device)
        params["model_options"] = model_options
        self.cond_stage_model = target.clip(**params)
        self.tokenizer = target.tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.patcher = ModelPatcher(self.cond_stage_model, load_device, offload_device)
        self.patcher.hook_mode, self.patcher.is_clip = "MinVram", True
        self.layer_idx = None
        self.tokenizer_options = {}

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher, n.cond_stage_model, n.tokenizer = self.patcher.clone(), self.cond_stage_model, self.tokenizer
        n.layer_idx, n.tokenizer_options = self.layer_idx, self.tokenizer_options.copy()
        return n

    def clip_layer(self, layer_idx):
        self.layer_idx = layer_idx

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def get_key_patches(self):
        return self.patcher.get_key_patches()

    def get_sd(self):
        return self.cond_stage_model.state_dict()

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.cond_stage_model.reset_clip_options()
        if self.layer_idx is not None:
            self.cond_stage_model.set_clip_options({"layer": self.layer_idx})
        if return_pooled == "unprojected":
            self.cond_stage_model.set_clip_options({"projected_pooled": False})
        self.load_model()
        o = self.cond_stage_model.encode_token_weights(tokens)
        out = {"cond": o[0], "pooled_output": o[1], **(o[2] if len(o) > 2 else {})}
        return out if return_dict else (o[0], o[1]) if return_pooled else o[0]

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        pooled_dict = self.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected else True,
                                              return_dict=True)
        cond = pooled_dict.pop("cond")
        pooled_dict.update(add_dict)
        return [[cond, pooled_dict]]

    def load_model(self):
        import comfy.model_management as mm

        mm.load_model_gpu(self.patcher)
        return self.patcher


class ClipTarget:  # comfy.supported_models_base.ClipTarget
    def __init__(self, tokenizer, clip):
        self.clip, self.tokenizer, self.params = clip, tokenizer, {}


def toy_clip(parts=("l",), l_width=768, g_width=1280, with_t5=False) -> CLIP:
    """parts ("l",): CLIPLoader clip_l; ("l", "g"): DualCLIPLoader sd3/sdxl (CLIP-L pooled projected unless told)."""
    def build(**params):
        # CLIPLoader's clip_l (SD1ClipModel) pools unprojected; DualCLIPLoader's sd3 / sdxl CLIP-L projects
        encoders = {"l": ToyClipEncoder(l_width, 1, return_projected_pooled=parts != ("l",)),
                    "g": ToyClipEncoder(g_width, 2)}
        chosen = {k: encoders[k] for k in parts}
        if with_t5:
            chosen["t5xxl"] = torch.nn.Linear(1, 1)
        return ToyContainer(chosen)

    return CLIP(ClipTarget(clip=build, tokenizer=lambda **kw: ToyTokenizerSet(parts + (("t5xxl",) if with_t5 else ()))))



# -- comfy.sd1_clip and comfy.text_encoders.flux / sd3_clip: ComfyUI's T5 family encoders, reduced ----------------
class MetaT5(torch.nn.Module):
    """comfy.text_encoders.t5.T5 as ComfyUI builds it: config, embedding; the nodes build it on the meta device and
    replace it, so it never runs here."""

    def __init__(self, config, dtype, device, operations=None):
        super().__init__()
        self.num_layers = config["num_layers"]
        self.shared = torch.nn.Embedding(config["vocab_size"], config["d_model"], device=device)

    def get_input_embeddings(self):
        return self.shared


class SDClipModel(torch.nn.Module):
    """comfy.sd1_clip.SDClipModel around a T5: layer options, process_tokens (ids through get_input_embeddings(),
    mask up to the first end token), the transformer call, zero-out, and ClipTokenWeightEncoder's weighting against
    the empty prompt (end then pad tokens)."""

    def __init__(self, device="cpu", dtype=None, special_tokens={"end": 1, "pad": 0}, enable_attention_masks=False,
                 zero_out_masked=False, model_options={}):
        super().__init__()
        config = {"num_layers": 24, "vocab_size": 32128, "d_model": 4096,
                  **model_options.get(f"{model_options.get('model_name', '')}_model_config", {})}
        self.transformer = MetaT5(config, dtype, device)
        self.num_layers = self.transformer.num_layers
        self.special_tokens = special_tokens
        self.enable_attention_masks, self.zero_out_masked = enable_attention_masks, zero_out_masked
        self.layer, self.layer_idx = "last", None
        self.options_default = (self.layer, self.layer_idx)

    def set_clip_options(self, options):
        layer_idx = options.get("layer", self.layer_idx)
        if layer_idx is None or abs(layer_idx) > self.num_layers:
            self.layer = "last"
        else:
            self.layer, self.layer_idx = "hidden", layer_idx

    def reset_clip_options(self):
        self.layer, self.layer_idx = self.options_default

    def forward(self, tokens):
        embed = self.transformer.get_input_embeddings()
        end = self.special_tokens["end"]
        masks = [[1 if end not in t[:i] else 0 for i in range(len(t))] for t in tokens]
        embeds = torch.cat([embed(torch.tensor([t], device=embed.weight.device), out_dtype=torch.float32)
                            for t in tokens])
        mask = torch.tensor(masks, device=embeds.device)
        outputs = self.transformer(None, mask if self.enable_attention_masks else None, embeds=embeds,
                                   num_tokens=[sum(m) for m in masks], intermediate_output=self.layer_idx,
                                   final_layer_norm_intermediate=True, dtype=torch.float32, embeds_info=[])
        z = (outputs[0] if self.layer == "last" else outputs[1]).float()
        if self.zero_out_masked:
            z *= mask.unsqueeze(-1).float()
        return z, None

    def encode_token_weights(self, token_weight_pairs):
        to_encode = [[t for t, _ in x] for x in token_weight_pairs]
        has_weights = any(w != 1.0 for x in token_weight_pairs for _, w in x)
        if has_weights:
            n = max(len(t) for t in to_encode)
            to_encode.append([self.special_tokens["end"]] + [self.special_tokens["pad"]] * (n - 1))
        o = self(to_encode)
        out = o[0]
        output = []
        for k, x in enumerate(token_weight_pairs):
            z = out[k:k + 1]
            for j, (_, w) in enumerate(x):
                if w != 1.0:
                    z[0][j] = (z[0][j] - out[-1][j]) * w + out[-1][j]
            output.append(z)
        return torch.cat(output, dim=-2), None


def make_t5_tokenizer(min_length: int, key: str = "t5xxl"):
    """comfy.sd1_clip.SDTokenizer for T5 (ComfyUI's bundled tokenizer, EOS, pad 0 to min_length); prompt weights are
    not parsed here (every weight 1.0)."""
    class T5Tokenizer:
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            from transformers import T5TokenizerFast

            import comfy

            folder = Path(comfy.__path__[0]) / "text_encoders" / "t5_tokenizer"
            self.tokenizer = T5TokenizerFast.from_pretrained(str(folder))

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            ids = self.tokenizer(text)["input_ids"]
            return {key: [[(t, 1.0) for t in ids + [0] * max(0, min_length - len(ids))]]}
    return T5Tokenizer


def make_text_encoders() -> dict[str, types.ModuleType]:
    flux, sd3 = types.ModuleType("comfy.text_encoders.flux"), types.ModuleType("comfy.text_encoders.sd3_clip")
    T5XXL = lambda device, dtype, model_options, attention_mask=False: SDClipModel(  # noqa: E731
        device, dtype, enable_attention_masks=attention_mask, model_options={**model_options, "model_name": "t5xxl"})

    class FluxClipModel(torch.nn.Module):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__()
            self.clip_l = ToyClipEncoder(768, 1, return_projected_pooled=False, device=device)
            self.t5xxl = T5XXL(device, dtype, model_options)
            self.dtypes = {dtype}

        def set_clip_options(self, options):
            self.clip_l.set_clip_options(options)
            self.t5xxl.set_clip_options(options)

        def reset_clip_options(self):
            self.clip_l.reset_clip_options()
            self.t5xxl.reset_clip_options()

        def encode_token_weights(self, token_weight_pairs):
            t5_out, _ = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"])
            _, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
            return t5_out, l_pooled

    class FluxTokenizer:
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.t5 = make_t5_tokenizer(256)()

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            return {"l": ToyClipTokenizer().tokenize_with_weights(text), **self.t5.tokenize_with_weights(text)}

    class SD3ClipModel(ClipOptionsToParts, torch.nn.Module):
        PARTS = ("clip_l", "clip_g", "t5xxl")

        def __init__(self, clip_l=True, clip_g=True, t5=True, device="cpu", dtype=None, model_options={}):
            super().__init__()
            self.clip_l = ToyClipEncoder(768, 1, return_projected_pooled=False, device=device) if clip_l else None
            self.clip_g = ToyClipEncoder(1280, 2, device=device) if clip_g else None
            self.t5xxl = T5XXL(device, dtype, model_options) if t5 else None
            self.dtypes = {dtype}

        def encode_token_weights(self, token_weight_pairs):
            lg_out = None
            l_pooled, g_pooled = torch.zeros((1, 768)), torch.zeros((1, 1280))
            if self.clip_l is not None:
                lg_out, l_pooled = self.clip_l.encode_token_weights(token_weight_pairs["l"])
            if self.clip_g is not None:
                g_out, g_pooled = self.clip_g.encode_token_weights(token_weight_pairs["g"])
                lg_out = (torch.nn.functional.pad(g_out, (768, 0)) if lg_out is None
                          else torch.cat([lg_out, g_out], dim=-1))
            out = self.t5xxl.encode_token_weights(token_weight_pairs["t5xxl"])[0]
            if lg_out is not None:
                out = torch.cat([torch.nn.functional.pad(lg_out, (0, 4096 - lg_out.shape[-1])), out], dim=-2)
            return out, torch.cat((l_pooled, g_pooled), dim=-1), {}

    def sd3_clip(clip_l=True, clip_g=True, t5=True, dtype_t5=None, t5xxl_scaled_fp8=None, t5_attention_mask=False):
        return lambda device="cpu", dtype=None, model_options={}: SD3ClipModel(clip_l, clip_g, t5, device, dtype,
                                                                              model_options)

    class SD3Tokenizer(FluxTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.t5 = make_t5_tokenizer(77)()

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            return {"g": ToyClipTokenizer().tokenize_with_weights(text), **super().tokenize_with_weights(text)}

    class SD1ClipModel(torch.nn.Module):  # comfy.sd1_clip.SD1ClipModel: one encoder under its name
        def __init__(self, name, clip_model, device="cpu", dtype=None, model_options={}):
            super().__init__()
            self.clip_name = name
            setattr(self, name, clip_model(device=device, dtype=dtype, model_options={**model_options,
                                                                                     "model_name": name}))
            self.dtypes = {dtype}

        def set_clip_options(self, options):
            getattr(self, self.clip_name).set_clip_options(options)

        def reset_clip_options(self):
            getattr(self, self.clip_name).reset_clip_options()

        def encode_token_weights(self, token_weight_pairs):
            return getattr(self, self.clip_name).encode_token_weights(token_weight_pairs[self.clip_name])

    pixart, wan = types.ModuleType("comfy.text_encoders.pixart_t5"), types.ModuleType("comfy.text_encoders.wan")
    pixart.pixart_te = lambda dtype_t5=None, t5xxl_scaled_fp8=None: lambda device="cpu", dtype=None, model_options={}: \
        SD1ClipModel("t5xxl", SDClipModel, device, dtype, model_options)
    pixart.PixArtTokenizer = make_t5_tokenizer(1)
    umt5 = lambda device, dtype, model_options: SDClipModel(device, dtype, enable_attention_masks=True,  # noqa: E731
                                                            zero_out_masked=True, model_options=model_options)
    wan.te = lambda dtype_t5=None, t5xxl_scaled_fp8=None: lambda device="cpu", dtype=None, model_options={}: \
        SD1ClipModel("umt5xxl", umt5, device, dtype, model_options)

    class WanT5Tokenizer:  # SPieceTokenizer from tokenizer_data["spiece_model"], min_length 512
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            import sentencepiece

            self.sp = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_data["spiece_model"].numpy().tobytes(),
                                                           add_eos=True)

        def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
            ids = self.sp.encode(text)
            return {"umt5xxl": [[(t, 1.0) for t in ids + [0] * max(0, 512 - len(ids))]]}

    wan.WanT5Tokenizer = WanT5Tokenizer
    flux.FluxClipModel, flux.FluxTokenizer = FluxClipModel, FluxTokenizer
    flux.flux_clip = lambda dtype_t5=None, t5xxl_scaled_fp8=None: FluxClipModel
    sd3.SD3ClipModel, sd3.SD3Tokenizer, sd3.sd3_clip = SD3ClipModel, SD3Tokenizer, sd3_clip
    return {"comfy.text_encoders.flux": flux, "comfy.text_encoders.sd3_clip": sd3,
            "comfy.text_encoders.pixart_t5": pixart, "comfy.text_encoders.wan": wan}


class CLIPType(Enum):  # comfy.sd.CLIPType, the members these fakes model
    STABLE_DIFFUSION = 1
    SD3 = 3
    FLUX = 6
    WAN = 13
    CHROMA = 15


# -- comfy_api.latest -----------------------------------------------------------------------------------------------
def make_comfy_api_latest() -> types.ModuleType:
    latest = types.ModuleType("comfy_api.latest")
    io = types.ModuleType("comfy_api.latest._io")

    class Input:
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, extra_dict=None):
            self.id, self.display_name, self.optional = id, display_name, optional
            self.tooltip, self.lazy = tooltip, lazy

    class WidgetInput(Input):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     socketless=None, widget_type=None, force_input=None, extra_dict=None):
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self.default = default

    class Output:
        def __init__(self, id=None, display_name=None, tooltip=None, is_output_list=False):
            self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list

    def comfytype(io_type, input_cls=Input, output_cls=Output):
        class T:
            class Input(input_cls):
                pass

            class Output(output_cls):
                pass
        T.io_type = T.Input.io_type = T.Output.io_type = io_type
        return T

    class ComboInput(WidgetInput):
        def __init__(self, id, options=None, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     control_after_generate=None, upload=None, image_folder=None, remote=None, socketless=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.options = options

    class StringInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, multiline=False,
                     placeholder=None, default=None, dynamic_prompts=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.multiline, self.dynamic_prompts = multiline, dynamic_prompts

    class FloatInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None, min=None,
                     max=None, step=None, round=None, display_mode=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)
            self.min, self.max, self.step = min, max, step

    class BooleanInput(WidgetInput):
        def __init__(self, id, display_name=None, optional=False, tooltip=None, lazy=None, default=None,
                     label_on=None, label_off=None, socketless=None, force_input=None):
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless, None, force_input)

    io.Combo = comfytype("COMBO", ComboInput)
    io.String = comfytype("STRING", StringInput)
    io.Float = comfytype("FLOAT", FloatInput)
    io.Boolean = comfytype("BOOLEAN", BooleanInput)
    io.Custom = lambda io_type: comfytype(io_type)

    @dataclass
    class Schema:
        node_id: str
        display_name: str = None
        category: str = "sd"
        inputs: list = None
        outputs: list = None
        hidden: list = None
        description: str = ""
        is_input_list: bool = False
        is_output_node: bool = False
        is_deprecated: bool = False
        is_experimental: bool = False
        is_api_node: bool = False
        not_idempotent: bool = False
        enable_expand: bool = False

    class ComfyNode:
        @classmethod
        def define_schema(cls):
            raise NotImplementedError

        @classmethod
        def execute(cls, **kwargs):
            raise NotImplementedError

        @classmethod
        def GET_SCHEMA(cls):
            return cls.define_schema()

    class NodeOutput:
        def __init__(self, *args, ui=None, expand=None, block_execution=None):
            self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    io.Schema, io.ComfyNode, io.NodeOutput = Schema, ComfyNode, NodeOutput

    class ComfyExtension(ABC):
        async def on_load(self):
            pass

        @abstractmethod
        async def get_node_list(self):
            ...

    latest.io, latest.ComfyExtension = io, ComfyExtension
    return latest


# -- install --------------------------------------------------------------------------------------------------------
def core_modules(comfy_path: list[str]) -> dict[str, types.ModuleType]:
    """comfy (its package path), comfy.model_management, comfy.model_patcher, comfy.patcher_extension and comfy.ops,
    by name."""
    comfy = types.ModuleType("comfy")  # a namespace package in ComfyUI: no __init__.py, no __file__
    comfy.__path__ = comfy_path
    comfy.model_management = make_model_management()
    comfy.model_management.module_size = module_size
    comfy.model_patcher = types.ModuleType("comfy.model_patcher")
    comfy.model_patcher.ModelPatcher = ModelPatcher
    comfy.patcher_extension = types.ModuleType("comfy.patcher_extension")
    comfy.patcher_extension.CallbacksMP = CallbacksMP
    comfy.ops = types.ModuleType("comfy.ops")
    comfy.ops.CastWeightBiasOp = CastWeightBiasOp
    comfy.float = types.ModuleType("comfy.float")
    comfy.float.stochastic_rounding = stochastic_rounding
    return {"comfy": comfy, "comfy.model_management": comfy.model_management,
            "comfy.model_patcher": comfy.model_patcher, "comfy.patcher_extension": comfy.patcher_extension,
            "comfy.ops": comfy.ops, "comfy.float": comfy.float}


def stochastic_rounding(value, dtype, seed=0):
    """comfy.float.stochastic_rounding for 32- and 16-bit dtypes (a plain cast, as ComfyUI's); ComfyUI rounds fp8
    stochastically, which this stand-in does not do."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise NotImplementedError(f"comfy_fakes.stochastic_rounding: {dtype}")
    return value.to(dtype)


def install(root: Path, tokenizer_dir: Path, with_v3: bool = False) -> dict[str, types.ModuleType]:
    """Fake ComfyUI rooted at root (root/models/..., root/comfy/text_encoders/t5_tokenizer a copy of tokenizer_dir).
    Returns the modules put into sys.modules, by name."""
    comfy_dir = root / "comfy"
    bundled = comfy_dir / "text_encoders" / "t5_tokenizer"
    if not bundled.exists():
        shutil.copytree(tokenizer_dir, bundled)
    for sub in ("text_encoders", "clip", "embeddings"):
        (root / "models" / sub).mkdir(parents=True, exist_ok=True)

    modules = core_modules([str(comfy_dir)])
    comfy = modules["comfy"]
    sd = types.ModuleType("comfy.sd")
    sd.CLIP, sd.CLIPType = CLIP, CLIPType
    smb = types.ModuleType("comfy.supported_models_base")
    smb.ClipTarget = ClipTarget
    text_encoders = types.ModuleType("comfy.text_encoders")
    text_encoders.__path__ = []
    comfy.sd, comfy.supported_models_base, comfy.text_encoders = sd, smb, text_encoders
    modules.update({"folder_paths": make_folder_paths(root / "models"), "comfy.sd": sd,
                    "comfy.supported_models_base": smb, "comfy.text_encoders": text_encoders, **make_text_encoders()})
    if with_v3:
        api = types.ModuleType("comfy_api")
        api.__path__ = []
        api.latest = make_comfy_api_latest()
        modules.update({"comfy_api": api, "comfy_api.latest": api.latest})
    sys.modules.update(modules)
    return modules
