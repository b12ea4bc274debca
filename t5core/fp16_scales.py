"""Float16 residual scales, in one place: their type, text form, presets, the sidecar file, how a load picks them,
and how they are applied to weights.

T5 v1.1's residual stream outgrows float16 (65504) in some layers' FFN outputs. Scaling layer i's output
projection down by s_i and the residual by s_i before the add keeps every layer's contribution in range; each
following norm sees c * x (c = product of scales so far) and, with eps * c**2, normalises exactly as before
(T5EncoderStack.apply_residual_scales_from_config). Powers of two make the weight scaling exact.

Where scales live, all read and written here:
- `Scales` in memory: one attention-out and one FFN-out factor per layer;
- text, in the CLI (`--fp16-scales`) and the nodes: '1,1,1/2,...' (FFN-out) or 'ATTN;FFN';
- T5Config.enc_attn_out_scales / enc_ffn_out_scales: scales baked into the weights (tensorizer and dcp files);
- config.json's CONFIG_KEY beside Hugging Face-form weights, which are stored unscaled (transformers reads them);
- the sidecar `fp16_scales.json` that `calibrate` writes beside the weights.
"""
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

CONFIG_KEY = "t5core_fp16_scales"  # in a Hugging Face config.json: {"attn": [...], "ffn": [...]}

# Known FFN-out scales of the public T5 v1.1 encoders, by (hidden_dim, num_layers, ff_dim); attention-out all 1.
# Found on one short prompt with no headroom (nai-t5): `python -m t5core calibrate` finds scales with headroom for
# your prompts, and saved scales win over these.
PRESETS: dict[str, tuple[tuple[int, int, int], list[float]]] = {
    "small": ((512, 8, 1024), [1, 1, 1 / 2, 1, 1, 1, 1, 1 / 2]),
    "xl": ((2048, 24, 5120), [1, 1 / 2, 1, 1, 1, 1 / 4] + [1] * 18),
    "xxl": ((4096, 24, 10240), [1] * 7 + [1 / 4] + [1] * 16),
}


def _check(values: Sequence, what: str) -> tuple[float, ...]:
    out = []
    for i, s in enumerate(values):
        s = float(s)
        if not (math.isfinite(s) and s > 0 and math.log2(s).is_integer()):
            raise ValueError(f"{what}: layer {i} scale {s:g} is not a power of two (e.g. 1, 1/2, 1/4)")
        out.append(s)
    return tuple(out)


@dataclass(frozen=True)
class Scales:
    """Per-layer power-of-two factors: attention-out and FFN-out."""

    attn: tuple[float, ...]
    ffn: tuple[float, ...]

    @classmethod
    def of(cls, attn: Optional[Sequence], ffn: Optional[Sequence], num_layers: int,
           names: tuple[str, str] = ("enc_attn_out_scales", "enc_ffn_out_scales")) -> "Scales":
        """Checked scales for num_layers layers; None stands for all 1. names: what errors call the two lists."""
        parts = []
        for values, what in zip((attn, ffn), names):
            values = [1.0] * num_layers if values is None else list(values)
            if len(values) != num_layers:
                raise ValueError(f"{what}: {len(values)} scales given for {num_layers} encoder layers")
            parts.append(_check(values, what))
        return cls(*parts)

    @classmethod
    def from_json(cls, data, names: tuple[str, str], num_layers: int) -> "Scales":
        """{attn name: [..] (optional: all 1), ffn name: [..]}, as a JSON file holds them -> checked Scales, or a
        ValueError saying which list is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"must be an object with {names[0]!r} and {names[1]!r} lists")
        lists = [data.get(name) for name in names]
        for name, values in zip(names, lists):
            if values is None and name == names[0]:
                continue
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                       for v in values):
                raise ValueError(f"{name!r} must be a list of numbers, got {values!r:.80}")
        return cls.of(*lists, num_layers, names)

    @classmethod
    def from_config(cls, config) -> "Scales":
        """The scales baked into a config's weights (all 1 when it records none)."""
        return cls.of(config.enc_attn_out_scales, config.enc_ffn_out_scales, config.num_layers)

    def __str__(self) -> str:
        """'1,1,0.5' (FFN-out), or 'ATTN;FFN' when attention scales are not all 1: what parse() reads."""
        def text(values):
            return ",".join(format(v, "g") for v in values)

        return f"{text(self.attn)};{text(self.ffn)}" if any(a != 1 for a in self.attn) else text(self.ffn)

    @property
    def is_unit(self) -> bool:
        return all(s == 1 for s in self.attn + self.ffn)

    def __mul__(self, other: "Scales") -> "Scales":
        return Scales(tuple(a * b for a, b in zip(self.attn, other.attn)),
                      tuple(a * b for a, b in zip(self.ffn, other.ffn)))

    def config_fields(self) -> dict:
        """T5Config fields recording these scales as baked into the weights."""
        return {"enc_attn_out_scales": list(self.attn), "enc_ffn_out_scales": list(self.ffn)}

    def weight_factors(self) -> dict[str, float]:
        """Cumulative factor of each output projection: layer i's o_proj / ff_out carry every scale up to them."""
        factors, c = {}, 1.0
        for i, (sa, sf) in enumerate(zip(self.attn, self.ffn)):
            c *= sa
            factors[f"layers.{i}.attn.o_proj.weight"] = c
            c *= sf
            factors[f"layers.{i}.ffn.ff_out.weight"] = c
        return factors


# A request for scales, as load_encoder, the CLI and the nodes take it: "auto", "calibrate", None, Scales, text,
# a list of FFN-out scales, or an (attn, ffn) pair of lists.
Spec = Union[str, None, Scales, Sequence]


