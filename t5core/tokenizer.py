"""T5 tokenizer: Hugging Face `tokenizers` (what transformers, diffusers and ComfyUI run), so ids match by construction.

A `tokenizer.json` is used as it is. A sentencepiece `spiece.model` (a file, or its bytes as checkpoints embed it)
becomes the same pipeline that transformers' T5TokenizerFast builds from it:
  normalizer     Precompiled(charsmap) -> Strip(right) -> Replace(" {2,}" -> "▁")
  pre-tokenizer  Metaspace("▁", prepend_scheme="first"): "▁" before the first chunk only, split before each "▁"
  model          Unigram(pieces + <extra_id_99> ... <extra_id_0>, score 0), so <extra_id_0> is the last id
  added tokens   control / unknown / user-defined pieces and the sentinels, matched whole in the raw text
  post-processor $A </s>
and is then read back from its JSON text, so it holds exactly the scores a tokenizer.json holds (see _from_spiece).
"""

import itertools
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path

import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPIECE_NAME = "spiece.model"
TOKENIZER_JSON_NAME = "tokenizer.json"
# diffusers repos keep the T5 tokenizer beside the text encoder: tokenizer_2/ (Flux), tokenizer_3/ (SD3)
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
NUM_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>, which spiece.model files do not contain
META = "\u2581"  # "▁", sentencepiece's visible space
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"

# The real T5 v1.1 tokenizer (32000 pieces; loading adds the 100 sentinels): a fallback when no tokenizer lies
# beside the weights.
BUNDLED_SPIECE = Path(__file__).parent / "data" / "t5_spiece.model"


# Encoded once when a tokenizer loads: a corrupt normalizer (precompiled charsmap) fails here, not on a user's prompt.
PROBE_TEXT = "Hello,  World! 123 ÀÉîõü ß ﬁ ①Ⅻ ＡＢ\u3000ｶﾀｶﾅ 漢字 한국어 Ελληνικά русский العربية 🙂 <extra_id_0></s>"


def _guarded(where: str, what: str, call):
    """call() with tokenizers' failures as a ValueError naming `where`: it raises bare Exceptions, and a Rust panic
    arrives as pyo3's PanicException, a BaseException that callers' `except Exception` would miss."""
    try:
        return call()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        raise ValueError(f"{where}: {what} ({type(e).__name__}: {str(e).strip()[:200]})") from e


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than max_length allows and was cut."""


def _from_spiece(data: bytes, where: str) -> Tokenizer:
    """A serialized sentencepiece Unigram model -> the Tokenizer T5TokenizerFast builds from it."""
    try:
        proto = sp_pb.ModelProto.FromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{where}: not a sentencepiece model ({e})") from e
    if proto.trainer_spec.model_type != sp_pb.TrainerSpec.UNIGRAM:
        kind = sp_pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"{where}: expected a Unigram sentencepiece model, got model type {kind}")
    if not proto.pieces:
        raise ValueError(f"{where}: not a sentencepiece model (no pieces)")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    if (bad := next((i for i, (piece, _) in enumerate(vocab) if not isinstance(piece, str)), None)) is not None:
        # protobuf hands a proto2 string that is not UTF-8 over as bytes
        raise ValueError(f"{where}: piece {bad} ({vocab[bad][0]!r:.60}) is not valid UTF-8: the model is corrupt")
    if (bad := next((i for i, (_, score) in enumerate(vocab) if not math.isfinite(score)), None)) is not None:
        raise ValueError(f"{where}: piece {bad} ({vocab[bad][0]!r}) has score {vocab[bad][1]}: the model is corrupt")
    has_sentinels = any(p.piece.startswith("<extra_id_") for p in proto.pieces)
    sentinels = [] if has_sentinels else [f"<extra_id_{k}>" for k in reversed(range(NUM_SENTINELS))]
    unk_id = proto.trainer_spec.unk_id
    if not 0 <= unk_id < len(vocab):
        raise ValueError(f"{where}: unk_id {unk_id} is not a piece")
    return _guarded(where, "not a usable sentencepiece model", lambda: _build(proto, vocab, sentinels, unk_id))


def _build(proto, vocab: list, sentinels: list[str], unk_id: int) -> Tokenizer:
    """The checked model's pieces (+ sentinels) -> the tokenizers pipeline (see the module docstring)."""
    Piece = sp_pb.ModelProto.SentencePiece
    tok = Tokenizer(models.Unigram(vocab + [(name, 0.0) for name in sentinels], unk_id=unk_id))
    charsmap = proto.normalizer_spec.precompiled_charsmap
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Precompiled(charsmap)] if charsmap else [])
        + [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), META)]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always")  # as in T5's tokenizer.json
    # control and unknown pieces (<pad>, </s>, <unk>) are special; user-defined ones are matched whole but not special
    tok.add_tokens([
        AddedToken(p.piece, normalized=False, special=p.type != Piece.USER_DEFINED)
        for p in proto.pieces if p.type in (Piece.CONTROL, Piece.UNKNOWN, Piece.USER_DEFINED)
    ])
    tok.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in sentinels])
    if (eos_id := tok.token_to_id(EOS)) is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=["$A", EOS], pair=["$A", EOS, "$B", EOS], special_tokens=[(EOS, eos_id)])
    # Read it back from its JSON text, as every tokenizer.json is read: tokenizers parses the decimal scores up to
    # 1 ulp off (a quarter of T5's pieces), and exact Unigram ties ("incat----": "---" "-" or "-" "---") follow
    # those bits. So both sources, and what save() writes, give the same ids.
    return Tokenizer.from_str(tok.to_str())


