"""Several processes (torchrun): the process group, and an FSDP2-sharded encoder read from a distributed
checkpoint. Embedding a caption file across ranks is t5core.embed (its functions are importable from here too).

    python -m t5core convert MODEL enc-dcp --format dcp --dtype bfloat16 --fuse-norms     # once
    torchrun --nproc-per-node 8 -m t5core embed --model enc-dcp --captions captions.txt --out emb/ [--fsdp]
"""
import gc
import os
from typing import Optional

import torch
import torch.distributed as dist

from .checkpoint import CheckpointError, open_checkpoint
from .embed import EmbedSettings, embed_captions, read_caption_embeddings, read_captions  # noqa: F401
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
    """Destroy the process group init_from_env started, if any (torchrun warns about one left open). Drop the
    FSDP-sharded encoders first: they hold the group, and a gloo group destroyed at interpreter exit sometimes
    aborts the process (SIGABRT, "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the encoders the caller dropped, and the reference cycles inside them
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
    # every parameter has its tensor and the shapes agree (CheckpointError naming the key), before allocating
    plan_reads(dict(model.named_parameters()), ckpt, model.config)
    # FSDP2 gathers a group's parameters as one flat buffer of one dtype: each projection and the embedding are
    # their own group (compute dtype); the float32 norm scales and position-bias tables stay with the root.
    for module in [model.vocab_embed, *(m for m in model.layers.modules() if isinstance(m, torch.nn.Linear))]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    state = model.state_dict()
    dcp_load(state, checkpoint_id=str(ckpt.path))  # casts to the model's dtypes while copying into the shards
    model.apply_residual_scales_from_config()
    return Encoder(model.eval(), sharded=True, source_path=ckpt.path)
