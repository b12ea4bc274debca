"""Write an encoder back to disk: the seed's tensorizer layout, or a Hugging Face-compatible folder."""
import json
from pathlib import Path

import torch

from .checkpoint import hf_config_dict, hf_key_of
from .fp16_scales import Scales
from .fp8 import Fp8Linear, per_tensor_scale, quantize_tensor
from .t5_encoder import T5EncoderStack

FORMATS = ("tensorizer", "safetensors", "dcp")
_PROJECTIONS = ("attn.qkv_proj.weight", "attn.o_proj.weight", "ffn.ff_in.weight", "ffn.ff_out.weight")


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
    fp8 (always for a model with fp8 weights): model.safetensors in ComfyUI's scaled fp8 convention (hf_state_dict)
    and no config.json, which would invite transformers to read weights it cannot dequantize."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, fp8)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if "scaled_fp8" not in tensors:
        (out / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    return out


def save_encoder(model: T5EncoderStack, out_dir, format: str = "tensorizer", tokenizer=None, fp8: bool = False) -> Path:
    """tensorizer: enc.tensors + config.json (T5Config), as the usage guide's loaders expect (weights as they are).
    safetensors: the Hugging Face form (save_hf_folder); with fp8, or for a model with fp8 weights (which only
    this format takes), ComfyUI's scaled fp8 file.
    dcp: a torch.distributed.checkpoint folder + config.json, weights as they are, which
    t5core.distributed.load_fsdp reads straight into each rank's shards at any world size. Called on every rank of
    a process group, each rank writes its own shard file (its FSDP shards, or its share of a replicated model)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    if (fp8 or any(isinstance(m, Fp8Linear) for m in model.modules())) and format != "safetensors":
        raise ValueError(f"fp8 weights are saved as ComfyUI's scaled fp8 safetensors: use format 'safetensors', "
                         f"not {format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if format == "tensorizer":
        from tensorizer import TensorSerializer

        serializer = TensorSerializer(str(out / "enc.tensors"))
        serializer.write_module(model)  # (not write_state_dict: TensorDeserializer.load_into_module needs this form)
        serializer.close()
        (out / "config.json").write_text(model.config.model_dump_json(indent=2))
    elif format == "dcp":
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dcp.save(model.state_dict(), checkpoint_id=str(out), no_dist=not dist.is_initialized())
        if dist.is_initialized() and dist.get_rank() != 0:
            return out  # rank 0 writes the config and tokenizer
        (out / "config.json").write_text(model.config.model_dump_json(indent=2))
    else:
        save_hf_folder(model, out, fp8)
    if tokenizer is not None:
        tokenizer.save(out)
    return out
