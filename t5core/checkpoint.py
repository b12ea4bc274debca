"""What is this checkpoint? One detector for every format users have, and lazy per-tensor access to it.

Formats: Hugging Face folders (single or sharded safetensors, or pytorch_model.bin read with weights_only),
diffusers repos (text_encoder_2/ etc.), ComfyUI single files (any key prefix, scaled fp8 included), full
encoder-decoder checkpoints (the encoder is taken), tensorizer `enc.tensors` + config.json folders,
torch.distributed.checkpoint folders + config.json, and GGUF T5 / UMT5 encoder files (t5core.gguf).
Keys are reported in Hugging Face T5 naming with the prefix stripped; `native_target` maps them onto
T5EncoderStack's fused parameters.
"""
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import torch

from .fp16_scales import CONFIG_KEY as FP16_SCALES_KEY, Scales
from .fp8 import FP8_DTYPES
from .t5_common import CONFIG_LIMITS, GELUApprox, T5Config, T5FFNType, config_error_text

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
WEIGHT_SUFFIXES = (*SAFETENSORS_SUFFIXES, ".tensors", ".bin", ".pt", ".pth", ".gguf")
DIFFUSERS_T5_SUBFOLDERS = ("text_encoder_2", "text_encoder_3", "text_encoder")
# Each marker locates the encoder inside any prefix; group 1 is the prefix to strip.
HF_MARKER = re.compile(r"^(.*?)encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight$")
NATIVE_MARKER = re.compile(r"^(.*?)layers\.0\.attn\.qkv_proj\.weight$")


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """isfinite(t).all() of a non-empty floating-point tensor, as one reduction without a tensor of flags (40x
    faster on the CPU, where it was half the time of loading a file: benchmarks/load_time.py): NaN propagates into
    the min and the max, and an infinity is one of them. float8, which torch's isfinite does not take: e4m3fn's NaN is
    S.1111.111 (it has no inf), e5m2's inf and NaN have the exponent 11111; both are the masked bits' largest value."""
    if t.dtype in FP8_DTYPES:
        mask = 0x7F if t.dtype == torch.float8_e4m3fn else 0x7C
        return (t.view(torch.uint8) & mask).amax() != mask
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and the key or problem."""


MAX_SAFETENSORS_HEADER = 100_000_000
# Other conventions' weight scales (compressed-tensors / vLLM, bitsandbytes): an fp8 or int8 weight beside one of
# these is refused, not read unscaled.
_FOREIGN_SCALES = ("weight_scale", "SCB", "input_scale")
MAX_DIM = 1 << 32  # no T5 dimension comes near; a larger one is a corrupt or hostile header
INPUT_FORMATS = ("auto", "dcp")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------------
# Tensor sources: keys, shapes and single tensors, never the whole file in memory
# --------------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None)}


class SafetensorsSource:
    """Reads byte ranges of safetensors files with plain reads (no memory map), so host memory never holds the
    whole file (Checkpoint.iter_tensors reads in chunks). Each read opens its own handle, so reads may run
    concurrently."""

    def __init__(self, files: list[Path], index: Optional["ShardIndex"] = None) -> None:
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        owner: dict[str, Path] = {}
        for f in files:
            _add_shard(f, self._read_header(f), owner, index)
        if index is not None:
            index.check_complete(owner)

    def _read_header(self, f: Path) -> list[str]:
        """-> the file's keys. Every entry is checked against the file before anything is allocated: dtype, shape and offsets agree,
        tensors lie inside the data section and do not overlap, so no shape asks for more than the file holds."""
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise CheckpointError(f"{f}: not a safetensors file (bad header length {n}"
                                      f"{'' if n > size - 8 else f' for a {size}-byte file'}); it may be truncated "
                                      f"or corrupt")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise CheckpointError(f"{f}: corrupt safetensors header ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{f}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        header.pop("__metadata__", None)
        spans, entries = [], {}
        for key, info in header.items():
            def bad(problem: str) -> CheckpointError:
                return CheckpointError(f"{f}: tensor {key!r}: {problem}; the file is corrupt or not a safetensors file")

            if not isinstance(info, dict):
                raise bad(f"header entry is a JSON {type(info).__name__}, not an object")
            dtype_name = info.get("dtype")
            if not isinstance(dtype_name, str):
                raise bad(f"'dtype' is missing or not a string ({dtype_name!r})")
            dtype = _ST_DTYPES.get(dtype_name)
            if dtype is None:
                raise CheckpointError(f"{f}: tensor {key!r} has unsupported dtype {dtype_name}")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
                raise bad(f"'shape' is missing or not a list of integers ({shape!r:.80})")
            if any(d < 0 or d > MAX_DIM for d in shape):
                raise bad(f"shape {shape} has a negative or huge dimension (limit {MAX_DIM})")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
                raise bad(f"'data_offsets' is missing or not two integers ({offsets!r:.80})")
            start, end = offsets
            if not 0 <= start <= end:
                raise bad(f"data_offsets {offsets} are negative or reversed")
            if 8 + n + end > size:
                raise CheckpointError(f"{f}: truncated: tensor {key!r} ends at byte {8 + n + end} but the file has "
                                      f"{size} bytes; re-download it")
            numel = math.prod(shape)
            if numel * dtype.itemsize != end - start:
                raise bad(f"shape {shape} of {dtype_name} needs {numel * dtype.itemsize} bytes but data_offsets "
                          f"{offsets} hold {end - start}")
            spans.append((start, end, key))
            entries[key] = (f, dtype, tuple(shape), 8 + n + start, end - start)
        if overlap := _first_overlap(spans):
            raise CheckpointError(f"{f}: tensors {overlap[0]!r} and {overlap[1]!r} overlap in the file (data_offsets); "
                                  f"the file is corrupt")
        self.entries.update(entries)
        return list(entries)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][1]

    def get(self, key: str) -> torch.Tensor:
        _, dtype, shape, _, nbytes = self.entries[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.read_range(key, 0, buf)
        return buf.view(dtype).reshape(shape)

    def nbytes(self, key: str) -> int:
        return self.entries[key][4]

    def read_range(self, key: str, start: int, out: torch.Tensor) -> None:
        """Bytes [start, start + out.numel()) of tensor `key` into `out` (a contiguous uint8 CPU tensor)."""
        f, _, _, offset, _ = self.entries[key]
        with open(f, "rb") as fh:
            fh.seek(offset + start)
            if fh.readinto(memoryview(out.numpy())) != out.numel():
                raise CheckpointError(f"{f}: short read for tensor {key!r}; the file is truncated")


def _first_overlap(spans: list[tuple[int, int, str]]) -> Optional[tuple[str, str]]:
    """(start, end, key) byte spans -> the keys of two that overlap, or None. Empty spans are skipped (they hold no
    bytes); each span is compared with the furthest-reaching one before it, so no span can hide an overlap."""
    reach, reach_key = 0, None
    for start, end, key in sorted(s for s in spans if s[0] < s[1]):
        if start < reach:
            return reach_key, key
        if end > reach:
            reach, reach_key = end, key
    return None


@dataclass
class ShardIndex:
    """A sharded checkpoint's index: which shard file holds each tensor (weight_map)."""

    path: Path
    shard_of: dict[str, Path]  # tensor name -> shard file

    def check_key(self, key: str, f: Path) -> None:
        if key in self.shard_of and self.shard_of[key] != f:
            raise CheckpointError(f"{f}: holds tensor {key!r}, which {self.path.name} maps to "
                                  f"{self.shard_of[key].name}: the index and the shards disagree")

    def check_complete(self, owner: dict[str, Path]) -> None:
        """Every tensor the index names lies in the shard it names."""
        for key, f in self.shard_of.items():
            if key not in owner:
                raise CheckpointError(f"{f}: has no tensor {key!r}, which {self.path.name} maps to it: the index and "
                                      f"the shards disagree")


