"""Speed and accuracy of t5core against every transformers set-up, on one set of random T5 v1.1 weights.

One process builds a transformers T5EncoderModel with transformers' own random init, in float32 on the device:
that model is the reference (TF32 off). It is saved once as a Hugging Face folder, and every variant loads from
that folder: ours through t5core.load_encoder (the product path, norms fused), transformers through
from_pretrained. Every variant sees the same token ids.

transformers set-ups (all four are timed by default; the fastest at each shape is the baseline):
  hf-eager[-compiled]-DT   attn_implementation="eager", run as loaded / under torch.compile(model, dynamic=False)
  hf-sdpa[-compiled]-DT    attn_implementation="sdpa", the same two ways
  (DT: bf16, fp16 or fp32; the eager and compiled variants of one attention share one loaded model)

Sections (--sections):
  speed       median ms per (variant, shape) with CUDA events; each variant's speed against the FASTEST
              transformers set-up at the same shape (named in the table); achieved TFLOP/s and its share of a bf16
              8192^3 torch.mm measured in the same run (in every round next to the variants, and once as a burst
              before them: see matmul_tflops); relative error vs the float32 reference on real tokens; first-call
              seconds (compile included)
  load        bf16 safetensors folder -> encoder ready on the device: ours vs transformers, seconds and memory
  cold-start  first call of one compiled variant (--cold-variant, at the first of --shapes) in fresh processes
              loading a bf16 copy of the weights: with an empty inductor/Triton cache, then again with that
              cache kept (a warm restart)
Markdown tables are printed at the end; --out-json keeps every number (rewritten after every case).

Cases run shape by shape (every variant at the first shape, then the next shape...), with all variants' models
alive at once (XXL: 9.5 GB each after the 19 GB float32 reference is freed), so that a run cut short by
--budget-s still has the most important shape for everyone (SIGTERM, as from `timeout`, also prints what is
done). Float32 weights are written to $TMPDIR (19 GB at XXL: about 20-40 s; TMPDIR=/dev/shm keeps them in
memory); every variant loads from them, so bf16 and float16 are each rounded once from the exact float32
reference. The load and cold-start sections write a bf16 copy (9.5 GB) as well.

Run from a checkout (this file imports the checkout's t5core, through its public API only):
  python benchmarks/bench.py                                  # XXL on CUDA: all default variants and shapes
  python benchmarks/bench.py --sections load,cold-start
  python benchmarks/bench.py --device cpu --size base         # CPU: ours float32 vs transformers, 1 x 128
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if (REPO / "t5core" / "__init__.py").is_file():  # a checkout: benchmark its t5core, not another installed copy
    sys.path.insert(0, str(REPO))

import torch

from t5core import load_encoder, open_checkpoint
from t5core.precision import relative_error
from t5core.scripts.t5_encoder_precision_parity import (build_hf_reference, free, load_hf, md_table,
                                                      quiet_transformers, short_error)

SIZES = ("small", "base", "large", "xl", "xxl")  # T5 v1.1 presets (T5Config.from_name)
FIRST_CALL_TAG = "T5CORE_FIRST_CALL "  # prefix of the JSON line a --first-call-only child prints


# -- variants and shapes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    impl: str  # "ours" | "hf"
    dtype: torch.dtype
    attn: str  # ours: "sdpa" | "flex"; transformers: "eager" | "sdpa"
    compiled: bool = False  # ours: load_encoder(compile=True); transformers: torch.compile of the whole model
    weight_dtype: Optional[str] = None  # ours: load_encoder(weight_dtype=), e.g. float16 weights for float32 compute


DTYPE_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
VARIANTS = {v.name: v for v in [
    Variant("ours-flex-compiled-bf16", "ours", torch.bfloat16, "flex", True),
    Variant("ours-sdpa-bf16", "ours", torch.bfloat16, "sdpa"),
    Variant("ours-sdpa-compiled-bf16", "ours", torch.bfloat16, "sdpa", True),
    Variant("ours-flex-compiled-fp16", "ours", torch.float16, "flex", True),  # fp16_scales="auto": preset by size
    Variant("ours-sdpa-compiled-fp16", "ours", torch.float16, "sdpa", True),
    Variant("ours-sdpa-fp32", "ours", torch.float32, "sdpa"),
    Variant("ours-sdpa-compiled-fp32", "ours", torch.float32, "sdpa", True),  # CPU: whole stack, frozen weights
    # float16 weights cast to float32 in each layer (what ComfyUI's Load node's auto does on the CPU)
    Variant("ours-sdpa-fp32-w16", "ours", torch.float32, "sdpa", weight_dtype="float16"),
    Variant("ours-sdpa-compiled-fp32-w16", "ours", torch.float32, "sdpa", True, "float16"),
    *[Variant(f"hf-{attn}{'-compiled' if compiled else ''}-{tag}", "hf", dtype, attn, compiled)
      for dtype, tag in DTYPE_TAGS.items() for attn in ("eager", "sdpa") for compiled in (False, True)],
]}
HF_SETUPS = ("hf-eager-{}", "hf-eager-compiled-{}", "hf-sdpa-{}", "hf-sdpa-compiled-{}")  # every one a user can pick
# most important first: a run cut by the time budget loses the tail
DEFAULT_VARIANTS = {
    "cuda": ",".join(["ours-sdpa-compiled-bf16", *(s.format("bf16") for s in HF_SETUPS), "ours-flex-compiled-bf16",
                      "ours-sdpa-compiled-fp16", "ours-sdpa-bf16"]),
    "cpu": ",".join(["ours-sdpa-compiled-fp32", "ours-sdpa-fp32", *(s.format("fp32") for s in HF_SETUPS)]),
}
DEFAULT_SHAPES = {"cuda": "1x512,8x512,pad8x256,1x256,8x256", "cpu": "1x128"}


@dataclass(frozen=True)
class Shape:
    batch: int
    seq_len: int
    padded: bool = False  # prompts of random lengths 20..200 (at most seq_len), right-padded, with a mask

    @property
    def name(self) -> str:
        return f"{'pad' if self.padded else ''}{self.batch}x{self.seq_len}"


def parse_shapes(text: str) -> list[Shape]:
    """'1x512,8x512,pad8x256' -> shapes."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        padded = part.startswith("pad")
        try:
            batch, seq_len = (int(x) for x in part.removeprefix("pad").split("x"))
        except ValueError:
            raise ValueError(f"bad shape {part!r}: expected BxL or padBxL, e.g. 1x512 or pad8x256") from None
        shapes.append(Shape(batch, seq_len, padded))
    return shapes


