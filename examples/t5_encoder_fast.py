"""The fast path: flex attention with a padding block mask, norm scales fused after load, torch.compile."""
import json

import torch
from tensorizer import TensorDeserializer
from torch import BoolTensor, FloatTensor, inference_mode
from torch.nn.attention.flex_attention import BlockMask

from _common import t5_dir
from t5core.fuse_norm_scales import fuse_norm_scales_enc
from t5core.t5_common import T5AttnImpl, T5Config
from t5core.t5_encoder import T5EncoderStack, make_self_attn_block_mask
from t5core.tokenizer import load_tokenizer

t5_dir = t5_dir()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
seq_len = 512 if device.type == "cuda" else 64

conf_dict = json.loads((t5_dir / "config.json").read_text())
config: T5Config = T5Config.model_validate(conf_dict)
config = config.model_copy(update={
    "dtype": dtype,
    "attn_impl": T5AttnImpl.Flex,
    "flex_kernel_options": {"BLOCK_M": 128, "BLOCK_N": 64} if device.type == "cuda" else {},
})
with torch.device(device):
    t5_enc = T5EncoderStack(config).eval()

deserializer = TensorDeserializer(t5_dir / "enc.tensors", lazy_load=True, dtype=dtype, device=device)
deserializer.load_into_module(t5_enc)
deserializer.close()

fuse_norm_scales_enc(t5_enc)
t5_enc.bind_score_mods(seq_len=seq_len)
if device.type == "cuda":  # compiling flex on CPU works too, but takes minutes
    t5_enc = torch.compile(t5_enc, dynamic=False, fullgraph=True)

tokenizer = load_tokenizer(t5_dir)
prompts = ["illustration of a nice tree", "a cat"]
input_ids, mask = tokenizer(prompts, pad_to=seq_len)  # fixed shape: no recompiles
input_ids, mask = input_ids.to(device), mask.to(device)
block_mask: BlockMask = make_self_attn_block_mask(mask=mask, mask_pad_queries=True)

with inference_mode():
    emb: FloatTensor = t5_enc(input_ids=input_ids, block_mask=block_mask)
print(f"{len(prompts)} prompts -> embeddings {tuple(emb.shape)}; real-token mean |x| {emb[mask].abs().mean():.4f}")
