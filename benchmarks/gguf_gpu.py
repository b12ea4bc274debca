"""GGUF encoders kept compressed on the GPU: memory after load, speed at 1x512 and error, against our bfloat16.

For each type (--types) one random T5 v1.1 encoder of the chosen size is written as a GGUF file:
  Q8_0  random float32 weights quantized with torch (per 32 values: an fp16 scale absmax/127 and int8 codes);
  Q2_K..Q6_K  random blocks with sane fp16 scales (sub-block scales, mins and codes at random);
  Q4_K_M, Q5_K_M    Q4_K / Q5_K with attn_v and ffn_down in Q6_K in half the layers, as llama.cpp's _M recipe;
norms and relative-attention tables in F32, as llama.cpp writes them. Then, on --device:
  compressed  t5core.load_encoder(file, dtype=bfloat16, compile=...): the product path, blocks kept (on CUDA the
              blocks expand through t5core.gguf_kernels; --variants torch times the torch code beside it);
  bf16        the same weights dequantized once into a plain bfloat16 model (what weight_dtype="bf16" loads;
              built here from the blocks on the device, which is faster than expanding through the file);
  reference   the same weights dequantized into float32, run eagerly with TF32 off.
Reported per type: memory_allocated after the compressed load (GB, the model alone) and its peak while encoding,
median ms at 1 x 512 (CUDA events on CUDA; compiled = regional compile + CUDA graphs, as load_encoder(compile=True)),
and relative error of compressed and bf16 vs the reference; for Q8_0 also the file's own quantization error (the
reference against the float32 model of the unquantized weights the file was made from). Targets (issue 18, XXL on an H200): Q8_0 <= 5.6 GB,
Q5_K_M <= 4.0 GB, compressed within 1.5x of bf16's ms, Q8_0 error <= bf16 error, and compressed at least 3x faster
than ComfyUI-GGUF's own forward on the same file. Markdown tables last.

With --comfyui DIR --comfyui-gguf DIR (a ComfyUI checkout and city96's ComfyUI-GGUF source), the same file is also
loaded and run by ComfyUI-GGUF, in this process, as a ComfyUI user runs it: ComfyUI's modules set up as
`python main.py` sets them up (no server; --cpu for a CPU device), ComfyUI-GGUF loaded by ComfyUI's own custom-node
loader (nodes.load_custom_node), the file found through folder_paths by its CLIPLoaderGGUF node (`load_clip`, type
sd3: ComfyUI's T5XXLModel without attention mask, the T5 that Flux's DualCLIPLoader builds too; GGMLOps as custom
operations, GGUFModelPatcher), put on the device by ComfyUI's model_management (load_models_gpu, fully loaded), all
under torch.inference_mode as ComfyUI's executor runs nodes. Timed, interleaved with ours (median, CUDA events,
two warm-up calls each):
  ComfyUI-GGUF encode   clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True), what CLIPTextEncode
                        runs after tokenizing: the model-management check, ComfyUI's T5 (float32 activations, each
                        weight dequantized on the fly, as ComfyUI-GGUF does), the copy to ComfyUI's intermediate
                        device (the CPU) included; tokens = the same 1 x L ids, each of weight 1.0;
  its forward           its T5 forward alone (SDClipModel.forward on those tokens), output left on the device.
Also its error vs the float32 reference and the memory it holds on the device after loading (memory_allocated).
ComfyUI's T5 needs XXL's width and 24 layers to be detected, so --comfyui takes --size xxl or xxl-thin (XXL's
width and depth, few heads and a narrow FFN, told to ComfyUI through its t5xxl_model_config option: the CPU check).
`av` and `torchvision`, which ComfyUI imports for video and image models only, are replaced by stand-in packages
when they do not import (tools/comfy_standins.py; logged).

  python benchmarks/gguf_gpu.py                                   # XXL on CUDA, Q8_0 and Q5_K_M, compiled
  python benchmarks/gguf_gpu.py --comfyui .comfy/ComfyUI --comfyui-gguf .comfy/ComfyUI-GGUF   # + ComfyUI-GGUF
  python benchmarks/gguf_gpu.py --size tiny --device cpu --eager  # a check that it runs, on the CPU
  python benchmarks/gguf_gpu.py --size xxl-thin --device cpu --eager --tokens 32 --reps 3 \
      --comfyui .comfy/ComfyUI --comfyui-gguf .comfy/ComfyUI-GGUF   # the CPU check of the ComfyUI-GGUF path
"""
import argparse
import asyncio
import gc
import logging
import shlex
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tools"))

