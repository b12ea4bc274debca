# Experiment (2026-11-29, H200): why flex is ~10 ms slower than SDPA on the padded batch (bench's pad8x256: 8
# prompts of 20-200 tokens padded to 256), and what fixes it. XXL bf16, random weights, compiled layers + CUDA
# graphs through encode(). Variants of the padded forward:
#   sdpa           padding folded into the dense bias (shipped default)
#   flex-blockmask make_self_attn_block_mask(mask) (shipped flex path)
#   flex-qmask     the same with mask_pad_queries=True
#   flex-keybias   no block mask: a [B, L] additive key bias (0 / -inf) read in the score_mod
# then the same model unpadded at 8x256 for both attentions, each with one profiled graph replay (top kernels),
# and attention alone (one layer's q, k, v) under the kernel options the third session found best.
# Run: python3 benchmarks/flex_pad_probe.py
import sys
import torch
sys.path.insert(0, ".")
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.nn.functional import scaled_dot_product_attention
from torch.profiler import ProfilerActivity, profile
from t5core.bench import Shape, make_inputs, time_calls
from t5core.t5_common import T5AttnImpl, T5Config
from t5core.t5_encoder import T5EncoderStack, T5SelfAttention, _flex_compiled, make_self_attn_block_mask

dev = torch.device("cuda")
shipped_attn_forward = T5SelfAttention.forward


def attn_forward(self, x, bias, block_mask, flex):
    """Shipped forward, except that a plain tensor in block_mask's place is a [B, L] float key bias."""
    if not (flex and isinstance(block_mask, torch.Tensor)):
        return shipped_attn_forward(self, x, bias, block_mask, flex)
    B, L, _ = x.shape
    key_bias = block_mask
    q, k, v = self.qkv_proj(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx - q_idx + (L - 1)] + key_bias[b, kv_idx]

    out = _flex_compiled(q, k, v, score_mod=score_mod, scale=self.scale, kernel_options=self.kernel_options)
    return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


T5SelfAttention.forward = attn_forward
MASKS = {
    "flex-blockmask": make_self_attn_block_mask,
    "flex-qmask": lambda m: make_self_attn_block_mask(m, mask_pad_queries=True),
    "flex-keybias": lambda m: torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf")),
}


def set_variant(model, name):
    flex = name.startswith("flex")
    model.config = model.config.model_copy(update={"attn_impl": T5AttnImpl.Flex if flex else T5AttnImpl.SDPA})
    model._drop_graphs()
    if flex:
        make = MASKS.get(name, make_self_attn_block_mask)
        model._masked_forward = lambda ids, mask: model(ids, block_mask=None if mask is None else make(mask))
    else:
        model.__dict__.pop("_masked_forward", None)


def profile_replay(model, key):
    graph = model._graphs[key][0]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ev = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in ev) / 1e3
    return total, [f"{e.device_time_total / 1e3:7.3f} ms x{e.count:4d} {e.key[:100]}" for e in ev[:6]]


torch.manual_seed(0)
with torch.device(dev):
    model = T5EncoderStack(T5Config.from_name("xxl", dtype=torch.bfloat16)).eval()
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0, 0.02)
model.compile_layers()
pad = make_inputs(Shape(8, 256, True), 32128, dev)
print("lengths", pad.mask.sum(-1).tolist(), flush=True)
cases = [(n, pad.mask) for n in ("sdpa", "flex-blockmask", "flex-qmask", "flex-keybias")]
cases += [("sdpa", None), ("flex", None)]
rows, reference = [], {}
for name, mask in cases:
    set_variant(model, name)
    out = model.encode(pad.ids, mask)
    real = pad.mask if mask is not None else torch.ones_like(pad.mask)
    reference.setdefault(mask is not None, out)
    diff = (out - reference[mask is not None])[real].abs().max().item()
    ms = [time_calls(lambda: model.encode(pad.ids, mask), dev, 1.0)["ms"] for _ in range(2)]
    kernels, top = profile_replay(model, (8, 256, mask is not None))
    label = f"{name} {'padded' if mask is not None else 'unpadded'}"
    rows.append((label, min(ms), kernels, diff))
    print(f"{label}: encode {ms[0]:.2f} / {ms[1]:.2f} ms, kernels {kernels:.2f} ms, max|diff| vs first {diff:.3g}",
          flush=True)
    print("\n".join("    " + t for t in top), flush=True)

# attention alone: one layer's q, k, v at each shape
H, Dh = 64, 64
OPTIONS = {"default": None, "128/64 w8 s2": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
           "128/64 w4 s3": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}}
att_rows = []
for B, L, masked in ((1, 512, False), (8, 512, False), (8, 256, True)):
    q, k, v = (torch.randn(B, H, L, Dh, device=dev, dtype=torch.bfloat16) for _ in range(3))
    table = torch.randn(H, 2 * L - 1, device=dev)
    rel = torch.arange(L, device=dev)[None, :] - torch.arange(L, device=dev)[:, None] + L - 1
    dense = table[:, rel][None]  # [1, H, L, L]
    mask = pad.mask if masked else None
    if mask is not None:
        dense = dense.masked_fill(~mask[:, None, None, :], float("-inf"))
    dense = dense.to(torch.bfloat16)
    key_bias = None if mask is None else torch.zeros(mask.shape, device=dev).masked_fill(~mask, float("-inf"))
    bm = None if mask is None else make_self_attn_block_mask(mask)

    def sm(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + (L - 1)]

    def sm_key(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + (L - 1)] + key_bias[b, kv_idx]

    fns = {"sdpa (dense bias)": lambda: scaled_dot_product_attention(q, k, v, attn_mask=dense)}
    for oname, opts in OPTIONS.items():
        fns[f"flex {oname}" + (" blockmask" if bm is not None else "")] = \
            lambda opts=opts: _flex_compiled(q, k, v, score_mod=sm, block_mask=bm, kernel_options=opts)
        if key_bias is not None:
            fns[f"flex {oname} keybias"] = lambda opts=opts: _flex_compiled(q, k, v, score_mod=sm_key, kernel_options=opts)
    for fname, fn in fns.items():
        try:
            fn()
            us = 1e3 * time_calls(fn, dev, 0.3, sync_each=False)["ms"]
        except Exception as e:  # an option set the template rejects
            us = float("nan")
            print(f"  {B}x{L} {fname}: {type(e).__name__}: {str(e)[:120]}")
        att_rows.append((f"{B}x{L}{' padded' if masked else ''}", fname, us))
        print(f"  attention {B}x{L} {fname}: {us:.1f} us", flush=True)

print(f"\n## flex_pad_probe, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
print("| forward (8x256, CUDA graph via encode()) | ms (best of 2 medians) | kernel ms, one replay | max abs diff |")
print("|---|---|---|---|")
for label, ms, kernels, diff in rows:
    print(f"| {label} | {ms:.2f} | {kernels:.2f} | {diff:.3g} |")
print("\n| attention alone | kernel | µs |\n|---|---|---|")
for shape, fname, us in att_rows:
    print(f"| {shape} | {fname} | {us:.1f} |")
