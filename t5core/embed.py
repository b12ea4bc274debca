"""Embedding a caption file once, resumably and at the encoder's speed: one process, or split across torchrun ranks.

    torchrun --nproc-per-node 8 -m t5core embed --model enc --captions captions.txt --out emb/ [--fsdp]

What `out` holds:
    manifest.json                   model, dtype, settings, world size, the captions' hash and count, every shard
    shard-RRRRR-NNNNN.safetensors   rank R's shard N: `offsets` [n + 1], `lines` [n] (0-based line in the caption
                                    file) and `embeddings` [tokens, D] (real tokens only, caption i is
                                    embeddings[offsets[i]:offsets[i + 1]])

Rank R takes every world-th caption (captions[R::world]) and cuts its share into shards of `shard_size`, so which
captions a shard holds depends only on the caption file, the rank and world size, and the settings. A shard is
written as `*.tmp` and renamed when complete; a restart of the same command skips finished shards and writes the
others as the first run would have; a restart with other settings or another caption file is refused.

How one shard runs, keeping the GPU busy:
- a worker thread tokenizes the next shard while this one encodes;
- the captions, longest first, are cut into batches of at most `tokens_per_batch` padded tokens (short captions
  in big batches, long ones in small batches). A compiled encoder gets one shape per length bucket
  (runtime.length_bucket): tokens_per_batch // bucket rows, a shard's last batch filled up with one-token rows,
  so each shape compiles and is captured once;
- on the device the real tokens are gathered and cast to the save dtype, then copied on a side stream into one of
  a few reused pinned host buffers (one device-to-host copy per batch); a writer thread streams them into the
  shard file. The host waits only for a free buffer.
"""
import hashlib
import json
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import BoolTensor, LongTensor, Tensor

from .runtime import Encoder, length_bucket
from .save import write_atomic
from .t5_common import MAX_TOKENS, dtype_name, parse_dtype

MANIFEST_NAME = "manifest.json"
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
IN_FLIGHT = 3  # batches between the encoder and the shard file: reused host buffers


@dataclass(frozen=True)
class EmbedSettings:
    """Everything besides the model and the captions that decides a run's shards (checked on restart)."""

    max_length: int = 512  # tokens per caption, EOS included; a longer caption is cut, with a warning naming its line
    save_dtype: str = "float16"  # float16 | bfloat16 | float32
    tokens_per_batch: int = 8192  # padded tokens per batch; a caption longer than this runs alone
    batch_size: Optional[int] = None  # at most this many captions a batch (None: as many as the token budget allows)
    shard_size: int = 4096  # captions per shard file

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{name}: must be {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.max_length) and 1 <= self.max_length <= MAX_TOKENS, "max_length",
             f"an integer from 1 to {MAX_TOKENS}")
        need(is_int(self.tokens_per_batch) and self.tokens_per_batch >= 1, "tokens_per_batch", "an integer >= 1")
        need(self.batch_size is None or (is_int(self.batch_size) and self.batch_size >= 1), "batch_size",
             "an integer >= 1")
        need(is_int(self.shard_size) and self.shard_size >= 1, "shard_size", "an integer >= 1")
        try:
            dtype = parse_dtype(self.save_dtype)
        except ValueError:
            dtype = None
        need(dtype in SAFETENSORS_DTYPES, "save_dtype", "float16, bfloat16 or float32")
        object.__setattr__(self, "save_dtype", dtype_name(dtype))  # canonical: "fp16" and "float16" match