def parse_variants(text: str) -> list[Variant]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    return [VARIANTS[n] for n in names]


@dataclass
class Inputs:
    ids: torch.Tensor  # [B, L] int64: random ids, EOS (1) last, pads 0
    mask: Optional[torch.Tensor]  # [B, L] bool (True = real token), None when nothing is padded
    hf_mask: Optional[torch.Tensor]  # the same as int64, as transformers takes it


def make_inputs(shape: Shape, vocab_size: int, device, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    B, L = shape.batch, shape.seq_len
    ids = torch.randint(3, min(vocab_size, 32000), (B, L), generator=gen)
    if shape.padded:
        lo, hi = min(20, L), min(200, L)
        lengths = torch.randint(lo, hi + 1, (B,), generator=gen).tolist()
    else:
        lengths = [L] * B
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, n - 1], ids[i, n:] = 1, 0
        mask[i, :n] = True
    ids = ids.to(device)
    if not shape.padded:
        return Inputs(ids, None, None)
    mask = mask.to(device)
    return Inputs(ids, mask, mask.long())


def encoder_flops(cfg, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward over all B*L positions (pads included: every variant computes them)."""
    d, inner, ff = cfg.hidden_dim, cfg.inner_dim, cfg.ff_dim
    ff_in = 2 * ff if getattr(cfg.ffn_type, "value", cfg.ffn_type) == "GEGLU" else ff  # gate and up
    per_token = 2 * (d * 3 * inner + inner * d + d * ff_in + ff * d) + 4 * seq_len * inner  # + QK^T and PV
    return float(per_token) * batch * seq_len * cfg.num_layers


# -- timing -------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_first_call(fn: Callable, device: torch.device):
    """-> (seconds, output) of one call, compilation included, synchronized."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def time_calls(fn: Callable, device: torch.device, seconds: float, min_runs: int = 5, max_runs: int = 300,
               sync_each: bool = True) -> dict:
    """Median ms after 3 warm-up calls, over enough calls to fill `seconds`; CUDA events around each call.

    sync_each: wait for each call before launching the next, so a call's time is the latency a caller sees,
    launch gaps included, for every variant alike (back to back, eager models would hide them by pipelining)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(3):
        fn()
    sync(device)
    per_call = (time.perf_counter() - start) / 3
    n = int(min(max(seconds / max(per_call, 1e-6), min_runs), max_runs))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
            if sync_each:
                end.synchronize()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {**summary(times), "times": times}


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=10)
    return {"ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "runs": len(times)}


def matmul_tflops(device: torch.device, seconds: float = 0.5) -> dict:
    """The matrix-unit reference: bf16 8192^3 torch.mm on random data (CPU: float32 1024^3), back to back.
    Its rate depends on the GPU's clock at the time: an idle H200 boosts to 1980 MHz for about a second, then its
    700 W power cap holds it near 1500 MHz (BENCHMARKS.md), so the bench measures it once first
    (burst) and again in every round next to the encoders it is compared with."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_calls(lambda: torch.mm(a, b), device, seconds=seconds, min_runs=10, max_runs=1000, sync_each=False)
    return {"tflops": 2 * n**3 / (t["ms"] * 1e-3) / 1e12, "n": n, "dtype": str(dtype).removeprefix("torch.")}


