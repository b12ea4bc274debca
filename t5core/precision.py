"""Per-layer activation tracing and error metrics, shared by the precision report, calibration and the
float16 overflow diagnosis."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import BoolTensor, LongTensor, Tensor


FLOAT16_MAX = 65504.0


@dataclass
class LayerStat:
    name: str  # e.g. "layers.7.ffn" (its output), "layers.7.ffn.hidden" (the ff_out input), "layers.7" (residual)
    absmax: float  # over real tokens
    finite: bool


@torch.inference_mode()
def trace_layers(model, input_ids: Optional[LongTensor], mask: Optional[BoolTensor] = None,
                 embeds: Optional[Tensor] = None) -> list[LayerStat]:
    """Run the model eagerly and record, in order, the absmax of every attention output, FFN hidden, FFN output
    and residual, over real tokens only. embeds: input embeddings instead of input_ids (T5EncoderStack.forward)."""
    stats: list[LayerStat] = []
    device = (input_ids if embeds is None else embeds).device
    real = None if mask is None else mask.to(device).bool()

    def record(name, t: Tensor):
        t = t.detach() if real is None else t.detach()[real]
        stats.append(LayerStat(name, t.float().abs().max().item() if t.numel() else 0.0, bool(torch.isfinite(t).all())))

    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.attn.register_forward_hook(lambda m, a, out, n=f"layers.{i}.attn": record(n, out)))
        hooks.append(layer.ffn.ff_out.register_forward_pre_hook(lambda m, a, n=f"layers.{i}.ffn.hidden": record(n, a[0])))
        hooks.append(layer.ffn.register_forward_hook(lambda m, a, out, n=f"layers.{i}.ffn": record(n, out)))
        hooks.append(layer.register_forward_hook(lambda m, a, out, n=f"layers.{i}": record(n, m.stream_after(out))))
    hooks.append(model.ln.register_forward_hook(lambda m, a, out: record("final_norm", out)))
    try:
        with torch.compiler.set_stance("force_eager"):  # hooks call .item() and must see every module
            model(input_ids, input_mask=real, **({} if embeds is None else {"embeds": embeds}))
    finally:
        for h in hooks:
            h.remove()
    return stats


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref||, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999)


def diff_quantiles(out: Tensor, ref: Tensor) -> dict[float, float]:
    """|out - ref| quantiles (50% ... 99.99%)."""
    d = (out.double() - ref.double()).abs().flatten()
    if d.numel() > 16_000_000:  # torch.quantile's input limit
        d = d[torch.randperm(d.numel(), device=d.device)[:16_000_000]]
    q = torch.quantile(d.float(), torch.tensor(QUANTILES, device=d.device))
    return dict(zip(QUANTILES, q.tolist()))
