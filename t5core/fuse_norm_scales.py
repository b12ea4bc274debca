"""Fold RMSNorm scales into the projections that read the norm's output.

Linear(RMSNorm(x) * g) == Linear'(RMSNorm(x)) with W' = W * g[None, :], so the norm loses its weight and the
projection absorbs it: one multiply (and one rounding) fewer per token. The final norm keeps its scale:
no projection follows it inside the encoder.
"""
import torch
from torch import Tensor

from .t5_encoder import T5EncoderStack


def scale_input_columns(weight: Tensor, scale: Tensor, via_f32: bool) -> Tensor:
    """W [out, in] * scale [in] -> a new tensor in W's dtype (rounded once when via_f32)."""
    if via_f32:
        return (weight.float() * scale.to(weight.device, torch.float32)).to(weight.dtype)
    return weight * scale.to(weight.device, weight.dtype)


def norm_consumers(model: T5EncoderStack):
    """(norm, projection reading its output) for every fusable pair."""
    for layer in model.layers:
        yield layer.ln1, layer.attn.qkv_proj
        yield layer.ln2, layer.ffn.ff_in


@torch.no_grad()
def fuse_norm_scales_enc(model: T5EncoderStack, fuse_via_f32: bool = False) -> T5EncoderStack:
    """Fold every layer's norm scales into its QKV and FFN-input projections, in place (no weight copy kept).

    Residual scaling already applied is untouched: it lives in the output projections and the norm eps."""
    for norm, proj in norm_consumers(model):
        if norm.weight is None:
            continue  # already fused
        proj.weight.copy_(scale_input_columns(proj.weight, norm.weight, fuse_via_f32))
        norm.weight = None
    model.config = model.config.model_copy(update={"elementwise_affine": False})
    return model