# -- models -------------------------------------------------------------------------------------------------
def hf_forward(model) -> Callable[[Inputs], torch.Tensor]:
    @torch.inference_mode()
    def call(inp: Inputs) -> torch.Tensor:
        return model(input_ids=inp.ids, attention_mask=inp.hf_mask).last_hidden_state  # [B, L, D]

    return call


def load_variant(v: Variant, folder, device, shared: Optional[dict] = None):
    """-> (model, call(inputs) -> [B, L, D]). Ours: the product path, load_encoder() and encode().
    transformers: the eager and the compiled variant of one dtype and attention share one loaded model when
    `shared` (keyed by both) is given; the compiled one calls torch.compile(model, dynamic=False) on it."""
    if v.impl == "ours":
        enc = load_encoder(folder, dtype=v.dtype, device=device, attn_impl=v.attn, fuse_norms=True,
                           compile=v.compiled, weight_dtype=v.weight_dtype)
        return enc, lambda inp: enc.encode(inp.ids, inp.mask)
    shared = {} if shared is None else shared
    key = (v.dtype, v.attn)
    if key not in shared:
        shared[key] = load_hf(folder, v.dtype, v.attn, device)
    model = shared[key]
    return model, hf_forward(torch.compile(model, dynamic=False) if v.compiled else model)


def variant_note(v: Variant, model) -> str:
    """Float16 rows name the residual scales in effect ({layer: FFN-out scale}, 1 elsewhere)."""
    if v.impl != "ours" or v.dtype != torch.float16:
        return ""
    scaled = {i: s for i, s in enumerate(model.config.enc_ffn_out_scales or []) if s != 1}
    return f"fp16 ffn scales {scaled}" if scaled else "no fp16 scales"


# -- one run ------------------------------------------------------------------------------------------------
class Stop(BaseException):
    """SIGTERM (the device runner's time limit): print what we have. A BaseException, like KeyboardInterrupt,
    so that the per-variant `except Exception` handlers let it through."""