def _add_shard(f: Path, keys: list[str], owner: dict[str, Path], index: Optional[ShardIndex]) -> None:
    """Record which file holds each of `keys`: a tensor in two files, or in a file its index does not map it to,
    is an error (never last-one-wins)."""
    for key in keys:
        if key in owner:
            raise CheckpointError(f"tensor {key!r} is in two files, {owner[key]} and {f}: which one is meant is "
                                  f"unclear; remove one")
        if index is not None:
            index.check_key(key, f)
        owner[key] = f


class TensorizerSource:
    """Lazy tensorizer reads are sequential: a read behind the current position reopens the file."""

    def __init__(self, path: Path) -> None:
        try:
            import tensorizer  # noqa: F401  (a clear error now rather than at the first read)
        except ImportError as e:
            raise CheckpointError(f"{path}: reading tensorizer files needs `pip install tensorizer`") from e
        self.path = path
        self._open()
        self.order = {k: i for i, k in enumerate(self.deser.keys())}

    def _open(self) -> None:
        from tensorizer import TensorDeserializer

        try:
            # verify_hash: each tensor's stored hashes are checked as it is read, so flipped bytes are an error
            self.deser = TensorDeserializer(str(self.path), lazy_load=True, device="cpu", verify_hash=True)
        except Exception as e:
            raise CheckpointError(f"{self.path}: not a readable tensorizer file ({e})") from e
        self.position = -1

    def keys(self) -> list[str]:
        return list(self.order)

    def shape(self, key: str) -> tuple[int, ...]:
        entry = getattr(self.deser, "_metadata", {}).get((key,))  # header only; tensorizer has no public shape query
        return tuple(entry.shape) if entry is not None else tuple(self.get(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        """From the header: tensorizer records numpy's type string ('<f4', '|i1'), or for types numpy lacks an
        opaque one followed by the torch name ('<V2\\0torch.bfloat16'). Otherwise read (no public dtype query)."""
        import numpy

        entry = getattr(self.deser, "_metadata", {}).get((key,))
        try:
            torch_name = entry.dtype.partition("\0")[2].removeprefix("torch.")
            dtype = getattr(torch, torch_name, None) if torch_name else torch.from_numpy(numpy.empty(0, entry.dtype)).dtype
        except (AttributeError, TypeError):
            dtype = None
        return dtype if isinstance(dtype, torch.dtype) else self.get(key).dtype

    def get(self, key: str) -> torch.Tensor:
        if self.order[key] <= self.position:
            self._open()
        try:
            t = self.deser[key]
        except Exception as e:
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({type(e).__name__}: {last}); the file "
                                  f"may be truncated or corrupt") from e
        self.position = self.order[key]
        return t


class TensorDictSource:
    """Tensors already in memory (a state dict) as a checkpoint source."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self.tensors[key]


# Names under which old transformers checkpoints store one tied embedding tensor (one storage) several times.
_TIED_NAMES = ("shared.weight", "embed_tokens.weight", "lm_head.weight")


def _check_dense(f: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Each tensor is backed by bytes of its own: contiguous, inside its storage, overlapping no other tensor (a
    stride-0 view or many views of one storage would let a tiny file claim a huge model). The one exception: the
    same tensor under several tied-embedding names."""
    spans: dict[int, list] = {}
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        start = t.storage_offset() * t.element_size()
        if not t.is_contiguous() or t.untyped_storage().nbytes() < start + size:
            raise CheckpointError(f"{f}: tensor {key!r} {tuple(t.shape)} is not a dense tensor of its own bytes (a "
                                  f"strided or stride-0 view, or larger than its storage): refused")
        spans.setdefault(t.untyped_storage().data_ptr(), []).append((start, start + size, key))
    for group in spans.values():
        tied = {span for span in group if span[2].endswith(_TIED_NAMES)}
        distinct = [span for span in group if span not in tied] + list({s[:2]: s for s in tied}.values())
        if overlap := _first_overlap(distinct):
            raise CheckpointError(f"{f}: tensors {overlap[0]!r} and {overlap[1]!r} share bytes (one storage): "
                                  f"refused")


def torch_file_source(files: list[Path], index: Optional[ShardIndex] = None) -> TensorDictSource:
    """pytorch_model.bin and friends: tensors only, memory-mapped. weights_only=True unpickles with torch's
    restricted unpickler (tensors, dicts, lists and plain values; no imports, no calls), so no code in the file runs."""
    tensors, owner = {}, {}
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{f}: not a loadable tensor-only torch file ({e})") from e
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f}: expected a state dict of tensors, got {type(sd).__name__}")
        sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        _check_dense(f, sd)
        _add_shard(f, list(sd), owner, index)
        tensors.update(sd)
    if index is not None:
        index.check_complete(owner)
    return TensorDictSource(tensors)


