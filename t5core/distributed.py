"""Several processes (torchrun): an FSDP2-sharded encoder read from a distributed checkpoint, and embedding a
caption file split across ranks.

    python -m t5core convert MODEL enc-dcp --format dcp --dtype bfloat16 --fuse-norms     # once
    torchrun --nproc-per-node 8 -m t5core embed --model enc-dcp --captions captions.txt --out emb/ [--fsdp]

Each rank writes emb/embeddings-RRRRR-of-WWWWW.safetensors: `embeddings` [tokens, D] (real tokens only, captions
one after another), `offsets` [n + 1] (caption i is embeddings[offsets[i]:offsets[i + 1]]) and `lines` [n] (its
0-based line in the caption file). read_caption_embeddings(out) gathers them back by line.
"""
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import CheckpointError, open_checkpoint
from .runtime import Encoder
from .t5_common import parse_dtype
from .t5_encoder import T5EncoderStack


def init_from_env(device: Optional[str] = None) -> tuple[int, int, torch.device]:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK -> (rank, world size, this rank's device), with the process group
    started (NCCL for GPUs, gloo for the CPU). Without torchrun: (0, 1, device) and no process group."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(kind, local) if kind == "cuda" else torch.device(kind)
    if "RANK" not in os.environ:  # not under torchrun
        return 0, 1, dev
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def end_process_group() -> None:
    """Destroy the process group init_from_env started, if any (torchrun warns about one left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def load_fsdp(path, dtype="bfloat16", device=None, mesh=None) -> Encoder:
    """An encoder sharded over the process group with FSDP2 (each projection, the embedding and the root
    `fully_shard`ed), read from a torch.distributed.checkpoint folder straight into each rank's shards: no rank
    ever holds the whole model. The checkpoint may have been written at any world size. Call on every rank;
    forward calls must match across ranks."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .weight_load import plan_reads

    # by definition a distributed checkpoint: the caller names the format, trusting the folder (its .metadata is
    # a pickle); any other folder is refused with a pointer to `convert --format dcp`
    try:
        ckpt = open_checkpoint(path, format="dcp")
    except CheckpointError as e:
        raise CheckpointError(f"{e}. load_fsdp reads distributed checkpoints; convert it once: "
                              f"python -m t5core convert {path} OUT --format dcp") from e
    if not dist.is_initialized():
        raise RuntimeError("load_fsdp needs a process group: run under torchrun (t5core.distributed.init_from_env)")
    device = torch.device(device) if device is not None else init_from_env()[2]
    mesh = mesh or init_device_mesh(device.type, (dist.get_world_size(),))
    with torch.device("meta"):
        model = T5EncoderStack(ckpt.config.model_copy(update={"dtype": parse_dtype(dtype)}))
    plan_reads(dict(model.named_parameters()), ckpt, model.config)  # shapes agree before anything is allocated
    # FSDP2 gathers a group's parameters as one flat buffer of one dtype: each projection and the embedding are
    # their own group (compute dtype); the float32 norm scales and position-bias tables stay with the root.
    for module in [model.vocab_embed, *(m for m in model.layers.modules() if isinstance(m, torch.nn.Linear))]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    state = model.state_dict()
    missing = sorted(set(state) - set(ckpt.keys))
    if missing:
        raise CheckpointError(f"{ckpt.path}: missing weights {missing[:4]} (written by another model or truncated?)")
    dcp_load(state, checkpoint_id=str(ckpt.path))  # casts to the model's dtypes while copying into the shards
    model.apply_residual_scales_from_config()
    return Encoder(model.eval(), sharded=True, source_path=ckpt.path)


def embed_captions(model: Encoder, tokenizer, captions: list[tuple[int, str]], out_dir, rank: int = 0,
                   world: int = 1, batch_size: int = 16, max_length: int = 512, save_dtype=torch.float16) -> Path:
    """Encode this rank's share of (line, caption) pairs (every world-th, shortest first so batches pad little)
    and write one safetensors file. A sharded (FSDP) model needs its ranks together: every rank then runs the same
    number of forward calls, padding its tail with empty batches."""
    from safetensors.torch import save_file

    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(max_length, int) and max_length >= 1):
        raise ValueError(f"max_length: must be an integer >= 1, got {max_length!r}")
    if not (isinstance(world, int) and world >= 1 and 0 <= rank < world):
        raise ValueError(f"rank, world: need 0 <= rank < world, got rank {rank!r}, world {world!r}")
    mine = captions[rank::world]
    tokens = []  # EOS-terminated; a loop, not a comprehension: the warning's stacklevel counts frames
    for line, text in mine:
        tokens.append(tokenizer.truncate(tokenizer.encode_ids(text, add_eos=False), max_length, f"line {line + 1}:"))
    order = sorted(range(len(mine)), key=lambda i: len(tokens[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    n_calls = len(batches)
    if model.sharded:
        count = torch.tensor([n_calls], device=model.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        n_calls = int(count)
    pieces, lines = [], []
    for b in range(n_calls):
        batch = batches[b] if b < len(batches) else []
        rows = [tokens[i] for i in batch] or [[tokenizer.eos_id()]]  # an idle rank still joins the sharded forward
        ids, mask = tokenizer.pad_rows(rows)  # a compiled encoder pads to its length buckets itself
        out = model.encode(ids, mask).to("cpu", save_dtype)  # one device-to-host copy per batch
        for row, i in enumerate(batch):
            emb = out[row, : int(mask[row].sum())].clone()  # real tokens only: the padded batch is freed
            if not torch.isfinite(emb).all():
                raise FloatingPointError(f"line {mine[i][0] + 1}: embedding overflows {save_dtype}; "
                                         f"save in float32 or bfloat16 instead")
            pieces.append(emb)
            lines.append(mine[i][0])
    counts = torch.tensor([0] + [len(p) for p in pieces])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"embeddings-{rank:05d}-of-{world:05d}.safetensors"
    hidden = model.config.hidden_dim
    save_file({"embeddings": torch.cat(pieces) if pieces else torch.empty(0, hidden, dtype=save_dtype),
               "offsets": counts.cumsum(0), "lines": torch.tensor(lines, dtype=torch.int64)}, str(path))
    return path


def read_caption_embeddings(out_dir) -> dict[int, Tensor]:
    """Every rank file of embed_captions in out_dir -> {line: embeddings [tokens, D]}."""
    from safetensors.torch import load_file

    files = sorted(Path(out_dir).glob("embeddings-*-of-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{out_dir}: no embeddings-*-of-*.safetensors files")
    result = {}
    for f in files:
        d = load_file(str(f))
        for i, line in enumerate(d["lines"].tolist()):
            result[line] = d["embeddings"][d["offsets"][i]:d["offsets"][i + 1]]
    return result


def read_captions(path) -> list[tuple[int, str]]:
    """A caption file, one caption a line -> (line, caption) pairs; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    return [(i, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
