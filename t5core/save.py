"""Write an encoder back to disk: the seed's tensorizer layout, a Hugging Face-compatible folder, or one
.safetensors file as ComfyUI's text_encoders folder holds them.

Nothing is lost on the way: every file is written under a temporary name in the target folder, flushed to disk
and renamed only when complete, so an interrupted or failing write leaves the previous files as they were and no
partial file that could load. A folder that already holds a model is refused unless overwrite=True; then, once
the new files are complete, the weight files of other formats (which the loader might otherwise pick) are removed.
"""
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import WEIGHT_SUFFIXES, hf_config_dict, hf_key_of
from .fp16_scales import Scales
from .fp8 import Fp8Linear, per_tensor_scale, quantize_tensor
from .tokenizer import TOKENIZER_JSON_NAME
from .t5_encoder import T5EncoderStack

FORMATS = ("tensorizer", "safetensors", "dcp")
_PROJECTIONS = ("attn.qkv_proj.weight", "attn.o_proj.weight", "ffn.ff_in.weight", "ffn.ff_out.weight")
TMP_PREFIX = ".t5core-partial-"  # no weight suffix: the loader never picks a leftover one up
# Files that make a folder "a model": refusing to write over them without overwrite=True.
MODEL_FILES = ("config.json", "enc.tensors", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", ".metadata", "spiece.model", "tokenizer.json", "fp16_scales.json")
MODEL_SUFFIXES = (*WEIGHT_SUFFIXES, ".distcp")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        _fsync_path(folder)
    except OSError:  # some file systems cannot sync a directory; the renames are still atomic
        pass


def write_atomic(path, write: Callable[[Path], object]) -> Path:
    """write(tmp) writes the whole file at a temporary path beside `path`; it is flushed to disk and renamed over
    `path` only if write returns. On any failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}.tmp")
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def existing_model_files(folder) -> list[str]:
    """Names of the model files (weights, configs, tokenizers, calibrated scales) already in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name in MODEL_FILES or (p.is_file() and p.suffix in MODEL_SUFFIXES))


def is_file_target(out) -> bool:
    """A target named *.safetensors is one file (weights only, in Hugging Face naming or ComfyUI's scaled fp8)."""
    return Path(out).suffix == ".safetensors"


def check_target(out_dir, overwrite: bool, format: str) -> Path:
    """Refuse a target that is a file, or a folder holding another model's files unless overwrite; a *.safetensors
    target: a folder of that name, another format, or a file that exists unless overwrite."""
    out = Path(out_dir)
    if is_file_target(out):
        if format != "safetensors":
            raise ValueError(f"{out}: a .safetensors file is written in format 'safetensors', not {format!r}; name "
                             f"a folder for {format!r}")
        if out.is_dir():
            raise FileExistsError(f"{out}: is a folder; a target named *.safetensors is written as one file")
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out}: exists; pass overwrite=True (CLI: --overwrite) to replace it")
        return out
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    found = existing_model_files(out)
    if found and not overwrite:
        raise FileExistsError(f"{out}: already holds model files ({', '.join(found[:6])}"
                              f"{', ...' if len(found) > 6 else ''}); pass overwrite=True (CLI: --overwrite) to "
                              f"replace them, or choose an empty folder")
    return out


def _remove_stale(out: Path, keep: set[str]) -> None:
    """After a complete write with overwrite allowed: weight files of other formats, indexes, shards, calibrated
    scales and a tokenizer of the previous model go, so loading the folder returns the new model."""
    for p in out.iterdir():
        if p.name in keep or p.name.startswith(TMP_PREFIX):
            continue
        stale = (p.name in MODEL_FILES and p.name not in ("spiece.model", "tokenizer.json")) \
            or (p.is_file() and p.suffix in MODEL_SUFFIXES) or p.name.endswith(".fp16_scales.json") \
            or (p.name == "spiece.model" and TOKENIZER_JSON_NAME in keep)  # found first: the old model's
        if stale and p.is_file():
            p.unlink()


