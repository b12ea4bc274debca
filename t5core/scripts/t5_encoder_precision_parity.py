"""Precision of the T5 encoder in bfloat16 / float16 against a float32 reference with TF32 off (issue 3).

Weights: --model (any format t5core.load_encoder reads) or random T5 v1.1 weights of --size (transformers' own
init, saved once as a Hugging Face folder). Inputs: --prompt texts tokenized with --tokenizer, or random token
ids (--batch x --seq-len). The reference is our float32 encoder (SDPA); errors are over real tokens.

Default: one precision (--dtype, --fp16-scales, --fuse-norms): per-layer absmax next to float32's, the first
layer with inf/NaN, |diff| quantiles and the relative error.
--report: the issue-3 comparison on the same inputs: ours float16 with and without residual scales, ours
bfloat16, ours fp8 storage and fp8 compute (issue 17, t5core.fp8), transformers bfloat16 and float16 (its `wo`
kept in float32), "ComfyUI-style" float16 weights computed in float32 (expanded to float32, and kept in float16:
weight_dtype="float16"), and transformers float32 as a check of the reference. transformers rows need a Hugging
Face folder (random weights are one).

  python -m t5core precision --size xxl --device cuda --report --fuse-norms   # XXL, 1 x 512 random ids
  python -m t5core precision --model t5xxl_fp16.safetensors --tokenizer spiece.model --prompt "a cat" --dtype float16
"""
import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `t5core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from t5core.precision import QUANTILES, diff_quantiles, relative_error, trace_layers
from t5core.fp16_scales import Scales, parse as parse_scales
from t5core.t5_common import V1_1_PRESETS, T5Config, dtype_name, parse_dtype
from t5core.weight_load import load_encoder

PROMPTS = [
    "a cat",
    "A photograph of an astronaut riding a horse on the moon, highly detailed, 8k, dramatic lighting",
    "illustration of a nice tree on a hill at sunset, watercolor, soft pastel colors, wide angle",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--model", default=None, help="weights in any format t5core reads (default: random --size)")
    p.add_argument("--size", choices=list(V1_1_PRESETS), default=None,
                   help="random T5 v1.1 weights of this size (default: xxl on CUDA, small on CPU)")
    p.add_argument("--tokenizer", default=None, help="spiece.model / tokenizer.json / folder (default: random ids)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; needs --tokenizer)")
    p.add_argument("--batch", type=int, default=1, help="random-id rows (default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="random-id length, or the tokenizer's max_length")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="float16")
    p.add_argument("--fp16-scales", type=parse_scales, default="auto",
                   help="auto | none | calibrate | '1,1,1/2,...' (FFN-out scales per layer) (default auto)")
    p.add_argument("--fuse-norms", action="store_true", help="fold the norm scales into the projections (ours)")
    p.add_argument("--attn", choices=["sdpa", "flex"], default=None, help="ours (default: sdpa)")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--report", action="store_true", help="the issue-3 table of all precisions instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-json", default=None)


# -- random weights, transformers and tables (benchmarks/bench.py uses these too) -------------------------------------
def build_hf_reference(size: str, device, seed: int = 0):
    """transformers' own random init of a T5 v1.1 encoder (normal weights, unit norms), float32, eager attention,
    created directly on `device`."""
    from transformers import T5Config as HFT5Config, T5EncoderModel

    c = T5Config.from_name(size)
    config = HFT5Config(vocab_size=c.vocab_size, d_model=c.hidden_dim, d_kv=c.head_dim, d_ff=c.ff_dim,
                        num_layers=c.num_layers, num_heads=c.n_head, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                        layer_norm_epsilon=1e-6, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128, tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    with torch.device(device):
        model = T5EncoderModel(config)
    return model.eval()


def load_hf(folder, dtype: torch.dtype, attn: str, device):
    """transformers' own load path; float16 keeps `wo` in float32 (its _keep_in_fp32_modules)."""
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(folder, dtype=dtype, attn_implementation=attn,
                                          device_map=str(device)).eval()


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()


def free(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def short_error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def random_ids(batch: int, seq_len: int, vocab_size: int, device, seed: int) -> torch.Tensor:
    """[batch, seq_len] random ids (3 .. 32000), EOS (1) last."""
    ids = torch.randint(3, min(vocab_size, 32000), (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ids[:, -1] = 1
    return ids.to(device)


# -- inputs and forward ---------------------------------------------------------------------------------------
def prompt_inputs(args, vocab_size: int, device):
    """-> (input_ids [B, L], mask [B, L] bool or None, description)."""
    if args.tokenizer is None:
        if args.prompt:
            raise ValueError("--prompt needs --tokenizer")
        ids = random_ids(args.batch, args.seq_len, vocab_size, device, args.seed)
        return ids, None, f"random ids {args.batch} x {args.seq_len}"
    from t5core import load_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation of long prompts is expected here
        ids, mask = load_tokenizer(args.tokenizer)(args.prompt or PROMPTS, max_length=args.seq_len)
    return ids.to(device), mask.to(device), f"{len(ids)} prompts, {int(mask.sum())} tokens"


def load_model(*args, **kwargs):
    """Our nn.Module, as load_encoder loads it: the report runs its forward directly."""
    return load_encoder(*args, **kwargs).model


@torch.inference_mode()
def forward(model, ids, mask):
    """Our forward without encode()'s non-finite check: the report wants the numbers either way."""
    return model(ids, input_mask=mask)


@torch.inference_mode()
def hf_forward(model, ids, mask):
    return model(input_ids=ids, attention_mask=None if mask is None else mask.long()).last_hidden_state.float()


def compare(out, ref, mask) -> dict:
    """Errors over real tokens: relative error and |diff| quantiles."""
    if mask is not None:
        out, ref = out[mask], ref[mask]
    return {"rel_err": relative_error(out, ref), "quantiles": diff_quantiles(out, ref),
            "finite": bool(torch.isfinite(out).all())}


def first_non_finite(stats) -> str:
    return next((s.name for s in stats if not s.finite), "none")


# -- the two modes -----------------------------------------------------------------------------------------------
def layer_rows(model, ref, ids, mask) -> list[dict]:
    """Per-layer absmax of `model` next to the float32 reference, with the residual scale in effect there."""
    factors = Scales.from_config(model.config).weight_factors()
    scale = {"final_norm": 1.0}
    for i in range(model.config.num_layers):
        scale[f"layers.{i}.attn"] = factors[f"layers.{i}.attn.o_proj.weight"]
        scale[f"layers.{i}.ffn.hidden"] = 1.0  # scaling lives in ff_out, after the hidden
        scale[f"layers.{i}.ffn"] = scale[f"layers.{i}"] = factors[f"layers.{i}.ffn.ff_out.weight"]
    ref_stats = {s.name: s for s in trace_layers(ref, ids, mask)}
    return [{"name": s.name, "absmax_f32": ref_stats[s.name].absmax, "absmax": s.absmax, "scale": scale[s.name],
             "finite": s.finite} for s in trace_layers(model, ids, mask)]


def single(args, path, ids, mask, ref, ref_out, device) -> dict:
    dtype = parse_dtype(args.dtype)
    model = load_model(path, dtype, device, attn_impl=args.attn, fuse_norms=args.fuse_norms,
                         fp16_scales=args.fp16_scales)
    layers = layer_rows(model, ref, ids, mask)
    err = compare(forward(model, ids, mask), ref_out, mask)
    bad = next((r["name"] for r in layers if not r["finite"]), "none")  # trace order = execution order
    print(f"\n{dtype_name(dtype)} ({model.config.attn_impl.value}, norms {'fused' if args.fuse_norms else 'kept'}, "
          f"{scales_text(model.config)})\n")
    headers = ["layer output", "float32 absmax", f"{dtype_name(dtype)} absmax (as stored)", "residual scale", "finite"]
    print(md_table(headers,
                   [[r["name"], f"{r['absmax_f32']:.4g}", f"{r['absmax']:.4g}", f"{r['scale']:g}", str(r["finite"])]
                    for r in layers]))
    print(f"\nfirst layer with inf/NaN: {bad}\n")
    print(error_table([{"config": f"ours {dtype_name(dtype)}", **err}]))
    return {"layers": layers, "first_non_finite": bad, "errors": [err]}


def report_configs(args, path, device):
    """(name, loader, forward) for every row of the issue-3 report; the loaders run one at a time."""
    ours = dict(attn_impl=args.attn, fuse_norms=args.fuse_norms)
    return [
        ("ours fp16 + residual scales",
         lambda: load_model(path, torch.float16, device, fp16_scales=args.fp16_scales, **ours), forward),
        ("ours fp16, no scales", lambda: load_model(path, torch.float16, device, fp16_scales=None, **ours), forward),
        ("ours bf16", lambda: load_model(path, torch.bfloat16, device, **ours), forward),
        ("ours fp8 storage (bf16 compute)",
         lambda: load_model(path, torch.bfloat16, device, weight_dtype="fp8_e4m3fn", **ours), forward),
        ("ours fp8 compute (fp8_e4m3fn_fast)",  # fp8 matmuls on CUDA >= 8.9 only; elsewhere the same as storage
         lambda: load_model(path, torch.bfloat16, device, weight_dtype="fp8_e4m3fn_fast", **ours), forward),
        ("transformers bf16 (eager)", lambda: load_hf(path, torch.bfloat16, "eager", device), hf_forward),
        ("transformers fp16 (eager)", lambda: load_hf(path, torch.float16, "eager", device), hf_forward),
        ("ComfyUI-style: fp16 weights, fp32 compute",  # ComfyUI stores fp16 and computes in float32
         lambda: load_model(path, torch.float16, device, attn_impl="sdpa", fp16_scales=None)
         .set_weight_dtype(torch.float32), forward),
        ("ours fp32 on fp16 weights",  # projections kept in float16, the rest float32 (the row above rounds all);
         # on CUDA through split_linear's 16-bit matmuls
         lambda: load_model(path, torch.float32, device, attn_impl=args.attn, weight_dtype="float16"), forward),
        ("transformers fp32 (reference check)", lambda: load_hf(path, torch.float32, "eager", device), hf_forward),
    ]


def scales_text(config) -> str:
    """Residual scales in effect, as {layer: scale} for the layers that are not 1."""
    baked = Scales.from_config(config)
    attn, ffn = ({i: s for i, s in enumerate(scales) if s != 1} for scales in (baked.attn, baked.ffn))
    if not attn and not ffn:
        return "no residual scales"
    return f"residual scales: FFN-out {ffn}" + (f", attention-out {attn}" if attn else "")


def describe(model) -> str:
    """What precision a row really ran: transformers' wo dtype, our weights and scales."""
    if hasattr(model, "encoder"):  # transformers
        return f"wo {dtype_name(model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype)}"
    fp8_mm = sum(bool(getattr(m, "fp8_mm", False)) for m in model.modules())
    return (f"weights {dtype_name(model.layers[0].attn.o_proj.weight.dtype)}, {scales_text(model.config)}"
            + (f", {fp8_mm} fp8 matmuls" if model.config.weight_dtype else ""))


def report(args, path, ids, mask, ref_out, device) -> dict:
    rows = []
    for name, loader, fwd in report_configs(args, path, device):
        row = {"config": name}
        try:
            model = loader()
            row["note"] = describe(model)
            row.update(compare(fwd(model, ids, mask), ref_out, mask))
            if not row["finite"] and not hasattr(model, "encoder"):
                row["note"] += f"; first inf/NaN at {first_non_finite(trace_layers(model, ids, mask))}"
            del model
        except Exception as e:  # e.g. transformers rows on a non-Hugging-Face file
            row["error"] = short_error(e)
        free(device)
        rows.append(row)
        print(f"done: {name}", file=sys.stderr, flush=True)
    print()
    print(error_table(rows))
    return {"errors": rows}


def error_table(rows: list[dict]) -> str:
    headers = ["config", "rel err", *[f"{100 * q:g}%" for q in QUANTILES], "finite", "note"]
    out = []
    for r in rows:
        if "rel_err" not in r:
            out.append([r["config"], "", *[""] * len(QUANTILES), "", r.get("error", "")])
            continue
        out.append([r["config"], f"{r['rel_err']:.2e}", *[f"{r['quantiles'][q]:.2g}" for q in QUANTILES],
                    str(r["finite"]), r.get("note", "")])
    return md_table(headers, out)


def run(args) -> dict:
    device = torch.device(args.device)
    args.size = args.size or ("xxl" if device.type == "cuda" else "small")
    torch.backends.cuda.matmul.allow_tf32 = False  # a true float32 reference
    torch.backends.cudnn.allow_tf32 = False
    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="t5core-precision-") as tmp:
        path = args.model
        if path is None:
            path = Path(tmp) / f"t5-v1_1-{args.size}-random"
            build_hf_reference(args.size, device, args.seed).save_pretrained(path)
            free(device)
        ref = load_model(path, torch.float32, device, attn_impl="sdpa")
        ids, mask, what = prompt_inputs(args, ref.config.vocab_size, device)
        ref_out = forward(ref, ids, mask)
        print(f"## precision vs float32 (TF32 off): {args.model or 'random ' + args.size}, {what}, {device}")
        if args.report:
            del ref
            free(device)
            result = report(args, path, ids, mask, ref_out, device)
        else:
            result = single(args, path, ids, mask, ref, ref_out, device)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m t5core precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