import t5core  # noqa: E402
from comfy_standins import write_standins  # noqa: E402  (tools/)
from fp8_gpu import timer  # noqa: E402  (this folder is on sys.path when the script runs)
from t5core.gguf import PackedEmbedding, PackedLinear, PackedWeight, open_gguf  # noqa: E402
from t5core.precision import relative_error  # noqa: E402
from t5core.runtime import Encoder  # noqa: E402
from t5core.weight_load import build_empty  # noqa: E402

SIZES = {  # vocab, d_model, layers, heads, d_kv, d_ff
    "xxl": (32128, 4096, 24, 64, 64, 10240),
    "xxl-thin": (512, 4096, 24, 2, 128, 256),  # what ComfyUI detects as T5-XXL (width, depth), small elsewhere
    "tiny": (512, 256, 2, 4, 64, 512),
}


def q8_0_blocks(w: torch.Tensor) -> np.ndarray:
    """float32 [R, C] -> Q8_0 bytes [R, C / 32 * 34]: per 32 values d = absmax / 127 (fp16), codes round(w / d)."""
    R, C = w.shape
    b = w.view(R, C // 32, 32)
    d = (b.abs().amax(-1, keepdim=True) / 127).half()
    q = torch.where(d == 0, 0, (b / d.float()).round()).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], -1).reshape(R, -1).cpu().numpy()


# Random K-type blocks: (bytes per block, the std of a value's integer part (scale times code, less min times mins)
# when the scale bytes and codes are uniform random: d = std / that, the mean code: dmin = d times it, so values
# center on 0; where d and dmin lie in the block)
K_BLOCKS = {"Q4_K": (144, 245, 7.5, 0, 2), "Q5_K": (176, 513, 15.5, 0, 2), "Q6_K": (210, 1366, None, 208, None),
            "Q3_K": (110, 43, None, 108, None), "Q2_K": (84, 14, 1.5, 80, 82)}
TYPES = ("Q8_0", *K_BLOCKS, "Q4_K_M", "Q5_K_M")


def k_blocks(qtype: str, rows: int, cols: int, std: float, gen: torch.Generator, device) -> np.ndarray:
    """Random bytes of a K type [R, C / 256 * size] whose values have about `std` and mean 0: the float16 fields
    (d, and dmin where the type has one) set so that the random scales, mins and codes spread like that."""
    size, spread, mean_code, d_at, dmin_at = K_BLOCKS[qtype]
    nb = cols // 256
    b = torch.randint(0, 256, (rows, nb, size), dtype=torch.uint8, generator=gen, device=device)
    d = torch.full((rows, nb, 1), std / spread, dtype=torch.float16, device=device)
    b[..., d_at:d_at + 2] = d.view(torch.uint8)
    if dmin_at is not None:
        b[..., dmin_at:dmin_at + 2] = (d * mean_code).view(torch.uint8)
    return b.reshape(rows, -1).cpu().numpy()


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down a _M file keeps in Q6_K (the first and last
    eighth, and every third between)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def write_file(path: Path, size: str, qtype: str, device, seed: int = 0, keep: Optional[dict] = None) -> None:
    """keep: a dict that receives Q8_0's unquantized float32 matrices by GGUF name (K types are random blocks,
    with no unquantized original)."""
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

    def matrix(name: str, rows: int, cols: int, std: float, q6_k: bool = False) -> None:
        if qtype == "Q8_0":
            w = torch.randn(rows, cols, generator=gen, device=device) * std
            writer.add_tensor(name, q8_0_blocks(w), raw_dtype=T.Q8_0)
            if keep is not None:
                keep[name] = w
        else:
            q = "Q6_K" if q6_k and qtype.endswith("_M") else qtype.removesuffix("_M")
            writer.add_tensor(name, k_blocks(q, rows, cols, std, gen, device), raw_dtype=T[q])

    def vector(name: str, *shape: int, mean: float, std: float) -> None:
        writer.add_tensor(name, (mean + std * torch.randn(*shape, generator=gen, device=device)).cpu().numpy())

    matrix("token_embd.weight", vocab, d, 1.0)
    vector("enc.output_norm.weight", d, mean=1.0, std=0.1)
    for i in range(layers):
        b = f"enc.blk.{i}."
        for part in ("attn_q", "attn_k", "attn_v"):  # T5 folds 1/sqrt(d_kv) into its queries: so does this init
            matrix(b + part + ".weight", inner, d, d ** -0.5 * (dkv ** -0.5 if part == "attn_q" else 1.0),
                   q6_k=part == "attn_v" and more_bits(i, layers))
        matrix(b + "attn_o.weight", d, inner, inner ** -0.5)
        matrix(b + "ffn_gate.weight", ff, d, d ** -0.5)
        matrix(b + "ffn_up.weight", ff, d, d ** -0.5)
        matrix(b + "ffn_down.weight", d, ff, ff ** -0.5, q6_k=more_bits(i, layers))
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