@torch.no_grad()
def hf_state_dict(model: T5EncoderStack, fp8: bool = False) -> dict[str, torch.Tensor]:
    """The weights in Hugging Face T5 form, which transformers reads: fused QKV / gate-up split back into q, k, v /
    wi_0, wi_1, residual scales divided out (exact: powers of two), fused norms as unit scales. CPU tensors with
    their own storage (safetensors refuses shared ones).

    fp8 (always for a model with fp8 weights): ComfyUI's scaled fp8 convention instead, which its loaders and
    t5core read, and transformers does not: each projection `weight` in float8_e4m3fn with one float32
    `scale_weight` [] (ComfyUI takes one scale per tensor), and the `scaled_fp8` marker. An fp8 part whose rows
    share one scale (weights read from such a file) keeps its bytes; one whose rows have their own scales (weights
    quantized by t5core) is re-quantized from them; wider weights are quantized once."""
    _check_expanded(model)
    config = model.config
    unscale = Scales.from_config(config).weight_factors()
    fused_parts = {"attn.qkv_proj.weight": 3, "ffn.ff_in.weight": 2 if model.layers[0].ffn.gated else 1}
    fp8_of = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    fp8 = fp8 or bool(fp8_of)
    out = {}
    for name, t in model.named_parameters():
        if name.removesuffix("scale") + "weight" in fp8_of:
            continue  # written with its weight
        parts = next((n for suffix, n in fused_parts.items() if name.endswith(suffix)), 1)
        chunks = t.detach().chunk(parts, dim=0)
        if name in fp8_of:
            scales = (fp8_of[name].scale.detach() / unscale.get(name, 1.0)).chunk(parts)
        elif unscale.get(name, 1.0) != 1.0:
            chunks = (t.float() / unscale[name]).to(t.dtype).chunk(parts, dim=0)
        for part, chunk in enumerate(chunks):
            key = hf_key_of(name, part, config)
            if fp8 and name.endswith(_PROJECTIONS):
                w, s = (per_tensor_scale(chunk, scales[part], torch.float8_e4m3fn) if name in fp8_of
                        else quantize_tensor(chunk, torch.float8_e4m3fn))
                out[key], out[key.removesuffix("weight") + "scale_weight"] = w.to("cpu", copy=True), s.to("cpu", copy=True)
            else:
                out[key] = chunk.to("cpu", copy=True)
    if fp8:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # ComfyUI's marker: its dtype, the weights'
    if not config.elementwise_affine:
        for i in range(config.num_layers):
            for ln in ("ln1", "ln2"):
                out[hf_key_of(f"layers.{i}.{ln}.weight", 0, config)] = torch.ones(config.hidden_dim)
    return out


