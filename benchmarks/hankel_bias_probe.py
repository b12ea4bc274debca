# Experiment (H200): can cuDNN attention read the T5 bias from its 2L-1 table instead of an [H, L, L] tensor?
# bias[h, q, k] = T[h, k - q + L - 1] is Toeplitz, which needs a negative stride. With the keys (and values)
# in reverse order it becomes Hankel: bias[h, q, k'] = Tr[h, q + k'] with Tr = T reversed, i.e. a view of
# the table with strides (2L-1, 1, 1): 128 KB instead of 32 MB per prompt. Attention is the same sum over keys in
# any order, so out is unchanged. Times cuDNN with the dense bias, the Hankel view, no bias, and the flips.
# Run: python3 benchmarks/hankel_bias_probe.py
import sys
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa
sys.path.insert(0, ".")
from t5core.bench import time_calls

dev = torch.device("cuda")
H, L, Dh = 64, 512, 64
torch.manual_seed(0)
for B in (1, 8):
    q, k, v = (torch.randn(B, H, L, Dh, device=dev, dtype=torch.bfloat16) for _ in range(3))
    T = torch.randn(H, 2 * L - 1, device=dev).to(torch.bfloat16)  # [H, 2L-1], offset k - q + L - 1
    rel = torch.arange(L, device=dev)[None, :] - torch.arange(L, device=dev)[:, None] + L - 1
    dense = T[:, rel][None]  # [1, H, L, L] contiguous: what t5core passes today
    Tr = T.flip(-1).contiguous()
    hankel = Tr.as_strided((1, H, L, L), (H * (2 * L - 1), 2 * L - 1, 1, 1))
    assert torch.equal(hankel[0, :, :, :].flip(-1), dense[0])
    kr, vr = k.flip(2), v.flip(2)
    flops = 4 * B * H * L * L * Dh
    ref = sdpa(q.float(), k.float(), v.float(), attn_mask=dense.float(), scale=1.0)
    cases = {
        "cuDNN dense bias": (SDPBackend.CUDNN_ATTENTION, lambda: sdpa(q, k, v, attn_mask=dense, scale=1.0)),
        "cuDNN Hankel view, keys reversed": (SDPBackend.CUDNN_ATTENTION, lambda: sdpa(q, kr, vr, attn_mask=hankel, scale=1.0)),
        "cuDNN Hankel view + the two flips": (SDPBackend.CUDNN_ATTENTION, lambda: sdpa(q, k.flip(2), v.flip(2), attn_mask=hankel, scale=1.0)),
        "cuDNN no bias": (SDPBackend.CUDNN_ATTENTION, lambda: sdpa(q, k, v, scale=1.0)),
        "efficient Hankel view": (SDPBackend.EFFICIENT_ATTENTION, lambda: sdpa(q, kr, vr, attn_mask=hankel, scale=1.0)),
        "flips alone": (SDPBackend.CUDNN_ATTENTION, lambda: (k.flip(2), v.flip(2))),
    }
    for name, (backend, fn) in cases.items():
        try:
            with sdpa_kernel(backend):
                out = fn()
                t = time_calls(fn, dev, 0.5, sync_each=False)["ms"]
            err = ((out.float() - ref).norm() / ref.norm()).item() if isinstance(out, torch.Tensor) else float("nan")
            print(f"{B}x{L} {name}: {t * 1e3:.1f} us ({flops / t / 1e9:.0f} TFLOP/s), rel err vs fp32 dense {err:.2e}", flush=True)
        except Exception as e:
            print(f"{B}x{L} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
