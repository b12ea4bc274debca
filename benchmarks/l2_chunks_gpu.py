"""Would expanding a compressed weight in L2-sized chunks of rows, each multiplied right after it is expanded, beat
expanding it whole? (The hope: the bf16 chunk is read back by the matmul from the 50 MB L2 instead of HBM.)

One T5-XXL layer's four projections (qkv 4096 -> 12288, o 4096 -> 4096, ff_in 4096 -> 20480, wo 10240 -> 4096)
at M = 512 tokens, each variant captured in a CUDA graph and timed with CUDA events, interleaved, median of 50
after warm-up (gguf_gpu.timed): bf16 weights resident; random Q8_0 blocks expanded by t5core.gguf_kernels then
multiplied, whole and in chunks of 512 .. 4096 rows (outputs concatenated); random fp8 weights with per-row scales
expanded and multiplied under torch.compile, whole and in chunks. Markdown table last; x24 is the encoder's 24 layers.

    python benchmarks/l2_chunks_gpu.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from gguf_gpu import timed  # this folder: interleaved medians after warm-up
from t5core.gguf import Q8_0, QTYPES
from t5core.gguf_kernels import expand

M = 512
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "ff_in": (20480, 4096), "wo": (4096, 10240)}  # [N, K]
SEGMENT = [Q8_0, *QTYPES[Q8_0][1:]]  # an expand() segment's type, weights per block, bytes per block


def q8_blocks(n: int, k: int) -> torch.Tensor:
    """[n, k // 32 * 34] uint8: random Q8_0 blocks (a small positive float16 scale, 32 random int8 codes)."""
    blocks = torch.randint(0, 256, (n, k // 32, 34), dtype=torch.uint8, device="cuda")
    d = torch.rand(n, k // 32, device="cuda") * 1e-3 + 1e-4
    blocks[..., :2] = d.half().view(torch.uint8).view(n, k // 32, 2)
    return blocks.view(n, -1)


def q8_linear(x: torch.Tensor, blocks: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """x [M, k] @ expanded(blocks)[N, k].T, `chunk` rows expanded and multiplied at a time."""
    n, one = blocks.shape[0], torch.ones((), device="cuda")
    outs = [x @ expand(blocks, [*SEGMENT, 0, min(chunk, n - r), r * blocks.shape[1]], [min(chunk, n - r), k], one,
                       torch.bfloat16).t() for r in range(0, n, chunk)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


@torch.compile(dynamic=False)
def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, chunk: int) -> torch.Tensor:
    """x [M, K] @ (w8 * scale)[N, K].T in bf16, `chunk` rows expanded and multiplied at a time."""
    outs = [x @ (w8[r:r + chunk].to(torch.bfloat16) * scale[r:r + chunk]).to(torch.bfloat16).t()
            for r in range(0, w8.shape[0], chunk)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def captured(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream): the graph's replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def main() -> None:
    torch.manual_seed(0)
    xs = {p: torch.randn(M, k, device="cuda", dtype=torch.bfloat16) for p, (_, k) in SHAPES.items()}
    dense = {p: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for p, (n, k) in SHAPES.items()}
    q8 = {p: q8_blocks(n, k) for p, (n, k) in SHAPES.items()}
    fp8 = {p: ((torch.randn(n, k, device="cuda") * 100).clamp(-440, 440).to(torch.float8_e4m3fn),
               torch.rand(n, 1, device="cuda") * 1e-3) for p, (n, k) in SHAPES.items()}
    one = torch.ones((), device="cuda")
    variants = {
        "bf16 resident": lambda: [xs[p] @ dense[p].t() for p in SHAPES],
        "Q8_0 expand only": lambda: [expand(q8[p], [*SEGMENT, 0, n, 0], [n, k], one, torch.bfloat16)
                                     for p, (n, k) in SHAPES.items()],
        "Q8_0 expand whole": lambda: [q8_linear(xs[p], q8[p], k, n) for p, (n, k) in SHAPES.items()],
        **{f"Q8_0 chunks of {c} rows": (lambda c=c: [q8_linear(xs[p], q8[p], k, c) for p, (n, k) in SHAPES.items()])
           for c in (512, 1024, 2048, 4096)},
        "fp8 whole (compiled)": lambda: [fp8_linear(xs[p], *fp8[p], n) for p, (n, _) in SHAPES.items()],
        **{f"fp8 chunks of {c} rows (compiled)": (lambda c=c: [fp8_linear(xs[p], *fp8[p], c) for p in SHAPES])
           for c in (1024, 2048)},
    }
    for p, (n, k) in SHAPES.items():  # chunks give the product of the whole (up to the matmul's order of sums)
        torch.testing.assert_close(q8_linear(xs[p], q8[p], k, 2048), q8_linear(xs[p], q8[p], k, n))
    replays = {name: captured(fn) for name, fn in variants.items()}
    times = timed(replays, 50, torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: one XXL layer's four projections, M = {M}, "
          f"CUDA graphs, median ms of 50")
    base = times["bf16 resident"]
    print("\n| variant | ms per layer | x24 | vs bf16 resident |\n|---|---|---|---|")
    for name, ms in times.items():
        print(f"| {name} | {ms:.3f} | {24 * ms:.2f} | {ms / base:.2f}x |")


if __name__ == "__main__":
    main()
