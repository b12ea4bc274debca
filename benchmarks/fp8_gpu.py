"""Float8 on the GPU (issue 17): bf16 against fp8 storage and fp8 compute, compiled, at 1x512 and 8x512.

Random T5 v1.1 XXL weights (transformers' T5 init: normal, never zeros; seed 0) are written once as a bf16
Hugging Face folder and loaded through t5core.load_encoder with each weight_dtype, so quantization runs as users
get it (per row, while streaming). For each variant: milliseconds per encode (CUDA events, synchronised every call,
median; warm-up first; variants interleaved over rounds, each round starting one variant later), the memory the load
added (torch.cuda.memory_allocated), and the relative error on the same random ids against t5core in float32 with
TF32 off (loaded once, run eagerly, then freed). Variants beyond bf16 / storage / compute change which projections
multiply in fp8 and how (`wo` = ff_out), choices t5core.fp8 does not make, to show what they would cost and gain:
"fp8 compute + wo" all four in fp8; "fp8 compute wo not o" ff_out in fp8, o_proj not; "... hi/lo": the named
projections' activations split in two fp8 parts (hilo_matmul), ff_out's, ff_in's (whose fp8 activations cost the
most precision: benchmarks/fp8_activation_error.py) or all four (fp8 storage's precision from fp8 GEMMs);
"fp8 compute ff_in int8" / "int8 all": ff_in's or every projection's fp8 weights re-rounded to int8 and multiplied
by torch._int_mm against int8 activations (int8_matmul).
--profile adds CUDA kernel time by kind. A markdown table and the issue's targets come last.

    python benchmarks/fp8_gpu.py                               # H200: about 5 minutes
    python benchmarks/fp8_gpu.py --size tiny --device cpu      # that it runs (eager, no timing claims)
"""
import argparse
import dataclasses
import functools
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

import t5core
from t5core import T5Config, T5EncoderStack
from t5core.fp8 import FAST, Fp8Linear, dequantize, fp8_matmul_support, quantize_tokens
from t5core.precision import relative_error
from t5core.save import save_encoder

PROJECTIONS = ("qkv_proj", "o_proj", "ff_in", "ff_out")
DEFAULT_FP8_MM = ("qkv_proj", "o_proj", "ff_in")  # what t5core.fp8 multiplies in fp8 (ff_out keeps bf16)


@dataclasses.dataclass
class Variant:
    weight_dtype: str
    fp8_mm: tuple = ()  # projections multiplied in fp8 (fp8_e4m3fn_fast only); () = t5core's choice
    hilo: tuple = ()  # of those, the projections whose activations are split in two fp8 parts (hilo_matmul)
    int8: tuple = ()  # of those, the projections multiplied as int8 instead (int8_matmul)
    options: Optional[dict] = None  # torch.compile options


# minutes of autotuning: inductor's Triton GEMM templates beside cuBLAS (which alone writes float32 out of bf16
# inputs, the f32_out projections), picked by timing; a template may fuse the fp8 -> bf16 dequantization into its
# prologue (reading fp8 weights) instead of writing a bf16 copy of each weight before cuBLAS
TRITON_GEMMS = {"max_autotune": True, "max_autotune_gemm_backends": "TRITON,ATEN", "triton.cudagraphs": False}


VARIANTS = {
    "bf16": Variant("bfloat16"),
    "fp8 storage": Variant("fp8_e4m3fn"),
    "fp8 compute": Variant(FAST),
    "fp8 compute + wo": Variant(FAST, PROJECTIONS),
    "fp8 compute wo not o": Variant(FAST, ("qkv_proj", "ff_in", "ff_out")),
    "fp8 compute wo hi/lo": Variant(FAST, PROJECTIONS, hilo=("ff_out",)),
    "fp8 compute ff_in hi/lo": Variant(FAST, PROJECTIONS, hilo=("ff_in",)),
    "fp8 all hi/lo": Variant(FAST, PROJECTIONS, hilo=PROJECTIONS),
    "fp8 compute ff_in int8": Variant(FAST, PROJECTIONS, int8=("ff_in",)),
    "int8 all": Variant(FAST, PROJECTIONS, int8=PROJECTIONS),
    "bf16 triton gemms": Variant("bfloat16", options=TRITON_GEMMS),
    "fp8 storage triton gemms": Variant("fp8_e4m3fn", options=TRITON_GEMMS),
}
DEFAULT_VARIANTS = ["bf16", "fp8 storage", "fp8 compute", "fp8 compute + wo"]
TINY = dict(vocab_size=512, hidden_dim=64, num_layers=3, n_head=4, head_dim=16, ff_dim=96)


