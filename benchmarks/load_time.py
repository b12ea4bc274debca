"""Seconds to load a float16 T5 file onto the CPU (what the ComfyUI Load node does before ComfyUI moves the weights to
the GPU): t5core.load_encoder in several set-ups against reading the same file with safetensors (every tensor copied
out of the mapping, as a state-dict load does). The file: T5 v1.1 XXL's widths and key names with --layers layers
(random normal weights), written once to --file; the page cache is warmed before each timing; best of --repeat.

    python benchmarks/load_time.py            # 8 layers, 3.35 GB: about a minute on 2 cores
The last two rows time the NaN/inf check every load makes of every tensor, as t5core did it before 2026-12-05 and
as it does it now.
"""
import argparse
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import t5core
from t5core.checkpoint import all_finite

D, FF, HEADS, VOCAB = 4096, 10240, 64, 32128


def write_file(path: Path, layers: int) -> None:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.05).half()

    sd = {"shared.weight": rand(VOCAB, D), "encoder.final_layer_norm.weight": rand(D) + 1}
    for i in range(layers):
        a, f = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        sd.update({a + "layer_norm.weight": rand(D) + 1, f + "layer_norm.weight": rand(D) + 1,
                   f + "DenseReluDense.wi_0.weight": rand(FF, D), f + "DenseReluDense.wi_1.weight": rand(FF, D),
                   f + "DenseReluDense.wo.weight": rand(D, FF)})
        sd.update({a + f"SelfAttention.{p}.weight": rand(D, D) for p in "qkvo"})
    sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = rand(32, HEADS)
    tmp = path.with_suffix(".tmp")
    save_file(sd, str(tmp))
    tmp.rename(path)


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def best(fn, repeat: int, path: Path) -> float:
    times = []
    for _ in range(repeat):
        warm(path)
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return min(times)


def safetensors_read(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).clone() for k in f.keys()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default=None, help="default /tmp/t5core_load_time_<layers>.safetensors")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.file or f"/tmp/t5core_load_time_{args.layers}.safetensors")
    if not path.exists():
        write_file(path, args.layers)
    gb = path.stat().st_size / 1e9
    print(f"# {path} ({gb:.2f} GB, {args.layers} layers), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"t5core from {Path(t5core.__file__).parent}")
    setups = {
        "safetensors, every tensor copied": lambda: safetensors_read(path),
        "t5core float16": lambda: t5core.load_encoder(path, torch.float16, "cpu", fp16_scales=None),
        "t5core float16, residual scales 1/2": lambda: t5core.load_encoder(
            path, torch.float16, "cpu", fp16_scales=",".join(["1/2"] * args.layers)),
        "t5core bfloat16 (converted)": lambda: t5core.load_encoder(path, torch.bfloat16, "cpu"),
        "t5core float32 on the float16 weights": lambda: t5core.load_encoder(path, torch.float32, "cpu",
                                                                             weight_dtype="float16"),
    }
    print("| set-up | s | GB/s |\n|---|---|---|")
    for name, fn in setups.items():
        s = best(fn, args.repeat, path)
        print(f"| {name} | {s:.2f} | {gb / s:.1f} |", flush=True)
    # the NaN/inf check a load makes of every tensor, on the file's tensors already in memory
    tensors = list(safetensors_read(path).values())
    for name, check in (("isfinite(t).all()", lambda t: torch.isfinite(t).all()),
                        ("t5core.checkpoint.all_finite", all_finite)):
        s = best(lambda: [bool(check(t)) for t in tensors], args.repeat, path)
        print(f"| NaN/inf check of every tensor, {name} | {s:.2f} | {gb / s:.1f} |", flush=True)