# -- planning -------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """One encoder call: `members` (indices into the shard's captions, row order), run as [rows, width] tokens;
    rows beyond the members are one-token filler rows (compiled encoders only)."""

    members: list[int]
    rows: int
    width: int


def shard_sizes(n_captions: int, world: int, shard_size: int) -> list[list[int]]:
    """Captions per shard, for each rank (rank r holds captions[r::world], cut into shard_size pieces)."""
    sizes = []
    for rank in range(world):
        mine = len(range(rank, n_captions, world))
        sizes.append([min(shard_size, mine - start) for start in range(0, mine, shard_size)])
    return sizes


def shard_name(rank: int, index: int) -> str:
    return f"shard-{rank:05d}-{index:05d}.safetensors"


def plan_batches(lengths: list[int], tokens_per_batch: int, batch_size: Optional[int] = None,
                 buckets: bool = False) -> list[Batch]:
    """Caption lengths -> batches, longest captions first. A batch's width is its first (longest) caption's length,
    or that length's bucket with buckets=True (compiled encoders); it takes max(1, tokens_per_batch // width)
    captions (at most batch_size). With buckets every batch of a width has the same rows (the last one filled
    up), so an encoder sees one shape per bucket."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, start = [], 0
    while start < len(order):
        width = lengths[order[start]]
        width = length_bucket(width) if buckets else width
        rows = min(max(1, tokens_per_batch // width), batch_size or len(order))
        members = order[start:start + rows]
        batches.append(Batch(members, rows if buckets else len(members), width))
        start += rows
    return batches


def tokenize(tokenizer, captions: list[tuple[int, str]], max_length: int) -> list[list[int]]:
    """(line, caption) pairs -> EOS-terminated token ids of at most max_length (a longer caption keeps its first
    max_length - 1 tokens and EOS, and a PromptTruncatedWarning names its line). One batch call of the tokenizer,
    lists throughout (no [captions, longest] tensor)."""
    rows = []
    for (line, _), ids in zip(captions, tokenizer.encode_batch([text for _, text in captions])):
        rows.append(tokenizer.truncate(ids, max_length, f"line {line + 1}:"))
    return rows


def batch_inputs(tokenizer, tokens: list[list[int]], batch: Batch) -> tuple[LongTensor, BoolTensor, LongTensor]:
    """-> (input_ids [rows, width], attention_mask [rows, width], index [real tokens]: the members' real tokens
    in the flattened [rows * width] output, caption after caption)."""
    rows = [tokens[i] for i in batch.members] + [[tokenizer.eos_id()]] * (batch.rows - len(batch.members))
    ids, mask = tokenizer.pad_rows(rows, pad_to=batch.width)
    real = mask.clone()
    real[len(batch.members):] = False
    return ids, mask, real.view(-1).nonzero().squeeze(1)


# -- manifest -------------------------------------------------------------------------------------------------------
def captions_sha256(captions: list[tuple[int, str]]) -> str:
    """Hash of the (line, caption) pairs read from a caption file (blank lines count through the line numbers)."""
    digest = hashlib.sha256()
    for line, text in captions:
        digest.update(f"{line}\t{text}\n".encode("utf-8"))
    return digest.hexdigest()


def _manifest(model: Encoder, captions: list[tuple[int, str]], world: int, settings: EmbedSettings) -> dict:
    sizes = shard_sizes(len(captions), world, settings.shard_size)
    return {
        "format": "t5core caption embeddings",
        "model": str(Path(model.source_path).resolve()) if model.source_path is not None else None,
        "dtype": dtype_name(model.config.dtype),
        "hidden_dim": model.config.hidden_dim,
        "settings": {**asdict(settings), "world_size": world},
        "captions": {"count": len(captions), "sha256": captions_sha256(captions)},
        "shards": [{"file": shard_name(rank, i), "rank": rank, "captions": n}
                   for rank in range(world) for i, n in enumerate(sizes[rank])],
    }


def _changes(old: dict, new: dict) -> list[str]:
    """What differs between a folder's manifest and this run's, in words."""
    changes = [f"{key} {old.get(key)!r} -> {new[key]!r}" for key in ("model", "dtype") if old.get(key) != new[key]]
    old_settings = old.get("settings", {})
    changes += [f"{key} {old_settings.get(key)!r} -> {value!r}" for key, value in new["settings"].items()
                if old_settings.get(key) != value]
    old_caps, new_caps = old.get("captions", {}), new["captions"]
    if old_caps != new_caps:
        changes.append(f"the caption file ({old_caps.get('count')} captions, sha256 {str(old_caps.get('sha256'))[:12]}"
                       f" -> {new_caps['count']} captions, sha256 {new_caps['sha256'][:12]})")
    return changes


def _claim(out_dir: Path, manifest: dict, rank: int) -> None:
    """Refuse a folder holding another run (naming what changed); rank 0 writes the manifest of a new one."""
    path = out_dir / MANIFEST_NAME
    if path.exists():
        changes = _changes(json.loads(path.read_text(encoding="utf-8")), manifest)
        if changes:
            raise ValueError(f"{out_dir} holds embeddings made differently: {'; '.join(changes)}. Rerun with the "
                             f"same settings to finish it, or write to another folder")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        text = json.dumps(manifest, indent=1)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# -- writing --------------------------------------------------------------------------------------------------------
def shard_prefix(lines: list[int], lengths: list[int], hidden: int, dtype: torch.dtype) -> bytes:
    """The first bytes of a shard file (safetensors): header, offsets [n + 1] and lines [n] (int64); the embeddings
    [sum(lengths), hidden] follow, written as batches arrive."""
    offsets = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    index = [("offsets", "I64", [len(offsets)], 8 * len(offsets)), ("lines", "I64", [len(lines)], 8 * len(lines)),
             ("embeddings", SAFETENSORS_DTYPES[dtype], [int(offsets[-1]), hidden],
              int(offsets[-1]) * hidden * dtype.itemsize)]
    header, start = {}, 0
    for name, code, shape, nbytes in index:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [start, start + nbytes]}
        start += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # keeps the int64 tensors aligned
    return (len(text).to_bytes(8, "little") + text + offsets.numpy().tobytes()
            + torch.tensor(lines, dtype=torch.int64).numpy().tobytes())


class _ShardOutput:
    """Encoder outputs -> shard files, off the main thread. write() gathers a batch's real tokens on the device,
    casts them and copies them (on a side stream for a GPU) into a free host buffer; the writer thread waits for
    that copy, appends the bytes to the shard's .tmp file and frees the buffer; close() renames the file once
    its bytes are written. Float16 outputs are checked for overflow on the device, read once per shard."""

    def __init__(self, device: torch.device, hidden: int, max_tokens: int, save_dtype: torch.dtype):
        self.device, self.hidden, self.dtype = device, hidden, save_dtype
        cuda = device.type == "cuda"
        self.free: queue.Queue = queue.Queue()
        for _ in range(IN_FLIGHT):
            self.free.put(torch.empty(max_tokens * hidden, dtype=save_dtype, pin_memory=cuda))
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.jobs: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()  # paths of finished shards
        self.error: Optional[BaseException] = None
        self.abort = False
        self._bad = None  # float16: per-token "not finite" flags of the open shard, on the device
        self._written = 0  # tokens of the open shard so far
        self._thread = threading.Thread(target=self._run, name="t5core-shard-writer", daemon=True)
        self._thread.start()

    # main thread
    def open(self, final: Path, lines: list[int], lengths: list[int]) -> None:
        """Start shard file `final` for captions (lines, token counts) in the order their batches will come."""
        if self.dtype == torch.float16:
            self._bad = torch.zeros(sum(lengths), dtype=torch.bool, device=self.device)
        self._written = 0
        prefix = shard_prefix(lines, lengths, self.hidden, self.dtype)
        self.jobs.put(("open", final, prefix, lines, lengths, self._bad))

    def write(self, out: Tensor, index: LongTensor) -> None:
        """out [rows, width, D] (float32, on the device), index [n]: flat row * width + position of real tokens."""
        self.check()
        packed = out.reshape(-1, out.shape[-1]).index_select(0, index.to(out.device, non_blocking=True))
        packed = packed.to(self.dtype)  # [n, D]
        if self._bad is not None:
            self._bad[self._written:self._written + len(packed)] = ~torch.isfinite(packed).all(1)
        self._written += len(packed)
        buffer = self._free_buffer()
        host = buffer[:packed.numel()].view(packed.shape)
        self.jobs.put(("write", buffer, host, self._to_host(packed, host)))

    def close(self) -> None:
        """Finish the open shard: renamed once written, unless a float16 value overflowed."""
        overflow, event = None, None
        if self._bad is not None:
            overflow = torch.empty((), dtype=torch.bool, pin_memory=self.copy_stream is not None)
            event = self._to_host(self._bad.any(), overflow)
        self.jobs.put(("close", overflow, event))

    def _to_host(self, src: Tensor, dst: Tensor) -> Optional[torch.cuda.Event]:
        """Copy src (device) into dst (host) after the work queued so far: on a GPU on the side stream, without
        waiting (the returned event marks the end); on the CPU right away."""
        if self.copy_stream is None:
            dst.copy_(src)
            return None
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
            src.record_stream(self.copy_stream)  # its memory is not reused before the copy ran
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event

    def flush(self) -> None:
        """Wait until everything queued is written (or dropped after an error)."""
        self.jobs.join()
        self.check()

    def finished(self) -> list[Path]:
        paths = []
        while not self.done.empty():
            paths.append(self.done.get())
        return paths

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def join(self, abort: bool = False) -> None:
        """Wait for the writer (abort: drop what is queued, remove the open .tmp file), then raise its error."""
        self.abort = abort
        self.jobs.put(None)
        self._thread.join()
        self.jobs.task_done()
        if not abort:
            self.check()

    def _free_buffer(self) -> Tensor:
        while True:
            try:
                return self.free.get(timeout=1.0)
            except queue.Empty:
                self.check()  # the writer failed: it still frees buffers, but say why now

    # writer thread
    def _run(self) -> None:
        file = None
        while (job := self.jobs.get()) is not None:
            try:
                if job[0] == "write":
                    _, buffer, host, event = job
                    try:
                        if file is not None and not self.abort and self.error is None:
                            if event is not None:
                                event.synchronize()
                            file.write(host.view(-1).view(torch.uint8).numpy().data)
                    finally:
                        self.free.put(buffer)
                elif self.abort or self.error is not None:
                    continue
                elif job[0] == "open":
                    _, final, prefix, lines, lengths, bad = job
                    file = open(final.with_name(final.name + ".tmp"), "wb")
                    file.write(prefix)
                    meta = (final, lines, lengths, bad)
                else:  # close
                    _, overflow, event = job
                    final, lines, lengths, bad = meta
                    file.close()
                    file = None
                    tmp = final.with_name(final.name + ".tmp")
                    if event is not None:
                        event.synchronize()
                    if overflow is not None and bool(overflow):
                        tmp.unlink()
                        first = int(bad.nonzero()[0, 0])
                        caption = int((torch.tensor(lengths).cumsum(0) <= first).sum())
                        raise FloatingPointError(f"line {lines[caption] + 1}: embedding overflows float16; "
                                                 f"save in float32 or bfloat16 instead (--save-dtype)")
                    os.replace(tmp, final)
                    self.done.put(final)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = self.error or e
            finally:
                self.jobs.task_done()
        if file is not None:
            file.close()
            if self.abort or self.error is not None:
                Path(file.name).unlink(missing_ok=True)


# -- the run --------------------------------------------------------------------------------------------------------
def _max_over_ranks(n: int, device: torch.device) -> int:
    count = torch.tensor([n], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count)


def _prefetched(fn: Callable, items: list):
    """fn(item) for each item, computed one item ahead on a worker thread."""
    with ThreadPoolExecutor(1, thread_name_prefix="t5core-tokenize") as pool:
        future = pool.submit(fn, items[0]) if items else None
        for k in range(len(items)):
            result = future.result()
            if k + 1 < len(items):
                future = pool.submit(fn, items[k + 1])
            yield result


def _encode_batch(model: Encoder, tokenizer, tokens: list[list[int]], batch: Batch, output: _ShardOutput) -> None:
    inputs = batch_inputs(tokenizer, tokens, batch)
    if model.device.type == "cuda":  # pinned: the host-to-device copies do not wait for the device
        inputs = [t.pin_memory() for t in inputs]
    ids, mask, index = inputs
    output.write(model.encode(ids, mask), index)


def embed_captions(model: Encoder, tokenizer, captions: list[tuple[int, str]], out_dir, rank: int = 0,
                   world: int = 1, settings: EmbedSettings = EmbedSettings(),
                   on_shard: Optional[Callable[[Path], None]] = None) -> list[Path]:
    """Encode this rank's share of (line, caption) pairs (read_captions) into shard files in out_dir; shards already
    there are kept. on_shard(path) is called on this thread once a new shard file is complete (a few batches
    later; with FSDP before the next shard). Returns this rank's shard paths, old and new. A sharded (FSDP) model
    needs its ranks together: every rank then runs the same number of forward calls, with one-token calls where
    it has less work."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank, world: need 0 <= rank < world, got rank {rank!r}, world {world!r}")
    out_dir = Path(out_dir)
    manifest = _manifest(model, captions, world, settings)
    _claim(out_dir, manifest, rank)
    mine = captions[rank::world]
    size = settings.shard_size
    shards = [(out_dir / shard_name(rank, i), mine[start:start + size])
              for i, start in enumerate(range(0, len(mine), size))]
    pending = [(path, part) for path, part in shards if not path.exists()]
    rounds = _max_over_ranks(len(pending), model.device) if model.sharded else len(pending)
    buckets = model.compiled
    save_dtype = parse_dtype(settings.save_dtype)
    max_tokens = max(settings.tokens_per_batch, settings.max_length)  # real tokens in a batch, at most
    output = _ShardOutput(model.device, model.config.hidden_dim, max_tokens, save_dtype)
    tokenized = _prefetched(lambda part: tokenize(tokenizer, part, settings.max_length), [p for _, p in pending])
    try:
        for k in range(rounds):
            batches = []
            if k < len(pending):
                path, part = pending[k]
                tokens = next(tokenized)
                batches = plan_batches([len(t) for t in tokens], settings.tokens_per_batch, settings.batch_size,
                                       buckets)
                order = [i for b in batches for i in b.members]  # the captions in the order they come out
                output.open(path, [part[i][0] for i in order], [len(tokens[i]) for i in order])
            calls = _max_over_ranks(len(batches), model.device) if model.sharded else len(batches)
            for b in range(calls):
                if b < len(batches):
                    _encode_batch(model, tokenizer, tokens, batches[b], output)
                else:  # an FSDP rank with less work still joins the sharded forward
                    model.encode(torch.full((1, 1), tokenizer.eos_id(), dtype=torch.long))
            if batches:
                output.close()
            if model.sharded:  # the ranks move in step anyway: each reports its shard in the round that wrote it
                output.flush()
            for done in output.finished():
                if on_shard:
                    on_shard(done)
    except BaseException:
        output.join(abort=True)
        raise
    finally:
        tokenized.close()
    output.join()
    for done in output.finished():
        if on_shard:
            on_shard(done)
    return [path for path, _ in shards]


# -- reading --------------------------------------------------------------------------------------------------------
def read_caption_embeddings(out_dir) -> dict[int, Tensor]:
    """A finished embed folder -> {line: embeddings [tokens, D]}. An unfinished run (shards missing) or a caption
    found twice is an error."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{out_dir}: no {MANIFEST_NAME} (not an embed output folder)")
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    files = [out_dir / shard["file"] for shard in manifest["shards"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: {len(missing)} of {len(files)} shards are not written yet ({missing[0]}"
                                f"{', ...' if len(missing) > 1 else ''}): rerun the same embed command to finish")
    result = {}
    for f in files:
        d = load_file(str(f))
        offsets = d["offsets"].tolist()
        for i, line in enumerate(d["lines"].tolist()):
            if line in result:
                raise ValueError(f"{f}: line {line + 1} is also in another shard")
            result[line] = d["embeddings"][offsets[i]:offsets[i + 1]]
    return result


def read_captions(path) -> list[tuple[int, str]]:
    """A caption file, one caption a line -> (line, caption) pairs; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    return [(i, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
