"""Which attention should a compiled encoder use: SDPA with the dense bias made in each layer, or flex attention
with the bias as a score_mod? And what did making UMT5's 24 bias tables one by one cost (variant "sdpa, tables
one by one": T5EncoderStack.offset_bias as it was before 2026-12-05)? Random XXL weights (fp8_gpu.random_t5, norms fused), float16, compiled layers in CUDA
graphs (t5core's default; under cudaMallocAsync, ComfyUI's allocator, built with inductor's C++ wrapper), timed
interleaved (median of --reps, CUDA events), at WAN's shape (UMT5, a bias table per layer, 1 x 512 with 40 pads),
Flux's (T5 v1.1, 1 x 256, no mask) and T5 1 x 512; with each variant's relative difference to SDPA's output and
the kernels of one encode without graphs (profiler: count and GPU ms by kernel, the largest first), and each
variant's relative error against the float32 model (eager SDPA, TF32 off) on the real tokens.

    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python benchmarks/attention_choice.py

--mode fp32-on-fp16: float32 compute on float16 projection weights (the Load node's fp32 on a float16 file:
t5_common.split_linear), whose attention runs in float32, instead of float16 compute.
"""
import argparse
import collections
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch.profiler import ProfilerActivity, profile

import t5core
from t5core.fuse_norm_scales import fuse_norm_scales_enc
from t5core.precision import relative_error
from t5core.t5_common import relative_offset_bias

from fp8_gpu import random_t5  # noqa: E402
from gguf_gpu import timed  # noqa: E402

VARIANTS = ("sdpa", "flex", "sdpa, tables one by one")
SHAPES = {"wan": (True, 512, 40), "flux": (False, 256, 0), "t5-512": (False, 512, 0)}  # umt5, tokens, pads


def offset_bias_one_by_one(self, device=None):
    tables = ([self.relative_attention_bias.weight] if self.relative_attention_bias is not None
              else [layer.attn.relative_attention_bias.weight for layer in self.layers])
    cfg = self.config
    return torch.stack([relative_offset_bias(t[None], cfg.relative_attention_num_buckets,
                                             cfg.relative_attention_max_distance)[0] for t in tables]).to(device)


def kernels(fn) -> collections.Counter:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ms, n = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            ms[e.name[:80]] += e.device_time_total / 1000
            n[e.name[:80]] += 1
    return ms, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--shapes", default="wan,flux,t5-512")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--mode", choices=("fp16", "fp32-on-fp16"), default="fp16")
    args = ap.parse_args()
    variants = args.variants.split(",")
    precision = ({"dtype": torch.float16} if args.mode == "fp16" else
                 {"dtype": torch.float32, "weight_dtype": "float16"})
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, allocator "
          f"{torch.cuda.get_allocator_backend()}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        umt5, L, pads = SHAPES[shape]
        ids = torch.randint(3, 32128, (1, L), generator=torch.Generator().manual_seed(1))
        mask = None
        if pads:
            mask = torch.ones(1, L, dtype=torch.bool)
            mask[:, L - pads:] = False
        config = t5core.T5Config.from_name("xxl", pos_emb_per_layer=umt5, **precision)
        torch.backends.cuda.matmul.allow_tf32 = False
        ref_config = config.model_copy(update={"dtype": torch.float32, "weight_dtype": None})
        ref = t5core.Encoder(random_t5(ref_config, "cuda")).encode(ids, mask)
        encoders, outs, counts = {}, {}, {}
        for v in variants:  # random_t5 seeds itself: the same weights
            attn = v.split(",")[0]
            model = fuse_norm_scales_enc(random_t5(config.model_copy(update={"attn_impl": attn}), "cuda"))
            if v.endswith("one by one"):
                model.offset_bias = types.MethodType(offset_bias_one_by_one, model)
            enc = t5core.Encoder(model).compile()
            outs[v] = enc.encode(ids, mask)
            encoders[v] = enc
            graphs_ok = enc._graphs_ok
            enc._graphs_ok = lambda: False
            with torch.inference_mode():
                ms, n = kernels(lambda e=enc: e.encode(ids, mask))
            enc._graphs_ok = graphs_ok
            counts[v] = sum(n.values())
            print(f"\n{shape} {v}: {counts[v]} kernels, {sum(ms.values()):.2f} GPU ms without graphs")
            for k, t in ms.most_common(12):
                print(f"  {t:7.3f} ms {n[k]:4d}x {k}")
        real = slice(0, L - pads)
        t = timed({k: (lambda e=e: e.encode(ids, mask)) for k, e in encoders.items()}, args.reps, torch.device("cuda"))
        for v in variants:
            rows.append((shape, L, pads, v, t[v], t[v] / t[variants[0]], counts[v],
                         relative_error(outs[v][0, real], ref[0, real])))
        del encoders, model, enc, ref
        torch.cuda.empty_cache()
    print(f"\n{args.mode}\n| shape | tokens | pads | variant | ms | / {variants[0]} | kernels per encode "
          "| rel. error vs float32 |\n"
          "|---|---|---|---|---|---|---|---|")
    for shape, L, pads, v, ms, ratio, n, err in rows:
        print(f"| {shape} | {L} | {pads} | {v} | {ms:.2f} | {ratio:.3f} | {n} | {err:.2e} |")


if __name__ == "__main__":
    main()