class DcpSource:
    """A torch.distributed.checkpoint folder (`.metadata` + `*.distcp`), as `convert --format dcp` writes: single
    tensors read without a process group (t5core.distributed.load_fsdp reads it sharded instead).

    `.metadata` is a pickle that torch unpickles in full: opening one runs whatever code it holds. Only opened when
    the caller names the format (format="dcp"), i.e. trusts the folder; detection never picks it."""

    def __init__(self, folder: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        try:
            meta = FileSystemReader(str(folder)).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{folder}: unreadable distributed-checkpoint metadata ({e})") from e
        self.entries = {k: (tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items()
                        if isinstance(m, TensorStorageMetadata)}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][1]

    def get(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        shape, dtype = self.entries[key]
        t = torch.empty(shape, dtype=dtype)
        try:
            dcp.load({key: t}, checkpoint_id=str(self.folder), no_dist=True)
        except (Exception, CheckpointException) as e:
            last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise CheckpointError(f"{self.folder}: cannot read tensor {key!r} ({last}); a shard file may be missing "
                                  f"or truncated") from e
        return t


# --------------------------------------------------------------------------------------------------
# Key naming
# --------------------------------------------------------------------------------------------------
_HF_LAYER = re.compile(r"^encoder\.block\.(\d+)\.layer\.([01])\.(.+)$")
_HF_LAYER_PARTS = {
    "SelfAttention.q.weight": ("attn.qkv_proj.weight", 0, 3),
    "SelfAttention.k.weight": ("attn.qkv_proj.weight", 1, 3),
    "SelfAttention.v.weight": ("attn.qkv_proj.weight", 2, 3),
    "SelfAttention.o.weight": ("attn.o_proj.weight", 0, 1),
    "SelfAttention.relative_attention_bias.weight": ("attn.relative_attention_bias.weight", 0, 1),
    "DenseReluDense.wi_0.weight": ("ffn.ff_in.weight", 0, 2),
    "DenseReluDense.wi_1.weight": ("ffn.ff_in.weight", 1, 2),
    "DenseReluDense.wi.weight": ("ffn.ff_in.weight", 0, 1),
    "DenseReluDense.wo.weight": ("ffn.ff_out.weight", 0, 1),
}

_PROJECTIONS = tuple(k for k in _HF_LAYER_PARTS if "relative_attention_bias" not in k)


def native_target(hf_key: str, config: T5Config) -> Optional[tuple[str, int, int]]:
    """Hugging Face key (prefix stripped) -> (T5EncoderStack parameter, part, parts); parts > 1 means the
    tensor fills rows [part*n/parts, (part+1)*n/parts) of a fused parameter. None: not an encoder weight."""
    if hf_key in ("shared.weight", "encoder.embed_tokens.weight"):
        return "vocab_embed.weight", 0, 1
    if hf_key == "encoder.final_layer_norm.weight":
        return "ln.weight", 0, 1
    m = _HF_LAYER.match(hf_key)
    if m is None:
        return None
    block, sub, rest = int(m[1]), m[2], m[3]
    if rest == "layer_norm.weight":
        return f"layers.{block}.ln{int(sub) + 1}.weight", 0, 1
    if rest not in _HF_LAYER_PARTS:
        return None
    name, part, parts = _HF_LAYER_PARTS[rest]
    if name.endswith("relative_attention_bias.weight") and not config.pos_emb_per_layer:
        return ("relative_attention_bias.weight", 0, 1) if block == 0 else None
    return f"layers.{block}.{name}", part, parts


def hf_key_of(native: str, part: int, config: T5Config) -> str:
    """Inverse of native_target, for writing Hugging Face-compatible files."""
    if native == "vocab_embed.weight":
        return "shared.weight"
    if native == "ln.weight":
        return "encoder.final_layer_norm.weight"
    if native == "relative_attention_bias.weight":
        return "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    m = re.match(r"^layers\.(\d+)\.(.+)$", native)
    block, rest = m[1], m[2]
    if rest in ("ln1.weight", "ln2.weight"):
        return f"encoder.block.{block}.layer.{int(rest[2]) - 1}.layer_norm.weight"
    gated = config.ffn_type == T5FFNType.GEGLU
    for hf_rest, (name, p, parts) in _HF_LAYER_PARTS.items():
        if name == rest and p == part and (rest != "ffn.ff_in.weight" or (parts == 2) == gated):
            sub = 0 if hf_rest.startswith("SelfAttention") else 1
            return f"encoder.block.{block}.layer.{sub}.{hf_rest}"
    raise KeyError(native)


# --------------------------------------------------------------------------------------------------
# Config: from config.json (Hugging Face or native) or inferred from shapes
# --------------------------------------------------------------------------------------------------
_MISSING = object()


def config_from_hf(hf: dict, where="config.json") -> T5Config:
    """A Hugging Face T5 / mT5 / UMT5 config.json -> T5Config. Every value is checked first: a missing,
    ill-typed, zero, negative or absurd one is a CheckpointError naming `where` and the config.json key."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got a {type(hf).__name__}")

    def value(key, kind, default=_MISSING, limits=None):
        v = hf.get(key, default)
        if v is _MISSING:
            raise CheckpointError(f"{where}: key {key!r} is missing")
        ok = _is_int(v) if kind is int else (isinstance(v, (int, float)) and not isinstance(v, bool)) if kind is float \
            else isinstance(v, kind)
        if not ok:
            raise CheckpointError(f"{where}: key {key!r} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {v!r:.80}")
        if limits is not None:
            lo, hi = limits
            if not (lo <= v <= hi) or (kind is float and not math.isfinite(v)):
                raise CheckpointError(f"{where}: key {key!r} is {v}, outside [{lo}, {hi}]")
        return v

    proj = value("feed_forward_proj", str, "relu")
    extra = value("t5core", dict, {})  # {"elementwise_affine": False} for fused norms saved as unit scales
    d_model = value("d_model", int, limits=CONFIG_LIMITS["hidden_dim"])
    heads = value("num_heads", int, limits=CONFIG_LIMITS["n_head"])
    if "d_kv" not in hf and d_model % heads:
        raise CheckpointError(f"{where}: 'd_model' {d_model} is not divisible by 'num_heads' {heads} (and no 'd_kv')")
    vocab = value("vocab_size", int, limits=CONFIG_LIMITS["vocab_size"])
    try:
        return T5Config(
            vocab_size=vocab, hidden_dim=d_model,
            num_layers=value("num_layers", int, limits=CONFIG_LIMITS["num_layers"]),
            n_head=heads, kv_heads=heads, head_dim=value("d_kv", int, d_model // heads, CONFIG_LIMITS["head_dim"]),
            ff_dim=value("d_ff", int, limits=CONFIG_LIMITS["ff_dim"]),
            eps=value("layer_norm_epsilon", float, 1e-6, (1e-30, 1.0)),
            ffn_type=T5FFNType.GEGLU if proj.startswith("gated") else T5FFNType.ReLU,
            gelu_approx=GELUApprox.Tanh if value("dense_act_fn", str, "gelu_new") in ("gelu_new", "gelu_pytorch_tanh") else GELUApprox.None_,
            relative_attention_num_buckets=value("relative_attention_num_buckets", int, 32,
                                                 CONFIG_LIMITS["relative_attention_num_buckets"]),
            relative_attention_max_distance=value("relative_attention_max_distance", int, 128,
                                                  CONFIG_LIMITS["relative_attention_max_distance"]),
            pos_emb_per_layer=hf.get("model_type") == "umt5",
            pad_token_id=0 if hf.get("pad_token_id") is None else value("pad_token_id", int, 0, (0, vocab - 1)),
            **extra,
        )
    except (ValueError, TypeError) as e:  # pydantic's ValidationError included: the "t5core" entry, a cross-field rule
        raise CheckpointError(f"{where}: {config_error_text(e)}") from e


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object"}


def native_config(cfg: dict, where) -> T5Config:
    """A t5core config.json (T5Config fields) -> T5Config; errors name the file and the key."""
    try:
        return T5Config.model_validate(cfg)
    except ValueError as e:
        raise CheckpointError(f"{where}: {config_error_text(e)}") from e


def hf_config_dict(config: T5Config) -> dict:
    """A config.json that transformers' T5/UMT5EncoderModel reads, for the weights in Hugging Face form
    (save.hf_state_dict): fused norms are recorded under "t5core", residual scales under FP16_SCALES_KEY."""
    gated = config.ffn_type == T5FFNType.GEGLU
    umt5 = config.pos_emb_per_layer
    extra = {} if config.elementwise_affine else {"elementwise_affine": False}
    baked = Scales.from_config(config)
    scales = ({FP16_SCALES_KEY: {"attn": list(baked.attn), "ffn": list(baked.ffn)}}
              if config.enc_attn_out_scales or config.enc_ffn_out_scales else {})
    return {
        "architectures": ["UMT5EncoderModel" if umt5 else "T5EncoderModel"],
        "model_type": "umt5" if umt5 else "t5",
        "vocab_size": config.vocab_size, "d_model": config.hidden_dim, "d_kv": config.head_dim,
        "d_ff": config.ff_dim, "num_layers": config.num_layers, "num_heads": config.n_head,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.eps, "dropout_rate": 0.0,
        "feed_forward_proj": ("gated-gelu" if gated else "relu"),
        "dense_act_fn": ("gelu_new" if config.gelu_approx == GELUApprox.Tanh else "gelu") if gated else "relu",
        "is_gated_act": gated, "is_encoder_decoder": False, "use_cache": False,
        "pad_token_id": config.pad_token_id, "eos_token_id": 1, "decoder_start_token_id": 0,
        "tie_word_embeddings": False, "torch_dtype": str(config.dtype).removeprefix("torch."),
        **({"t5core": extra} if extra else {}),
        **scales,
    }


def infer_config(shape_of: dict[str, tuple[int, ...]], where: Path) -> T5Config:
    """Architecture from Hugging Face-named shapes alone (ComfyUI files carry no config)."""
    def need(key):
        if key not in shape_of:
            raise CheckpointError(f"{where}: T5 encoder key {key!r} is missing; cannot infer the architecture")
        return shape_of[key]

    def matrix(key):
        shape = need(key) if isinstance(key, str) else key
        if len(shape) != 2 or 0 in shape:
            raise CheckpointError(f"{where}: {key if isinstance(key, str) else 'the token embedding'} has shape "
                                  f"{tuple(shape)}, not a non-empty matrix")
        return shape

    blocks = {int(m[1]) for k in shape_of if (m := _HF_LAYER.match(k))}
    q_key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    inner, d_model = matrix(q_key)
    bias_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    buckets, heads = matrix(bias_key)
    if inner % heads:
        raise CheckpointError(f"{where}: {q_key} has {inner} rows, not divisible by the {heads} heads of {bias_key}")
    emb = shape_of.get("shared.weight") or shape_of.get("encoder.embed_tokens.weight")
    if emb is None:
        raise CheckpointError(f"{where}: no token embedding ('shared.weight' or 'encoder.embed_tokens.weight')")
    matrix(emb)
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shape_of
    ff = matrix("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    try:
        return T5Config(
            vocab_size=emb[0], hidden_dim=d_model, num_layers=max(blocks) + 1, n_head=heads, kv_heads=heads,
            head_dim=inner // heads, ff_dim=ff, relative_attention_num_buckets=buckets,
            ffn_type=T5FFNType.GEGLU if gated else T5FFNType.ReLU,
            pos_emb_per_layer="encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in shape_of,
        )
    except ValueError as e:
        raise CheckpointError(f"{where}: the architecture inferred from the tensor shapes is invalid: "
                              f"{config_error_text(e)}") from e


# --------------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------------
def raise_non_finite(path, flags: list) -> None:
    """flags: (tensor name, 0-d bool tensor: all finite), collected without host syncs; one sync here. A flag that is
    False is a CheckpointError naming the file and the tensor."""
    if flags and not bool(torch.stack([f for _, f in flags]).all()):
        name = next(n for n, f in flags if not bool(f))
        raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values: the file is corrupt "
                              f"(re-download it)")


@dataclass
class Checkpoint:
    """An opened T5 encoder checkpoint: lazy tensors in Hugging Face naming, plus its config."""

    path: Path
    format: str
    source: object
    keys: dict[str, str]  # HF-style key (prefix stripped) -> key in the source
    config: T5Config
    native: bool = False  # keys are already T5EncoderStack names (tensorizer files written by t5core)
    tokenizer: Optional[Path] = None
    tokenizer_bytes: Optional[bytes] = field(default=None, repr=False)  # ComfyUI files may embed `spiece_model`
    fp16_scales: Optional[Scales] = None  # recorded in config.json beside Hugging Face-form weights

    def own_tokenizer(self):
        """The tokenizer beside the weights, else the one the file embeds (ComfyUI's `spiece_model`, GGUF's
        tokenizer.ggml.* fields; errors name the file and which), else None."""
        from .tokenizer import load_tokenizer

        if self.tokenizer is not None:
            return load_tokenizer(self.tokenizer)
        if self.tokenizer_bytes is None:
            return None
        what = "its tokenizer.ggml.* fields" if self.format == "gguf" else "its embedded spiece_model"
        return load_tokenizer(self.tokenizer_bytes, where=f"{self.path} ({what})")

    def tokenizer_or_bundled(self):
        """own_tokenizer(), else the bundled T5 tokenizer (a logged warning says so)."""
        from .tokenizer import bundled_tokenizer

        own = self.own_tokenizer()
        return own if own is not None else bundled_tokenizer(f"beside {self.path}")

    def get(self, key: str, device="cpu", keep_fp8: bool = False) -> torch.Tensor:
        """One tensor, on `device`, dequantized if it is float8 (weight * scale_weight) unless keep_fp8."""
        t = self.source.get(self.keys[key]).to(device)
        return self._checked(key, t) if keep_fp8 else self._dequantized(key, t)

    def _dequantized(self, key: str, t: torch.Tensor, pending: Optional[list] = None) -> torch.Tensor:
        if t.dtype in FP8_DTYPES:
            scale = self.fp8_scale(key, tuple(t.shape)).to(t.device)
            t = t.float() * (scale.view(-1, *[1] * (t.dim() - 1)) if t.dim() else scale)
        return self._checked(key, t, pending)

    @cached_property
    def _source_keys(self) -> frozenset:
        return frozenset(self.source.keys())

    @cached_property
    def _scaled_fp8(self) -> bool:
        """ComfyUI's scaled fp8 convention: a scale_weight, or the scaled_fp8 marker, anywhere in the file."""
        return any(k.endswith(("scale_weight", "scaled_fp8")) for k in self._source_keys)

    def fp8_scale_key(self, key: str) -> Optional[str]:
        """The source key of the float8 tensor `key`'s ComfyUI `scale_weight`; None in a plain (unscaled) fp8 file.
        In a scaled file (a scale_weight or the scaled_fp8 marker anywhere) a projection without one is a
        CheckpointError, and so is any weight beside scales of other conventions: never read as unscaled."""
        name = self.keys[key]
        stem = name.removesuffix("weight")
        foreign = [stem + suffix for suffix in _FOREIGN_SCALES if stem + suffix in self._source_keys]
        if foreign:
            raise CheckpointError(f"{self.path}: float8 tensor {name!r} comes with {foreign}, a scale convention "
                                  f"t5core does not read (it reads ComfyUI's 'scale_weight'): refused")
        if stem + "scale_weight" in self._source_keys:
            return stem + "scale_weight"
        if key.endswith(_PROJECTIONS) and self._scaled_fp8:
            raise CheckpointError(f"{self.path}: float8 tensor {name!r} has no {stem + 'scale_weight'!r}, but the "
                                  f"file is scaled fp8: it is incomplete or corrupt")
        return None

    def fp8_scale(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 scale per row [shape[0]] of the float8 tensor `key` of `shape`: its ComfyUI `scale_weight`
        (per tensor, [] or [1], or per row, [N] or [N, 1]), or 1 for plain fp8 files. A scale of 0, NaN or inf, of
        another shape, or missing in a scaled file, is a CheckpointError."""
        name = self.keys[key]
        scale_key = self.fp8_scale_key(key)
        rows = shape[0] if shape else 1
        if scale_key is None:
            return torch.ones(rows)
        scale = self.source.get(scale_key).float()
        if scale.numel() == 1:
            scale = scale.reshape(1).expand(rows)
        elif tuple(scale.shape) not in ((rows,), (rows, 1)):
            raise CheckpointError(f"{self.path}: tensor {scale_key!r} has shape {tuple(scale.shape)}, which does not "
                                  f"fit {name!r} {shape}: one scale, or one per row ({rows})")
        if not bool((torch.isfinite(scale) & (scale != 0)).all()):
            raise CheckpointError(f"{self.path}: tensor {scale_key!r} (the float8 scale of {name!r}) is 0, NaN or "
                                  f"infinite: the file is corrupt")
        return scale.reshape(rows).contiguous()

    def stored_dtype(self, key: str) -> torch.dtype:
        """The dtype `key` is stored in (from the header where the source has one)."""
        if key not in self.keys:
            raise CheckpointError(f"{self.path}: missing tensor {key!r} (a truncated or non-T5-encoder checkpoint?)")
        return self.source.dtype(self.keys[key])

    def projection_dtype(self) -> torch.dtype:
        """The dtype the projection weights are stored in (the first attention output projection's)."""
        return self.stored_dtype("layers.0.attn.o_proj.weight" if self.native else "encoder.block.0.layer.0.SelfAttention.o.weight")

    def _checked(self, key: str, t: torch.Tensor, pending: Optional[list] = None) -> torch.Tensor:
        """NaN or infinite weights are a corrupt file: one all_finite per tensor, naming it. With `pending`
        (GPU reads) the flags are collected without a host sync and checked once by _raise_non_finite."""
        if t.is_floating_point() and t.numel():
            finite = all_finite(t)
            if pending is not None:
                pending.append((key, finite))
            elif not bool(finite):
                self._raise_non_finite([(key, finite)])
        return t

    def _raise_non_finite(self, flags: list) -> None:
        """flags: (our key, 0-d bool tensor); the tensor named as the file names it."""
        def file_name(key: str) -> str:
            stored = self.keys[key]
            return self.source.entries[stored].name if self.format == "gguf" else stored

        raise_non_finite(self.path, [(file_name(k), f) for k, f in flags])

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source.shape(self.keys[key])

    def iter_tensors(self, keys: list[str], device, into: Optional[dict[str, torch.Tensor]] = None,
                     threads: int = 4, chunk_bytes: int = 64 << 20, slots: int = 6, keep_fp8: frozenset = frozenset()):
        """(key, tensor on device) in order. Safetensors files are read on worker threads in chunks, a few chunks
        ahead of use. For CUDA each chunk lands in one of `slots` reused pinned buffers and is copied to the GPU
        asynchronously, so disk reads, host-to-device copies and the caller's work overlap, and host memory
        holds slots * chunk_bytes; for the CPU chunks are read straight into the returned tensors.

        into: key -> a contiguous tensor on `device` (a parameter, or rows of one) that a stored tensor of the same
        dtype and size is read straight into, and returned as; otherwise that key gets a new tensor as usual.
        keep_fp8: keys returned as stored when float8, not dequantized (their scales: fp8_scale)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU: compare as cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        into = into or {}
        src = self.source
        if not isinstance(src, SafetensorsSource) or device.type not in ("cpu", "cuda"):
            # tensorizer reads are sequential, .bin files are mapped; other devices get one tensor at a time
            yield from ((k, self.get(k, device, k in keep_fp8)) for k in keys)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        staged = device.type == "cuda"
        size = {k: src.nbytes(self.keys[k]) for k in keys}
        chunks = [(k, start, min(chunk_bytes, size[k] - start)) for k in keys for start in range(0, max(size[k], 1), chunk_bytes)]
        slots = min(slots, len(chunks))
        slot_bytes = min(chunk_bytes, max(size.values(), default=0))
        pinned = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)] if staged else []
        copied = [None] * slots  # per pinned buffer: CUDA event of the last copy out of it
        raw: dict[str, torch.Tensor] = {}  # key -> its bytes on `device`, filled chunk by chunk

        def read(i: int, buffer_free) -> None:
            k, start, n = chunks[i]
            if staged:
                if buffer_free is not None:
                    buffer_free.synchronize()
                src.read_range(self.keys[k], start, pinned[i % slots][:n])
            else:
                src.read_range(self.keys[k], start, raw[k][start:start + n])

        ahead = slots if staged else 2 * threads
        pending = [] if staged else None  # GPU: finiteness flags, checked once at the end (no sync per tensor)
        with ThreadPoolExecutor(threads) as pool:
            futures = deque()

            in_place = set()

            def destination(k: str) -> torch.Tensor:  # the tensor's bytes on `device`
                dest, (_, dtype, _, _, _) = into.get(k), src.entries[self.keys[k]]
                if (dest is not None and dest.device == device and dest.dtype == dtype and dest.is_contiguous()
                        and dest.numel() * dest.element_size() == size[k]):
                    in_place.add(k)
                    return dest.view(-1).view(torch.uint8)
                return torch.empty(size[k], dtype=torch.uint8, device=device)

            def submit(i: int) -> None:
                k, start, _ = chunks[i]
                if start == 0:
                    raw[k] = destination(k)
                futures.append(pool.submit(read, i, copied[i % slots] if staged else None))

            for i in range(min(ahead, len(chunks))):
                submit(i)
            for i, (k, start, n) in enumerate(chunks):
                futures.popleft().result()
                if staged:
                    raw[k][start:start + n].copy_(pinned[i % slots][:n], non_blocking=True)
                    copied[i % slots] = torch.cuda.Event()
                    copied[i % slots].record(torch.cuda.current_stream(device))
                if i + ahead < len(chunks):
                    submit(i + ahead)
                if start + n == size[k]:
                    _, dtype, shape, _, _ = src.entries[self.keys[k]]
                    data = raw.pop(k)
                    t = into[k] if k in in_place else data.view(dtype).reshape(shape)
                    yield k, (self._checked(k, t, pending) if k in keep_fp8 or k in in_place
                              else self._dequantized(k, t, pending))
        if pending:
            self._raise_non_finite(pending)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e


def _shards_of(folder: Path, index: Path) -> ShardIndex:
    """The shard files an index names, each checked to lie inside `folder` (no '..', absolute paths or symlinks
    out of it) and to exist."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' object (tensor name -> shard file); the index is corrupt")
    root = folder.resolve()
    shard_of = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: weight_map entry {key!r} is {name!r}, not a file name")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or rel.drive:
            raise CheckpointError(f"{index}: weight_map entry {key!r} points outside the model folder ({name!r}); "
                                  f"refused")
        target = folder / rel
        if target.exists() and not target.resolve().is_relative_to(root):
            raise CheckpointError(f"{index}: weight_map entry {key!r} ({name!r}) is a link to {target.resolve()}, "
                                  f"outside the model folder; refused")
        shard_of[key] = target
    missing = sorted({str(s.relative_to(folder)) for s in shard_of.values() if not s.is_file()})
    if missing:
        raise CheckpointError(f"{index}: shard files missing: {missing}")
    return ShardIndex(index, shard_of)


def _resolve(path: Path, subfolder: Optional[str], format: str = "auto"
             ) -> tuple[list[Path], Optional[dict], Path, Optional[ShardIndex]]:
    """-> weight files, config.json contents (if any), folder they came from, the index of sharded files. A
    distributed checkpoint (`.metadata`, a pickle) is only ever taken when format == "dcp"."""
    if subfolder:
        if not (path / subfolder).is_dir():
            have = sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
            raise CheckpointError(f"{path}: no subfolder {subfolder!r} (subfolders here: {have})")
        path = path / subfolder
    if format == "dcp":
        folder = path.parent if path.name == ".metadata" else path
        if not (folder / ".metadata").is_file():
            raise CheckpointError(f"{folder}: format 'dcp' given but there is no distributed checkpoint here "
                                  f"(no .metadata file)")
        cfg = _read_json(folder / "config.json") if (folder / "config.json").exists() else None
        return [folder / ".metadata"], cfg, folder, None
    if path.is_file():
        if path.name == ".metadata":
            raise CheckpointError(f"{path}: a distributed checkpoint's metadata (a pickle, which can run code when "
                                  f"read); load the folder with format='dcp' (--format dcp) only if you trust it")
        cfg = path.parent / "config.json"
        return [path], (_read_json(cfg) if path.suffix == ".tensors" and cfg.exists() else None), path.parent, None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    cfg = _read_json(path / "config.json") if (path / "config.json").exists() else None
    if cfg is not None and not isinstance(cfg, dict):
        raise CheckpointError(f"{path / 'config.json'}: expected a JSON object, got a {type(cfg).__name__}")
    if (path / "model_index.json").exists():  # a diffusers repo: its T5 lives in a subfolder
        for sub in DIFFUSERS_T5_SUBFOLDERS:
            sub_cfg = path / sub / "config.json"
            sub_json = _read_json(sub_cfg) if sub_cfg.exists() else None
            if isinstance(sub_json, dict) and sub_json.get("model_type") in ("t5", "mt5", "umt5"):
                return _resolve(path / sub, None)
        raise CheckpointError(f"{path}: a diffusers repo without a T5 text encoder in {DIFFUSERS_T5_SUBFOLDERS}")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            shards = _shards_of(path, path / index)
            return sorted(set(shards.shard_of.values())), cfg, path, shards
    for name in ("enc.tensors", "model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name], cfg, path, None
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files and (path / ".metadata").exists():
        raise CheckpointError(f"{path}: only a distributed checkpoint (.metadata) here. Its metadata is a pickle, "
                              f"which can run code when read: pass format='dcp' (CLI: --format dcp, convert: "
                              f"--input-format dcp) only if you trust this folder")
    if len(files) != 1:
        raise CheckpointError(f"{path}: expected one weight file (or an index), found {[f.name for f in files] or 'none'}")
    return files, cfg, path, None


def _embedded_spiece(source, where: Path) -> bytes:
    """The serialized sentencepiece model a ComfyUI file embeds as `spiece_model`: 1-D uint8 (or int8) bytes."""
    dtype, shape = source.dtype("spiece_model"), tuple(source.shape("spiece_model"))
    if dtype not in (torch.uint8, torch.int8) or len(shape) != 1:
        raise CheckpointError(f"{where}: tensor 'spiece_model' is {str(dtype).removeprefix('torch.')} {shape}, not the "
                              f"1-D uint8 bytes of a sentencepiece model")
    return source.get("spiece_model").numpy().tobytes()


def open_checkpoint(path, subfolder: Optional[str] = None, format: Optional[str] = None) -> Checkpoint:
    """Open any supported T5 encoder checkpoint without reading its tensors.

    format: None / "auto" detects safetensors, tensorizer and tensor-only torch files, and never reads a
    torch.distributed.checkpoint folder: its `.metadata` is a pickle that can run code. "dcp" reads one; pass it
    only for folders you trust (ones you converted yourself)."""
    from .tokenizer import find_tokenizer

    format = format or "auto"
    if format not in INPUT_FORMATS:
        raise ValueError(f"format: expected one of {INPUT_FORMATS}, got {format!r}")
    path = Path(path).expanduser()
    files, cfg_json, folder, index = _resolve(path, subfolder, format)
    if cfg_json is not None and not isinstance(cfg_json, dict):
        raise CheckpointError(f"{folder / 'config.json'}: expected a JSON object, got a {type(cfg_json).__name__}")
    suffix = files[0].suffix
    if suffix == ".gguf":  # llama.cpp T5 / UMT5 encoder files (t5core.gguf); a tokenizer beside it wins over its fields
        from .gguf import open_gguf, spiece_model_bytes

        source, config, fields = open_gguf(files[0])
        tokenizer = find_tokenizer(folder)
        return Checkpoint(path=files[0], format="gguf", source=source, keys={k: k for k in source.keys()},
                          config=config, tokenizer=tokenizer,
                          tokenizer_bytes=spiece_model_bytes(fields) if fields and tokenizer is None else None)
    if suffix == ".tensors":
        source, fmt = TensorizerSource(files[0]), "tensorizer"
    elif format == "dcp":
        source, fmt = DcpSource(folder), "dcp"
    elif suffix in (".safetensors", ".sft"):
        source, fmt = SafetensorsSource(files, index), "safetensors"
    else:
        source, fmt = torch_file_source(files, index), "torch"
    where = files[0] if len(files) == 1 and fmt != "dcp" else folder
    all_keys = source.keys()

    native, prefix = False, None
    for key in all_keys:
        if m := HF_MARKER.match(key):
            prefix = m[1]
            break
        if m := NATIVE_MARKER.match(key):
            prefix, native = m[1], True
            break
    if prefix is None:
        sample = ", ".join(all_keys[:3]) or "no tensors"
        raise CheckpointError(
            f"{where}: not a T5 encoder checkpoint (no key like 'encoder.block.0.layer.0.SelfAttention.q.weight'); "
            f"its keys start: {sample}")
    keys = {k[len(prefix):]: k for k in all_keys if k.startswith(prefix)}
    if fmt == "safetensors" and any(k.endswith("scale_weight") for k in keys.values()):
        fmt = "comfyui-scaled-fp8"

    cfg_where = folder / "config.json"
    if cfg_json is not None and "hidden_dim" in cfg_json:
        config = native_config(cfg_json, cfg_where)
    elif cfg_json is not None and "d_model" in cfg_json:
        config = config_from_hf(cfg_json, cfg_where)
    elif native:
        raise CheckpointError(f"{where}: t5core-native weights need the config.json written beside them")
    else:
        config = infer_config({k: source.shape(v) for k, v in keys.items()}, where)
    emb_bytes = _embedded_spiece(source, where) if "spiece_model" in all_keys else None
    saved = (cfg_json or {}).get(FP16_SCALES_KEY)
    if saved is not None:
        try:
            saved = Scales.from_json(saved, ("attn", "ffn"), config.num_layers)
        except ValueError as e:
            raise CheckpointError(f"{cfg_where}: key {FP16_SCALES_KEY!r}: {e}") from e
    return Checkpoint(path=where, format=fmt, source=source, keys=keys, config=config, native=native,
                      tokenizer=find_tokenizer(folder), tokenizer_bytes=emb_bytes, fp16_scales=saved)