@torch.no_grad()
def random_t5(config: T5Config, device) -> T5EncoderStack:
    """transformers' T5 init (factor 1): embedding N(0, 1); q N(0, (D*Dh)^-1/2); k, v N(0, D^-1/2); o N(0, I^-1/2);
    wi_0, wi_1 N(0, D^-1/2); wo N(0, F^-1/2); relative bias N(0, D^-1/2); norms 1."""
    torch.manual_seed(0)
    D, I, F, Dh = config.hidden_dim, config.inner_dim, config.ff_dim, config.head_dim
    with torch.device(device):
        model = T5EncoderStack(config).eval()
    model.vocab_embed.weight.normal_(0, 1.0)
    for table in [model.relative_attention_bias] if model.relative_attention_bias is not None else [
            layer.attn.relative_attention_bias for layer in model.layers]:  # UMT5: one per layer
        table.weight.normal_(0, D ** -0.5)
    for layer in model.layers:
        qkv = layer.attn.qkv_proj.weight
        qkv[:I].normal_(0, (D * Dh) ** -0.5)
        qkv[I:].normal_(0, D ** -0.5)
        layer.attn.o_proj.weight.normal_(0, I ** -0.5)
        layer.ffn.ff_in.weight.normal_(0, D ** -0.5)
        layer.ffn.ff_out.weight.normal_(0, F ** -0.5)
    return model


def set_fp8_mm(model, v: Variant) -> None:
    """Which projections multiply in fp8, and how (a benchmark-only override of t5core's choice)."""
    for layer in model.layers:
        for proj in PROJECTIONS:
            m = getattr(layer.attn, proj, None) or getattr(layer.ffn, proj)
            if v.weight_dtype != FAST:
                continue
            m.compute = proj in (v.fp8_mm or DEFAULT_FP8_MM)
            m._update_fp8_mm()
            if proj in v.hilo:
                m.fp8_matmul = functools.partial(hilo_matmul, m)
            if proj in v.int8:  # the fp8 weights re-rounded to int8 rows in place: the same bytes
                w = dequantize(m.weight, m.scale, torch.float32)
                s8 = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
                m.weight.data = (w / s8[:, None]).round().clamp(-127, 127).to(torch.int8)
                m.scale.data = s8
                m.fp8_matmul = functools.partial(int8_matmul, m)