@torch.no_grad()
def unquantized(reference: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """The float32 `reference` (the file's weights dequantized) with every matrix replaced, in place, by the
    unquantized original write_file kept (q|k|v and gate|up fused as t5core fuses them; the same norms)."""
    reference.vocab_embed.weight.copy_(keep.pop("token_embd.weight"))
    for i, layer in enumerate(reference.layers):
        w = {part: keep.pop(f"enc.blk.{i}.{part}.weight") for part in
             ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")}
        layer.attn.qkv_proj.weight.copy_(torch.cat([w["attn_q"], w["attn_k"], w["attn_v"]]))
        layer.attn.o_proj.weight.copy_(w["attn_o"])
        layer.ffn.ff_in.weight.copy_(torch.cat([w["ffn_gate"], w["ffn_up"]]))
        layer.ffn.ff_out.weight.copy_(w["ffn_down"])
    return reference


# --------------------------------------------------------------------------------------------------
# Variants of the compressed path (--variants), to time beside it
# --------------------------------------------------------------------------------------------------
VARIANTS = {"torch": "the blocks expanded by t5core.gguf's torch code (t5core.gguf_kernels' Triton kernel off)",
            "q8-torch": "one-type Q8_0 planes expanded by the torch code, not gguf_kernels.expand_q8_0_planes"}


def load_variant(path: Path, variant: str, device, eager: bool) -> Encoder:
    """The compressed encoder as load_encoder gives it, changed as VARIANTS[variant] says."""
    enc = t5core.load_encoder(path, dtype="bfloat16", device=device, compile=False)
    for m in enc.model.modules():
        if isinstance(m, PackedWeight) and (variant == "torch" or m.planar):
            m.use_kernel = False
    if not eager:
        enc.compile()
    return enc


def dequant_only(model: nn.Module, eager: bool) -> Callable[[], object]:
    """A call that does only what the layers do before their matmuls: every projection weight of `model`
    dequantized, times its residual scale, rounded to bfloat16 (compiled per layer, as the layers are; no CUDA
    graph): the dequantization's share of an encode."""
    def weights(*modules):
        return tuple(m.packed(torch.bfloat16, m.scale) for m in modules)

    fn = weights if eager else torch.compile(weights, dynamic=False)
    groups = [[m for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.ffn.ff_in, layer.ffn.ff_out)
               if isinstance(m, PackedLinear)] for layer in model.layers]

    def call():
        with torch.inference_mode():
            for group in groups:
                fn(*group)

    return call


def timed(calls: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median ms of each call, interleaved (one of each per round, so drift and clocks hit all alike), after two
    warm-up calls each (compiling, capturing CUDA graphs, ComfyUI's first load)."""
    for call in calls.values():
        for _ in range(2):
            call()
    ms = timer(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            times[name].append(ms(call))
    return {name: statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------------
# ComfyUI-GGUF, run by ComfyUI in this process
# --------------------------------------------------------------------------------------------------
def import_comfyui(comfyui: Path, gguf_nodes: Path, cpu: bool, extra_args: str) -> types.SimpleNamespace:
    """ComfyUI's modules, set up as `python main.py [--cpu] EXTRA` sets them up (its argument parser), and
    ComfyUI-GGUF loaded by ComfyUI's custom-node loader. -> namespace of mm (comfy.model_management), sd
    (comfy.sd), folder_paths, CLIPLoaderGGUF (the node class as ComfyUI registered it)."""
    for path in (comfyui / "comfy" / "sd.py", gguf_nodes / "nodes.py"):
        if not path.is_file():
            raise SystemExit(f"--comfyui / --comfyui-gguf: {path} not found")
    stubs = Path(tempfile.mkdtemp(prefix="comfy_standins_"))
    if written := write_standins(stubs, sys.path):
        print(f"ComfyUI: no importable {' or '.join(written)} here: stand-in packages (ComfyUI imports them for "
              f"video and image models, never for T5)", flush=True)
        sys.path.insert(0, str(stubs))
    sys.path.insert(0, str(comfyui.resolve()))  # first: ComfyUI's nodes.py, not this repository's nodes/ package
    argv, sys.argv = sys.argv, ["main.py", *(["--cpu"] if cpu else []), *shlex.split(extra_args)]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # (parses sys.argv as main.py would)
    finally:
        sys.argv = argv
    logging.basicConfig(level=logging.WARNING)
    import comfy.model_management
    import comfy.sd
    import folder_paths

    import nodes  # ComfyUI's nodes.py

    if not asyncio.run(nodes.load_custom_node(str(gguf_nodes.resolve()))) \
            or "CLIPLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
        raise SystemExit(f"ComfyUI could not load {gguf_nodes} as a custom node (its log above says why)")
    return types.SimpleNamespace(mm=comfy.model_management, sd=comfy.sd, folder_paths=folder_paths,
                                 CLIPLoaderGGUF=nodes.NODE_CLASS_MAPPINGS["CLIPLoaderGGUF"])


def comfy_gguf_clip(comfy: types.SimpleNamespace, path: Path, size: str):
    """The CLIP ComfyUI-GGUF's CLIPLoaderGGUF node returns for `path` (type sd3), loaded fully onto ComfyUI's text
    encoder device by its model_management. For sizes other than xxl, ComfyUI is told the T5's heads, head width,
    FFN width and vocabulary through the t5xxl_model_config model option (which the node does not set: added on
    the way into comfy.sd.load_text_encoder_state_dicts, the function it calls)."""
    comfy.folder_paths.add_model_folder_path("text_encoders", str(path.parent.resolve()), is_default=True)
    load_state_dicts = comfy.sd.load_text_encoder_state_dicts
    if size != "xxl":
        vocab, _, _, heads, dkv, ff = SIZES[size]
        config = {"num_heads": heads, "d_kv": dkv, "d_ff": ff, "vocab_size": vocab}

        def with_config(*args, model_options=None, **kwargs):
            return load_state_dicts(*args, model_options={**(model_options or {}), "t5xxl_model_config": config},
                                    **kwargs)

        comfy.sd.load_text_encoder_state_dicts = with_config
    try:
        (clip,) = comfy.CLIPLoaderGGUF().load_clip(path.name, type="sd3")
    finally:
        comfy.sd.load_text_encoder_state_dicts = load_state_dicts
    comfy.mm.load_models_gpu([clip.patcher], force_full_load=True)
    return clip


def comfy_encode(clip, tokens):
    with torch.inference_mode():
        return clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)


def comfy_forward(t5, ids: list[list[int]]):
    """What encode_token_weights runs of the T5 for unweighted tokens: SDClipModel.forward on the ids."""
    with torch.inference_mode():
        return t5(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="xxl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--types", default="Q8_0,Q5_K_M", help="comma-separated, of: " + ", ".join(TYPES)
                   + " (default %(default)s)")
    p.add_argument("--eager", action="store_true", help="time uncompiled (the CPU check)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=512, help="prompt length (default %(default)s)")
    p.add_argument("--dir", default=None, help="where the GGUF files go (default: a temporary folder)")
    p.add_argument("--variants", default="", help=f"comma-separated, timed beside the compressed path: "
                   f"{', '.join(VARIANTS)} (default none)")
    p.add_argument("--dequant", action="store_true", help="also time the dequantization alone (all layers' "
                   "weights to bf16, no matmul) of the compressed path and of each variant")
    p.add_argument("--comfyui", type=Path, default=None, help="a ComfyUI checkout: also time ComfyUI-GGUF")
    p.add_argument("--comfyui-gguf", type=Path, default=None, help="city96's ComfyUI-GGUF source folder")
    p.add_argument("--comfyui-args", default="", help="more ComfyUI command-line options, e.g. '--fp32-text-enc'")
    args = p.parse_args()
    if (args.comfyui is None) != (args.comfyui_gguf is None):
        p.error("--comfyui and --comfyui-gguf go together")
    if args.comfyui is not None and args.size not in ("xxl", "xxl-thin"):
        p.error("ComfyUI detects T5-XXL by its width and depth: --comfyui needs --size xxl or xxl-thin")
    for t in args.types.split(","):
        if t not in TYPES:
            p.error(f"--types: unknown {t!r}; known: {', '.join(TYPES)}")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    comfy = import_comfyui(args.comfyui, args.comfyui_gguf, not cuda, args.comfyui_args) if args.comfyui else None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    folder = Path(args.dir or tempfile.mkdtemp(prefix="gguf_gpu_"))
    vocab = SIZES[args.size][0]
    ids = torch.randint(3, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if cuda else 'CPU'}, size {args.size}, "
          f"1x{args.tokens}, {'eager' if args.eager else 'compiled'}", flush=True)
    rows, comfy_rows, variant_rows = [], [], []
    for qtype in args.types.split(","):
        t0 = time.perf_counter()
        path = folder / f"t5-{args.size}-{qtype}.gguf"
        keep = {} if qtype == "Q8_0" else None  # the unquantized matrices: the file's own error
        write_file(path, args.size, qtype, device, keep=keep)
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
            err_file = relative_error(want, unquantized(reference, keep)(ids)) if keep else float("nan")
        del reference, keep
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        out = compressed.encode(ids)
        peak_gb = (torch.cuda.max_memory_allocated(device) - before) / 1e9 if cuda else float("nan")
        err_c, err_b = relative_error(out, want), relative_error(bf16.encode(ids), want)
        calls = {"compressed": partial(compressed.encode, ids), "bf16": partial(bf16.encode, ids)}
        variant_info = {}
        if args.dequant:
            calls["compressed dequant"] = dequant_only(compressed.model, args.eager)
        for v in variants:
            before = torch.cuda.memory_allocated(device) if cuda else 0
            t0 = time.perf_counter()
            enc = load_variant(path, v, device, args.eager)
            v_gb = ((torch.cuda.memory_allocated(device) - before) if cuda else
                    sum(t.numel() * t.element_size() for t in [*enc.model.parameters(), *enc.model.buffers()])) / 1e9
            t1 = time.perf_counter()
            err_v = relative_error(enc.encode(ids), want)  # the first call compiles
            variant_info[v] = (v_gb, err_v)
            print(f"{qtype}: variant {v}: loaded in {t1 - t0:.1f} s, {v_gb:.2f} GB, first call (compiling) "
                  f"{time.perf_counter() - t1:.1f} s, error {err_v:.2e}", flush=True)
            calls[v] = partial(enc.encode, ids)
            if args.dequant:
                calls[v + " dequant"] = dequant_only(enc.model, args.eager)
        clip = None
        if comfy is not None:
            with torch.inference_mode():  # as ComfyUI's executor runs every node
                before = torch.cuda.memory_allocated(device) if cuda else 0
                t0 = time.perf_counter()
                clip = comfy_gguf_clip(comfy, path, args.size)
                c_load_s = time.perf_counter() - t0
                c_gb = (torch.cuda.memory_allocated(device) - before) / 1e9 if cuda else float("nan")
                loaded, size = clip.patcher.loaded_size() / 1e9, clip.patcher.model_size() / 1e9
                t5 = clip.cond_stage_model.t5xxl
                tokens = {"l": [], "g": [], "t5xxl": [[(int(t), 1.0) for t in ids[0].tolist()]]}
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                cond = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)["cond"]
                c_peak = (torch.cuda.max_memory_allocated(device) - before) / 1e9 if cuda else float("nan")
                err_g = relative_error(cond.to(want.device), want)
            calls.update({"ComfyUI-GGUF encode": partial(comfy_encode, clip, tokens),
                          "its forward": partial(comfy_forward, t5, [[t for t, _ in tokens["t5xxl"][0]]])})
            print(f"{qtype}: ComfyUI-GGUF loaded in {c_load_s:.1f} s, {c_gb:.2f} GB on the device (its patcher: "
                  f"{loaded:.2f} of {size:.2f} GB loaded), encode peak +{c_peak:.2f} GB, error {err_g:.2e}; cond "
                  f"{tuple(cond.shape)} {cond.dtype} on {cond.device}", flush=True)
        ms = timed(calls, args.reps, device)
        ms_c, ms_b = ms["compressed"], ms["bf16"]
        if args.dequant:
            print(f"{qtype}: dequantization alone: " + ", ".join(f"{k.removesuffix(' dequant')} {v:.2f} ms"
                                                                 for k, v in ms.items() if k.endswith(" dequant")),
                  flush=True)
        rows.append((qtype, file_gb, model_gb, peak_gb, load_s, ms_c, ms_b, err_c, err_b, err_file))
        print(f"{qtype}: model {model_gb:.2f} GB, encode peak +{peak_gb:.2f} GB, {ms_c:.2f} ms vs bf16 {ms_b:.2f} ms, "
              f"error {err_c:.2e} vs bf16 {err_b:.2e}; the file's own quantization error {err_file:.2e}", flush=True)
        for v, (v_gb, err_v) in variant_info.items():
            dq = f"{ms[v + ' dequant']:.2f} / {ms['compressed dequant']:.2f}" if args.dequant else "-"
            variant_rows.append((qtype, v, v_gb, ms[v], ms_c, ms_b, err_v, dq))
            print(f"{qtype}: variant {v}: {ms[v]:.2f} ms ({ms[v] / ms_b:.2f}x bf16, {ms[v] / ms_c:.2f}x compressed)",
                  flush=True)
        if clip is not None:
            ms_g, ms_f = ms["ComfyUI-GGUF encode"], ms["its forward"]
            comfy_rows.append((qtype, c_gb, c_peak, c_load_s, ms_c, ms_g, ms_f, err_c, err_g))
            print(f"{qtype}: ComfyUI-GGUF encode {ms_g:.2f} ms, its forward {ms_f:.2f} ms: ours {ms_g / ms_c:.2f}x "
                  f"/ {ms_f / ms_c:.2f}x faster", flush=True)
            comfy.mm.unload_all_models()
            del clip, t5, cond
        del compressed, bf16, out, want, calls
        enc = None
        gc.collect()
        if comfy is not None:
            comfy.mm.soft_empty_cache()
        elif cuda:
            torch.cuda.empty_cache()
        path.unlink()
    print(f"\n| type | file tensors GB | model GB after load | encode peak GB over model | load s "
          f"| ms 1x{args.tokens} compressed | ms 1x{args.tokens} bf16 | ratio | rel. error compressed | rel. error bf16 "
          f"| the file's own error |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for q, f, m, pk, ls, mc, mb, ec, eb, ef in rows:
        print(f"| {q} | {f:.2f} | {m:.2f} | {pk:.2f} | {ls:.1f} | {mc:.2f} | {mb:.2f} | {mc / mb:.2f}x | {ec:.2e} "
              f"| {eb:.2e} | {ef:.2e} |")
    if variant_rows:
        print(f"\n| type | variant | model GB | ms 1x{args.tokens} | vs bf16 | vs compressed | rel. error "
              f"| dequant alone ms (variant / compressed) |")
        print("|---|---|---|---|---|---|---|---|")
        for q, v, g, mv, mc, mb, ev, dq in variant_rows:
            print(f"| {q} | {v} | {g:.2f} | {mv:.2f} | {mv / mb:.2f}x | {mv / mc:.2f}x | {ev:.2e} | {dq} |")
    if comfy_rows:
        print(f"\n| type | ComfyUI-GGUF GB on device | its encode peak GB | its load s | ms 1x{args.tokens} ours compressed "
              f"| ms ComfyUI-GGUF encode | ms its forward | ours faster (encode / forward) | rel. error ours "
              f"| rel. error ComfyUI-GGUF |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for q, g, pk, ls, mc, mg, mf, ec, eg in comfy_rows:
            print(f"| {q} | {g:.2f} | {pk:.2f} | {ls:.1f} | {mc:.2f} | {mg:.2f} | {mf:.2f} | {mg / mc:.2f}x / "
                  f"{mf / mc:.2f}x | {ec:.2e} | {eg:.2e} |")


if __name__ == "__main__":
    main()
