"""Small stand-ins for the ComfyUI modules the nodes touch, with ComfyUI's signatures (read from its source):
folder_paths, comfy (its package folder holds the bundled T5 tokenizer), comfy.model_management,
comfy.model_patcher, comfy.sd (CLIP, with toy CLIP-L / CLIP-G encoders) and, optionally, comfy_api.latest.

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
class VRAMState(Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


def make_model_management() -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.VRAMState = VRAMState
    mm.vram_state = VRAMState.NORMAL_VRAM
    mm.current_loaded_models = []
    mm.load_calls = []  # test hook: (models, force_full_load) of every load_models_gpu call

    class InterruptProcessingException(Exception):
        pass

    mm.InterruptProcessingException = InterruptProcessingException
    mm.OOM_EXCEPTION = torch.cuda.OutOfMemoryError

    def get_torch_device():
        return CPU  # this machine has no GPU: ComfyUI then runs everything on the CPU

    def text_encoder_device():
        return get_torch_device() if mm.vram_state in (VRAMState.HIGH_VRAM, VRAMState.NORMAL_VRAM) else CPU

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
            if patcher not in mm.current_loaded_models:
                mm.current_loaded_models.insert(0, patcher)
            patcher.patch_model(patcher.load_device, lowvram_model_memory=0 if force_full_load else 1e32)

    def load_model_gpu(model):
        return load_models_gpu([model])

    def soft_empty_cache(force=False):
        pass

    for f in (get_torch_device, text_encoder_device, text_encoder_offload_device, intermediate_device,
              should_use_bf16, load_models_gpu, load_model_gpu, soft_empty_cache):
        setattr(mm, f.__name__, f)
    return mm


# -- comfy.model_patcher --------------------------------------------------------------------------------------------
class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if getattr(model, "device", None) is None:
            model.device = offload_device
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.parent = None
        self.model_size()

    def model_size(self):
        if self.size <= 0:
            self.size = sum(t.nelement() * t.element_size() for t in self.model.state_dict().values())
        return self.size

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.parent = self
        return n

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        self.load(device_to, lowvram_model_memory, force_patch_weights, full_load=lowvram_model_memory == 0)
        return self.model

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        self.model.to(device_to)
        self.model.device = device_to

    def detach(self, unpatch_all=True):
        self.model.to(self.offload_device)
        self.model.device = self.offload_device
        return self.model

    def current_loaded_device(self):
        return self.model.device


# -- comfy.sd: CLIP with toy CLIP encoders ---------------------------------------------------------------------------
class ToyClipEncoder(torch.nn.Module):
    """Shaped like ComfyUI's SDClipModel: set/reset_clip_options and encode_token_weights -> (z [1, 77k, C], pooled)."""

    def __init__(self, width: int, seed: int, return_projected_pooled: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(49408, width, generator=gen)
        self.proj = torch.randn(width, width, generator=gen) / width**0.5
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
        z = self.table[ids] * weights[..., None]  # [sections, 77, C]
        pooled = z[:1, (ids[0] == 49407).nonzero()[0, 0]]  # first section's end token, [1, C]
        if self.return_projected_pooled:
            pooled = pooled @ self.proj
        return z.reshape(1, -1, z.shape[-1]), pooled


class ToyClipTokenizer:
    """77-token CLIP sections: start, one id per word (weights ignored), end, padding."""

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        words = [49406] + [hash(w) % 49000 + 1 for w in text.split()][:75] + [49407]
        return [[(t, 1.0) for t in words + [0] * (77 - len(words))]]


class ToyContainer(torch.nn.Module):
    """A cond_stage_model holding some of clip_l / clip_g / t5xxl, like SD1ClipModel, FluxClipModel, SD3ClipModel."""

    def __init__(self, parts: dict):
        super().__init__()
        self.clip_l, self.clip_g, self.t5xxl = parts.get("l"), parts.get("g"), parts.get("t5xxl")

    def _parts(self):
        return [p for p in (self.clip_l, self.clip_g) if p is not None]

    def set_clip_options(self, options):
        for p in self._parts():
            p.set_clip_options(options)

    def reset_clip_options(self):
        for p in self._parts():
            p.reset_clip_options()


class ToyTokenizerSet:
    def __init__(self, keys):
        self.keys = keys

    def tokenize_with_weights(self, text: str, return_word_ids=False, **kwargs):
        return {k: ToyClipTokenizer().tokenize_with_weights(text) for k in self.keys}


class CLIP:
    def __init__(self, target=None, embedding_directory=None, no_init=False, tokenizer_data={}, parameters=0,
                 model_options={}):
        if no_init:
            return
        import comfy.model_management as mm

        self.cond_stage_model = target.clip()
        self.tokenizer = target.tokenizer()
        self.patcher = ModelPatcher(self.cond_stage_model, mm.text_encoder_device(), mm.text_encoder_offload_device())
        self.layer_idx = None
        self.tokenizer_options = {}

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def load_model(self):
        import comfy.model_management as mm

        mm.load_model_gpu(self.patcher)
        return self.patcher


@dataclass
class ClipTarget:
    clip: object
    tokenizer: object


def toy_clip(parts=("l",), l_width=768, g_width=1280, with_t5=False) -> CLIP:
    """parts ("l",): CLIPLoader clip_l; ("l", "g"): DualCLIPLoader sd3/sdxl (CLIP-L pooled projected unless told)."""
    def build():
        encoders = {"l": ToyClipEncoder(l_width, 1), "g": ToyClipEncoder(g_width, 2)}
        chosen = {k: encoders[k] for k in parts}
        if with_t5:
            chosen["t5xxl"] = torch.nn.Linear(1, 1)
        return ToyContainer(chosen)

    return CLIP(ClipTarget(clip=build, tokenizer=lambda: ToyTokenizerSet(parts + (("t5xxl",) if with_t5 else ()))))


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
def install(root: Path, tokenizer_dir: Path, with_v3: bool = False) -> dict[str, types.ModuleType]:
    """Fake ComfyUI rooted at root (root/models/..., root/comfy/text_encoders/t5_tokenizer a copy of tokenizer_dir).
    Returns the modules put into sys.modules, by name."""
    comfy_dir = root / "comfy"
    bundled = comfy_dir / "text_encoders" / "t5_tokenizer"
    if not bundled.exists():
        shutil.copytree(tokenizer_dir, bundled)
    for sub in ("text_encoders", "clip", "embeddings"):
        (root / "models" / sub).mkdir(parents=True, exist_ok=True)

    comfy = types.ModuleType("comfy")  # a namespace package in ComfyUI: no __init__.py, no __file__
    comfy.__path__ = [str(comfy_dir)]
    mm = make_model_management()
    patcher_mod = types.ModuleType("comfy.model_patcher")
    patcher_mod.ModelPatcher = ModelPatcher
    sd = types.ModuleType("comfy.sd")
    sd.CLIP = CLIP
    comfy.model_management, comfy.model_patcher, comfy.sd = mm, patcher_mod, sd
    modules = {"folder_paths": make_folder_paths(root / "models"), "comfy": comfy, "comfy.model_management": mm,
               "comfy.model_patcher": patcher_mod, "comfy.sd": sd}
    if with_v3:
        api = types.ModuleType("comfy_api")
        api.__path__ = []
        api.latest = make_comfy_api_latest()
        modules.update({"comfy_api": api, "comfy_api.latest": api.latest})
    sys.modules.update(modules)
    return modules
