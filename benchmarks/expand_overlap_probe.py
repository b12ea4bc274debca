"""Probe: does expanding compressed weights (Q8_0 planes, fp8 rows) on a second stream, while the previous
projection multiplies, hide the expansion's time? XXL-shaped layer (D 4096, 64 heads, FF 10240, gated), 24 layers of
distinct random weights, 1 x 512 tokens, bf16 compute; everything captured in one CUDA graph per variant:

  bf16            weights already bf16 (what weight_dtype="bf16" holds)
  <fmt> serial    each projection's weight expanded into a buffer, then multiplied (what t5core does today)
  <fmt> overlap   the same, the expansion of projection p+1 on a side stream while projection p's layer part runs
                  (two buffers per projection kind; events order each buffer's writer and reader)

fmt: q8 (int8 codes [N, K] and float16 scales [N, K/32]) and fp8 (e4m3 rows [N, K], float32 scale per row).
Median of --reps graph replays, CUDA events, variants interleaved (gguf_gpu.timed). Prints a table last.

    python benchmarks/expand_overlap_probe.py
"""
import argparse

import torch
import torch.nn.functional as F

from gguf_gpu import timed  # this folder: interleaved medians after warm-up

D, H, FF, LAYERS, L = 4096, 64, 10240, 24, 512
SHAPES = {"qkv": (3 * D, D), "o": (D, D), "ff_in": (2 * FF, D), "ff_out": (D, FF)}


def make_weights(fmt, gen):
    """Per layer, per projection: what the format stores."""
    layers = []
    for _ in range(LAYERS):
        w = {}
        for name, (n, k) in SHAPES.items():
            if fmt == "bf16":
                w[name] = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).bfloat16()
            elif fmt == "q8":
                w[name] = (torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=gen),
                           torch.rand(n, k // 32, device="cuda", generator=gen).half() * 1e-3)
            else:
                w[name] = ((torch.randn(n, k, device="cuda", generator=gen) * 100).to(torch.float8_e4m3fn),
                           torch.rand(n, 1, device="cuda", generator=gen) * 1e-4)
        layers.append(w)
    return layers


@torch.compile(fullgraph=True)
def expand_q8(codes, scales, out):  # codes [N, K] int8, scales [N, K/32] fp16 -> out [N, K] bf16
    n, k = codes.shape
    out.copy_((codes.view(n, k // 32, 32) * scales.float()[..., None]).view(n, k))


@torch.compile(fullgraph=True)
def expand_fp8(codes, scales, out):  # codes [N, K] e4m3, scales [N, 1] fp32 -> out [N, K] bf16
    out.copy_(codes.float() * scales)


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def layer_parts(x, bias):
    """The layer as four parts, each ending in one projection: part(p)(weight) -> None, updating state."""
    st = {"x": x}

    def qkv(w):
        st["qkv"] = F.linear(rms(st["x"]).bfloat16(), w)

    def o(w):
        q, k, v = st["qkv"].view(1, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        st["x"] = st["x"] + F.linear(a.transpose(1, 2).reshape(1, L, D), w).float()

    def ff_in(w):
        st["h"] = F.linear(rms(st["x"]).bfloat16(), w)

    def ff_out(w):
        g, u = st["h"].chunk(2, -1)
        st["x"] = st["x"] + F.linear(F.gelu(g, approximate="tanh") * u, w).float()

    return st, [qkv, o, ff_in, ff_out]


def forward_bf16(layers, x, bias):
    for w in layers:
        st, parts = layer_parts(x, bias)
        for part, name in zip(parts, SHAPES):
            part(w[name])
        x = st["x"]
    return x


def make_forward(fmt, overlap):
    expand = expand_q8 if fmt == "q8" else expand_fp8
    bufs = {name: [torch.empty(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            for name, (n, k) in SHAPES.items()}

    def forward(layers, x, bias):
        order = [(i, name) for i in range(LAYERS) for name in SHAPES]
        if not overlap:
            for i, w in enumerate(layers):
                st, parts = layer_parts(x, bias)
                for part, name in zip(parts, SHAPES):
                    buf = bufs[name][0]
                    expand(*w[name], buf)
                    part(buf)
                x = st["x"]
            return x
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        ready = [torch.cuda.Event() for _ in order]
        used = [torch.cuda.Event() for _ in order]

        def issue(j):  # expand order[j] on the side stream into its buffer, after order[j - 8] is done with it
            i, name = order[j]
            with torch.cuda.stream(side):
                if j >= 8:
                    side.wait_event(used[j - 8])
                expand(*layers[i][name], bufs[name][(j // 4) % 2])
                ready[j].record(side)

        issue(0)
        j = 0
        for i in range(LAYERS):
            st, parts = layer_parts(x, bias)
            for part, name in zip(parts, SHAPES):
                if j + 1 < len(order):
                    issue(j + 1)
                main.wait_event(ready[j])
                part(bufs[name][(j // 4) % 2])
                used[j].record(main)
                j += 1
            x = st["x"]
        main.wait_stream(side)
        return x

    return forward


def graphed(fn, *args):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*args)
    return g, out, fn  # fn keeps the buffers its graph writes alive


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, L, D, device="cuda", generator=gen)
    bias = torch.randn(1, H, L, L, device="cuda", generator=gen).bfloat16()
    print(torch.__version__, torch.cuda.get_device_name())
    variants, kept = {}, []
    ref_layers = make_weights("bf16", gen)
    variants["bf16"] = graphed(forward_bf16, ref_layers, x, bias)
    for fmt in ("q8", "fp8"):
        layers = make_weights(fmt, gen)
        kept.append(layers)  # the graphs read them
        for overlap in (False, True):
            name = f"{fmt} {'overlap' if overlap else 'serial'}"
            variants[name] = graphed(make_forward(fmt, overlap), layers, x, bias)
        torch.cuda.synchronize()
        s, o = variants[f"{fmt} serial"][1], variants[f"{fmt} overlap"][1]
        variants[f"{fmt} serial"][0].replay(), variants[f"{fmt} overlap"][0].replay()
        torch.cuda.synchronize()
        print(f"{fmt}: overlap equals serial: {torch.equal(s, o)}")
        # the expansion alone, all 96 projections
        bufs = {n: torch.empty(*shp, device="cuda", dtype=torch.bfloat16) for n, shp in SHAPES.items()}
        ex = expand_q8 if fmt == "q8" else expand_fp8

        def expand_all(layers=layers, bufs=bufs, ex=ex):
            for w in layers:
                for n in SHAPES:
                    ex(*w[n], bufs[n])
        variants[f"{fmt} expansion alone"] = graphed(expand_all)
    ms = timed({k: g.replay for k, (g, *_) in variants.items()}, args.reps, torch.device("cuda"))
    print("\n| variant | ms 1x512 (median) | x bf16 |\n|---|---|---|")
    for k, m in ms.items():
        print(f"| {k} | {m:.2f} | {m / ms['bf16']:.2f}x |")


if __name__ == "__main__":
    main()
