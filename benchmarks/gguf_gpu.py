"""GGUF encoders kept compressed on the GPU: memory after load, speed at 1x512 and error, against our bfloat16.

For each type (--types) one random T5 v1.1 encoder of the chosen size is written as a GGUF file:
  Q8_0  random float32 weights quantized with torch (per 32 values: an fp16 scale absmax/127 and int8 codes);
  Q5_K  random blocks with sane fp16 scales (6-bit sub-block scales and mins, 5-bit codes at random);
norms and relative-attention tables in F32, as llama.cpp writes them. Then, on --device:
  compressed  t5core.load_encoder(file, dtype=bfloat16, compile=...): the product path, blocks kept;
  bf16        the same weights dequantized once into a plain bfloat16 model (what weight_dtype="bf16" loads;
              built here from the blocks on the device, which is faster than expanding through the file);
  reference   the same weights dequantized into float32, run eagerly with TF32 off.
Reported per type: memory_allocated after the compressed load (GB, the model alone) and its peak while encoding,
median ms at 1 x 512 (CUDA events on CUDA; compiled = regional compile + CUDA graphs, as load_encoder(compile=True)),
and relative error of compressed and bf16 vs the reference. Targets (issue 18, XXL on an H200): Q8_0 <= 5.6 GB,
Q5_K <= 4.0 GB, compressed within 1.5x of bf16's ms, Q8_0 error <= bf16 error. Markdown table last.

  python benchmarks/gguf_gpu.py                                   # XXL on CUDA, Q8_0 and Q5_K, compiled
  python benchmarks/gguf_gpu.py --size tiny --device cpu --eager  # a check that it runs, on the CPU
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import t5core  # noqa: E402
from t5core.gguf import PackedEmbedding, PackedLinear, open_gguf  # noqa: E402
from t5core.precision import relative_error  # noqa: E402
from t5core.runtime import Encoder  # noqa: E402
from t5core.weight_load import build_empty  # noqa: E402

SIZES = {  # vocab, d_model, layers, heads, d_kv, d_ff
    "xxl": (32128, 4096, 24, 64, 64, 10240),
    "tiny": (512, 256, 2, 4, 64, 512),
}


def q8_0_blocks(w: torch.Tensor) -> np.ndarray:
    """float32 [R, C] -> Q8_0 bytes [R, C / 32 * 34]: per 32 values d = absmax / 127 (fp16), codes round(w / d)."""
    R, C = w.shape
    b = w.view(R, C // 32, 32)
    d = (b.abs().amax(-1, keepdim=True) / 127).half()
    q = torch.where(d == 0, 0, (b / d.float()).round()).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], -1).reshape(R, -1).cpu().numpy()


def q5_k_blocks(rows: int, cols: int, std: float, gen: torch.Generator, device) -> np.ndarray:
    """Random Q5_K bytes [R, C / 256 * 176] whose values have about `std` and mean 0: d, dmin fp16 fields set so
    (6-bit scales 0..63 times 5-bit codes 0..31, less 6-bit mins times dmin) spread like that; the rest random."""
    nb = cols // 256
    b = torch.randint(0, 256, (rows, nb, 176), dtype=torch.uint8, generator=gen, device=device)
    d = torch.full((rows, nb, 1), std / 513, dtype=torch.float16, device=device)  # std of sc*q - 15.5*m is ~513
    b[..., 0:2] = d.view(torch.uint8)
    b[..., 2:4] = (d * 15.5).view(torch.uint8)
    return b.reshape(rows, -1).cpu().numpy()


def write_file(path: Path, size: str, qtype: str, device, seed: int = 0) -> None:
    import gguf

    vocab, d, layers, heads, dkv, ff = SIZES[size]
    inner = heads * dkv
    gen = torch.Generator(device).manual_seed(seed)  # random numbers made on the device: fast at XXL
    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    for key, value in {"context_length": 512, "embedding_length": d, "feed_forward_length": ff, "block_count": layers,
                       "head_count": heads, "key_length": dkv, "value_length": dkv, "layer_norm_rms_eps": 1e-6,
                       "relative_attn_buckets_count": 32}.items():
        getattr(writer, f"add_{key}")(value)

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        if qtype == "Q8_0":
            w = torch.randn(rows, cols, generator=gen, device=device) * std
            writer.add_tensor(name, q8_0_blocks(w), raw_dtype=T.Q8_0)
        else:
            writer.add_tensor(name, q5_k_blocks(rows, cols, std, gen, device), raw_dtype=T.Q5_K)

    def vector(name: str, *shape: int, mean: float, std: float) -> None:
        writer.add_tensor(name, (mean + std * torch.randn(*shape, generator=gen, device=device)).cpu().numpy())

    matrix("token_embd.weight", vocab, d, 1.0)
    vector("enc.output_norm.weight", d, mean=1.0, std=0.1)
    for i in range(layers):
        b = f"enc.blk.{i}."
        for part in ("attn_q", "attn_k", "attn_v"):  # T5 folds 1/sqrt(d_kv) into its queries: so does this init
            matrix(b + part + ".weight", inner, d, d ** -0.5 * (dkv ** -0.5 if part == "attn_q" else 1.0))
        matrix(b + "attn_o.weight", d, inner, inner ** -0.5)
        matrix(b + "ffn_gate.weight", ff, d, d ** -0.5)
        matrix(b + "ffn_up.weight", ff, d, d ** -0.5)
        matrix(b + "ffn_down.weight", d, ff, ff ** -0.5)
        vector(b + "attn_norm.weight", d, mean=1.0, std=0.1)
        vector(b + "ffn_norm.weight", d, mean=1.0, std=0.1)
        if i == 0:
            vector(b + "attn_rel_b.weight", 32, heads, mean=0.0, std=1.0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@torch.no_grad()
def expanded(model, dtype: torch.dtype):
    """A plain model of `dtype` holding the compressed model's weights dequantized (on its device)."""
    config = model.config.model_copy(update={"dtype": dtype})
    plain = build_empty(config, model.unit_scale.device)
    params = dict(plain.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            params[name + ".weight"].copy_(module.packed(torch.float32) * module.scale)
        elif isinstance(module, PackedEmbedding):
            params[name + ".weight"].copy_(module.packed(torch.float32))
    for name, p in model.named_parameters():
        params[name].copy_(p)
    return plain


def timed(encoder: Encoder, ids: torch.Tensor, reps: int) -> float:
    """Median ms of encoder.encode(ids) after two warm-up calls (compiling, capturing)."""
    for _ in range(2):
        encoder.encode(ids)
    times = []
    for _ in range(reps):
        if ids.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            encoder.encode(ids)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            encoder.encode(ids)
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="xxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--types", default="Q8_0,Q5_K", help="comma-separated: Q8_0, Q5_K (default %(default)s)")
    p.add_argument("--eager", action="store_true", help="time uncompiled (the CPU check)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--dir", default=None, help="where the GGUF files go (default: a temporary folder)")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = Path(args.dir or tempfile.mkdtemp(prefix="gguf_gpu_"))
    vocab = SIZES[args.size][0]
    ids = torch.randint(3, vocab, (1, 512), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if cuda else 'CPU'}, size {args.size}, "
          f"{'eager' if args.eager else 'compiled'}", flush=True)
    rows = []
    for qtype in args.types.split(","):
        t0 = time.perf_counter()
        path = folder / f"t5-{args.size}-{qtype}.gguf"
        write_file(path, args.size, qtype, device)
        source, _, _ = open_gguf(path)
        file_gb = sum(source.nbytes(k) for k in source.keys()) / 1e9
        print(f"{qtype}: wrote {path} ({file_gb:.2f} GB of tensors) in {time.perf_counter() - t0:.0f} s", flush=True)
        if cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        compressed = t5core.load_encoder(path, dtype="bfloat16", device=device, compile=not args.eager)
        load_s = time.perf_counter() - t0
        model_gb = ((torch.cuda.memory_allocated(device) - base) if cuda else
                    sum(t.numel() * t.element_size() for t in [*compressed.model.parameters(), *compressed.model.buffers()])) / 1e9
        reference = expanded(compressed.model, torch.float32)
        bf16 = Encoder(expanded(compressed.model, torch.bfloat16))
        if not args.eager:
            bf16.compile()
        with torch.inference_mode():
            want = reference(ids)
        del reference
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        out = compressed.encode(ids)
        peak_gb = (torch.cuda.max_memory_allocated(device) - before) / 1e9 if cuda else float("nan")
        err_c, err_b = relative_error(out, want), relative_error(bf16.encode(ids), want)
        ms_c, ms_b = timed(compressed, ids, args.reps), timed(bf16, ids, args.reps)
        rows.append((qtype, file_gb, model_gb, peak_gb, load_s, ms_c, ms_b, err_c, err_b))
        print(f"{qtype}: model {model_gb:.2f} GB, encode peak +{peak_gb:.2f} GB, {ms_c:.2f} ms vs bf16 {ms_b:.2f} ms, "
              f"error {err_c:.2e} vs bf16 {err_b:.2e}", flush=True)
        del compressed, bf16, out, want
        path.unlink()
    print("\n| type | file tensors GB | model GB after load | encode peak GB over model | load s "
          "| ms 1x512 compressed | ms 1x512 bf16 | ratio | rel. error compressed | rel. error bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for q, f, m, pk, ls, mc, mb, ec, eb in rows:
        print(f"| {q} | {f:.2f} | {m:.2f} | {pk:.2f} | {ls:.1f} | {mc:.2f} | {mb:.2f} | {mc / mb:.2f}x | {ec:.2e} | {eb:.2e} |")


if __name__ == "__main__":
    main()
