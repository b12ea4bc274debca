# Issue 20 across several GPUs: `embed` on N torchrun ranks (NCCL), replicated and compiled, and with --fsdp,
# against one process on one GPU (every caption once, relative error); then half the shards of the N-rank run
# deleted (plus a stale .tmp) and the same command rerun: the files must come back byte for byte.
# Run from the repo root on an N-GPU machine:   N=2 bash benchmarks/embed_ranks_check.sh
# CPU (gloo) dry run:            N=2 DEV=cpu COMPILE= COUNT=200 PY=.venv/bin/python bash benchmarks/embed_ranks_check.sh
set -e
N=${N:-2}; DEV=${DEV:-cuda}; COUNT=${COUNT:-4000}; COMPILE=${COMPILE---compile}; PY=${PY:-python3}
TORCHRUN="$PY -m torch.distributed.run --nproc-per-node $N"
W=$(mktemp -d)
export PYTHONWARNINGS=ignore W COUNT N
$PY - <<'PY'
import os, sys, torch
sys.path.insert(0, "benchmarks")
from transformers import T5Config, T5EncoderModel
from make_captions import make_captions
from t5core.tokenizer import BUNDLED_SPIECE, load_tokenizer
torch.manual_seed(0)
c = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=8, feed_forward_proj="gated-gelu")
T5EncoderModel(c).eval().save_pretrained(f"{os.environ['W']}/hf")
captions = make_captions(int(os.environ["COUNT"]), load_tokenizer(BUNDLED_SPIECE))
open(f"{os.environ['W']}/caps.txt", "w").write("\n".join(captions))
PY
DEVARG=$([ "$DEV" = cpu ] && echo "--device cpu" || true)
COMMON="--captions $W/caps.txt --dtype bfloat16 --shard-size 256 --tokenizer t5core/data/t5_spiece.model"
$PY -m t5core convert $W/hf $W/dcp --format dcp --dtype bfloat16 --device $DEV
$PY -m t5core embed --model $W/hf $COMMON --out $W/one --device $DEV $COMPILE | tail -1
$TORCHRUN -m t5core embed --model $W/dcp --format dcp $COMMON --out $W/ranks $DEVARG $COMPILE | grep "shards in"
$TORCHRUN -m t5core embed --model $W/dcp $COMMON --out $W/fsdp --fsdp $DEVARG | grep "shards in"
cp -r $W/ranks $W/resumed
GONE=$(ls $W/resumed/shard-*.safetensors | awk 'NR % 2 == 0')
rm $GONE
echo partial > $(echo $GONE | cut -d' ' -f1).tmp  # a killed writer's leftover
$TORCHRUN -m t5core embed --model $W/dcp --format dcp $COMMON --out $W/resumed $DEVARG $COMPILE | grep "shards in"
$PY - <<'PY'
import filecmp, os, torch
from pathlib import Path
from t5core.embed import read_caption_embeddings
W = Path(os.environ["W"])
one, ranks, fsdp = (read_caption_embeddings(W / d) for d in ("one", "ranks", "fsdp"))
lines = list(range(int(os.environ["COUNT"])))
assert sorted(one) == sorted(ranks) == sorted(fsdp) == lines, "a caption missing or repeated"
ref = torch.cat([one[k].float() for k in lines])
for name, got in (("replicated", ranks), ("fsdp", fsdp)):
    x = torch.cat([got[k].float() for k in lines])
    print(f"{name} on {os.environ.get('N', 2)} ranks vs one process: rel err {((x - ref).norm() / ref.norm()).item():.2e} "
          f"over {len(ref)} tokens (bf16, other batches; fsdp unfused and eager)")
names = sorted(p.name for p in (W / "ranks").iterdir())
assert names == sorted(p.name for p in (W / "resumed").iterdir()), "resumed folder holds other files"
assert all(filecmp.cmp(W / "ranks" / n, W / "resumed" / n, shallow=False) for n in names), "resumed files differ"
print(f"resumed run: {len(names) - 1} shards identical to the uninterrupted run")
PY
rm -rf $W
