"""The ComfyUI nodes, written as classic (V1) node classes; nodes/v3.py wraps the same classes for the V3 API.

Every node is a pure function of its inputs, so ComfyUI's output cache makes a repeated run free: none of them
defines IS_CHANGED. Errors name the node and the problem.
"""
import contextlib
import math

from . import clip as comfy_clip, comfy_model, conditioning

CATEGORY = "T5 (fast)"
T5_ENCODER = "T5_ENCODER"
ENCODER_INPUT = (T5_ENCODER, {"tooltip": "A T5 encoder from Load T5 Encoder (fast)."})


class NodeError(ValueError):
    """A problem with a node's inputs; the message starts with the node's display name."""


@contextlib.contextmanager
def errors_named(node_cls):
    """Prefix expected failures (bad file, bad settings, float16 overflow) with the node's name. Out-of-memory and
    ComfyUI's interrupt pass through untouched: ComfyUI handles those itself."""
    try:
        yield
    except NodeError:
        raise
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        raise NodeError(f"{DISPLAY_NAMES[node_cls.__name__]}: {e}") from e


def _ui(text: str) -> dict:
    return {"text": [text]}


class LoadT5Encoder:
    DESCRIPTION = ("Load a T5 encoder (Flux / SD3 T5-XXL, T5 v1.0/v1.1, mT5, UMT5) from models/text_encoders. "
                   "The file is checked now; the weights are read when an Encode Prompt first needs them.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (T5_ENCODER,)
    RETURN_NAMES = ("t5_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (comfy_model.weight_file_names(), {
                "tooltip": "A .safetensors / .sft file (any key prefix, scaled fp8 included) or a tensorizer "
                           ".tensors file with its config.json, from models/text_encoders or models/clip."}),
            "weight_dtype": (list(comfy_model.WEIGHT_DTYPE_CHOICES), {
                "default": "auto",
                "tooltip": "auto: compute in bf16 where the GPU supports it, else fp32. bf16/fp16/fp32: compute "
                           "in that dtype, weights too (fp16 uses the preset float16 scales for the model's size; "
                           "see FP16 Scale), except that fp32 compute keeps a float16 or bfloat16 file's 16-bit "
                           "weights, as ComfyUI does (half fp32's memory; on the GPU each layer's input is split "
                           "into two 16-bit halves for the tensor cores, near float32's precision). "
                           "fp8 and GGUF files keep their compressed weights either way. fp8_*: fp8 weights "
                           "(quantized at load unless the file's are fp8), compute as auto; fp8_e4m3fn_fast also "
                           "multiplies in fp8 on GPUs that can (RTX 40xx, H100, newer)."}),
            "attention": (["auto", "flex", "sdpa"], {
                "default": "auto", "tooltip": "auto: flex for a compiled UMT5 (WAN) in bf16 / fp16 on a GPU, where it "
                                               "reads each layer's bias table in its kernel (5% faster), else SDPA "
                                               "(without compile it needs no Triton; in fp32 its kernel is 6.6x "
                                               "faster). flex: flex attention with the bias as a score_mod (always "
                                               "compiled by Triton)."}),
            "compile": ("BOOLEAN", {
                "default": False,
                "tooltip": "torch.compile each layer: faster repeated encodes. Prompts run padded to one of 21 "
                           "lengths up to 512 tokens (16, 20, 24, 28, 32, 40, ...); each new one compiles once."}),
            "device": (["default", "cpu"], {
                "default": "default", "tooltip": "default: where ComfyUI runs text encoders. cpu: always on CPU."}),
        }}

    def load(self, model_name, weight_dtype="auto", attention="auto", compile=False, device="default"):
        with errors_named(type(self)):
            encoder = comfy_model.load(model_name, weight_dtype, attention, compile, device)
            return {"ui": _ui(encoder.describe()), "result": (encoder,)}


class FuseNorms:
    DESCRIPTION = ("Fold the RMSNorm scales into the projections that follow them: one multiply less per token. "
                   "Returns a new encoder and leaves the input unchanged; no weights are copied (they are read "
                   "from the file already fused).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (T5_ENCODER,)
    RETURN_NAMES = ("t5_encoder",)
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"t5_encoder": ENCODER_INPUT}}

    def fuse(self, t5_encoder):
        with errors_named(type(self)):
            encoder = comfy_model.fuse_norms(t5_encoder)
            return {"ui": _ui(encoder.describe()), "result": (encoder,)}


class FP16Scale:
    DESCRIPTION = ("Run the encoder in float16 without overflow: power-of-two residual scales keep the T5 v1.1 "
                   "activations inside float16's range while the output stays the same up to rounding. Returns a "
                   "new encoder (the input is unchanged) and the scales used.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (T5_ENCODER, "STRING")
    RETURN_NAMES = ("t5_encoder", "scales")
    FUNCTION = "scale"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "t5_encoder": ENCODER_INPUT,
            "mode": (["preset", "custom", "auto-calibrate"], {
                "default": "preset",
                "tooltip": "preset: scales calibrated beside the file, else the known ones for the model's size. "
                           "custom: the list below. auto-calibrate: measure now in float32 on varied prompts."}),
            "custom_scales": ("STRING", {
                "default": "", "multiline": False,
                "tooltip": "custom mode: one FFN-out scale per layer, powers of two, e.g. 1,1,0.5,... "
                           "or 'ATTN;FFN' for two lists. The scales output uses the same syntax."}),
        }}

    def scale(self, t5_encoder, mode="preset", custom_scales=""):
        with errors_named(type(self)):
            encoder, scales = comfy_model.to_fp16(t5_encoder, mode, custom_scales)
            return {"ui": _ui(encoder.describe()), "result": (encoder, scales)}