def hilo_matmul(m: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """Fp8Linear.fp8_matmul with the activation kept to about bf16's precision: x [.., K] ~ hi + lo, each e4m3 per
    token (lo: what rounding x to hi lost), multiplied by one torch._scaled_mm of 2M rows, the halves summed in
    float32. On random weights this keeps `wo`'s fp8 activations from adding error (benchmarks/fp8_activation_error.py);
    whether two fp8 GEMM halves beat dequantize + bf16 GEMM is what the variant times."""
    x2 = x.reshape(-1, m.in_features)
    hi, s_hi = quantize_tokens(x2)
    lo, s_lo = quantize_tokens(x2.float() - hi.float() * s_hi)
    out = torch._scaled_mm(torch.cat([hi, lo]), m.weight.t(), scale_a=torch.cat([s_hi, s_lo]),
                           scale_b=m.scale[None, :], out_dtype=m.mm_out_dtype, use_fast_accum=True)
    out = out[:len(x2)].float() + out[len(x2):].float()  # [M, N]
    return out.to(torch.float32 if m.f32_out else x.dtype).view(*x.shape[:-1], m.out_features)


def int8_matmul(m: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """Fp8Linear.fp8_matmul as an int8 GEMM: x [.., K] rounded to int8 per token (scale amax / 127), m.weight the
    fp8 weights re-rounded to int8 per output row (set_fp8_mm), torch._int_mm accumulating in int32, both scales
    applied in float32. On random weights int8 activations cost less precision than e4m3 where they are not
    heavy-tailed (ff_in's normed input; benchmarks/fp8_activation_error.py); real T5 activations may have outlier
    channels, which an int8 scale per token does not survive and e4m3 does."""
    x2 = x.reshape(-1, m.in_features)
    sx = x2.abs().amax(dim=-1, keepdim=True).float().clamp(min=torch.finfo(torch.float32).tiny) / 127  # [M, 1]
    xq = (x2.float() / sx).round().clamp(-127, 127).to(torch.int8)
    out = torch._int_mm(xq, m.weight.t()).float() * sx * m.scale[None, :]  # [M, N]
    return out.to(torch.float32 if m.f32_out else x.dtype).view(*x.shape[:-1], m.out_features)


def kernel_profile(enc, x, top: int = 8) -> str:
    """CUDA kernel time of one encode, by kind (GEMM, attention, other) and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    enc.encode(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        enc.encode(x)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    kind = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for e in kernels:
        n = e.key.lower()
        k = ("gemm" if any(w in n for w in ("gemm", "nvjet", "sm90_xmma", "cutlass")) and "triton" not in n
             else "attention" if any(w in n for w in ("flash", "attention", "flex", "fmha")) else "other")
        kind[k] += e.self_device_time_total / 1e3
    lines = [" ".join(f"{k} {v:.2f} ms" for k, v in kind.items())]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"    {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:<4d} {e.key[:110]}")
    return "\n".join(lines)


def timer(device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def ms(fn):
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def ms(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    return ms


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["xxl", "tiny"], default="xxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default="1x512,8x512", help="BxL,... (default %(default)s)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="of: " + ", ".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=0.75, help="timed per variant, shape and round")
    p.add_argument("--profile", action="store_true", help="CUDA kernel time by kind at the first shape")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = args.variants.split(",")
    t0 = time.time()
    config = T5Config.from_name("xxl") if args.size == "xxl" else T5Config(**TINY)
    if cuda:
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; fp8 matmul (row-wise), float32 "
              f"out: {fp8_matmul_support(device)}", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="t5core_fp8_bench_"))
    save_encoder(random_t5(config.model_copy(update={"dtype": torch.bfloat16}), device), folder, "safetensors")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"[{time.time() - t0:.0f}s] wrote random {args.size} weights (bf16) to {folder}", flush=True)
    gen = torch.Generator().manual_seed(1)
    ids = {s: torch.randint(3, config.vocab_size - 100, s, generator=gen) for s in shapes}

    ref_enc = t5core.load_encoder(folder, "float32", device)
    ref = {s: ref_enc.encode(x).cpu() for s, x in ids.items()}
    del ref_enc
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"[{time.time() - t0:.0f}s] float32 reference (TF32 off)", flush=True)

    encoders, resident, errors = {}, {}, {}
    for name in variants:
        v = VARIANTS[name]
        before = allocated(device)
        enc = t5core.load_encoder(folder, "bfloat16", device, weight_dtype=v.weight_dtype)
        resident[name] = allocated(device) - before
        set_fp8_mm(enc.model, v)
        if cuda:  # regional compile + a CUDA graph per shape
            enc.compile_layers(**({"options": v.options} if v.options else {}))
        for s, x in ids.items():
            for _ in range(3):
                out = enc.encode(x)
            errors[name, s] = relative_error(out.cpu(), ref[s])
        if cuda:
            torch.cuda.synchronize()
        encoders[name] = enc
        fp8_layers = sum(isinstance(m, Fp8Linear) and m.fp8_mm for m in enc.model.modules())
        print(f"[{time.time() - t0:.0f}s] {name}: loaded ({resident[name] / 1e9:.2f} GB){', compiled' if cuda else ''}, warm; "
              f"{fp8_layers} fp8 matmuls", flush=True)

    ms = timer(device)
    times = {(n, s): [] for n in variants for s in shapes}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name in order:
            for s in shapes:
                enc, x = encoders[name], ids[s]
                end = time.perf_counter() + args.seconds
                while time.perf_counter() < end:
                    times[name, s].append(ms(lambda: enc.encode(x)))
    med = {k: statistics.median(v) for k, v in times.items()}
    if args.profile and cuda:
        for name in variants:
            print(f"profile {name} {shapes[0]}: {kernel_profile(encoders[name], ids[shapes[0]])}", flush=True)
    print(f"[{time.time() - t0:.0f}s] timed: {args.rounds} rounds x {args.seconds} s", flush=True)

    cols = " | ".join(f"{b}x{l} ms" for b, l in shapes)
    errs = " | ".join(f"rel err {b}x{l}" for b, l in shapes)
    print(f"\n| variant | {cols} | x bf16 ({shapes[0][0]}x{shapes[0][1]}) | resident after load GB | {errs} |")
    print("|---" * (3 + 2 * len(shapes)) + "|")
    base = "bf16" if "bf16" in variants else variants[0]
    for name in variants:
        row = " | ".join(f"{med[name, s]:.2f}" for s in shapes)
        err = " | ".join(f"{errors[name, s]:.3e}" for s in shapes)
        print(f"| {name} | {row} | {med[base, shapes[0]] / med[name, shapes[0]]:.2f}x | {resident[name] / 1e9:.2f} | {err} |")

    if not cuda or not {"bf16", "fp8 storage", "fp8 compute"} <= set(variants) or {(1, 512), (8, 512)} - set(shapes):
        print("\n(targets are checked for an xxl CUDA run with bf16, fp8 storage and fp8 compute at 1x512 and 8x512)")
        return
    s1, s8 = (1, 512), (8, 512)
    checks = [
        ("fp8 compute 1x512 <= 6.0 ms", med["fp8 compute", s1] <= 6.0),
        ("fp8 compute 1x512 >= 1.5x bf16", med["bf16", s1] >= 1.5 * med["fp8 compute", s1]),
        ("fp8 compute 8x512 <= 45 ms", med["fp8 compute", s8] <= 45.0),
        ("fp8 storage within 10% of bf16 (1x512, 8x512)",
         all(med["fp8 storage", s] <= 1.1 * med["bf16", s] for s in (s1, s8))),
        ("resident after load <= 5.3 GB (both fp8 modes)",
         max(resident["fp8 storage"], resident["fp8 compute"]) <= 5.3e9),
        ("fp8 compute error <= 1.3x fp8 storage's (1x512, 8x512)",
         all(errors["fp8 compute", s] <= 1.3 * errors["fp8 storage", s] for s in (s1, s8))),
    ]
    print("\n| target | met |\n|---|---|")
    for what, ok in checks:
        print(f"| {what} | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