def save_hf_folder(model: T5EncoderStack, out_dir, fp8: bool = False) -> Path:
    """config.json + model.safetensors that transformers' T5EncoderModel reads and t5core reloads as it was.
    Like transformers' save_pretrained it replaces the files of those names (each atomically).
    fp8 (always for a model with fp8 weights): model.safetensors in ComfyUI's scaled fp8 convention (hf_state_dict)
    and no config.json, which would invite transformers to read weights it cannot dequantize.
    An older config.json goes once the new weights are complete, before they replace the old ones: the folder never
    pairs weights with a config.json that describes others (fused norms, residual scales)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = hf_state_dict(model, fp8)

    def write_weights(tmp: Path) -> None:
        _save_file(sd, tmp)
        (out / "config.json").unlink(missing_ok=True)

    write_atomic(out / "model.safetensors", write_weights)
    if "scaled_fp8" not in sd:
        config = json.dumps(hf_config_dict(model.config), indent=2)
        write_atomic(out / "config.json", lambda tmp: tmp.write_text(config))
    return out


def _save_file(sd: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata={"format": "pt"})


def save_encoder(model: T5EncoderStack, out_dir, format: str = "tensorizer", tokenizer=None,
                 overwrite: bool = False, fp8: bool = False) -> Path:
    """tensorizer: enc.tensors + config.json (T5Config), as the usage guide's loaders expect (weights as they are).
    safetensors: the Hugging Face form (save_hf_folder); with fp8, or for a model with fp8 weights (which only
    this format takes), ComfyUI's scaled fp8 file. An `out_dir` named *.safetensors is that one file, weights only
    (no config, no tokenizer: t5core and ComfyUI read the architecture from the shapes).
    dcp: a torch.distributed.checkpoint folder + config.json, weights as they are, which
    t5core.distributed.load_fsdp reads straight into each rank's shards at any world size. Called on every rank of
    a process group, each rank writes its own shard file (its FSDP shards, or its share of a replicated model).

    A folder that already holds model files is refused unless overwrite; every file is written under a temporary
    name and renamed when complete (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"format: unknown format {format!r}; choose one of {FORMATS}")
    fp8 = fp8 or any(isinstance(m, Fp8Linear) for m in model.modules())
    if fp8 and format != "safetensors":
        raise ValueError(f"fp8 weights are saved as ComfyUI's scaled fp8 safetensors: use format 'safetensors', "
                         f"not {format!r}")
    import torch.distributed as dist

    distributed = format == "dcp" and dist.is_initialized()
    rank0 = not distributed or dist.get_rank() == 0
    _check_expanded(model)
    out = check_target(out_dir, overwrite, format)  # on every rank: all refuse together, none waits for a refused one
    if is_file_target(out):
        sd = hf_state_dict(model, fp8)
        return write_atomic(out, lambda tmp: _save_file(sd, tmp))
    out.mkdir(parents=True, exist_ok=True)
    written = {"config.json"}
    if format == "tensorizer":
        from tensorizer import TensorSerializer

        def write_tensors(tmp: Path) -> None:
            serializer = TensorSerializer(str(tmp))
            try:
                serializer.write_module(model)  # (not write_state_dict: TensorDeserializer.load_into_module needs this form)
            finally:
                serializer.close()

        write_atomic(out / "enc.tensors", write_tensors)
        written.add("enc.tensors")
    elif format == "dcp":
        import torch.distributed.checkpoint as dcp

        # every rank writes into one temporary folder inside the target; rank 0 moves the files out when complete
        staging = out / f"{TMP_PREFIX}dcp"
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)
        if distributed:
            dist.barrier()
        try:
            dcp.save(model.state_dict(), checkpoint_id=str(staging), no_dist=not distributed)
        except BaseException:
            if rank0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if not rank0:
            return out  # rank 0 moves the shards and writes the config and tokenizer
        names = sorted(p.name for p in staging.iterdir())
        for name in names:
            if name != ".metadata":
                _fsync_path(staging / name)
                os.replace(staging / name, out / name)
        _fsync_path(staging / ".metadata")
        os.replace(staging / ".metadata", out / ".metadata")  # last: the folder is a checkpoint only once complete
        staging.rmdir()
        written.update(names)
    else:
        save_hf_folder(model, out, fp8)
        written.add("model.safetensors")
        if fp8:
            written.discard("config.json")  # none written (save_hf_folder removed an older one)
    if format != "safetensors":
        config = model.config.model_dump_json(indent=2)
        write_atomic(out / "config.json", lambda tmp: tmp.write_text(config))
    if tokenizer is not None:
        write_atomic(out / TOKENIZER_JSON_NAME, lambda tmp: tmp.write_text(tokenizer.to_json(), encoding="utf-8"))
        written.add(TOKENIZER_JSON_NAME)
    if overwrite:
        _remove_stale(out, written)
    _fsync_dir(out)
    return out


def _check_expanded(model: T5EncoderStack) -> None:
    from .gguf import is_packed

    if is_packed(model):
        raise ValueError("this encoder keeps GGUF weights compressed: load it with weight_dtype (e.g. 'bf16', the same "
                         "as dtype) to expand them before saving")