class Run:
    """Results, time budget and JSON of one bench invocation."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.start = time.perf_counter()
        self.results: dict = {"meta": {}, "speed": [], "load": [], "cold_start": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)

    def save(self) -> None:
        if self.args.out_json:
            self.results["meta"]["wall_s"] = self.elapsed()
            Path(self.args.out_json).write_text(json.dumps(self.results, indent=1, default=str))


@dataclass
class Loaded:
    """A variant ready to time, or why it is not."""
    model: object = None
    call: Optional[Callable[[Inputs], torch.Tensor]] = None
    note: str = ""
    error: str = ""


def load_for_speed(run: Run, v: Variant, folder: Path, shared: dict) -> Loaded:
    try:
        start = time.perf_counter()
        model, call = load_variant(v, folder, run.device, shared)
        run.log(f"loaded {v.name} in {time.perf_counter() - start:.1f}s")
        return Loaded(model, call, variant_note(v, model))
    except Exception as e:  # one broken variant must not lose the run
        free(run.device)
        return Loaded(error=f"load: {short_error(e)}")


def real_tokens(t: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return t if mask is None else t[mask]  # [B, L, D] -> [real tokens, D]


def check_case(run: Run, row: dict, v: Variant, loaded: Loaded, inp: Inputs, ref: torch.Tensor) -> bool:
    """First call (compilation included) and error vs float32; False (and row["error"]) if it failed."""
    row["note"] = loaded.note
    try:
        row["first_call_s"], out = time_first_call(lambda: loaded.call(inp), run.device)
        row["rel_err"] = relative_error(real_tokens(out.float(), inp.mask), real_tokens(ref, inp.mask))
        return True
    except Exception as e:
        row["error"] = short_error(e)
        run.log(f"{v.name} {row['shape']}: {row['error']}")
        free(run.device)
        return False


def time_interleaved(run: Run, cases: list[tuple[dict, Variant, Loaded]], inp: Inputs, burst: float) -> None:
    """Time every variant of one shape in turn, --rounds times over, so that the machine's drift (and the GPU's
    power-capped clock) lands on all of them alike; each row's median is over all its calls. Each round starts
    with the matmul reference, so its rate is measured in the same state as the encoders, and then rotates the
    variants' order by one: no variant always follows the same neighbour (a heavier one leaves the clock lower)."""
    if not cases:
        return
    samples: dict[str, list[float]] = {v.name: [] for _, v, _ in cases}
    seconds = run.args.seconds_per_case / run.args.rounds
    # a power-capped GPU takes ~0.3 s to settle after the switch from a lighter load: 1 s keeps the median past it
    mm_seconds = max(seconds, 1.0) if run.device.type == "cuda" else seconds
    mm_rates = []
    for r in range(run.args.rounds):
        mm_rates.append(matmul_tflops(run.device, mm_seconds)["tflops"])
        k = r % len(cases)
        for row, v, loaded in cases[k:] + cases[:k]:
            if "error" in row:
                continue
            try:
                samples[v.name] += time_calls(lambda: loaded.call(inp), run.device, seconds)["times"]
            except Exception as e:
                row["error"] = short_error(e)
                free(run.device)
    mm = statistics.median(mm_rates)
    for row, v, loaded in cases:
        if "error" in row:
            run.log(f"{v.name} {row['shape']}: {row['error']}")
            continue
        row.update(summary(samples[v.name]))
        row["tflops"] = row["flops"] / (row["ms"] * 1e-3) / 1e12
        row["burst_share"] = row["tflops"] / burst
        row["mm_tflops"], row["mm_share"] = mm, row["tflops"] / mm
        run.log(f"{v.name} {row['shape']}: {row['ms']:.2f} ms, first call {row['first_call_s']:.1f}s, "
                f"rel err {row['rel_err']:.2e}")


def run_speed(run: Run, folder: Path, cfg, refs: dict, burst: float) -> None:
    """Shape by shape: load (once; models stay loaded and compiled across shapes) and check every variant, then
    time them interleaved."""
    args = run.args
    variants, shapes = parse_variants(args.variants), parse_shapes(args.shapes)
    models: dict[str, Loaded] = {}
    shared_hf: dict = {}  # one transformers model per (dtype, attention), eager and compiled alike
    try:
        for shape in shapes:
            inp = make_inputs(shape, cfg.vocab_size, run.device, args.seed)
            cases = []
            for v in variants:
                row = {"variant": v.name, "impl": v.impl, "shape": shape.name,
                       "flops": encoder_flops(cfg, shape.batch, shape.seq_len)}
                run.results["speed"].append(row)
                if run.over_budget():
                    row["error"] = f"skipped: past --budget-s {args.budget_s:.0f}"
                    continue
                if v.name not in models:
                    models[v.name] = load_for_speed(run, v, folder, shared_hf)
                if models[v.name].error:
                    row["error"] = models[v.name].error
                elif check_case(run, row, v, models[v.name], inp, refs[shape.name]):
                    cases.append((row, v, models[v.name]))
            time_interleaved(run, cases, inp, burst)
            run.save()
    finally:
        add_ratios(run.results["speed"])
        models.clear()
        shared_hf.clear()
        free(run.device)


