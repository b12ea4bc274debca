"""Float32 compute on 16-bit weights on a GPU (t5core.t5_common.split_linear, what CastLinear runs there): error and
speed at T5-XXL's projection shapes, against a float32 matmul (TF32 off: what ComfyUI's manual cast runs) and the
16-bit matmul of t5core's float16 mode (the activation rounded to float16).

For each projection (qkv 4096 -> 12288, o 4096 -> 4096, ff_in 4096 -> 20480, wo 10240 -> 4096) at M tokens:
random float16 weights (std 0.05) and float64 activations; relative error ||out - ref|| / ||ref|| against the float64
product on the same float16 weights; median ms over --reps calls (CUDA events, after warm-up) of split_linear
compiled, the float32 matmul, and the 16-bit matmul with float32 output. Markdown table last.

    python benchmarks/split_linear_gpu.py                # M = 512 (one 512-token prompt)
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from t5core.t5_common import split_linear

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "ff_in": (20480, 4096), "wo": (4096, 10240)}  # name: (N, K)


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, M = {args.tokens}")
    split = torch.compile(split_linear, dynamic=False)
    rows = []
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=dev) * 0.05).half()
        x64 = torch.randn(args.tokens, k, device=dev, dtype=torch.float64)
        ref = x64 @ w.double().t()
        x, w32, x16 = x64.float(), w.float(), x64.half()
        calls = {"split (compiled)": lambda: split(x, w), "float32 matmul": lambda: x @ w32.t(),
                 "float16 matmul": lambda: torch.mm(x16, w.t(), out_dtype=torch.float32)}
        errs = {label: rel(fn(), ref) for label, fn in calls.items()}
        ms = {label: median_ms(fn, args.reps) for label, fn in calls.items()}
        rows.append((name, n, k, errs, ms))
        print(name, errs, ms)
    labels = list(rows[0][3])
    print("\n| projection | " + " | ".join(f"{lb} rel. error | {lb} ms" for lb in labels) + " |")
    print("|---|" + "---|---|" * len(labels))
    for name, n, k, errs, ms in rows:
        print(f"| {name} {k} -> {n} | " + " | ".join(f"{errs[lb]:.2e} | {ms[lb]:.3f}" for lb in labels) + " |")


if __name__ == "__main__":
    main()
