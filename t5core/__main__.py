"""python -m t5core {encode, convert, embed, calibrate, precision, bench, demo}"""
import argparse
import importlib
import sys
from pathlib import Path

from . import fp16_scales
from .t5_common import parse_dtype


def _add_model_args(p: argparse.ArgumentParser, dtype_default="float32") -> None:
    p.add_argument("--dtype", default=dtype_default, help="float32 | bfloat16 | float16 (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default %(default)s)")
    p.add_argument("--attn", choices=["sdpa", "flex"], default=None, help="attention kernel (default: sdpa)")
    p.add_argument("--fuse-norms", action="store_true", help="fold RMSNorm scales into the following projections")
    p.add_argument("--fp16-scales", type=fp16_scales.parse, default="auto",
                   help="float16 residual scales: auto (saved, calibrated or preset by size), none, calibrate, "
                        "per-layer FFN-out scales '1,1,1/2,...' or 'ATTN;FFN' (default auto)")
    p.add_argument("--subfolder", default=None, help="subfolder of a diffusers repo, e.g. text_encoder_2")


def _load(args, model_path, compile: bool = False, expand: bool = False):
    """expand: GGUF weights dequantized at load (to save them), not kept compressed."""
    import t5core

    return t5core.load_encoder(model_path, dtype=args.dtype, device=args.device, attn_impl=args.attn,
                               fuse_norms=args.fuse_norms, fp16_scales=args.fp16_scales, compile=compile,
                               subfolder=args.subfolder, weight_dtype=args.dtype if expand else None)


def _tokenizer_for(args, ckpt_path):
    from .tokenizer import BUNDLED_SPIECE, find_tokenizer, load_tokenizer

    from .checkpoint import open_checkpoint

    path = args.tokenizer or find_tokenizer(Path(ckpt_path) / (args.subfolder or ""))
    if path is None:  # one carried in the file (GGUF tokenizer.ggml.* fields, a ComfyUI file's spiece_model)?
        path = open_checkpoint(ckpt_path, subfolder=args.subfolder).tokenizer_bytes
    if path is None:
        print(f"no tokenizer beside {ckpt_path}; using the bundled T5 tokenizer", file=sys.stderr)
        path = BUNDLED_SPIECE
    return load_tokenizer(path)


def cmd_encode(args) -> None:
    from safetensors.torch import save_file

    tok = _tokenizer_for(args, args.model)
    ids, mask = tok(args.prompts, max_length=args.max_length, pad_to=args.pad_to)
    model = _load(args, args.model)
    emb = model.encode(ids, mask).float().cpu()
    save_file({"embeddings": emb.contiguous(), "input_ids": ids, "attention_mask": mask.to(ids.dtype)}, args.out)
    print(f"wrote {args.out}: embeddings {list(emb.shape)} float32, {int(mask.sum())} real tokens")


def cmd_convert(args) -> None:
    from .checkpoint import open_checkpoint
    from .save import save_encoder
    from .tokenizer import load_tokenizer

    if args.fp16_scales not in ("auto", None) and args.dtype not in ("float16", "fp16"):
        raise SystemExit("--fp16-scales needs --dtype float16")
    if args.format == "dcp":  # under torchrun every rank writes a shard file
        from .distributed import end_process_group, init_from_env

        init_from_env("cpu" if args.device == "cpu" else None)
    ckpt = open_checkpoint(args.src, subfolder=args.subfolder)
    tok_src = args.tokenizer or ckpt.tokenizer or ckpt.tokenizer_bytes
    model = _load(args, args.src, expand=True)
    out = save_encoder(model.model, args.out_dir, args.format, load_tokenizer(tok_src) if tok_src is not None else None)
    c = model.config
    print(f"wrote {out} ({args.format}, {args.dtype}, norms {'fused' if not c.elementwise_affine else 'kept'}, "
          f"ffn scales {c.enc_ffn_out_scales}, tokenizer {'copied' if tok_src is not None else 'none found'})")
    if args.format == "dcp":
        end_process_group()


def cmd_calibrate(args) -> None:
    from .calibrate import calibrate_fp16_scales

    tok = _tokenizer_for(args, args.model)
    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else None
    args.dtype, args.fp16_scales = "float32", None
    model = _load(args, args.model)
    scales = calibrate_fp16_scales(model.model, tok, [p for p in prompts or [] if p.strip()] or None, args.headroom)
    where = fp16_scales.save_sidecar(model.source_path, scales, args.headroom)
    print(f"attention-out scales: {list(scales.attn)}\nFFN-out scales:       {list(scales.ffn)}\n"
          f"saved to {where} (used by dtype float16 loads)")