def fastest_hf(rows: list[dict]) -> dict:
    """{shape: the timed transformers row with the lowest median at that shape}."""
    best = {}
    for r in rows:
        if r.get("impl") == "hf" and "ms" in r and (r["shape"] not in best or r["ms"] < best[r["shape"]]["ms"]):
            best[r["shape"]] = r
    return best


def add_ratios(rows: list[dict]) -> None:
    """Speed against the fastest transformers set-up timed at the same shape: its ms / this row's ms (above 1:
    faster than every transformers set-up), with that set-up's name."""
    best = fastest_hf(rows)
    for r in rows:
        if "ms" in r and r["shape"] in best:
            r["fastest_hf"], r["x_fastest_hf"] = best[r["shape"]]["variant"], best[r["shape"]]["ms"] / r["ms"]


def reference_outputs(ref_model, cfg, shapes: list[Shape], device, seed: int) -> dict:
    """Float32 transformers outputs (TF32 off) for every shape, kept on the device."""
    refs = {}
    for shape in shapes:
        inp = make_inputs(shape, cfg.vocab_size, device, seed)
        refs[shape.name] = hf_forward(ref_model)(inp).float()
    return refs


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers (each storage once) of a transformers model or of what load_encoder
    returned (a t5core.Encoder: its .model)."""
    module = getattr(model, "model", model)
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def warm_read(folder: Path) -> None:
    """Read every file once so both loaders start from the page cache (it cannot be dropped here)."""
    for f in (f for f in folder.iterdir() if f.is_file()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def run_load(run: Run, folder16: Path) -> None:
    """Seconds from a bf16 safetensors folder to weights on the device (synchronized), and the memory it took."""
    device = run.device
    cuda = device.type == "cuda"
    warm_read(folder16)
    loaders = [
        ("ours: t5core.load_encoder(bf16, fuse_norms=True)",
         lambda: load_encoder(folder16, dtype=torch.bfloat16, device=device, fuse_norms=True)),
        ("ours: t5core.load_encoder(bf16)", lambda: load_encoder(folder16, dtype=torch.bfloat16, device=device)),
        (f"transformers: from_pretrained(dtype=bf16, device_map={str(device)!r})",
         lambda: load_hf(folder16, torch.bfloat16, "sdpa", device)),
    ]
    for name, fn in loaders:
        row = {"loader": name}
        run.results["load"].append(row)
        try:
            free(device)
            if cuda:
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            row["seconds"], model = time_first_call(fn, device)
            row["weight_gb"] = weight_bytes(model) / 1e9
            if cuda:
                free(device)  # allocated after empty_cache: what the model keeps
                row["allocated_gb"] = (torch.cuda.memory_allocated(device) - base) / 1e9
                row["peak_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
            run.log(f"load {name}: {row['seconds']:.2f}s")
            del model
        except Exception as e:
            row["error"] = short_error(e)
        free(device)
        run.save()


def run_cold_start(run: Run, folder: Path, workdir: Path) -> None:
    """The same first call in two fresh processes: empty inductor + Triton caches, then those caches kept."""
    args = run.args
    cache = workdir / "compile-cache"
    repo = str(REPO)  # the child imports this checkout's t5core
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    shape = parse_shapes(args.shapes)[0]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--first-call-only", "--model", str(folder),
           "--device", args.device, "--variants", args.cold_variant, "--shapes", shape.name, "--seed", str(args.seed)]
    for label in ("cold: empty compile caches", "warm restart: caches kept"):
        row = {"run": label, "variant": args.cold_variant, "shape": shape.name}
        run.results["cold_start"].append(row)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(60.0, args.budget_s))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(FIRST_CALL_TAG)]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
            row.update(json.loads(lines[-1].removeprefix(FIRST_CALL_TAG)))
            row["process_s"] = time.perf_counter() - start
            run.log(f"cold start, {label}: first call {row['first_call_s']:.1f}s")
        except Exception as e:
            row["error"] = short_error(e)
        run.save()


def first_call_only(args) -> None:
    """Child of --sections cold-start: load one variant, time its first and next calls, print one JSON line."""
    device = torch.device(args.device)
    (v,), (shape,) = parse_variants(args.variants), parse_shapes(args.shapes)
    load_s, (model, call) = time_first_call(lambda: load_variant(v, args.model, device), device)
    inp = make_inputs(shape, open_checkpoint(args.model).config.vocab_size, device, args.seed)
    first_s, _ = time_first_call(lambda: call(inp), device)
    second_s, _ = time_first_call(lambda: call(inp), device)
    steady = time_calls(lambda: call(inp), device, seconds=0.3, min_runs=5, max_runs=50)["ms"]
    print(FIRST_CALL_TAG + json.dumps({"load_s": load_s, "first_call_s": first_s, "second_call_s": second_s,
                                       "steady_ms": steady}), flush=True)


# -- tables -------------------------------------------------------------------------------------------------
def fmt(x, kind: str = "ms") -> str:
    if x is None:
        return ""
    if kind == "err":
        return f"{x:.2e}"
    if kind == "x":
        return f"{x:.2f}x"
    if kind == "pct":
        return f"{100 * x:.0f}%"
    return f"{x:.2f}" if abs(x) < 100 else f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"


def speed_table(rows: list[dict]) -> str:
    out = []
    for r in rows:
        spread = (r["p90_ms"] - r["p10_ms"]) / r["ms"] if "ms" in r else None
        note = r.get("error") or ("not finished; " if "ms" not in r else "") + r.get("note", "")
        out.append([r["variant"], r["shape"], fmt(r.get("ms")), fmt(spread, "pct"), fmt(r.get("x_fastest_hf"), "x"),
                    r.get("fastest_hf", ""), fmt(r.get("tflops")), fmt(r.get("mm_tflops")),
                    fmt(r.get("mm_share"), "pct"), fmt(r.get("burst_share"), "pct"),
                    fmt(r.get("rel_err"), "err"), fmt(r.get("first_call_s")), note])
    return md_table(["variant", "shape", "median ms", "p10-p90", "x fastest HF", "fastest HF", "TFLOP/s",
                     "mm in rounds TFLOP/s", "of mm in rounds", "of mm burst", "rel err vs f32", "first call s",
                     "note"], out)


def baseline_table(rows: list[dict]) -> str:
    """One line per shape: every transformers set-up's median ms, the fastest of them, and each t5core variant's
    ms with its speed against that fastest set-up."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    hf = list(dict.fromkeys(r["variant"] for r in rows if r.get("impl") == "hf"))
    ours = list(dict.fromkeys(r["variant"] for r in rows if r.get("impl") != "hf"))
    cell = {(r["variant"], r["shape"]): r for r in rows}
    best = fastest_hf(rows)
    out = []
    for shape in shapes:
        line = [shape, *(fmt(cell.get((v, shape), {}).get("ms")) for v in hf)]
        line.append(f"{best[shape]['variant']} ({fmt(best[shape]['ms'])})" if shape in best else "")
        for v in ours:
            r = cell.get((v, shape), {})
            line.append(f"{fmt(r['ms'])} ({fmt(r['x_fastest_hf'], 'x')})" if "x_fastest_hf" in r else fmt(r.get("ms")))
        out.append(line)
    return md_table(["shape", *(f"{v} ms" for v in hf), "fastest HF (ms)", *(f"{v} ms (x fastest HF)" for v in ours)],
                    out)


