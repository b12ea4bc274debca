"""Build a small T5 v1.1 encoder with random weights (or take --model), save it, load it back in several
precisions, tokenize prompts, encode, and compare each result with the float32 reference."""
import math
import tempfile
import time
from pathlib import Path

import torch

from .precision import relative_error
from .save import save_encoder
from .t5_common import T5Config
from .t5_encoder import T5EncoderStack
from .tokenizer import BUNDLED_SPIECE, load_tokenizer, tokenizer_in
from .weight_load import load_encoder

PROMPTS = ["illustration of a nice tree", "a photograph of an astronaut riding a horse on the moon", "a cat"]


@torch.no_grad()
def random_init_(model: T5EncoderStack, seed: int = 0) -> T5EncoderStack:
    """Normal weights scaled like T5's initialisation: embeddings ~1, projections ~1/sqrt(fan_in), and queries
    a further 1/sqrt(head_dim) (T5 folds the attention scaling into them)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("ln1.weight", "ln2.weight", "ln.weight")):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        elif "vocab_embed" in name or "relative_attention_bias" in name:
            p.copy_(torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            if name.endswith("qkv_proj.weight"):
                p[: model.config.inner_dim] /= math.sqrt(model.config.head_dim)
    return model


def build_demo_model(out_dir: Path, size: str = "small") -> Path:
    model = random_init_(T5EncoderStack(T5Config.from_name(size)))
    return save_encoder(model, out_dir, "tensorizer", load_tokenizer(BUNDLED_SPIECE))


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="weights to use instead of a random T5 v1.1 small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("prompts", nargs="*", default=PROMPTS)


def run(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = build_demo_model(Path(tmp) / "t5-small-random")
            print(f"built a random T5 v1.1 small encoder and saved it as {path}/enc.tensors + config.json")
        tok = tokenizer_in(path)
        ids, mask = tok(args.prompts or PROMPTS)
        print(f"tokenized {len(ids)} prompts -> input_ids {list(ids.shape)}, {int(mask.sum())} real tokens")
        ref = load_encoder(path, "float32", args.device, attn_impl="sdpa").encode(ids, mask)
        print(f"float32 reference: embeddings {list(ref.shape)}, mean |x| {ref[mask].abs().mean():.4f}")
        print("\n| variant | rel. error vs float32 (real tokens) | ms |\n|---|---|---|")
        variants = [("float32", "sdpa", False), ("float32", "flex", True), ("bfloat16", "sdpa", True), ("float16", "sdpa", True)]
        for dtype, attn, fuse in variants:
            model = load_encoder(path, dtype, args.device, attn_impl=attn, fuse_norms=fuse)
            start = time.perf_counter()
            out = model.encode(ids, mask)
            ms = (time.perf_counter() - start) * 1e3
            label = f"{dtype} {attn}{' fused norms' if fuse else ''}"
            if dtype == "float16":
                label += f" scales {model.config.enc_ffn_out_scales}"
            print(f"| {label} | {relative_error(out[mask], ref[mask]):.2e} | {ms:.1f} |")
