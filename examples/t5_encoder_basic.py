"""Encode a prompt with the T5 encoder (SDPA attention, weights loaded with tensorizer)."""
import json

import torch
from tensorizer import TensorDeserializer
from torch import BoolTensor, FloatTensor, LongTensor, inference_mode

from _common import t5_dir
from t5core.t5_common import T5Config
from t5core.t5_encoder import T5EncoderStack
from t5core.tokenizer import load_tokenizer

t5_dir = t5_dir()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

conf_dict = json.loads((t5_dir / "config.json").read_text())
config: T5Config = T5Config.model_validate(conf_dict)
config = config.model_copy(update={"dtype": dtype})

with torch.device(device):
    t5_enc = T5EncoderStack(config).eval()

deserializer = TensorDeserializer(t5_dir / "enc.tensors", lazy_load=True, dtype=dtype, device=device)
deserializer.load_into_module(t5_enc)
deserializer.close()

tokenizer = load_tokenizer(t5_dir)
prompt = "illustration of a nice tree"
input_ids: LongTensor = torch.tensor([tokenizer.encode_ids(prompt)], device=device)
mask: BoolTensor = input_ids != tokenizer.pad_id()

with inference_mode():
    emb: FloatTensor = t5_enc(input_ids=input_ids, input_mask=mask)
print(f"{prompt!r} -> embedding {tuple(emb.shape)} {emb.dtype}, mean |x| {emb.abs().mean():.4f}")
