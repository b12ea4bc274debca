"""What float16 activations cost in precision, per projection, on the CPU (issue 19: "no worse precision in float16
mode" than ComfyUI, which multiplies a float16 file's weights in float32).

Random T5 v1.1 weights (transformers' init, benchmarks/fp8_gpu.random_t5); every parameter rounded to float16, as
a float16 file holds it; then the activations entering chosen projections rounded to float16 (what t5core's float16
mode multiplies: the normed input of qkv and ff_in, the attention output, the gated activation), or split in two
float16 parts (hi + lo: about float32's precision, two GEMMs), and q, k, v rounded to float16 (what SDPA reads);
everything else float32. Not emulated: the float16 attention bias and the probabilities inside the fused attention
kernel. Relative error of the last hidden state against the float32 model with the unrounded weights, and its
ratio to float32 compute on the float16 weights (what ComfyUI computes).

    python benchmarks/fp16_activation_error.py          # T5 v1.1 XL, 1 x 128 ids: about 1 minute on 2 cores
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from fp8_activation_error import projections, study
from fp8_gpu import PROJECTIONS

ALL = dict.fromkeys(PROJECTIONS, "fp16")
VARIANTS = {
    "float16 weights, float32 compute (ComfyUI)": {},
    "+ every projection's input in float16": ALL,
    "+ q, k, v in float16 too (t5core float16)": {**ALL, "qkv_out": "fp16"},
    **{f"{name}'s input alone": {name: "fp16"} for name in PROJECTIONS},
    "q, k, v alone": {"qkv_out": "fp16"},
    "t5core float16, ff_in hi/lo": {**ALL, "qkv_out": "fp16", "ff_in": "hilo"},
    "t5core float16, ff_in and wo hi/lo": {**ALL, "qkv_out": "fp16", "ff_in": "hilo", "ff_out": "hilo"},
    "t5core float16, all four hi/lo": {**dict.fromkeys(PROJECTIONS, "hilo"), "qkv_out": "fp16"},
    "all four hi/lo, q, k, v float32": dict.fromkeys(PROJECTIONS, "hilo"),
}


def round_fp16(x: torch.Tensor, how: str) -> torch.Tensor:
    """x rounded to float16 ("fp16") or to hi + lo, two float16 parts ("hilo"); float32."""
    hi = x.half().float()
    return hi if how == "fp16" else hi + (x.float() - hi).half().float()


def hook_fp16(model, how: dict) -> None:
    for name, module in projections(model):
        module.register_forward_pre_hook(
            lambda m, inputs, name=name: (round_fp16(inputs[0], how[name]),) if name in how else None)
    for layer in model.layers:
        layer.attn.qkv_proj.register_forward_hook(
            lambda m, inputs, out: round_fp16(out, how["qkv_out"]) if "qkv_out" in how else None)


def fp16_weights(model) -> None:
    for t in model.parameters():
        t.copy_(t.half())


if __name__ == "__main__":
    study(__doc__, VARIANTS, hook_fp16, fp16_weights, "rounded to float16 | rel. error | / float32 compute's")
