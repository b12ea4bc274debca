# Experiment (2026-11-29, H200): flex attention's padding and kernel options inside the XXL bf16 encoder
# (random weights, compiled layers, one CUDA graph per case, timed through graph replay as encode() runs it).
# Padding, at bench's pad8x256 (8 prompts of 20-200 tokens padded to 256):
#   sdpa               padding folded into the dense bias
#   flex               input_mask, which flex turns into make_self_attn_block_mask(mask) (what encode() does)
#   flex-qmask         make_self_attn_block_mask(mask, mask_pad_queries=True), the usage guide's
# each with flex's own default kernel options and with t5core's (FLEX_KERNEL_OPTIONS: the usage guide's BLOCK_M
# 128 / BLOCK_N 64); then the unpadded shapes 1x512, 8x512 and 8x256 with both attentions and option sets. One
# profiled replay per case gives the attention kernel's time per layer.
# Earlier runs: 2026-11-29_h200_flex_pad_probe.log (the script at git 77fd8bd, which patched in a [B, L] key
# bias) and _run2.log (git 856b371, where input_mask meant that key bias; its diff column read the captured
# output before any replay, so it is void).
# Run: python3 benchmarks/flex_pad_probe.py
import sys
import torch
sys.path.insert(0, ".")
from torch.profiler import ProfilerActivity, profile
from t5core.bench import Shape, make_inputs, time_calls
from gpu_base import graphed, random_xxl_encoder
from t5core.t5_common import T5AttnImpl
from t5core.t5_encoder import FLEX_KERNEL_OPTIONS, make_self_attn_block_mask

dev = torch.device("cuda")
OPTIONS = {"flex's default": None, "t5core's 128/64": FLEX_KERNEL_OPTIONS}
CALLS = {  # how each variant hands the model its padding
    "sdpa": lambda m, ids, mask: m(ids, input_mask=mask),
    "flex": lambda m, ids, mask: m(ids, input_mask=mask),
    "flex-qmask": lambda m, ids, mask: m(ids, block_mask=make_self_attn_block_mask(mask, mask_pad_queries=True)),
}


def attention_us(graph):
    """Per-layer µs of the attention kernel (cuDNN or flex's Triton template) in one profiled replay, and the
    total kernel ms."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    attn = [e for e in ev if "flex_attention" in e.key or "sdpa" in e.key or "fmha" in e.key]
    return sum(e.device_time_total for e in attn) / 24, sum(e.device_time_total for e in ev) / 1e3


model = random_xxl_encoder(dev).compile_layers()
pad = make_inputs(Shape(8, 256, True), 32128, dev)
print("lengths", pad.mask.sum(-1).tolist(), flush=True)
cases = [(pad.ids, pad.mask, name) for name in CALLS]
for B, L in ((1, 512), (8, 512), (8, 256)):
    ids = make_inputs(Shape(B, L, False), 32128, dev).ids
    cases += [(ids, None, "sdpa"), (ids, None, "flex")]

rows, reference = [], {}
for ids, mask, name in cases:
    for oname, opts in OPTIONS.items():
        if name == "sdpa" and opts is not None:
            continue
        impl = T5AttnImpl.Flex if name.startswith("flex") else T5AttnImpl.SDPA
        model.config = model.config.model_copy(update={"attn_impl": impl})
        for layer in model.layers:
            layer.attn.kernel_options = opts
        with torch.inference_mode():
            graph, out = graphed(lambda: CALLS[name](model, ids, mask))
        ms = min(time_calls(graph.replay, dev, 1.0)["ms"] for _ in range(2))  # replays fill `out`
        real = torch.ones(ids.shape, dtype=torch.bool, device=dev) if mask is None else mask
        key = (tuple(ids.shape), mask is not None)
        reference.setdefault(key, out.clone())  # sdpa comes first for every shape
        diff = (out - reference[key])[real].abs().max().item()
        attn_us, kernel_ms = attention_us(graph)
        shape = f"{'pad' if mask is not None else ''}{ids.shape[0]}x{ids.shape[1]}"
        rows.append((shape, name, oname if impl == T5AttnImpl.Flex else "", ms, kernel_ms, attn_us, diff))
        print(rows[-1], flush=True)
        del graph, out

print(f"\n## flex_pad_probe, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
print("| shape | attention | flex options | graph replay ms (best of 2 medians) | kernel ms, one replay | "
      "attention µs per layer | max abs diff vs sdpa |")
print("|---|---|---|---|---|---|---|")
for shape, name, oname, ms, kernel_ms, attn_us, diff in rows:
    print(f"| {shape} | {name} | {oname} | {ms:.2f} | {kernel_ms:.2f} | {attn_us:.0f} | {diff:.3g} |")
