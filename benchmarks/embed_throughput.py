# Caption embedding throughput (issue 20): `t5core.embed.embed_captions` end to end (caption texts -> shard files)
# against `Encoder.encode` alone on the same pre-tokenized batches, on synthetic captions of a realistic length mix
# (benchmarks/make_captions.py), with a random-weight T5 v1.1 encoder built here (normal weights, never zeros).
# Also: the share of GPU kernel time spent in GEMMs over a few batches (torch.profiler). A markdown table is last.
#   python benchmarks/embed_throughput.py                                    # H200: XXL, bf16, compiled (~3-4 min)
#   python benchmarks/embed_throughput.py --size tiny --device cpu --eager --captions 300    # CPU smoke run
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from make_captions import make_captions
from t5core.embed import EmbedSettings, batch_inputs, embed_captions, plan_batches, read_captions, tokenize
from t5core.runtime import Encoder
from t5core.t5_common import T5Config, parse_dtype
from t5core.t5_encoder import T5EncoderStack
from t5core.tokenizer import BUNDLED_SPIECE, load_tokenizer

TINY = dict(vocab_size=32128, hidden_dim=64, num_layers=2, n_head=4, head_dim=16, ff_dim=128)
NOT_GEMM = ("flash", "fmha", "attention", "sdpa", "softmax")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def random_encoder(size: str, dtype: torch.dtype, device: torch.device) -> T5EncoderStack:
    """A T5 v1.1 stack scaled like T5's own init (t5core.demo.random_init_, drawn on the device): norm scales
    1 + N(0, 0.1), embeddings and position biases N(0, 1), projections N(0, 1/fan_in) with the queries a further
    1/sqrt(head_dim) (T5 folds attention scaling into them; without it attention is one-hot and bf16 rounding
    flips it), seed 0."""
    config = T5Config(**TINY, dtype=dtype) if size == "tiny" else T5Config.from_name(size, dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = T5EncoderStack(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm scales
                p.copy_(1 + 0.1 * torch.randn_like(p, dtype=torch.float32))
            elif "vocab_embed" in name or "relative_attention_bias" in name:
                p.normal_(0, 1.0)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
                if name.endswith("qkv_proj.weight"):
                    p[: config.inner_dim] *= config.head_dim ** -0.5
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_gemm(name: str) -> bool:
    n = name.lower()
    if any(k in n for k in NOT_GEMM):
        return False
    return (any(k in n for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas"))
            or n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")
            or ("triton_tem" in n and "mm" in n))


def gemm_share(encoder: Encoder, batches: list, device: torch.device) -> tuple[float, int]:
    """(GEMM kernel time / all kernel time, kinds of kernels) over the given batches (copies and memsets are no
    kernels); on the CPU, operator self times instead of kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for ids, mask in batches:
            encoder.encode(ids, mask)
        sync(device)
    rows = []
    for e in prof.key_averages():
        if cuda and not e.key.startswith(("cuda", "cuLaunch", "Activity Buffer", "Memcpy", "Memset")) \
                and e.device_time_total > 0:
            rows.append((e.key, e.device_time_total))
        elif not cuda and e.key.startswith("aten::"):
            rows.append((e.key, e.self_cpu_time_total))
    total = sum(t for _, t in rows)
    return (sum(t for k, t in rows if is_gemm(k)) / total if total else float("nan")), len(rows)


def out_folder(requested: str, need_bytes: int) -> Path:
    """--out-dir, else /dev/shm when it has room (no disk in the measurement), else the temp folder."""
    if requested:
        return Path(tempfile.mkdtemp(dir=requested))
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * need_bytes:
        return Path(tempfile.mkdtemp(dir=shm))
    return Path(tempfile.mkdtemp())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="xxl", help="tiny | small | base | large | xl | xxl (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eager", action="store_true", help="do not compile (default: compiled, CUDA graphs on a GPU)")
    p.add_argument("--captions", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens-per-batch", type=int, default=EmbedSettings.tokens_per_batch)
    p.add_argument("--shard-size", type=int, default=EmbedSettings.shard_size)
    p.add_argument("--save-dtype", default=EmbedSettings.save_dtype)
    p.add_argument("--profile-batches", type=int, default=4, help="batches profiled for the GEMM share")
    p.add_argument("--out-dir", default="", help="where the shards go (default: /dev/shm if it has room, else /tmp)")
    args = p.parse_args()
    device = torch.device(args.device)
    settings = EmbedSettings(tokens_per_batch=args.tokens_per_batch, shard_size=args.shard_size,
                             save_dtype=args.save_dtype)
    tok = load_tokenizer(BUNDLED_SPIECE)

    model = random_encoder(args.size, getattr(torch, args.dtype), device)
    encoder = Encoder(model) if args.eager else Encoder(model).compile()
    hidden = model.config.hidden_dim
    log(f"built random {args.size} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
        f"{args.dtype}, {'eager' if args.eager else 'compiled'}) on {device}")

    texts = make_captions(args.captions, tok, args.seed)
    # the batches embed_captions runs (one rank): per shard, tokenized and planned the same way
    batches = []
    for start in range(0, len(texts), settings.shard_size):
        part = list(enumerate(texts))[start:start + settings.shard_size]
        tokens = tokenize(tok, part, settings.max_length)
        for b in plan_batches([len(t) for t in tokens], settings.tokens_per_batch, settings.batch_size,
                              encoder.compiled):
            ids, mask, index = batch_inputs(tok, tokens, b)
            if device.type == "cuda":
                ids, mask = ids.pin_memory(), mask.pin_memory()
            batches.append((ids, mask, len(index)))
    real = sum(n for _, _, n in batches)
    run = sum(ids.numel() for ids, _, _ in batches)
    shapes = sorted({tuple(ids.shape) for ids, _, _ in batches}, key=lambda s: -s[1])
    out_bytes = real * hidden * parse_dtype(settings.save_dtype).itemsize
    log(f"{len(texts)} captions, {real} tokens, {len(batches)} batches of {len(shapes)} shapes, "
        f"{run} tokens run ({1 - real / run:.1%} padding)")

    work = out_folder(args.out_dir, out_bytes)
    log(f"output {out_bytes / 1e9:.2f} GB to {work}")
    try:
        (work / "captions.txt").write_text("\n".join(texts), encoding="utf-8")
        captions = read_captions(work / "captions.txt")
        assert captions == list(enumerate(texts))

        t = time.perf_counter()
        for shape in shapes:  # compile and capture every shape once
            ids, mask, _ = next(b for b in batches if tuple(b[0].shape) == shape)
            encoder.encode(ids, mask)
        sync(device)
        warm = time.perf_counter() - t
        log(f"warm-up (compile, capture) of {len(shapes)} shapes: {warm:.1f}s")

        sync(device)
        t = time.perf_counter()
        for ids, mask, _ in batches:
            encoder.encode(ids, mask)
        sync(device)
        alone = time.perf_counter() - t
        log(f"encoder alone: {alone:.2f}s, {real / alone:,.0f} tokens/s")

        out = work / "emb"
        sync(device)
        t = time.perf_counter()
        paths = embed_captions(encoder, tok, captions, out, settings=settings)
        sync(device)
        end_to_end = time.perf_counter() - t
        log(f"end to end: {end_to_end:.2f}s, {real / end_to_end:,.0f} tokens/s, {len(paths)} shards")

        # every caption once, and a few against the encoder alone
        from safetensors import safe_open

        lines, first = [], {}
        for path in paths:
            with safe_open(str(path), "pt") as f:
                shard_lines, offsets = f.get_tensor("lines").tolist(), f.get_tensor("offsets")
                lines += shard_lines
                if path == paths[0]:
                    emb = f.get_slice("embeddings")
                    for i in (0, len(shard_lines) // 2, len(shard_lines) - 1):
                        first[shard_lines[i]] = emb[int(offsets[i]):int(offsets[i + 1])]
        assert sorted(lines) == [line for line, _ in captions], "captions missing or repeated"
        errs = []
        for line, got in first.items():
            ids, mask = tok([captions[line][1]], max_length=settings.max_length)
            ref = encoder.encode(ids, mask)[0].float().cpu()
            errs.append(((got.float() - ref).norm() / ref.norm()).item())
        log(f"every caption once; {len(errs)} captions vs. encoded alone: max rel err {max(errs):.2e}")

        step = max(1, len(batches) // args.profile_batches)
        profiled = [(ids, mask) for ids, mask, _ in batches[::step][:args.profile_batches]]
        share, kernels = gemm_share(encoder, profiled, device)
        log(f"GEMM share of {'kernel' if device.type == 'cuda' else 'operator'} time over {len(profiled)} batches: "
            f"{share:.1%} ({kernels} kinds)")
        manifest = json.loads((out / "manifest.json").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(captions)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n### embed throughput: {args.size} {args.dtype} {'eager' if args.eager else 'compiled'}, {name}, "
          f"torch {torch.__version__}\n")
    print(f"{n} captions, {real} real tokens ({real / n:.1f} a caption), settings {manifest['settings']}\n")
    print("| measure | value |\n|---|---|")
    for label, value in [
        ("batches / shapes", f"{len(batches)} / {len(shapes)}"),
        ("padding (of tokens run)", f"{1 - real / run:.1%}"),
        ("warm-up: compile + capture", f"{warm:.1f} s"),
        ("encoder alone", f"{alone:.2f} s: {n / alone:,.0f} captions/s, {real / alone:,.0f} tokens/s"),
        ("end to end (texts -> shard files)", f"{end_to_end:.2f} s: {n / end_to_end:,.0f} captions/s, "
                                              f"{real / end_to_end:,.0f} tokens/s"),
        ("end to end / encoder alone", f"{alone / end_to_end:.1%} (target >= 85%)"),
        ("GEMM share of kernel time" if device.type == "cuda" else "GEMM share of operator time",
         f"{share:.1%} ({len(profiled)} batches)"),
        ("output", f"{len(paths)} shards, {out_bytes / 1e9:.2f} GB {settings.save_dtype}"),
        ("max rel err vs. encoded alone", f"{max(errs):.2e} ({len(errs)} captions)"),
    ]:
        print(f"| {label} | {value} |")


START = time.perf_counter()
if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
