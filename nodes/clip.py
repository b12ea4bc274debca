"""A ComfyUI CLIP whose T5 / UMT5 forward is t5core's, for every ComfyUI family built on T5.

ComfyUI's own text-encoder model for the family (FluxClipModel, SD3ClipModel, PixArtT5XXL, WanT5Model, ...) is built
the way comfy.sd.load_text_encoder_state_dicts builds it, on the meta device (no weights are allocated), with ComfyUI's
own tokenizer. Then:
  * the `transformer` of each of its T5 SDClipModels becomes a T5Transformer: ComfyUI's T5 call contract (ids or
    input embeddings, attention mask, hidden-layer index) served by the T5Encoder's t5core model;
  * its CLIP-L / CLIP-G / Llama parts (the family's options: layer, pooling) run on the CLIP input's weights (from
    ComfyUI's CLIP loaders), and weight patches for them go to the CLIP input's patcher (those for the T5's
    projections to the T5Encoder's);
  * its patcher is the T5Encoder's ModelPatcher, so ComfyUI's memory manager loads and offloads the T5 weights;
    the CLIP input's patcher is loaded beside it when the CLIP encodes.
Everything else (tokenizing, prompt weights, embeddings, padding, masks, zero-out, the family's conditioning) is
ComfyUI's code, unchanged. ComfyUI modules are imported inside functions: this package must import without ComfyUI.
"""
import dataclasses
import functools
import logging
from typing import Callable, Optional

import torch

from t5core.checkpoint import native_target
from t5core.gguf import PackedEmbedding
from t5core.t5_common import T5FFNType, check_token_ids

log = logging.getLogger("t5core.nodes")

T5, T5_V1_0, MT5, UMT5 = "T5 v1.1", "T5 v1.0", "mT5", "UMT5"


@dataclasses.dataclass(frozen=True)
class Family:
    module: str  # comfy.text_encoders.<module>
    model: Callable  # (module, parts present) -> ComfyUI's text-encoder model class, as load_text_encoder_state_dicts
    tokenizer: str  # the tokenizer class in that module
    kind: str = T5  # the T5 the family was trained with
    parts: tuple[str, ...] = ()  # non-T5 encoders it takes from the CLIP input (cond_stage_model attributes)
    t5: str = "t5xxl"  # the attribute holding its T5 SDClipModel (inside SD1ClipModel containers too)


FAMILIES = {  # ComfyUI's CLIPType names, lower case, as CLIPLoader's "type"
    "flux": Family("flux", lambda m, p: m.flux_clip(), "FluxTokenizer", parts=("clip_l",)),
    "chroma": Family("pixart_t5", lambda m, p: m.pixart_te(), "PixArtTokenizer"),
    "sd3": Family("sd3_clip", lambda m, p: m.sd3_clip(clip_l="clip_l" in p, clip_g="clip_g" in p, t5=True),
                  "SD3Tokenizer", parts=("clip_l", "clip_g")),
    "pixart": Family("pixart_t5", lambda m, p: m.pixart_te(), "PixArtTokenizer"),
    "ltxv": Family("lt", lambda m, p: m.ltxv_te(), "LTXVT5Tokenizer"),
    "mochi": Family("genmo", lambda m, p: m.mochi_te(), "MochiT5Tokenizer"),
    "cosmos": Family("cosmos", lambda m, p: m.te(), "CosmosT5Tokenizer", kind=T5_V1_0),
    "wan": Family("wan", lambda m, p: m.te(), "WanT5Tokenizer", kind=UMT5, t5="umt5xxl"),
    "hidream": Family("hidream", lambda m, p: m.hidream_clip(clip_l="clip_l" in p, clip_g="clip_g" in p, t5=True,
                                                             llama="llama" in p),
                      "HiDreamTokenizer", parts=("clip_l", "clip_g", "llama")),
}


def available_families() -> list[str]:
    """The families the running ComfyUI knows: its comfy.sd.CLIPType has the name and comfy.text_encoders the
    module and classes. Without ComfyUI (or a very old one): none."""
    import importlib

    try:
        import comfy.sd
    except ImportError:
        return []
    names = []
    for name, fam in FAMILIES.items():
        if not hasattr(getattr(comfy.sd, "CLIPType", None), name.upper()):
            continue
        try:
            module = importlib.import_module(f"comfy.text_encoders.{fam.module}")
        except ImportError:
            continue
        if hasattr(module, fam.tokenizer):
            names.append(name)
    return names


