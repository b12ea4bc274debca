"""Float16 residual scaling by powers of two.

T5 v1.1's residual stream outgrows float16 (65504) in some layers' FFN outputs. Scaling layer i's output
projection down by s_i and the residual by s_i before the add keeps every layer's contribution in range;
each following norm sees c * x (c = product of scales so far) and, with eps * c**2, normalises exactly as
before. Powers of two make the weight scaling exact.
"""
import math
from typing import Optional, Sequence

import torch

from .t5_common import T5Config
from .t5_encoder import T5EncoderStack


def check_scales(scales: Optional[Sequence[float]], num_layers: int, what: str) -> list[float]:
    if scales is None:
        return [1.0] * num_layers
    scales = [float(s) for s in scales]
    if len(scales) != num_layers:
        raise ValueError(f"{what}: {len(scales)} scales given for {num_layers} encoder layers")
    for i, s in enumerate(scales):
        if not (s > 0 and math.isfinite(s) and math.log2(s).is_integer()):
            raise ValueError(f"{what}: layer {i} scale {s} is not a power of two (e.g. 1, 1/2, 1/4)")
    return scales


def output_weight_factors(attn_scales: Sequence[float], ffn_scales: Sequence[float]) -> dict[str, float]:
    """Cumulative factor for each output projection: layer i's o_proj / ff_out carry every scale up to them."""
    factors, c = {}, 1.0
    for i, (sa, sf) in enumerate(zip(attn_scales, ffn_scales)):
        c *= sa
        factors[f"layers.{i}.attn.o_proj.weight"] = c
        c *= sf
        factors[f"layers.{i}.ffn.ff_out.weight"] = c
    return factors


def combined_config(config: T5Config, attn_scales, ffn_scales):
    """`config` (whose scales are those baked into the weights) with new scales multiplied on, and the factor
    each output projection must be multiplied by."""
    n = config.num_layers
    attn_new = check_scales(attn_scales, n, "enc_attn_out_scales")
    ffn_new = check_scales(ffn_scales, n, "enc_ffn_out_scales")
    attn_old, ffn_old = config.residual_scales()
    config = config.model_copy(update={
        "enc_attn_out_scales": [a * b for a, b in zip(attn_old, attn_new)],
        "enc_ffn_out_scales": [a * b for a, b in zip(ffn_old, ffn_new)],
    })
    return config, output_weight_factors(attn_new, ffn_new)


@torch.no_grad()
def scale_residuals_enc(model: T5EncoderStack, attn_out_scales=None, ffn_out_scales=None) -> T5EncoderStack:
    """Apply power-of-two residual scales in place (on top of any already applied); output unchanged."""
    config, factors = combined_config(model.config, attn_out_scales, ffn_out_scales)
    params = dict(model.named_parameters())
    for name, f in factors.items():
        if f != 1.0:
            params[name].mul_(f)
    model.config = config
    model.apply_residual_scales_from_config()
    model.invalidate_caches()
    return model
