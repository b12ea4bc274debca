"""Pick float16 residual scales from the activations of real prompts, with headroom.

Runs the encoder (in float32, or whatever precision it has, as long as it is finite) over a prompt set, records
each layer's attention-out and FFN-out absmax over real tokens, and chooses, layer by layer, the largest power
of two <= 1 that keeps every scaled output `headroom` times below the float16 maximum."""
import math
import warnings
from typing import Optional, Sequence

from .fp16_scales import Scales
from .precision import FLOAT16_MAX, trace_layers

# Short, long, repetitive and unusual-unicode prompts: activations peak on different kinds of input.
BUILTIN_PROMPTS = [
    "a cat",
    "illustration of a nice tree",
    "A photograph of an astronaut riding a horse on the moon, highly detailed, 8k, dramatic lighting",
    "masterpiece, best quality, " * 40,
    "the the the the the the the the the the the the the the the the the the the the",
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "東京の夜景、ネオン、雨、映画のような構図",
    "Ünïcödé façade — naïve café, ½ ¾ ™ © ∑ ∫ √ ∞ ≠ ≤ ≥ 🙂🚀🌲",
    "0123456789 " * 30,
    "A sprawling fantasy city built into the side of a waterfall at dusk, lanterns glowing along wooden "
    "walkways, airships docking at towers, a crowd of travellers in colourful robes, mist rising from the "
    "river below, painted in the style of a detailed matte painting with soft volumetric light. " * 4,
    "<extra_id_0> a sentinel token and </s> an end token inside the text",
    "\t  spaced   out\n\nprompt  with   tabs\tand newlines  ",
]


def measure_output_absmax(model, tokenizer, prompts: Optional[Sequence[str]] = None, max_length: int = 512,
                          device=None):
    """-> per layer (attention-out absmax, FFN-out absmax, FFN-hidden absmax), unscaled units. device: where the
    model runs (default: its weights' device; an offloading manager's partial load may leave some elsewhere)."""
    n = model.config.num_layers
    stats = {}
    device = model.unit_scale.device if device is None else device
    for text in prompts or BUILTIN_PROMPTS:  # one at a time: no padding, exact lengths
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long built-in prompts are meant to be truncated
            ids, _ = tokenizer([text], max_length=max_length)
        for s in trace_layers(model, ids.to(device)):
            stats[s.name] = max(stats.get(s.name, 0.0), s.absmax)
    # undo scales already baked into the weights
    factors = Scales.from_config(model.config).weight_factors()
    attn = [stats[f"layers.{i}.attn"] / factors[f"layers.{i}.attn.o_proj.weight"] for i in range(n)]
    ffn = [stats[f"layers.{i}.ffn"] / factors[f"layers.{i}.ffn.ff_out.weight"] for i in range(n)]
    hidden = [stats[f"layers.{i}.ffn.hidden"] for i in range(n)]
    return attn, ffn, hidden


def choose_scales(attn_absmax, ffn_absmax, headroom: float = 4.0) -> tuple[list[float], list[float]]:
    """Greedy, first layer to last: shrink only when the cumulative-scaled output would pass the limit."""
    limit = FLOAT16_MAX / check_headroom(headroom)  # -1 would loop forever, inf give scales of 0, 0 divide by 0
    c, attn_scales, ffn_scales = 1.0, [], []
    for a, f in zip(attn_absmax, ffn_absmax):
        for absmax, out in ((a, attn_scales), (f, ffn_scales)):
            s = 1.0
            while c * s * absmax > limit:
                s /= 2
            out.append(s)
            c *= s
    return attn_scales, ffn_scales


def calibrate_fp16_scales(model, tokenizer, prompts=None, headroom: float = 4.0, max_length: int = 512,
                          device=None) -> Scales:
    """A T5EncoderStack's scales in total, relative to unscaled weights (device: as measure_output_absmax's).

    Use them with load_encoder(..., dtype="float16", fp16_scales=scales), or with fp16_scales.scale_residuals_enc
    on an unscaled model before casting it to float16; fp16_scales.save_sidecar keeps them beside the weights."""
    headroom = check_headroom(headroom)
    attn, ffn, hidden = measure_output_absmax(model, tokenizer, prompts, max_length, device)
    for i, h in enumerate(hidden):
        if h * headroom > FLOAT16_MAX:
            warnings.warn(f"layer {i}: FFN hidden activations reach {h:.0f}, within {headroom}x of the float16 "
                          f"limit; residual scales cannot reduce them, so prefer bfloat16 for this model")
    return Scales.of(*choose_scales(attn, ffn, headroom), model.config.num_layers)


def check_headroom(headroom) -> float:
    """headroom must be a finite number >= 1 (the scaled activations stay that many times below 65504)."""
    try:
        value = float(headroom)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"headroom: must be a finite number >= 1, got {headroom!r}")
    return value