class T5Tokenizer:
    """T5 text -> ids. Build with load_tokenizer(); `tok(texts)` gives padded (input_ids, attention_mask)."""

    def __init__(self, tokenizer: Tokenizer, where: str = "tokenizer"):
        if not isinstance(tokenizer.model, models.Unigram):
            raise ValueError(f"{where}: expected a Unigram (sentencepiece) T5 tokenizer, got "
                             f"{type(tokenizer.model).__name__}")
        self._pad_id, self._eos_id, self._unk_id = map(tokenizer.token_to_id, (PAD, EOS, UNK))
        if self._pad_id is None or self._eos_id is None:
            raise ValueError(f"{where}: a T5 tokenizer needs {PAD} and {EOS} tokens")
        _guarded(where, "the tokenizer fails on a probe text; its normalizer (precompiled charsmap) is corrupt",
                 lambda: tokenizer.encode(PROBE_TEXT))
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def pad_id(self) -> int:
        return self._pad_id

    def eos_id(self) -> int:
        return self._eos_id

    def unk_id(self) -> int | None:
        return self._unk_id

    def encode_ids(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of one text, with EOS appended unless add_eos=False. No truncation."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self._eos_id] if add_eos else ids

    def __call__(
        self, texts: str | list[str], max_length: int = 512, pad_to: int | None = None
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Batch encode: (input_ids [B, L] int64, attention_mask [B, L] bool), EOS-terminated, right-padded with 0.

        A text longer than max_length tokens keeps its first max_length-1 tokens plus EOS (as HF truncation=True)
        and a PromptTruncatedWarning says so. L = pad_to if given, else the longest row.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1 (room for EOS), got {max_length}")
        if bad := [type(t).__name__ for t in texts if not isinstance(t, str)]:
            raise TypeError(f"expected str prompts, got {bad[0]}")
        rows = []
        for index, ids in enumerate(self.encode_batch(texts)):  # a loop, not a comprehension: stacklevel counts frames
            rows.append(self.truncate(ids, max_length, f"prompt {index} has"))
        return self.pad_rows(rows, pad_to)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, without EOS and uncut (one call into tokenizers, which uses its threads)."""
        return [e.ids for e in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def truncate(self, ids: list[int], max_length: int, what: str, stacklevel: int = 2) -> list[int]:
        """Token ids without EOS -> at most max_length ids ending in EOS: the first max_length-1 plus EOS, as HF
        truncation=True. Dropping tokens warns (PromptTruncatedWarning) with `what` ("prompt 3 has") first."""
        if len(ids) + 1 > max_length:
            warnings.warn(f"{what} {len(ids) + 1} tokens (with EOS), more than max_length={max_length}; dropped its "
                          f"last {len(ids) + 1 - max_length} tokens", PromptTruncatedWarning, stacklevel=stacklevel + 1)
            ids = ids[: max_length - 1]
        return ids + [self._eos_id]

    def pad_rows(self, rows: list[list[int]], pad_to: int | None = None) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Token id rows -> (input_ids [B, L] int64, attention_mask [B, L] bool), right-padded with 0 to
        L = pad_to if given, else the longest row."""
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)
        longest = int(lengths.max()) if rows else 0
        if pad_to is not None and pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest encoded prompt ({longest} tokens)")
        length = longest if pad_to is None else pad_to
        mask = torch.arange(length) < lengths.reshape(-1, 1)
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        # one flat conversion: much faster than a tensor from a list of lists; row-major order fills row by row
        input_ids[mask] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
        return input_ids, mask

    def to_json(self) -> str:
        """The full pipeline as tokenizer.json text, which load_tokenizer, transformers' T5TokenizerFast, diffusers
        and ComfyUI read back."""
        return self._tokenizer.to_str(pretty=True)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write folder/tokenizer.json (to_json), under a temporary name renamed when complete."""
        from .save import write_atomic  # (t5core.save imports this module)

        out = Path(folder) / TOKENIZER_JSON_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_json()
        return write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def __repr__(self) -> str:
        return f"T5Tokenizer(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------------------------
# finding and loading


def _is_unigram_json(path: Path) -> bool:
    """tokenizer.json files of CLIP tokenizers sit in the same kind of folders; only accept Unigram ones."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("model", {}).get("type") == "Unigram"
    except (OSError, ValueError, AttributeError):
        return False


def _tokenizer_in(folder: Path) -> Path | None:
    if (folder / SPIECE_NAME).is_file():
        return folder / SPIECE_NAME
    if (folder / TOKENIZER_JSON_NAME).is_file() and _is_unigram_json(folder / TOKENIZER_JSON_NAME):
        return folder / TOKENIZER_JSON_NAME
    return None


def find_tokenizer(folder_or_file: str | os.PathLike) -> Path | None:
    """Find spiece.model / tokenizer.json for a model folder or file; None if there is none.

    Looks in the folder itself (or the folder of a file), then in tokenizer/, tokenizer_2/, tokenizer_3/ inside it
    and beside it (a diffusers text_encoder_2/ has its T5 tokenizer in ../tokenizer_2/). The folder whose number
    matches (text_encoder_3 -> tokenizer_3) is tried first.
    """
    path = Path(folder_or_file)
    if path.is_file() and path.name in (SPIECE_NAME, TOKENIZER_JSON_NAME):
        return path
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return None
    number = re.search(r"_\d+$", folder.name)
    names = sorted(TOKENIZER_FOLDERS, key=lambda name: not (number and name.endswith(number.group())))
    for candidate in [folder] + [folder / n for n in names] + [folder.parent / n for n in names]:
        if candidate.is_dir() and (found := _tokenizer_in(candidate)):
            return found
    return None


def load_tokenizer(source: "str | os.PathLike | bytes | bytearray | memoryview | torch.Tensor",
                   where: str = "sentencepiece model bytes") -> T5Tokenizer:
    """Load a T5 tokenizer from a spiece.model, a tokenizer.json, a folder holding either (spiece.model preferred),
    or serialized sentencepiece model bytes (also a uint8 tensor, as ComfyUI checkpoints embed `spiece_model`),
    which errors call `where`."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().to(torch.uint8).numpy().tobytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return T5Tokenizer(_from_spiece(bytes(source), where), where)

    path = Path(source)
    expected = f"expected a {SPIECE_NAME}, a {TOKENIZER_JSON_NAME}, or a folder holding one"
    if not path.exists():
        raise FileNotFoundError(f"T5 tokenizer not found: {path} does not exist ({expected})")
    if path.is_dir():
        found = next((path / n for n in (SPIECE_NAME, TOKENIZER_JSON_NAME) if (path / n).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"no T5 tokenizer in folder {path} ({expected})")
        path = found
    if path.suffix == ".json":
        tokenizer = _guarded(str(path), "not a readable tokenizer.json", lambda: Tokenizer.from_file(str(path)))
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e}); {expected}") from e
        tokenizer = _from_spiece(data, str(path))
    return T5Tokenizer(tokenizer, str(path))


def bundled_tokenizer(missing: str) -> T5Tokenizer:
    """The bundled T5 tokenizer, where none was found: one logged warning naming what lacks one (`missing`, e.g.
    "beside model.safetensors")."""
    logging.getLogger("t5core").warning("no tokenizer %s; using the bundled T5 tokenizer", missing)
    return load_tokenizer(BUNDLED_SPIECE)


def tokenizer_in(folder_or_file: "str | os.PathLike") -> T5Tokenizer:
    """The tokenizer find_tokenizer finds for a model folder or file, else the bundled one (bundled_tokenizer)."""
    found = find_tokenizer(folder_or_file)
    return load_tokenizer(found) if found is not None else bundled_tokenizer(f"in {folder_or_file}")
