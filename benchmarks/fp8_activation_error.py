"""What fp8 activations cost in precision, per projection and per quantization granularity (issue 17), on the CPU.

Random T5 v1.1 weights (transformers' init, benchmarks/fp8_gpu.random_t5) quantized to e4m3 per row as fp8 storage
does; the activations entering chosen projections rounded to e4m3 per token, per 1x128 or 1x32 block along K, or
split in two e4m3 parts (hi + lo, fp8_gpu.hilo_matmul), or multiplied as int8 (W8A8: the activations per token and
the fp8 weights re-rounded per output channel to int8, what an int8 GEMM such as torch._int_mm takes); everything
else float32. Relative error of the last hidden state against the same model with the unquantized weights, and its
ratio to fp8 storage's (issue 17 asks <= 1.3).
This emulates the GPU's rounding (quantize, dequantize, float32 matmul), not its speed: the GPU run of the same
choices (benchmarks/fp8_gpu.py, XXL at 1x512) gave 1.28 for "fp8 compute" and 1.39 with `wo` too.

    python benchmarks/fp8_activation_error.py        # T5 v1.1 XL, 1 x 128 ids: about 90 s on 2 cores
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from fp8_gpu import DEFAULT_FP8_MM, PROJECTIONS, random_t5

from t5core import T5Config
from t5core.fp8 import E4M3_MAX, dequantize, quantize_rows, quantize_tokens, to_fp8

QKV_O_IN = dict.fromkeys(DEFAULT_FP8_MM, "token")  # what fp8_e4m3fn_fast multiplies in fp8
VARIANTS = {
    "fp8 storage (weights only)": {},
    "fp8 compute (shipped: wo dequantized)": QKV_O_IN,
    "+ wo, per token": {**QKV_O_IN, "ff_out": "token"},
    "+ wo, 1x128 blocks": {**QKV_O_IN, "ff_out": 128},
    "+ wo, 1x32 blocks": {**QKV_O_IN, "ff_out": 32},
    "all four, 1x128 blocks": dict.fromkeys(PROJECTIONS, 128),
    "+ wo, hi/lo": {**QKV_O_IN, "ff_out": "hilo"},
    "all four, hi/lo": dict.fromkeys(PROJECTIONS, "hilo"),
    "+ wo in int8 (W8A8)": {**QKV_O_IN, "ff_out": "int8"},
    "qkv, o in fp8; ff_in, wo in int8": {"qkv_proj": "token", "o_proj": "token", "ff_in": "int8", "ff_out": "int8"},
    "qkv, o, wo in fp8; ff_in in int8": {"qkv_proj": "token", "o_proj": "token", "ff_in": "int8", "ff_out": "token"},
    "all four in int8 (W8A8)": dict.fromkeys(PROJECTIONS, "int8"),
    **{f"{name} alone, per token": {name: "token"} for name in PROJECTIONS},
    **{f"all but {name}, per token": {p: "token" for p in PROJECTIONS if p != name} for name in PROJECTIONS},
}


def round_int8(x: torch.Tensor) -> torch.Tensor:
    """x [.., K] rounded to int8 with a scale per row (amax / 127), as int8 GEMMs take activations per token and
    weights per output channel; float32."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return (x.float() / scale).round().clamp(-127, 127) * scale


def round_e4m3(x: torch.Tensor, how) -> torch.Tensor:
    """x [.., K] rounded to e4m3 with a scale per token ("token", as fp8_e4m3fn_fast) or per 1 x `how` block, or
    x ~ hi + lo ("hilo"), or to int8 per token ("int8": the activation of an int8 GEMM); float32."""
    if how == "int8":
        return round_int8(x)
    if how == "hilo":
        hi = round_e4m3(x, "token")
        return hi + round_e4m3(x.float() - hi, "token")
    if how == "token":
        xq, scale = quantize_tokens(x.reshape(-1, x.shape[-1]))
        return (xq.float() * scale).view(x.shape)
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // how, how)  # [.., K / how, how]
    scale = blocks.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    return (to_fp8(blocks / scale, torch.float8_e4m3fn).float() * scale).reshape(x.shape)


def projections(model):
    """(name, module) of every layer's four projections."""
    for layer in model.layers:
        for name in PROJECTIONS:
            yield name, getattr(layer.attn, name, None) or getattr(layer.ffn, name)


def study(doc: str, variants: dict, hook, round_weights, columns: str) -> None:
    """Random T5 v1.1 (--preset, 1 x --tokens ids); hook(model, how) installs the roundings a variant names in
    `how`; the float32 output is the reference, then round_weights(model), then one table row per variant: its
    relative error and the ratio to the first row's."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="xl", help="T5 v1.1 size (default %(default)s)")
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    model = random_t5(T5Config.from_name(args.preset, dtype=torch.float32), "cpu")
    ids = torch.randint(3, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    how: dict = {}
    hook(model, how)
    with torch.inference_mode():
        ref = model(ids)
        round_weights(model)
        print(f"T5 v1.1 {args.preset}, 1 x {args.tokens} ids, torch {torch.__version__}\n")
        print(f"| {columns} |\n|---|---|---|")
        first = None
        for name, choice in variants.items():
            how.clear()
            how.update(choice)
            err = ((model(ids) - ref).norm() / ref.norm()).item()
            first = first or err
            print(f"| {name} | {err:.3e} | {err / first:.3f} |", flush=True)


def hook_fp8(model, how: dict) -> None:
    for name, module in projections(model):
        module.register_forward_pre_hook(
            lambda m, inputs, name=name: (round_e4m3(inputs[0], how[name]),) if name in how else None)
        # int8 GEMMs need int8 weights too: the fp8 weights re-rounded to int8 per output channel
        module.register_forward_hook(lambda m, inputs, out, name=name: torch.nn.functional.linear(
            inputs[0], round_int8(m.weight)).to(out.dtype) if how.get(name) == "int8" else None)


def fp8_weights(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.copy_(dequantize(*quantize_rows(m.weight, torch.float8_e4m3fn), torch.float32))


if __name__ == "__main__":
    study(__doc__, VARIANTS, hook_fp8, fp8_weights, "activations rounded to e4m3 | rel. error | / fp8 storage's")