def encoder_kind(config) -> str:
    """What a T5Config is, in the terms the family errors use."""
    if config.pos_emb_per_layer:
        return UMT5
    if config.vocab_size > 100_000:
        return MT5
    return T5 if config.ffn_type == T5FFNType.GEGLU else T5_V1_0


def check_family(encoder, family: str) -> None:
    """ValueError naming the family and the file when the loaded T5 is not the one the family was trained with
    (its vocabulary or architecture differs: WAN's UMT5 has 256k tokens and a position bias per layer)."""
    if family not in FAMILIES:
        raise ValueError(f"family: unknown family {family!r}; choose one of {list(FAMILIES)}")
    need, have, cfg = FAMILIES[family].kind, encoder_kind(encoder.config), encoder.config
    if need != have:
        raise ValueError(f"the {family} family needs a {need} encoder, but {encoder.plan.path} is a {have} "
                         f"({cfg.vocab_size}-token vocabulary, {cfg.num_layers} layers, "
                         f"{'per-layer' if cfg.pos_emb_per_layer else 'shared'} position bias)")


# -- ComfyUI's T5 call contract, served by t5core -------------------------------------------------------------------
class Embedding(torch.nn.Module):
    """t5core's token embedding (vocab_embed, not a copy) called the way ComfyUI calls its T5's: ids -> [B, L, D] on
    the device the encoder runs on (its table may be left on the offload device, and streams), out_dtype=float32.
    Not registered anywhere: its weight belongs to the T5Encoder's model."""

    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime  # t5core.Encoder (not a module)

    @property
    def weight(self) -> torch.Tensor:
        """ComfyUI reads only its device, where it makes the ids, textual-inversion vectors and the attention mask
        it multiplies the output by: the device the encoder runs on. The table (or its GGUF blocks) when it is
        there; an empty tensor there when a partial load left the table behind to stream."""
        embed = self.runtime.model.vocab_embed
        table = embed.packed.blocks if isinstance(embed, PackedEmbedding) else embed.weight
        device = self.runtime.device
        return table if table.device == device else torch.empty(0, dtype=table.dtype, device=device)

    def forward(self, input_ids: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        check_token_ids(input_ids.cpu(), self.runtime.config.vocab_size)  # a clear error, not a CUDA device assert
        out = self.runtime.model.vocab_embed(input_ids.to(self.runtime.device))
        return out if out_dtype is None else out.to(out_dtype)


PROJECTIONS = ("qkv_proj.weight", "o_proj.weight", "ff_in.weight", "ff_out.weight")  # the weights patches reach


def comfy_t5_weight_names(config) -> list[str]:
    """The names of ComfyUI's T5 weights (after the T5's own prefix): Hugging Face's, for `config`."""
    wi = ("wi_0", "wi_1") if config.ffn_type == T5FFNType.GEGLU else ("wi",)
    attn = [f"SelfAttention.{p}.weight" for p in "qkvo"]
    names = ["shared.weight", "encoder.final_layer_norm.weight"]
    for i in range(config.num_layers):
        bias = ["SelfAttention.relative_attention_bias.weight"] if i == 0 or config.pos_emb_per_layer else []
        names += [f"encoder.block.{i}.layer.0.{n}" for n in ["layer_norm.weight", *attn, *bias]]
        names += [f"encoder.block.{i}.layer.1.{n}" for n in ["layer_norm.weight", *(f"DenseReluDense.{p}.weight"
                                                                                    for p in (*wi, "wo"))]]
    return names


def comfy_t5_names(module: "T5Transformer", state_dict: dict, prefix: str, local_metadata) -> None:
    """The names of ComfyUI's T5 weights, as empty meta tensors, in the state dict: ComfyUI's LoRA loaders map a
    LoRA's T5 keys onto the names a CLIP's state dict has, so a LoRA for the T5 reaches the CLIP's add_patches, which
    hands those for the projections to t5core's weights (t5_weight_patches) and refuses the others (a key ComfyUI's
    loaders find no name for is only logged, and the LoRA would apply in part)."""
    for name in comfy_t5_weight_names(module.encoder.config):
        state_dict[prefix + name] = torch.empty(0, device="meta")


def t5_weight_patches(encoder, prefix: str, patches: dict) -> dict:
    """ComfyUI's patches for its T5's projection weights (keys `prefix` + a Hugging Face T5 name, or (name, offset[,
    function])) -> the same patches for the T5Encoder's weights, keyed as ComfyUI's ModelPatcher keys them:
    (t5core's weight, its rows (dim 0, first row, rows) where it is part of a fused one: q, k, v of qkv_proj, wi_0
    and wi_1 of ff_in (checkpoint.native_target)[, function]). Its patcher applies them to the weights as ComfyUI's
    own T5 holds them (the projection modules' convert_weight / set_weight: fp8 row scales and float16 residual
    factors taken out and put back, nodes/lowvram.py). ValueError for what t5core's T5 cannot take: patches for its
    embedding, norms or position bias, patches on norm-fused or GGUF weights."""
    model = encoder.patcher().model
    names = set(comfy_t5_weight_names(model.config))  # (not wi for a gated FFN, which native_target would take)
    out = {}
    for key, patch in patches.items():
        name, offset, function = (key, None, None) if isinstance(key, str) else (key[0], key[1], (*key[2:], None)[0])
        target = native_target(name.removeprefix(prefix), model.config) if name.removeprefix(prefix) in names else None
        if target is None or not target[0].endswith(PROJECTIONS):
            raise ValueError(f"T5 Encoder to CLIP (fast): {name!r}: t5core's T5 takes weight patches (a LoRA, a "
                             f"merge) for its q, k, v, o, wi and wo projections only")
        ours, part, parts = target
        if not model.config.elementwise_affine:
            raise ValueError(f"T5 Encoder to CLIP (fast): {name!r}: {encoder.plan.path} has its norm scales fused "
                             f"into these weights (T5 Fuse Norms); load it without Fuse Norms to patch its T5")
        weight = getattr(model.get_submodule(ours.rpartition(".")[0]), "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            raise ValueError(f"T5 Encoder to CLIP (fast): {name!r}: {encoder.plan.path} keeps this weight as GGUF "
                             f"blocks, which take no weight patches; to patch its T5, convert it to a .safetensors file "
                             f"(python -m t5core convert FILE.gguf FILE.safetensors --dtype bfloat16) and load that")
        rows = weight.shape[0] // parts
        rows = (0, part * rows, rows) if parts > 1 else None
        if offset is not None and rows is not None and offset[0] != 0:
            raise ValueError(f"T5 Encoder to CLIP (fast): {name!r}: a patch of part of its columns (offset "
                             f"{offset}) on rows of {ours}")
        if offset is not None:
            rows = offset if rows is None else (0, rows[1] + offset[1], offset[2])
        out[(ours, rows, function) if function else (ours, rows) if rows else ours] = patch
    return out


class T5Transformer(torch.nn.Module):
    """Stands where ComfyUI's comfy.text_encoders.t5.T5 stands (SDClipModel.transformer) and returns what it returns:
    (last hidden state [B, L, D], hidden state of layer intermediate_output or None), float32."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder  # nodes.comfy_model.T5Encoder (not a module: its weights live in its patcher)
        self.num_layers = encoder.config.num_layers
        self.dtype = encoder.plan.dtype
        self.register_state_dict_post_hook(comfy_t5_names)

    def get_input_embeddings(self) -> Embedding:
        return Embedding(self.encoder.runtime())

    def forward(self, input_ids, attention_mask=None, embeds=None, num_tokens=None, intermediate_output=None,
                final_layer_norm_intermediate=True, dtype=None, embeds_info=(), **kwargs):
        runtime = self.encoder.runtime()
        if embeds is None:
            embeds = self.get_input_embeddings()(input_ids, out_dtype=torch.float32)
        mask = None if attention_mask is None else attention_mask.bool()
        # t5core encodes in inference mode; ComfyUI weights tokens in place, also outside it: a normal tensor
        out = runtime.encode(None, mask, embeds=embeds).clone()
        intermediate = None
        if intermediate_output is not None:  # CLIPSetLastLayer: that layer's output, after the final norm
            if not isinstance(intermediate_output, int) or not final_layer_norm_intermediate:
                raise ValueError(f"t5core: this T5 gives the last layer or one hidden layer (normed), not "
                                 f"{intermediate_output!r} (final_layer_norm_intermediate={final_layer_norm_intermediate})")
            depth = (intermediate_output % self.num_layers) + 1
            intermediate = out.clone() if depth == self.num_layers else runtime.encode(
                None, mask, embeds=embeds, num_layers=depth).clone()
        return out, intermediate


# -- the CLIP -------------------------------------------------------------------------------------------------------
def patch_key_name(key) -> str:
    """A ModelPatcher patch key: the weight's name, or (name, offset[, function])."""
    return key if isinstance(key, str) else key[0]


@functools.cache
def clip_class():
    """comfy.sd.CLIP whose non-T5 parts are the CLIP input's: its load_model also loads their weights (whole, or
    partially where the GPU is short of room), and weight patches for them (LoRA loaders, CLIP merges) go to the
    input's patcher, cloned with the CLIP; those for the T5's projections go to its own patcher (t5_weight_patches).
    Patches t5core's T5 cannot take, and using this CLIP as a merge source or saving it, are errors rather than
    silently ignored."""
    import comfy.model_management as mm
    import comfy.sd

    class T5CoreCLIP(comfy.sd.CLIP):
        part_patchers = ()  # the CLIP input's patcher (its cond_stage_model holds the parts, under the same names)
        part_names = ()  # the parts taken from it: "clip_l", "clip_g", "llama"
        t5_name = "t5xxl"  # the family's T5 attribute ("umt5xxl" for wan): t5core's T5

        def clone(self):
            n = super().clone()
            n.__class__, n.part_names, n.t5_name = type(self), self.part_names, self.t5_name
            n.part_patchers = tuple(p.clone() for p in self.part_patchers)  # patches on a clone stay on the clone
            return n

        def load_model(self):
            mm.load_models_gpu([self.patcher, *self.part_patchers])
            return self.patcher

        def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
            """-> the keys applied, as ModelPatcher.add_patches (a LoRA loader passes the diffusion model's too).
            Patches for the T5's projections go to this CLIP's patcher (the T5Encoder's, cloned with the CLIP) as
            patches of t5core's weights; those that change nothing (a LoRA loader's strength_clip 0, a merge at
            ratio 1) are taken as applied whatever they name."""
            t5 = {k: v for k, v in patches.items() if patch_key_name(k).split(".")[0] == self.t5_name}
            if t5 and (strength_patch != 0 or strength_model != 1):
                transformer = getattr(self.cond_stage_model, self.t5_name).transformer
                ours = t5_weight_patches(transformer.encoder, f"{self.t5_name}.transformer.", t5)
                if len(self.patcher.add_patches(ours, strength_patch, strength_model)) != len(ours):
                    raise ValueError(f"T5 Encoder to CLIP (fast): of {len(ours)} T5 patches, the encoder's patcher "
                                     f"took fewer (its weights are not the ones mapped)")
            parts = [k for p in self.part_patchers for k in p.add_patches(patches, strength_patch, strength_model)]
            return [*t5, *parts]

        def get_key_patches(self):
            raise ValueError("T5 Encoder to CLIP (fast): this CLIP cannot be merged into another: its T5 is t5core's "
                             "(fused, maybe fp8 or GGUF), not ComfyUI's weights; merge the CLIPs ComfyUI loads")

        def get_sd(self):
            raise ValueError("T5 Encoder to CLIP (fast): this CLIP cannot be saved: its T5 is t5core's; save the "
                             "CLIP input, and keep the T5 file you loaded")

    return T5CoreCLIP


def clip_parts(clip, family: str) -> dict[str, torch.nn.Module]:
    """The non-T5 encoders of the CLIP input that the family uses; ValueError naming both for a CLIP of the wrong
    kind (one holding none of them)."""
    fam = FAMILIES[family]
    if clip is None:
        return {}
    container = getattr(clip, "cond_stage_model", None)
    parts = {name: getattr(container, name) for name in fam.parts if getattr(container, name, None) is not None}
    if not parts:
        held = sorted(n for n in ("clip_l", "clip_g", "clip_h", "llama", "t5xxl", "umt5xxl")
                      if getattr(container, n, None) is not None)
        wanted = " / ".join(fam.parts) if fam.parts else "no CLIP input (leave it unconnected)"
        raise ValueError(f"the CLIP input ({type(container).__name__} holding {', '.join(held) or 'nothing known'}) "
                         f"has nothing the {family} family uses: it takes {wanted}")
    for name in ("t5xxl", "umt5xxl"):
        if getattr(container, name, None) is not None:
            log.warning("t5core: the CLIP input also holds ComfyUI's own %s; it is loaded but not used here (load "
                        "only the CLIP files to save memory)", name)
    return parts


class ZeroPooledCLIPL(torch.nn.Module):
    """Flux without a CLIP-L: ComfyUI's FluxClipModel keeps only CLIP-L's pooled vector, which is then zeros (as the
    Encode Prompt node always gave)."""

    def set_clip_options(self, options):
        pass

    def reset_clip_options(self):
        pass

    def encode_token_weights(self, token_weight_pairs):
        import comfy.model_management as mm

        return None, torch.zeros((1, 768), device=mm.intermediate_device())


def wan_tokenizer_data(encoder) -> dict:
    """ComfyUI's WAN tokenizer reads the UMT5 sentencepiece model from tokenizer_data["spiece_model"] (as the
    `spiece_model` tensor ComfyUI's UMT5 files embed): a spiece.model beside the file, else the file's own, the
    order in which the Load node picks its tokenizer (comfy_model.resolve_tokenizer)."""
    ckpt = encoder.ckpt
    if ckpt.tokenizer is not None and ckpt.tokenizer.suffix == ".model":
        data = ckpt.tokenizer.read_bytes()
    elif ckpt.tokenizer_bytes:
        data = ckpt.tokenizer_bytes
    else:
        raise ValueError(f"ComfyUI's WAN tokenizer needs the UMT5 sentencepiece model: {encoder.plan.path} embeds no "
                         f"`spiece_model` and has no spiece.model beside it (Comfy-Org's umt5_xxl files embed it)")
    return {"spiece_model": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def make_clip(encoder, family: str, clip=None):
    """-> a ComfyUI CLIP for the family: ComfyUI's model and tokenizer for it, t5core's T5, the CLIP input's parts."""
    import importlib

    import comfy.supported_models_base
    import folder_paths

    check_family(encoder, family)
    if family not in available_families():
        raise ValueError(f"family: this ComfyUI has no {family} text encoder; it has {available_families()}")
    fam = FAMILIES[family]
    parts = clip_parts(clip, family)
    module = importlib.import_module(f"comfy.text_encoders.{fam.module}")
    target = comfy.supported_models_base.ClipTarget(getattr(module, fam.tokenizer), fam.model(module, parts))
    load_device, offload_device = encoder.devices()
    options = {"initial_device": torch.device("meta"), "load_device": load_device, "offload_device": offload_device,
               "dtype": torch.float32}  # meta: ComfyUI's own T5 (and the parts replaced below) allocate nothing
    out = clip_class()(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                       tokenizer_data=wan_tokenizer_data(encoder) if fam.kind == UMT5 else {}, model_options=options)
    model = out.cond_stage_model
    t5 = getattr(model, fam.t5)
    t5.transformer, t5.num_layers = T5Transformer(encoder), encoder.config.num_layers
    for name in fam.parts:
        if name in parts:  # the family's own part (its layer, pooling and norm options) on the input's weights
            getattr(model, name).transformer = parts[name].transformer
        elif family == "flux":
            model.clip_l = ZeroPooledCLIPL()
            log.warning("t5core: Flux without a CLIP-L: the pooled vector is zeros (connect a CLIP-L)")
    patcher = encoder.patcher()
    patcher.is_clip, patcher.hook_mode = True, out.patcher.hook_mode
    out.patcher, out.part_patchers, out.part_names = patcher, (clip.patcher,) if parts else (), tuple(parts)
    out.t5_name = fam.t5
    return out


# -- the Encode Prompt node's families ------------------------------------------------------------------------------
ENCODE_FAMILIES = {"Flux": "flux", "SD3": "sd3", "Chroma": "chroma", "PixArt": "pixart", "LTXV": "ltxv",
                   "Mochi": "mochi", "Cosmos": "cosmos", "WAN": "wan", "HiDream": "hidream",
                   "plain T5": None}  # plain T5: no ComfyUI encoder (nodes/conditioning.py)


def check_finite(tensors) -> None:
    """Never hand the sampler NaN or inf conditioning."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError("the T5 output is not finite (NaN or inf): try bf16 or fp32, or check the model file")


def encode(encoder, text: str, family_name: str, guidance: float, clip=None) -> tuple[list, str]:
    """-> (CONDITIONING from ComfyUI's own encoder for the family, a one-line summary): the CLIP make_clip builds,
    encoded as CLIP Text Encode does (Flux: as CLIPTextEncodeFlux, with the guidance). The Encode Prompt node has
    checked the family, text and guidance."""
    family = ENCODE_FAMILIES[family_name]
    made = make_clip(encoder, family, clip)
    tokens = made.tokenize(text)
    cond = made.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance} if family == "flux" else {})
    t5 = tokens.get(FAMILIES[family].t5, [[]])
    summary = f"{family_name} through ComfyUI's {family} encoder: {sum(len(s) for s in t5)} T5 tokens"
    return cond, summary
