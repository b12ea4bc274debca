"""python -m t5core {encode, convert, embed, calibrate, precision, demo}"""
import argparse
import functools
import importlib
import sys
from pathlib import Path

from . import fp16_scales
from .t5_common import MAX_TOKENS, parse_dtype




class _Parser(argparse.ArgumentParser):
    """Bad arguments print one line, `t5core: error: argument --x: problem`, and exit with status 2."""

    def error(self, message):
        self.exit(2, f"t5core: error: {' '.join(message.split())}\n")


def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {value}")
        return value
    parse.__name__ = "integer"
    return parse


def _dtype_arg(text: str) -> str:
    """A dtype name parse_dtype knows, kept as written (it is printed as given)."""
    try:
        parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _device_arg(text: str) -> str:
    """cpu | cuda | cuda:N, and a GPU must exist for cuda."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: no such CUDA GPU here ({torch.cuda.device_count()} visible)")
    return text


def _headroom_arg(text: str) -> float:
    from .calibrate import check_headroom

    try:
        return check_headroom(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 1, got {text!r}") from None


def _scales_arg(text: str):
    """fp16_scales.parse for argparse: its message, not argparse's generic one."""
    try:
        return fp16_scales.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser, dtype_default="float32", format_flags=("--format", "--input-format")) -> None:
    p.add_argument("--dtype", type=_dtype_arg, default=dtype_default, help="float32 | bfloat16 | float16 (default %(default)s)")
    p.add_argument("--device", type=_device_arg, default="cpu", help="cpu | cuda | cuda:N (default %(default)s)")
    p.add_argument("--attn", choices=["sdpa", "flex"], default=None,
                   help="attention kernel (default: flex for a compiled UMT5 in 16 bits on CUDA, else sdpa)")
    p.add_argument("--fuse-norms", action="store_true", help="fold RMSNorm scales into the following projections")
    p.add_argument("--fp16-scales", type=_scales_arg, default="auto",
                   help="float16 residual scales: auto (saved, calibrated or preset by size), none, calibrate, "
                        "or per-layer FFN-out scales '1,1,1/2,...' (default auto)")
    p.add_argument("--subfolder", default=None, help="subfolder of a diffusers repo, e.g. text_encoder_2")
    p.add_argument("--weight-dtype", default="auto",
                   help="projection weights: auto (fp8 files stay fp8, others load in --dtype), fp8_e4m3fn, fp8_e5m2 "
                        "(fp8 with a scale per row), fp8_e4m3fn_fast (also fp8 matmuls on GPUs of compute capability "
                        ">= 8.9), --dtype's name to expand fp8 files, or with --dtype float32 float16 / bfloat16 "
                        "(16-bit weights cast to float32 in each layer) (default %(default)s)")
    p.add_argument(*format_flags, dest="input_format", choices=["auto", "dcp"], default="auto",
                   help="auto (default) detects safetensors, tensorizer and tensor-only .bin files and never reads a "
                        "distributed checkpoint; dcp reads a torch.distributed.checkpoint folder, whose .metadata is "
                        "a pickle that can run code: only for folders you trust")


def _open(args, model_path):
    """The checkpoint a command reads, opened once (headers only)."""
    from .checkpoint import open_checkpoint

    return open_checkpoint(model_path, subfolder=args.subfolder, format=args.input_format)


def _load(args, ckpt, compile: bool = False, expand: bool = False):
    """expand (convert): weights in --dtype, GGUF and fp8 files expanded, unless --weight-dtype says otherwise."""
    import t5core

    return t5core.load_encoder(ckpt, dtype=args.dtype, device=args.device, attn_impl=args.attn,
                               fuse_norms=args.fuse_norms, fp16_scales=args.fp16_scales, compile=compile,
                               weight_dtype=(args.weight_dtype or args.dtype) if expand else args.weight_dtype)


def _tokenizer_for(args, ckpt=None, folder=None):
    """--tokenizer, else the checkpoint's own (beside it or embedded) or the one in folder, else the bundled one."""
    from .tokenizer import load_tokenizer, tokenizer_in

    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    if ckpt is not None:
        return ckpt.tokenizer_or_bundled()
    return tokenizer_in(folder)


def cmd_encode(args) -> None:
    from safetensors.torch import save_file

    if not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out: the folder of {args.out} does not exist")
    ckpt = _open(args, args.model)
    tok = _tokenizer_for(args, ckpt)
    ids, mask = tok(args.prompts, max_length=args.max_length, pad_to=args.pad_to)
    model = _load(args, ckpt)
    emb = model.encode(ids, mask).float().cpu()
    save_file({"embeddings": emb.contiguous(), "input_ids": ids, "attention_mask": mask.to(ids.dtype)}, args.out)
    print(f"wrote {args.out}: embeddings {list(emb.shape)} float32, {int(mask.sum())} real tokens")