def cmd_embed(args) -> None:
    from .distributed import embed_captions, end_process_group, init_from_env, load_fsdp, read_captions

    if args.fsdp:
        unused = [flag for flag, given in (("--compile", args.compile), ("--attn", args.attn),
                                           ("--fuse-norms", args.fuse_norms), ("--fp16-scales", args.fp16_scales != "auto"),
                                           ("--subfolder", args.subfolder)) if given]
        if unused:
            raise SystemExit(f"embed --fsdp loads the dcp folder as converted: {', '.join(unused)} do not apply "
                             f"(fuse norms or scale with `convert --format dcp`)")
    rank, world, device = init_from_env(args.device)
    captions = read_captions(args.captions)
    tok = _tokenizer_for(args, args.model)
    if args.fsdp:
        model = load_fsdp(args.model, args.dtype, device)
    else:
        args.device = str(device)
        model = _load(args, args.model, compile=args.compile)
    path = embed_captions(model, tok, captions, args.out, rank, world, args.batch_size, args.max_length,
                          parse_dtype(args.save_dtype))
    print(f"rank {rank}/{world}: wrote {path}")
    end_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m t5core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("encode", help="encode prompts to a .safetensors file of embeddings")
    p.add_argument("--model", required=True, help="weights: HF/diffusers folder, ComfyUI file, GGUF file, or tensorizer folder")
    p.add_argument("--tokenizer", default=None, help="spiece.model, tokenizer.json or a folder (default: beside the model)")
    p.add_argument("--max-length", type=int, default=512, help="truncate longer prompts, with a warning (default 512)")
    p.add_argument("--pad-to", type=int, default=None, help="pad every prompt to this many tokens")
    p.add_argument("--out", required=True, help="output .safetensors: embeddings [B,L,D] float32, input_ids, attention_mask")
    p.add_argument("prompts", nargs="+")
    _add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("convert", help="rewrite a checkpoint as a tensorizer, Hugging Face or distributed-checkpoint folder")
    p.add_argument("src")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=["tensorizer", "safetensors", "dcp"], default="tensorizer",
                   help="tensorizer (enc.tensors), safetensors (Hugging Face folder) or dcp (torch.distributed.checkpoint, "
                        "for t5core.distributed.load_fsdp) (default %(default)s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to copy (default: the one beside SRC, if any)")
    _add_model_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("embed", help="embed a caption file, split across the ranks of torchrun (or one process)")
    p.add_argument("--model", required=True, help="weights in any supported format; with --fsdp a dcp folder")
    p.add_argument("--captions", required=True, help="text file, one caption a line (blank lines skipped)")
    p.add_argument("--out", required=True, help="folder for embeddings-RANK-of-WORLD.safetensors files")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512, help="truncate longer captions, with a warning")
    p.add_argument("--save-dtype", default="float16", help="dtype of the saved embeddings (default %(default)s)")
    p.add_argument("--fsdp", action="store_true", help="shard the weights over the ranks (FSDP2) instead of a "
                   "copy per rank; --model must then be a dcp folder (convert --format dcp)")
    p.add_argument("--compile", action="store_true", help="compile the encoder (not with --fsdp)")
    p.add_argument("--tokenizer", default=None)
    _add_model_args(p, dtype_default="bfloat16")
    p.set_defaults(func=cmd_embed, device=None)  # torchrun: cuda:LOCAL_RANK when there are GPUs, else cpu

    p = sub.add_parser("calibrate", help="find float16 residual scales with headroom and save them beside the model")
    p.add_argument("model")
    p.add_argument("--prompts", default=None, help="text file, one prompt a line (default: a built-in varied set)")
    p.add_argument("--headroom", type=float, default=4.0, help="keep activations this many times below 65504")
    p.add_argument("--tokenizer", default=None)
    _add_model_args(p)
    p.set_defaults(func=cmd_calibrate)

    for name, module, help_ in (("precision", "t5core.scripts.t5_encoder_precision_parity", "per-layer absmax and error vs float32"),
                                ("bench", "t5core.bench", "speed vs transformers (CUDA; --size small on CPU)"),
                                ("demo", "t5core.demo", "build, save, load, tokenize, encode and check a small model")):
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and bad arguments: a message, not a traceback
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
