"""float16 inference: norm scales fused and residual scales applied while loading (FusingDeserializer)."""
import json

import torch
from torch import FloatTensor, inference_mode

from _common import t5_dir
from t5core.fp16_scales import preset
from t5core.t5_common import T5AttnImpl, T5Config
from t5core.t5_encoder import T5EncoderStack, make_self_attn_block_mask
from t5core.tokenizer import load_tokenizer
from t5core.weight_load import FusingDeserializer

t5_dir = t5_dir()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.float16

conf_dict = json.loads((t5_dir / "config.json").read_text())
config: T5Config = T5Config.model_validate(conf_dict)
config = config.model_copy(update={"dtype": dtype, "elementwise_affine": False, "attn_impl": T5AttnImpl.Flex})
with torch.device(device):
    t5_enc = T5EncoderStack(config).eval()

# FFN-out scales for T5 v1.1 small's 8 layers (None for a size without a preset: no scaling)
ffn_scales = list(preset(config).ffn) if preset(config) else None
deserializer = FusingDeserializer(t5_dir / "enc.tensors", lazy_load=True, dtype=dtype, device=device)
deserializer.load_with_fusions(
    t5_enc,
    fuse_norm_scales=True,
    norm_fusion_via_f32=True,
    enc_attn_out_scales=None,
    enc_ffn_out_scales=ffn_scales,
)
deserializer.close()

tokenizer = load_tokenizer(t5_dir)
input_ids, mask = tokenizer(["illustration of a nice tree"])
block_mask = make_self_attn_block_mask(mask=mask.to(device), mask_pad_queries=True)
with inference_mode():
    emb: FloatTensor = t5_enc(input_ids=input_ids.to(device), block_mask=block_mask)
print(f"float16 with FFN-out scales {ffn_scales}: embedding {tuple(emb.shape)}, finite: {bool(emb.isfinite().all())}")