def cmd_convert(args) -> None:
    import torch

    from .fp8 import FP8_DTYPES
    from .save import check_target, is_file_target, save_encoder
    from .tokenizer import load_tokenizer

    if args.fp16_scales not in ("auto", None) and parse_dtype(args.dtype) != torch.float16:
        raise ValueError("--fp16-scales: needs --dtype float16")
    # fp8: ComfyUI's scaled fp8 file. An fp8 source keeps its bytes; others are read in --dtype and quantized once,
    # one scale per tensor, as they are written.
    fp8 = args.weight_dtype is not None and args.weight_dtype.startswith("fp8")
    if fp8 and args.weight_dtype != "fp8_e4m3fn":
        raise ValueError("convert writes ComfyUI's scaled fp8 convention, which is float8_e4m3fn: use --weight-dtype fp8_e4m3fn")
    args.format = args.format or ("safetensors" if fp8 or is_file_target(args.out_dir) else "tensorizer")
    if fp8 and args.format != "safetensors":
        raise ValueError(f"--weight-dtype {args.weight_dtype} writes a safetensors file (ComfyUI's scaled fp8), not {args.format}")
    check_target(args.out_dir, args.overwrite, args.format)  # before the model is read: refuse early, lose nothing
    if args.format == "dcp":  # under torchrun every rank writes a shard file
        from .distributed import end_process_group, init_from_env

        init_from_env("cpu" if args.device == "cpu" else None)
    ckpt = _open(args, args.src)
    if fp8:
        args.weight_dtype = "auto" if ckpt.projection_dtype() in FP8_DTYPES else args.dtype
    single = is_file_target(args.out_dir)  # one .safetensors file: weights only
    tok = None if single else load_tokenizer(args.tokenizer) if args.tokenizer else ckpt.own_tokenizer()
    model = _load(args, ckpt, expand=True)
    out = save_encoder(model.model, args.out_dir, args.format, tok, overwrite=args.overwrite, fp8=fp8)
    c = model.config
    print(f"wrote {out} ({args.format}{', scaled fp8_e4m3fn' if fp8 else ''}, {args.dtype}, "
          f"norms {'fused' if not c.elementwise_affine else 'kept'}, ffn scales {c.enc_ffn_out_scales}, tokenizer "
          f"{'not written (weights only)' if single else 'copied' if tok is not None else 'none found'})")
    if args.format == "dcp":
        end_process_group()


def cmd_calibrate(args) -> None:
    from .calibrate import calibrate_fp16_scales

    ckpt = _open(args, args.model)
    tok = _tokenizer_for(args, ckpt)
    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else None
    args.dtype, args.fp16_scales = "float32", None
    model = _load(args, ckpt)
    scales = calibrate_fp16_scales(model.model, tok, [p for p in prompts or [] if p.strip()] or None, args.headroom)
    where = fp16_scales.save_sidecar(model.source_path, scales, args.headroom)
    print(f"attention-out scales: {list(scales.attn)}\nFFN-out scales:       {list(scales.ffn)}\n"
          f"saved to {where} (used by dtype float16 loads)")


def cmd_embed(args) -> None:
    from .distributed import end_process_group, init_from_env, load_fsdp
    from .embed import EmbedSettings, embed_captions, read_captions

    if args.fsdp:
        unused = [flag for flag, given in (("--compile", args.compile), ("--attn", args.attn),
                                           ("--fuse-norms", args.fuse_norms), ("--fp16-scales", args.fp16_scales != "auto"),
                                           ("--subfolder", args.subfolder),
                                           ("--weight-dtype", args.weight_dtype != "auto")) if given]
        if unused:
            raise ValueError(f"{unused[0]}: embed --fsdp loads the dcp folder as converted: {', '.join(unused)} do not apply "
                             f"(fuse norms or scale with `convert --format dcp`)")
    settings = EmbedSettings(max_length=args.max_length, save_dtype=args.save_dtype, batch_size=args.batch_size,
                             tokens_per_batch=args.tokens_per_batch, shard_size=args.shard_size)
    rank, world, device = init_from_env(args.device)
    captions = read_captions(args.captions)
    if not captions:
        raise ValueError(f"--captions: {args.captions} has no captions (only blank lines)")
    if args.fsdp:
        tok = _tokenizer_for(args, folder=args.model)
        model = load_fsdp(args.model, args.dtype, device)
    else:
        ckpt = _open(args, args.model)
        tok = _tokenizer_for(args, ckpt)
        args.device = str(device)
        model = _load(args, ckpt, compile=args.compile)
    written = []

    def progress(path):
        written.append(path)
        print(f"rank {rank}/{world}: wrote {path}", flush=True)

    shards = embed_captions(model, tok, captions, args.out, rank, world, settings, on_shard=progress)
    print(f"rank {rank}/{world}: {len(shards)} shards in {args.out} ({len(shards) - len(written)} were already there)")
    del model  # before the process group it may hold (end_process_group)
    end_process_group()