def load_table(rows: list[dict]) -> str:
    return md_table(["loader", "seconds", "weights GB", "allocated GB", "peak GB", "error"], [
        [r["loader"], fmt(r.get("seconds")), fmt(r.get("weight_gb")), fmt(r.get("allocated_gb")),
         fmt(r.get("peak_gb")), r.get("error", "")] for r in rows])


def cold_table(rows: list[dict]) -> str:
    return md_table(["run", "variant", "shape", "process s", "load s", "first call s", "second call s", "steady ms",
                     "error"], [
        [r["run"], r["variant"], r["shape"], fmt(r.get("process_s")), fmt(r.get("load_s")),
         fmt(r.get("first_call_s")), fmt(r.get("second_call_s")), fmt(r.get("steady_ms")), r.get("error", "")]
        for r in rows])


def rerun_command(args) -> str:
    """The command that repeats this run, defaults resolved, so a saved report says how it was made."""
    model = f" --model {args.model}" if args.model else f" --size {args.size}"
    return (f"python benchmarks/bench.py --device {args.device}{model} --sections {args.sections} --variants "
            f"{args.variants} --shapes {args.shapes} --seconds-per-case {args.seconds_per_case:g} --rounds "
            f"{args.rounds} --budget-s {args.budget_s:g} --cold-variant {args.cold_variant} --seed {args.seed}")


