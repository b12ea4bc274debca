"""Instructions per weight of t5core's GGUF expansion kernels, compiled for a GPU without one (CPU only).

Triton compiles each kernel for --arch (default sm_90, Hopper) on this machine, and the `nvdisasm` that Triton ships
disassembles the cubin. Printed per kernel and type: SASS instructions per thread (those of one program, which is
straight-line code), the weights each thread writes, their ratio, and the int-to-float conversions (I2F), global
loads (LDG) and stores (STG) among them. --file takes another copy of t5core/gguf_kernels.py (an earlier commit's,
say) to compare.

  python benchmarks/kernel_sass.py
  git show e021694:t5core/gguf_kernels.py > /tmp/k.py && python benchmarks/kernel_sass.py --file /tmp/k.py
"""
import argparse
import collections
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t5core.gguf import QTYPES  # noqa: E402

TYPES = {"Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q2_K": 10, "Q3_K": 11, "Q4_0": 2}


def load(path: Path):
    spec = importlib.util.spec_from_file_location("t5core.gguf_kernels_copy", path)  # .runtime resolves in t5core
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sass(fn, constants: dict, arch: int, warps: int) -> list[str]:
    """fn compiled with `constants`, every other argument an int64 or pointer divisible by 16 -> SASS opcodes."""
    kinds = {"src": "*u8", "out": "*bf16", "scale_ptr": "*fp32"}
    signature = {a: "constexpr" if a in constants else kinds.get(a, "i64") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in constants}
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"), "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", text)
    return [op for op in ops if op != "NOP"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, default=Path(__file__).resolve().parents[1] / "t5core/gguf_kernels.py")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args()
    k = load(args.file)
    rows, warps = k.ROWS, getattr(k, "WARPS", 4)
    jobs = []  # (kernel, type, constants, weights per program)
    for name, q in TYPES.items():
        _, block, nbytes = QTYPES[q]
        runs = getattr(k, "RUNS", {}).get(q, 1)
        c = {"QTYPE": q, "BLOCK": block, "NBYTES": nbytes, "ROWS": rows}
        if "RUNS" in k._expand_kernel.arg_names:
            c["RUNS"] = runs
        jobs.append(("_expand_kernel", name, c, rows * 32 * c.get("RUNS", 1)))
    if hasattr(k, "_expand_q8_0_planes_kernel"):
        jobs.append(("_expand_q8_0_planes_kernel", "Q8_0 planes", {"ROWS": rows}, rows * 32))
    print(f"{args.file}, sm_{args.arch}, ROWS {rows}, {warps} warps\n")
    print("| kernel | type | SASS per thread | weights per thread | per weight | I2F | LDG | STG |")
    print("|---|---|---|---|---|---|---|---|")
    for kernel, name, constants, weights in jobs:
        ops = sass(getattr(k, kernel), constants, args.arch, warps)
        n = collections.Counter(ops)
        per_thread = weights // (32 * warps)
        print(f"| {kernel} | {name} | {len(ops)} | {per_thread} | {len(ops) / per_thread:.1f} | "
              f"{n['I2F'] + n['I2FP']} | {n['LDG']} | {n['STG']} |")


if __name__ == "__main__":
    main()