def main(argv=None) -> None:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of one line")
    parser = _Parser(prog="python -m t5core", description=__doc__, parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser = functools.partial(sub.add_parser, parents=[debug])

    p = sub.add_parser("encode", help="encode prompts to a .safetensors file of embeddings")
    p.add_argument("--model", required=True, help="weights: HF/diffusers folder, ComfyUI file, GGUF file, or tensorizer folder")
    p.add_argument("--tokenizer", default=None, help="spiece.model, tokenizer.json or a folder (default: beside the model)")
    p.add_argument("--max-length", type=_int_in(1, MAX_TOKENS), default=512,
                   help=f"truncate longer prompts, with a warning (default 512, at most {MAX_TOKENS})")
    p.add_argument("--pad-to", type=_int_in(1, MAX_TOKENS), default=None,
                   help=f"pad every prompt to this many tokens (at most {MAX_TOKENS})")
    p.add_argument("--out", required=True, help="output .safetensors: embeddings [B,L,D] float32, input_ids, attention_mask")
    p.add_argument("prompts", nargs="+")
    _add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("convert", help="rewrite a checkpoint as a tensorizer, Hugging Face or distributed-checkpoint folder")
    p.add_argument("src")
    p.add_argument("out_dir", help="a folder, or a file named *.safetensors (weights only, as ComfyUI's text_encoders "
                                   "files)")
    p.add_argument("--format", choices=["tensorizer", "safetensors", "dcp"], default=None,
                   help="tensorizer (enc.tensors), safetensors (Hugging Face folder; with --weight-dtype fp8_e4m3fn "
                        "a model.safetensors in ComfyUI's scaled fp8 convention) or dcp (torch.distributed.checkpoint, "
                        "for t5core.distributed.load_fsdp) (default tensorizer, or safetensors for fp8 or a "
                        "*.safetensors OUT_DIR)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to copy (default: the one beside SRC, if any)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model files already in OUT_DIR (default: refuse); weight files of other "
                        "formats left there are removed once the new files are complete")
    _add_model_args(p, format_flags=("--input-format",))
    p.set_defaults(func=cmd_convert, weight_dtype=None)  # None: weights saved in --dtype

    p = sub.add_parser("embed", help="embed a caption file, split across the ranks of torchrun (or one process)")
    p.add_argument("--model", required=True, help="weights in any supported format; with --fsdp a dcp folder")
    p.add_argument("--captions", required=True, help="text file, one caption a line (blank lines skipped)")
    p.add_argument("--out", required=True, help="folder for manifest.json and shard-RANK-NUMBER.safetensors files; "
                   "rerunning the same command resumes an interrupted run")
    p.add_argument("--tokens-per-batch", type=_int_in(1, 1 << 20), default=8192,
                   help="padded tokens per batch: short captions go in big batches, long ones in small (default %(default)s)")
    p.add_argument("--batch-size", type=_int_in(1, 65536), default=None,
                   help="at most this many captions a batch (default: as many as --tokens-per-batch allows)")
    p.add_argument("--shard-size", type=_int_in(1, 1 << 24), default=4096,
                   help="captions per shard file (default %(default)s)")
    p.add_argument("--max-length", type=_int_in(1, MAX_TOKENS), default=512,
                   help=f"truncate longer captions, with a warning (default 512, at most {MAX_TOKENS})")
    p.add_argument("--save-dtype", type=_dtype_arg, default="float16", help="dtype of the saved embeddings (default %(default)s)")
    p.add_argument("--fsdp", action="store_true", help="shard the weights over the ranks (FSDP2) instead of a "
                   "copy per rank; --model must then be a dcp folder (convert --format dcp)")
    p.add_argument("--compile", action="store_true", help="compile the encoder (not with --fsdp)")
    p.add_argument("--tokenizer", default=None)
    _add_model_args(p, dtype_default="bfloat16")
    p.set_defaults(func=cmd_embed, device=None)  # torchrun: cuda:LOCAL_RANK when there are GPUs, else cpu

    p = sub.add_parser("calibrate", help="find float16 residual scales with headroom and save them beside the model")
    p.add_argument("model")
    p.add_argument("--prompts", default=None, help="text file, one prompt a line (default: a built-in varied set)")
    p.add_argument("--headroom", type=_headroom_arg, default=4.0,
                   help="keep activations this many times below 65504 (a finite number >= 1; default 4)")
    p.add_argument("--tokenizer", default=None)
    _add_model_args(p)
    p.set_defaults(func=cmd_calibrate)

    for name, module, help_ in (("precision", "t5core.scripts.t5_encoder_precision_parity", "per-layer absmax and error vs float32"),
                                ("demo", "t5core.demo", "build, save, load, tokenize, encode and check a small model")):
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # CheckpointError, bad arguments, missing files: one line, not a traceback
        if getattr(args, "debug", False):
            raise
        print(f"t5core: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
