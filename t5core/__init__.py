"""t5core: a fast, accurate T5 text encoder (T5 v1.0/v1.1, mT5, UMT5) for image-generation pipelines."""
from .checkpoint import CheckpointError, open_checkpoint
from .t5_common import T5AttnImpl, T5Config
from .runtime import Encoder, NonFiniteOutputError
from .t5_encoder import T5EncoderStack, make_self_attn_block_mask
from .tokenizer import find_tokenizer, load_tokenizer
from .weight_load import FusingDeserializer, load_encoder

__all__ = [
    "CheckpointError", "Encoder", "FusingDeserializer", "NonFiniteOutputError", "T5AttnImpl", "T5Config", "T5EncoderStack",
    "find_tokenizer", "load_encoder", "load_tokenizer", "make_self_attn_block_mask", "open_checkpoint",
]
