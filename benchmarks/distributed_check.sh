# GPU check of t5core.distributed (2026-11-28, one H200: multi-GPU kinds were not lent): a dcp conversion,
# the FSDP2 parity script and `embed` with and without --fsdp under torchrun (NCCL), against a float32 single-GPU
# embed of the same 300 captions. Run from the repo root: bash benchmarks/distributed_check.sh
set -e
export PYTHONWARNINGS=ignore
python3 - <<'PY'
from transformers import T5Config, T5EncoderModel
import torch
torch.manual_seed(0)
c = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=8, feed_forward_proj="gated-gelu")
T5EncoderModel(c).eval().save_pretrained("/tmp/hf")
open("/tmp/caps.txt", "w").write("\n".join(f"caption number {i} " + "word " * (i % 37) for i in range(300)))
PY
python3 -m t5core convert /tmp/hf /tmp/dcp --format dcp --dtype bfloat16 --fuse-norms --device cuda
torchrun --nproc-per-node 1 t5core/scripts/t5_encoder_parity_fsdp.py /tmp/dcp --dtype bfloat16 2>&1 | grep -E "rank|FSDP"
torchrun --nproc-per-node 1 -m t5core embed --model /tmp/dcp --captions /tmp/caps.txt --out /tmp/e1 --fsdp --dtype bfloat16 2>&1 | grep rank
torchrun --nproc-per-node 1 -m t5core embed --model /tmp/dcp --format dcp --captions /tmp/caps.txt --out /tmp/e2 --dtype bfloat16 --compile 2>&1 | grep rank
python3 -m t5core embed --model /tmp/hf --captions /tmp/caps.txt --out /tmp/e3 --dtype float32 --save-dtype float32 --device cuda 2>&1 | grep rank
python3 - <<'PY'
import torch
from t5core.distributed import read_caption_embeddings
from t5core.precision import relative_error
a, b, ref = (read_caption_embeddings(f"/tmp/{d}") for d in ("e1", "e2", "e3"))
assert sorted(a) == sorted(b) == sorted(ref) == list(range(300))
for name, got in (("fsdp bf16", a), ("replicated compiled bf16", b)):
    x = torch.cat([got[k].float() for k in sorted(ref)]); r = torch.cat([ref[k] for k in sorted(ref)])
    print(f"{name} (torchrun, 1 GPU, NCCL) vs single-GPU float32: rel err {relative_error(x, r):.2e} over {len(r)} tokens")
PY
