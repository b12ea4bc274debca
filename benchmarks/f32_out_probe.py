# Experiment (2026-11-28, H200): float32-output projections on vs off (plain F.linear + .float()), bf16 and fp16,
# 1x512 and a padded 8x256 batch, CUDA-graphed and not. Run from the repo root: python3 benchmarks/f32_out_probe.py
import time, torch, sys
sys.path.insert(0, '.')
from t5core.bench import time_calls
import torch.nn.functional as F
from transformers import T5EncoderModel, T5Config as HC
from t5core.checkpoint import Checkpoint, infer_config
from t5core.weight_load import build_empty, load_checkpoint_into
from t5core.checkpoint_info import suggested_scales
from t5core.t5_encoder import F32OutLinear
from t5core.t5_common import T5AttnImpl
torch.backends.cuda.matmul.allow_tf32 = False; torch.backends.cudnn.allow_tf32 = False
dev = 'cuda'
def bench(fn, n=None, warm=None):  # median ms with CUDA events, each call synchronized (t5core.bench's timer)
    return time_calls(fn, torch.device(dev), seconds=0.5)["ms"]
torch.manual_seed(0)
hc = HC(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj='gated-gelu')
with torch.device(dev):
    hf = T5EncoderModel(hc).eval()
ids = torch.randint(3, 32000, (1, 512), device=dev)
g = torch.Generator().manual_seed(1); lens = torch.randint(20, 200, (8,), generator=g)
pmask = (torch.arange(256)[None] < lens[:, None]); pids = (torch.randint(3, 32000, (8, 256), generator=g) * pmask)
with torch.inference_mode():
    ref = hf(input_ids=ids).last_hidden_state.double()
    pref = hf(input_ids=pids.to(dev), attention_mask=pmask.to(dev).long()).last_hidden_state.double()
sd = {k: v.detach() for k, v in hf.state_dict().items()}
class Src:
    def keys(self): return list(sd)
    def shape(self, k): return tuple(sd[k].shape)
    def get(self, k): return sd[k]
cfg = infer_config({k: tuple(v.shape) for k, v in sd.items()}, 'mem')
def rel(o, r): return ((o.double() - r).norm() / r.norm()).item()
out = []
with torch.inference_mode():
    hb = hf.to(torch.bfloat16)
    out.append(f"hf bf16 rel {rel(hb(input_ids=ids).last_hidden_state, ref):.3e}")
    hf.to(torch.float32)
orig = F32OutLinear.forward
for mode in ['f32out', 'plain']:
    if mode == 'plain':
        F32OutLinear.forward = lambda self, x: F.linear(x, self.weight).float()
    torch._dynamo.reset()
    for dtype in [torch.bfloat16, torch.float16]:
        c = cfg.model_copy(update={'dtype': dtype, 'attn_impl': T5AttnImpl.Flex})
        m = build_empty(c, dev)
        ck = Checkpoint(path='mem', format='mem', source=Src(), keys={k: k for k in sd}, config=cfg)
        sc = suggested_scales(c) if dtype == torch.float16 else (None, None)
        load_checkpoint_into(m, ck, fuse_norm_scales=True, enc_attn_out_scales=sc[0], enc_ffn_out_scales=sc[1])
        m.compile_layers()
        try:
            t0 = time.perf_counter(); o = m.encode(ids); torch.cuda.synchronize(); first = time.perf_counter() - t0
            t = bench(lambda: m.encode(ids))
            e = rel(m.encode(ids), ref)
            po = m.encode(pids, pmask); pe = rel(po[pmask.to(dev)], pref[pmask.to(dev)])
            tp = bench(lambda: m.encode(pids, pmask))
            m.cuda_graphs = False
            tpn = bench(lambda: m.encode(pids, pmask), n=20)
            tn = bench(lambda: m.encode(ids), n=20)
            out.append(f"{mode} {dtype}: 1x512 {t:.2f} ms (no graph {tn:.2f}) rel {e:.3e} | pad8x256 graphed {tp:.2f} ms no-graph {tpn:.2f} ms rel {pe:.3e} | first {first:.1f}s")
        except Exception as ex:
            import traceback; traceback.print_exc(); out.append(f"{mode} {dtype}: FAIL {type(ex).__name__} {str(ex)[:200]}")
        print(out[-1], flush=True)
        del m; torch.cuda.empty_cache()
print("\n".join(out))