class EncoderToCLIP:
    DESCRIPTION = ("A ComfyUI CLIP for a T5 / UMT5 model family whose T5 runs on t5core: ComfyUI's own tokenizer, "
                   "prompt weights, padding, masks and conditioning for the family, so every text-encode node works "
                   "with it (CLIP Text Encode, CLIPTextEncodeFlux, the WAN / LTXV nodes...). CLIP-L / CLIP-G come from "
                   "the optional CLIP input (ComfyUI's CLIP loaders).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    FUNCTION = "to_clip"

    @classmethod
    def INPUT_TYPES(cls):
        families = comfy_clip.available_families() or list(comfy_clip.FAMILIES)
        return {
            "required": {
                "t5_encoder": ENCODER_INPUT,
                "family": (families, {"default": families[0], "tooltip": "ComfyUI's text-encoder type (as CLIPLoader's "
                                      "type). wan takes a UMT5 file, cosmos a T5 v1.0 file, the others T5 v1.1."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "flux: CLIP-L (CLIPLoader). sd3: CLIP-L and/or CLIP-G (DualCLIPLoader "
                                             "type sd3). hidream: CLIP-L / CLIP-G / Llama. Others take none."}),
            },
        }

    def to_clip(self, t5_encoder, family, clip=None):
        with errors_named(type(self)):
            made = comfy_clip.make_clip(t5_encoder, family, clip)
            return {"ui": _ui(f"{family}: ComfyUI's {family} text encoder, T5 from t5core ({t5_encoder.describe()})"),
                    "result": (made,)}


class EncodePrompt:
    DESCRIPTION = ("Encode a prompt with T5 into CONDITIONING through ComfyUI's own text encoder for the family (the "
                   "CLIP that T5 Encoder to CLIP builds; Flux adds the guidance). plain T5: the T5 states only. "
                   "Supports (word:1.2) weights.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "t5_encoder": ENCODER_INPUT,
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                    "tooltip": "The prompt; an empty prompt is valid (EOS and padding)."}),
                "family": (list(comfy_clip.ENCODE_FAMILIES), {
                    "default": "Flux",
                    "tooltip": "ComfyUI's encoder for the family (Flux: T5 padded to 256+ tokens, CLIP-L pooled, "
                               "guidance; SD3: CLIP-L/G states then T5). plain T5: [1, tokens, width], no extras."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Flux guidance (ignored by SD3 and plain T5)."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Flux: a CLIP with CLIP-L (CLIPLoader). SD3: CLIP-L and/or CLIP-G "
                                             "(DualCLIPLoader type sd3). Without it, zeros as in ComfyUI."}),
            },
        }

    def encode(self, t5_encoder, text, family="Flux", guidance=3.5, clip=None):
        with errors_named(type(self)):
            check_inputs(text, family, guidance)
            if comfy_clip.ENCODE_FAMILIES[family] is None:  # plain T5: ComfyUI has no such encoder
                cond, summary = conditioning.build(t5_encoder, text)
            else:
                cond, summary = comfy_clip.encode(t5_encoder, text, family, guidance, clip)
            comfy_clip.check_finite([c for c, _ in cond])
            return {"ui": _ui(summary), "result": (cond,)}


def check_inputs(text, family: str, guidance) -> None:
    """Encode Prompt's inputs, from an edited or old workflow: a ValueError naming the input."""
    if family not in comfy_clip.ENCODE_FAMILIES:
        raise ValueError(f"family: unknown family {family!r}; choose one of {list(comfy_clip.ENCODE_FAMILIES)}")
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance: must be a finite number, got {guidance!r}")


NODE_CLASSES = {"T5CoreLoadEncoder": LoadT5Encoder, "T5CoreFuseNorms": FuseNorms, "T5CoreFP16Scale": FP16Scale,
                "T5CoreEncodePrompt": EncodePrompt, "T5CoreEncoderToCLIP": EncoderToCLIP}
NODE_DISPLAY_NAME_MAPPINGS = {
    "T5CoreLoadEncoder": "Load T5 Encoder (fast)",
    "T5CoreFuseNorms": "T5 Fuse Norms (fast)",
    "T5CoreFP16Scale": "T5 FP16 Scale (fast)",
    "T5CoreEncodePrompt": "T5 Encode Prompt (fast)",
    "T5CoreEncoderToCLIP": "T5 Encoder to CLIP (fast)",
}
DISPLAY_NAMES = {cls.__name__: NODE_DISPLAY_NAME_MAPPINGS[node_id] for node_id, cls in NODE_CLASSES.items()}