def parse(text: str) -> Spec:
    """CLI / node text -> a Spec: 'auto', 'calibrate', 'none' (None), '1,1,1/2,...' (FFN-out scales) or
    'ATTN;FFN' (an (attn, ffn) pair). Each value is checked here; their number once the model is known."""
    text = text.strip()
    if text in ("auto", "calibrate"):
        return text
    if text in ("none", ""):
        return None
    if text.count(";") > 1:
        raise ValueError(f"fp16 scales {text!r}: expected 'FFN scales' or 'ATTN scales;FFN scales'")

    def values(part: str, what: str) -> list[float]:
        out = []
        for v in (v.strip() for v in part.replace("\n", ",").split(",")):
            if not v:
                continue
            try:
                out.append(float(Fraction(v)))
            except (ValueError, ZeroDivisionError, OverflowError):
                raise ValueError(f"fp16 scales: cannot read {v!r}; write powers of two, e.g. 1,1,1/2,...") from None
        return list(_check(out, what))

    if ";" in text:
        attn, ffn = text.split(";")
        return values(attn, "attention-out scales"), values(ffn, "FFN-out scales")
    return values(text, "FFN-out scales")


def preset(config) -> Optional[Scales]:
    """The preset for a known T5 v1.1 size, else None."""
    size = detect_size(config)
    return Scales.of(None, PRESETS[size][1], config.num_layers) if size else None


def detect_size(config) -> Optional[str]:
    shape = (config.hidden_dim, config.num_layers, config.ff_dim)
    return next((name for name, (s, _) in PRESETS.items() if s == shape), None)


def resolve(spec: Spec, config, weights_path=None, stored: Optional[Scales] = None) -> Optional[Scales]:
    """A Spec -> the Scales to apply on top of the weights (None: none). "auto": the sidecar beside
    weights_path, else `stored` (config.json's CONFIG_KEY), else the preset for the size, else none. ("calibrate"
    needs a model and a tokenizer: load_encoder handles it.)"""
    n = config.num_layers
    if spec is None:
        return None
    if isinstance(spec, Scales):
        return Scales.of(spec.attn, spec.ffn, n)
    if isinstance(spec, str):
        if spec.strip() == "calibrate":
            raise ValueError("fp16 scales 'calibrate' needs the model and a tokenizer: pass it to load_encoder")
        if spec != "auto":
            return resolve(parse(spec), config, weights_path, stored)
        return (load_sidecar(weights_path, n) if weights_path is not None else None) or stored or preset(config)
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"fp16_scales: expected 'auto', 'calibrate', None, Scales, text, a list of FFN-out scales "
                         f"or an (attn, ffn) pair, got {spec!r}")
    if len(spec) == 2 and not isinstance(spec[0], (int, float)):  # (attn, ffn)
        return Scales.of(spec[0], spec[1], n)
    return Scales.of(None, spec, n)


def combined_config(config, scales: Optional[Scales]):
    """-> (config with `scales` multiplied onto the scales already baked into its weights, the factor each output
    projection must be multiplied by)."""
    if scales is None:
        return config, {}
    total = Scales.from_config(config) * scales
    return config.model_copy(update=total.config_fields()), scales.weight_factors()


@torch.no_grad()
def scale_residuals_enc(model, attn_out_scales=None, ffn_out_scales=None):
    """Apply power-of-two residual scales to a T5EncoderStack in place (on top of any already applied); its
    output is unchanged."""
    config, factors = combined_config(model.config, Scales.of(attn_out_scales, ffn_out_scales, model.config.num_layers))
    for name, f in factors.items():
        if f != 1.0:
            multiply_weight(model, name, f)
    model.config = config
    model.apply_residual_scales_from_config()
    return model


@torch.no_grad()
def multiply_weight(model, name: str, factor: float) -> None:
    """Multiply weight `name` ('layers.3.ffn.ff_out.weight') by a power of two in place; a projection kept as GGUF
    blocks (t5core.gguf.PackedLinear) or fp8 (t5core.fp8.Fp8Linear) takes it into the scale it applies after
    dequantizing (exact either way)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    weight = getattr(module, attr, None)
    # fp8 weights (t5core.fp8.Fp8Linear) too: their float32 row scales take it, never the fp8 bytes
    (weight if isinstance(weight, torch.nn.Parameter) and weight.dtype.itemsize > 1 else module.scale).mul_(factor)


# -- the sidecar that `calibrate` writes ---------------------------------------------------------------------------
def sidecar_path(weights_path) -> Path:
    """fp16_scales.json in a model folder, <file>.fp16_scales.json beside a single file."""
    p = Path(weights_path)
    return p / "fp16_scales.json" if p.is_dir() else p.with_name(p.name + ".fp16_scales.json")


def save_sidecar(weights_path, scales: Scales, headroom: float) -> Path:
    """Write the sidecar under a temporary name, renamed when complete: an old one is never half-replaced."""
    from .save import write_atomic

    text = json.dumps({"enc_attn_out_scales": list(scales.attn), "enc_ffn_out_scales": list(scales.ffn),
                       "headroom": headroom}, indent=2)
    return write_atomic(sidecar_path(weights_path), lambda tmp: tmp.write_text(text))


def load_sidecar(weights_path, num_layers: int) -> Optional[Scales]:
    """The calibrated scales saved beside the weights, or None; a corrupt file is a CheckpointError naming it."""
    from .checkpoint import CheckpointError, _read_json

    path = sidecar_path(weights_path)
    if not path.exists():
        return None
    data = _read_json(path)
    try:
        return Scales.from_json(data, ("enc_attn_out_scales", "enc_ffn_out_scales"), num_layers)
    except ValueError as e:
        raise CheckpointError(f"{path}: calibrated scales: {e}") from e
