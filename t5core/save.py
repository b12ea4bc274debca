"""Write an encoder back to disk: the seed's tensorizer layout, or a Hugging Face-compatible folder."""
import json
import warnings
from pathlib import Path

import torch

from .checkpoint import hf_config_dict, hf_key_of
from .t5_encoder import T5EncoderStack

FORMATS = ("tensorizer", "safetensors")


def hf_state_dict(model: T5EncoderStack) -> dict[str, torch.Tensor]:
    """Hugging Face T5 key names; fused QKV / gate-up split back into q, k, v / wi_0, wi_1."""
    config, out = model.config, {}
    fused_parts = {"attn.qkv_proj.weight": 3, "ffn.ff_in.weight": 2 if model.layers[0].ffn.gated else 1}
    for name, t in model.state_dict().items():
        parts = next((n for suffix, n in fused_parts.items() if name.endswith(suffix)), 1)
        for part, chunk in enumerate(t.chunk(parts, dim=0)):
            out[hf_key_of(name, part, config)] = chunk.contiguous()
    if not config.elementwise_affine:  # fused norms: unit scales keep the file readable by transformers
        for i in range(config.num_layers):
            for sub in (0, 1):
                out[f"encoder.block.{i}.layer.{sub}.layer_norm.weight"] = torch.ones(config.hidden_dim)
    return out


def save_encoder(model: T5EncoderStack, out_dir, format: str = "tensorizer", tokenizer=None) -> Path:
    """tensorizer: enc.tensors + config.json (T5Config), as the usage guide's loaders expect.
    safetensors: model.safetensors + config.json that transformers' T5EncoderModel also reads."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if format == "tensorizer":
        from tensorizer import TensorSerializer

        serializer = TensorSerializer(str(out / "enc.tensors"))
        serializer.write_module(model)  # (not write_state_dict: TensorDeserializer.load_into_module needs this form)
        serializer.close()
        (out / "config.json").write_text(model.config.model_dump_json(indent=2))
    else:
        from safetensors.torch import save_file

        if model.config.enc_ffn_out_scales or model.config.enc_attn_out_scales:
            warnings.warn("residual-scaled weights: only t5core reads this folder correctly (transformers ignores the scales)")
        save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    if tokenizer is not None:
        tokenizer.save(out)
    return out
