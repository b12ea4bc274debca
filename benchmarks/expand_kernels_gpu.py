"""The GGUF expansion kernels alone (t5core.gguf_kernels), against an earlier version of that file, on one GPU.

For each type (--types), one weight of --rows x 4096 random blocks (benchmarks/gguf_gpu.py's: Q8_0 quantized from
random floats, K types random blocks with sane scales) is expanded to bfloat16, times a residual scale of 1:
  baseline  --baseline's `expand` (a copy of t5core/gguf_kernels.py from an earlier commit), the blocks as stored;
  records   this checkout's `expand`, the blocks as stored;
  planes    Q8_0 only: what loading does with one-type Q8_0 weights (PackedWeight.make_planar_), expanded by
            gguf_kernels.expand_q8_0_planes; "planes, torch": by the torch code, compiled (as inside a compiled
            layer; what t5core did before that kernel).
Each output is checked bit for bit against the baseline's. Times are medians of --reps interleaved calls (CUDA
events, after two warm-up calls each); GB/s counts the bytes read (the blocks) and written (2 per weight), against
a device-to-device copy of the output's size timed in the same rounds ("copy").

  git show e021694:t5core/gguf_kernels.py > /tmp/gguf_kernels_e021694.py
  python benchmarks/expand_kernels_gpu.py --baseline /tmp/gguf_kernels_e021694.py
  TRITON_INTERPRET=1 python benchmarks/expand_kernels_gpu.py --baseline /tmp/gguf_kernels_e021694.py \
      --device cpu --rows 64 --reps 2     # a check that it runs, on the CPU
"""
import argparse
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gguf_gpu import k_blocks, q8_0_blocks, timed  # noqa: E402  (this folder)
from t5core import gguf_kernels  # noqa: E402
from t5core.gguf import QTYPES, PackedWeight  # noqa: E402

QTYPE = {"Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q3_K": 11, "Q2_K": 10}


def load_baseline(path: Path) -> types.ModuleType:
    """The module in `path` (a t5core/gguf_kernels.py), its torch ops renamed so that they register beside ours."""
    module = types.ModuleType("t5core.gguf_kernels_baseline")
    module.__package__, module.__file__ = "t5core", str(path)
    exec(compile(path.read_text().replace('"t5core::', '"t5core_baseline::'), str(path), "exec"), module.__dict__)
    return module


def blocks_of(name: str, rows: int, cols: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    if name == "Q8_0":
        w = torch.randn(rows, cols, generator=gen, device=device) * 0.02
        return torch.from_numpy(q8_0_blocks(w)).to(device)
    return torch.from_numpy(np.ascontiguousarray(k_blocks(name, rows, cols, 0.02, gen, device))).to(device)


def with_tile(rows: int, warps: int, fn, *args):
    """fn(*args) with gguf_kernels.ROWS = rows and WARPS = warps (a kernel compiled for them)."""
    default = gguf_kernels.ROWS, gguf_kernels.WARPS
    gguf_kernels.ROWS, gguf_kernels.WARPS = rows, warps
    try:
        return fn(*args)
    finally:
        gguf_kernels.ROWS, gguf_kernels.WARPS = default


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, required=True, help="an earlier t5core/gguf_kernels.py")
    p.add_argument("--types", default="Q8_0,Q4_K,Q5_K,Q6_K", help=f"comma-separated, of {', '.join(QTYPE)}")
    p.add_argument("--rows", type=int, default=81920, help="rows of 4096 weights (default: 335M weights)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--tiles", default="", help="comma-separated ROWSxWARPS: other gguf_kernels.ROWS (tile rows per "
                                               "program) and WARPS, timed as variants of the records and planes")
    p.add_argument("--device", default="cuda", help="cpu: a check that it runs, under TRITON_INTERPRET=1")
    args = p.parse_args()
    device = torch.device(args.device)
    baseline = load_baseline(args.baseline)
    one = torch.ones((), device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter truncates to bfloat16
    cols, table = 4096, []
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles.split(",") if t]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {gpu}, {args.rows} x {cols} weights per type, baseline {args.baseline}",
          flush=True)
    for name in args.types.split(","):
        if name not in QTYPE:
            p.error(f"--types: unknown {name!r}")
        q = QTYPE[name]
        blocks = blocks_of(name, args.rows, cols, device)
        segments = [q, *QTYPES[q][1:], 0, args.rows, 0]
        shape = [args.rows, cols]
        calls = {"baseline": lambda: baseline.expand(blocks, segments, shape, one, dtype),
                 "records": lambda: gguf_kernels.expand(blocks, segments, shape, one, dtype)}
        for rows, warps in tiles:
            calls[f"records {rows}x{warps}"] = partial(with_tile, rows, warps, gguf_kernels.expand, blocks, segments,
                                                       shape, one, dtype)
        if q == 8:  # as loading leaves one-type Q8_0 weights: planes, through their kernel and the torch code
            planar = PackedWeight(blocks.clone(), q, tuple(shape))
            planar.make_planar_()
            calls["planes"] = lambda: gguf_kernels.expand_q8_0_planes(planar.blocks, shape, one, dtype)
            for rows, warps in tiles:
                calls[f"planes {rows}x{warps}"] = partial(with_tile, rows, warps, gguf_kernels.expand_q8_0_planes,
                                                          planar.blocks, shape, one, dtype)
            in_torch = PackedWeight(planar.blocks, q, tuple(shape))
            in_torch.planar, in_torch.use_kernel = True, False
            calls["planes, torch"] = torch.compile(lambda: in_torch(dtype, one))
        out = torch.empty(shape, dtype=dtype, device=device)
        calls["copy"] = lambda: out.copy_(want)
        want = calls["baseline"]()
        for v, call in calls.items():
            assert torch.equal(call(), want), f"{name} {v}: not the baseline's bits"
        ms = timed(calls, args.reps, device)
        moved = {v: blocks.numel() + 2 * out.numel() for v in calls}
        moved["copy"] = 4 * out.numel()
        copy_gbs = moved["copy"] / ms["copy"] / 1e6
        for v in calls:
            gbs = moved[v] / ms[v] / 1e6
            table.append((name, v, ms[v], gbs, gbs / copy_gbs, ms["baseline"] / ms[v]))
            print(f"{name} {v}: {ms[v]:.3f} ms, {gbs:.0f} GB/s", flush=True)
    print("\n| type | variant | ms | GB/s | of copy | faster than baseline |\n|---|---|---|---|---|---|")
    for name, v, t, gbs, frac, speedup in table:
        print(f"| {name} | {v} | {t:.3f} | {gbs:.0f} | {frac:.0%} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