def print_report(run: Run, stopped: Optional[str]) -> None:
    m, res = run.results["meta"], run.results
    print("\n## t5core bench (benchmarks/bench.py)")
    print(rerun_command(run.args))
    print(f"device {m.get('device_name')}, torch {m.get('torch')}, transformers {m.get('transformers')}, "
          f"size {m.get('size')} {m.get('dims', '')}, wall {run.elapsed():.0f}s"
          + (f", STOPPED: {stopped}" if stopped else ""))
    if res["speed"]:
        print(f"matmul {m.get('mm_what')}: burst {fmt(m.get('mm_burst_tflops'))} TFLOP/s before timing, then "
              "measured again at the start of every round (the 'in rounds' columns); work per shape: "
              + ", ".join(f"{s} {f / 1e12:.3f} TFLOP" for s, f in m.get("flops", {}).items()))
        print("ours: t5core.load_encoder(fuse_norms=True), timed through encode() (compiled: one CUDA graph replayed "
              "per shape); HF: T5EncoderModel from_pretrained with attn_implementation eager or sdpa, run as loaded or "
              "under torch.compile(model, dynamic=False) ('-compiled'). 'x fastest HF' = the fastest transformers "
              "set-up's ms at that shape / the row's ms (above 1: faster than all of them). Each call synchronized "
              "(latency), "
              f"{'host clock' if m.get('device_name') == 'cpu' else 'CUDA events'}, median; the variants of a shape "
              f"are timed in turn, {m.get('rounds')} rounds. Rel err on real tokens "
              "vs HF float32 "
              "(TF32 off). First call includes compilation; inductor caches carry across variants and shapes in "
              "one process (see cold-start for a fresh process). Padded TFLOP/s counts pads.\n")
        print(speed_table(res["speed"]))
        print("\nAgainst every transformers set-up (median ms; t5core: ms and x the fastest transformers set-up at "
              "that shape):\n")
        print(baseline_table(res["speed"]))
    if res["load"]:
        print("\nLoad: bf16 safetensors folder -> ready encoder (synchronized; no forward). Files read once "
              "before timing: both loaders read a warm page cache. GB deltas of torch.cuda memory.\n")
        print(load_table(res["load"]))
    if res["cold_start"]:
        print("\nCold start: separate processes; 'first call' = compile + one forward.\n")
        print(cold_table(res["cold_start"]))


# -- entry points ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="cuda | cpu (default: cuda if present)")
    p.add_argument("--size", choices=SIZES, default=None,
                   help="random T5 v1.1 weights of this size (default: xxl on CUDA, small on CPU)")
    p.add_argument("--model", default=None, help="a Hugging Face T5 folder to use instead of random weights")
    p.add_argument("--sections", default="speed", help="comma list of speed, load, cold-start (default speed)")
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS)} "
                   f"(default on CUDA: {DEFAULT_VARIANTS['cuda']}; on CPU: {DEFAULT_VARIANTS['cpu']})")
    p.add_argument("--shapes", default=None, help="comma list of BxL or padBxL (B prompts of random lengths 20..200 "
                   f"padded to L) (default on CUDA: {DEFAULT_SHAPES['cuda']}; on CPU: {DEFAULT_SHAPES['cpu']})")
    p.add_argument("--seconds-per-case", type=float, default=1.0,
                   help="timed calls of one variant and shape fill this long in all (default 1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="the variants of a shape are timed in turn, this many times over (default 3)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the speed cases not started within this many seconds of the run (default 420)")
    p.add_argument("--cold-variant", default="ours-sdpa-compiled-bf16",
                   help="variant timed by cold-start, at the first of --shapes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", default=None, help="write every number here")
    p.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)  # cold-start's child process


