"""How fast does t5core run under cudaMallocAsync (ComfyUI's default allocator), where kernels launched from
inductor's Python wrapper cannot be captured in CUDA graphs? Random XXL-shaped weights (transformers' T5 init),
WAN's shape (UMT5: a bias table per layer, 1 x 512, float16) and Flux's (T5 v1.1, 1 x 256, float16), timed
interleaved in one process (CUDA events, median of --reps after two warm-up calls each: gguf_gpu.timed), each
variant's kernel count per encode from the profiler, and its relative difference to the eager model:

  eager graphs        the eager layers captured (t5core's fallback there where inductor's C++ wrapper cannot build)
  eager graphs fused  the same with fewer eager kernels: residual multiply-adds as addcmul, the norms as
                      F.rms_norm (one fused kernel on CUDA), the gated activation written straight in the
                      projection's dtype
  layers compiled     the compiled layers (regional compilation), no graphs
  layers compiled skip guards
                      the same, each layer's call checking only the guards that tell its compiled entries apart
                      (torch.compiler.set_stance(skip_guard_eval_unsafe=True)): less host time per call
  layers compiled graphs
                      t5core's default: the compiled layers captured (under cudaMallocAsync built with inductor's C++
                      wrapper, t5core.runtime.Encoder.compile_layers; so are the two variants above there)

    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python benchmarks/malloc_async_layers.py
    python benchmarks/malloc_async_layers.py          # torch's own allocator
"""
import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
import torch.nn.functional as F

import t5core
from t5core.fuse_norm_scales import fuse_norm_scales_enc
from t5core.precision import relative_error
from t5core.t5_encoder import T5EncoderLayer, T5FFN

from fp8_gpu import random_t5  # noqa: E402  (this folder is on sys.path when the script runs)
from gguf_gpu import timed  # noqa: E402


def fused_layer_forward(self, x, prev_ffn_out, prev_ffn_scale, bias, block_mask=None, flex=False, input_mask=None):
    """T5EncoderLayer.forward in fewer eager kernels (the norms' float eps read once, before any capture)."""
    x = torch.addcmul(prev_ffn_out, x, prev_ffn_scale)
    h = F.rms_norm(x, (x.shape[-1],), self.ln1.weight, self._eps1).to(self.dtype)
    x = torch.addcmul(self.attn(h, bias, block_mask, flex, input_mask), x, self.attn_res_scale)
    return x, self.ffn(F.rms_norm(x, (x.shape[-1],), self.ln2.weight, self._eps2).to(self.dtype))


def fused_ffn_forward(self, x):
    h = self.ff_in(x)  # [B, L, 2F] float32
    gate, up = h.chunk(2, dim=-1)
    act = torch.empty(gate.shape, dtype=x.dtype, device=x.device)
    torch.mul(self.act(gate), up, out=act)  # float32 product written in x's dtype: no separate cast
    return self.ff_out(act)


def patch_fused(model) -> None:
    for layer in model.layers:
        layer._eps1, layer._eps2 = float(layer.ln1.eps), float(layer.ln2.eps)
    T5EncoderLayer.forward, T5FFN.forward = fused_layer_forward, fused_ffn_forward


def skipping_guards(fn, *args):
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        return fn(*args)


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="wan,flux")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="eager graphs,eager graphs fused,layers compiled,"
                                          "layers compiled skip guards,layers compiled graphs")
    args = ap.parse_args()
    backend = torch.cuda.get_allocator_backend()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, allocator {backend}", flush=True)
    variants = args.variants.split(",")
    rows = []
    for shape in args.shapes.split(","):
        umt5 = shape == "wan"
        L = 512 if umt5 else 256
        config = t5core.T5Config.from_name("xxl", dtype=torch.float16, pos_emb_per_layer=umt5)
        model = fuse_norm_scales_enc(random_t5(config, "cuda"))
        ids = torch.randint(3, config.vocab_size, (1, L), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(1, L, dtype=torch.bool)
        mask[:, L - 40:] = False  # WAN pads each prompt to 512 with a mask; Flux's T5 runs unmasked
        mask = mask if umt5 else None
        want = t5core.Encoder(model).encode(ids, mask)
        calls, info = {}, {}
        regional = None  # compile_layers() compiles the layers in place: a copy of its own, made once
        for v in variants:
            if v.startswith("layers compiled") and regional is None:
                regional = copy.deepcopy(model)
            enc = t5core.Encoder(regional if v.startswith("layers compiled") else model)
            t0 = time.perf_counter()
            if v.startswith("layers compiled"):
                enc.compile()
                if v != "layers compiled graphs":
                    enc._graphs_ok = lambda: False
            else:
                enc._regional = True  # compiled() -> True: encode() takes its CUDA-graph path with the eager layers
                enc._graphs_ok = lambda: True
                if v == "eager graphs fused":
                    saved = T5EncoderLayer.forward, T5FFN.forward
                    patch_fused(model)
            out = enc.encode(ids, mask)
            out = enc.encode(ids, mask)
            first_s = time.perf_counter() - t0
            err = relative_error(out[0, :L - 40], want[0, :L - 40])
            # kernels of one encode; for graphs, of the eager forward they capture
            run = ((lambda e=enc: e.encode(ids, mask)) if not enc._graphs_ok() or v.startswith("layers") else
                   (lambda m=model: m(ids.cuda(), None if mask is None else mask.cuda())))
            with torch.inference_mode():
                n = kernels_per_call(run)
            info[v] = (first_s, err, n)
            calls[v] = (lambda e: lambda: e.encode(ids, mask))(enc)
            if v == "layers compiled skip guards":
                calls[v] = (lambda e: lambda: skipping_guards(e.encode, ids, mask))(enc)
            print(f"{shape}: {v}: first two calls {first_s:.1f} s, {n} kernels per encode, rel. diff to eager "
                  f"{err:.1e}", flush=True)
            if v == "eager graphs fused":
                # the fused forward stays patched into its graphs; the other variants run the plain code
                T5EncoderLayer.forward, T5FFN.forward = saved
        ms = timed(calls, args.reps, torch.device("cuda"))
        for v in variants:
            rows.append((shape, L, v, ms[v], *info[v]))
        del model, regional, calls, enc
        torch.cuda.empty_cache()
    print(f"\nallocator {backend}\n\n| shape | tokens | variant | ms | first two calls s | kernels per encode "
          f"| rel. diff to eager |\n|---|---|---|---|---|---|---|")
    for shape, L, v, m, s, e, n in rows:
        print(f"| {shape} | {L} | {v} | {m:.2f} | {s:.1f} | {n} | {e:.1e} |")


if __name__ == "__main__":
    main()
