"""Load the encoder sharded with FSDP2 from a distributed checkpoint, and check it against the same checkpoint
loaded whole (rank 0) on the same prompts:

  torchrun --nproc-per-node 2 t5core/scripts/t5_encoder_parity_fsdp.py enc-dcp/ [--dtype bfloat16] [--prompt ...]

Every rank holds 1/world of each weight (printed); the relative error is over real tokens.
"""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file from a checkout: make `t5core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from t5core import load_encoder
from t5core.distributed import end_process_group, init_from_env, load_fsdp
from t5core.precision import relative_error
from t5core.tokenizer import tokenizer_in


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dcp_folder")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if there are GPUs, else cpu")
    p.add_argument("--prompt", action="append", default=None)
    args = p.parse_args()
    rank, world, device = init_from_env(args.device)
    sharded = load_fsdp(args.dcp_folder, args.dtype, device)
    w = sharded.model.layers[0].attn.qkv_proj.weight
    print(f"rank {rank}/{world}: layers.0.attn.qkv_proj.weight local shard {list(w.to_local().shape)} of {list(w.shape)}")
    tok = tokenizer_in(args.dcp_folder)
    ids, mask = tok(args.prompt or ["a photo of a cat wearing a tiny hat", "an oil painting of a lighthouse at dusk"])
    out = sharded.encode(ids, mask)
    if rank == 0:
        whole = load_encoder(args.dcp_folder, args.dtype, device, format="dcp").encode(ids, mask)  # a folder we trust
        m = mask.to(out.device)
        print(f"FSDP ({world} ranks) vs whole model: relative error {relative_error(out[m], whole[m]):.2e}")
    del sharded, w  # before the process group they hold (end_process_group)
    end_process_group()


if __name__ == "__main__":
    main()