def _setup(args) -> torch.device:
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    args.size = args.size or ("xxl" if kind == "cuda" else "small")
    args.variants = args.variants or DEFAULT_VARIANTS[kind]
    args.shapes = args.shapes or DEFAULT_SHAPES[kind]
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be true float32
    torch.backends.cudnn.allow_tf32 = False
    # transformers' compiled variants share code objects across dtypes and shapes (ours raise their own limit)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
    quiet_transformers()
    return device


def run(args) -> dict:
    device = _setup(args)
    if args.first_call_only:
        first_call_only(args)
        return {}
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - {"speed", "load", "cold-start"}:
        raise ValueError(f"unknown sections {sections - {'speed', 'load', 'cold-start'}}")
    parse_variants(args.variants + "," + args.cold_variant), parse_shapes(args.shapes)  # fail fast on typos
    bench = Run(args, device)
    stopped = None
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with tempfile.TemporaryDirectory(prefix="t5core-bench-") as tmp:
            _run_sections(bench, sections, Path(tmp))
    except (Stop, KeyboardInterrupt) as e:
        stopped = str(e) or type(e).__name__
    finally:
        signal.signal(signal.SIGTERM, previous)
        bench.save()
        print_report(bench, stopped)
    return bench.results


def _raise_stop(signum, frame):
    raise Stop(f"signal {signum} after the time limit")


def _run_sections(run: Run, sections: set[str], workdir: Path) -> None:
    import transformers

    args, device = run.args, run.device
    run.results["meta"].update(
        torch=torch.__version__, transformers=transformers.__version__, size=args.model or args.size,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    if args.model:
        ref_model = load_hf(args.model, torch.float32, "eager", device)
    else:
        ref_model = build_hf_reference(args.size, device, args.seed)
    if "speed" in sections:
        folder32 = Path(args.model) if args.model else workdir / "float32"
        if not args.model:
            ref_model.save_pretrained(folder32)
            run.log(f"built and saved float32 {args.size} weights")
        cfg = open_checkpoint(folder32).config
        refs, burst = prepare_speed(run, ref_model, cfg)
    folder16 = workdir / "bfloat16"
    if sections & {"load", "cold-start"}:
        ref_model.to(torch.bfloat16).save_pretrained(folder16)
    del ref_model  # 19 GB at XXL: only its outputs are needed from here on
    free(device)

    if "speed" in sections:
        run_speed(run, folder32, cfg, refs, burst)
        refs.clear()
        free(device)
    if "load" in sections:
        run_load(run, folder16)
    if "cold-start" in sections:
        run_cold_start(run, folder16, workdir)


def prepare_speed(run: Run, ref_model, cfg) -> tuple[dict, float]:
    """-> (float32 reference outputs per shape, burst matmul TFLOP/s); records both in the meta."""
    meta, shapes = run.results["meta"], parse_shapes(run.args.shapes)
    meta["dims"] = f"(d {cfg.hidden_dim}, heads {cfg.n_head}, ff {cfg.ff_dim}, layers {cfg.num_layers})"
    meta["flops"] = {s.name: encoder_flops(cfg, s.batch, s.seq_len) for s in shapes}
    refs = reference_outputs(ref_model, cfg, shapes, run.device, run.args.seed)
    mm = matmul_tflops(run.device)
    meta["mm_burst_tflops"] = mm["tflops"]
    meta["mm_what"] = f"{mm['dtype']} {mm['n']}^3 torch.mm, median"
    meta["rounds"] = run.args.rounds
    run.log(f"reference outputs done; matmul burst {mm['tflops']:.3g} TFLOP/s")
    return refs, mm["tflops"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
