"""Write an encoder back to disk: the seed's tensorizer layout, or a Hugging Face-compatible folder."""
import json
from pathlib import Path

import torch

from .checkpoint import hf_config_dict, hf_key_of
from .fp16_scales import Scales
from .t5_encoder import T5EncoderStack

FORMATS = ("tensorizer", "safetensors", "dcp")


@torch.no_grad()
def hf_state_dict(model: T5EncoderStack) -> dict[str, torch.Tensor]:
    """The weights in Hugging Face T5 form, which transformers reads: fused QKV / gate-up split back into q, k, v /
    wi_0, wi_1, residual scales divided out (exact: powers of two), fused norms as unit scales. CPU tensors with
    their own storage (safetensors refuses shared ones)."""
    _check_expanded(model)
    config = model.config
    unscale = Scales.from_config(config).weight_factors()
    fused_parts = {"attn.qkv_proj.weight": 3, "ffn.ff_in.weight": 2 if model.layers[0].ffn.gated else 1}
    out = {}
    for name, t in model.named_parameters():
        if unscale.get(name, 1.0) != 1.0:
            t = (t.float() / unscale[name]).to(t.dtype)
        parts = next((n for suffix, n in fused_parts.items() if name.endswith(suffix)), 1)
        for part, chunk in enumerate(t.detach().chunk(parts, dim=0)):
            out[hf_key_of(name, part, config)] = chunk.to("cpu", copy=True)
    if not config.elementwise_affine:
        for i in range(config.num_layers):
            for ln in ("ln1", "ln2"):
                out[hf_key_of(f"layers.{i}.{ln}.weight", 0, config)] = torch.ones(config.hidden_dim)
    return out


def save_hf_folder(model: T5EncoderStack, out_dir) -> Path:
    """config.json + model.safetensors that transformers' T5EncoderModel reads and t5core reloads as it was."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    return out


def save_encoder(model: T5EncoderStack, out_dir, format: str = "tensorizer", tokenizer=None) -> Path:
    """tensorizer: enc.tensors + config.json (T5Config), as the usage guide's loaders expect (weights as they are).
    safetensors: the Hugging Face form (save_hf_folder).
    dcp: a torch.distributed.checkpoint folder + config.json, weights as they are, which
    t5core.distributed.load_fsdp reads straight into each rank's shards at any world size. Called on every rank of
    a process group, each rank writes its own shard file (its FSDP shards, or its share of a replicated model)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    _check_expanded(model)
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
        save_hf_folder(model, out)
    if tokenizer is not None:
        tokenizer.save(out)
    return out


def _check_expanded(model: T5EncoderStack) -> None:
    from .gguf import is_packed

    if is_packed(model):
        raise ValueError("this encoder keeps GGUF weights compressed: load it with weight_dtype (e.g. 'bf16', the same "
                         "as dtype) to expand them before saving")
