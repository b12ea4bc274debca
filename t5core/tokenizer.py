"""T5 tokenizer on the `sentencepiece` runtime, giving the same ids as Hugging Face's T5 `tokenizer.json`.

Loads a sentencepiece `spiece.model`, a Hugging Face `tokenizer.json` (Unigram) or raw serialized model bytes.
Both file kinds are turned into one sentencepiece ModelProto, so both routes give identical ids.

Why not just `SentencePieceProcessor.encode(text)`: the Hugging Face tokenizer first cuts the text at special
tokens written literally in it (`<extra_id_0>`, `</s>`, ...) and then normalizes and tokenizes each piece
separately, with a leading "▁" only on the piece that starts the text (Metaspace prepend_scheme "first").
So we do the cutting and the whitespace handling here, use sentencepiece for the character map (NFKC-like
normalization) and for the Unigram segmentation, and let sentencepiece add nothing on its own.
"""

import base64
import json
import os
import re
import warnings
from pathlib import Path

import sentencepiece
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb

Piece = sp_pb.ModelProto.SentencePiece

SPIECE_NAME = "spiece.model"
TOKENIZER_JSON_NAME = "tokenizer.json"
# diffusers repos keep the T5 tokenizer beside the text encoder: tokenizer_2/ (Flux), tokenizer_3/ (SD3)
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
NUM_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>, which spiece.model files do not contain
SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")
META = "\u2581"  # "▁", sentencepiece's visible space
# What Rust's char::is_whitespace accepts (Unicode White_Space); the HF Strip normalizer uses it.
# Python's str.isspace differs (it also takes \x1c-\x1f), so spell the set out.
UNICODE_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
PREPEND_SCHEMES = ("first", "always", "never")


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than max_length allows and was cut."""


# ---------------------------------------------------------------------------------------------------------------
# tokenizer.json -> sentencepiece ModelProto


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e


def _flatten(component: dict | None) -> list[dict]:
    """A normalizer / pre_tokenizer may be one object or a Sequence of them; return them as a flat list."""
    if not component:
        return []
    inner = component.get("normalizers") or component.get("pretokenizers")
    if component.get("type") == "Sequence" and inner is not None:
        return [leaf for part in inner for leaf in _flatten(part)]
    return [component]


def _prepend_scheme_of(data: dict) -> str:
    """How the Metaspace pre-tokenizer adds the leading "▁": 'first' (only at text start), 'always', 'never'."""
    for pre in _flatten(data.get("pre_tokenizer")):
        if pre.get("type") == "Metaspace":
            if "prepend_scheme" in pre:
                return pre["prepend_scheme"]
            return "always" if pre.get("add_prefix_space", True) else "never"  # older files
    return "never"


def _trailing_sentinels(vocab: list, added_ids: set[int]) -> int:
    """How many entries at the end of vocab are the standard sentinel block <extra_id_K-1> ... <extra_id_0>.

    That block is what T5 tokenizers add on top of spiece.model; we drop it from the proto and add it back on
    load, so the written spiece.model is a plain 32000-piece one, as other sentencepiece users expect.
    """
    count = 0
    while count < len(vocab):
        idx = len(vocab) - 1 - count
        if idx not in added_ids or vocab[idx][0] != f"<extra_id_{count}>":
            break
        count += 1
    return count if count == NUM_SENTINELS else 0


def _proto_from_tokenizer_json(data: dict, path: Path) -> sp_pb.ModelProto:
    model = data.get("model") or {}
    if model.get("type") != "Unigram":
        raise ValueError(f"{path}: expected a Unigram (sentencepiece) tokenizer.json, got model type {model.get('type')!r}")
    if model.get("byte_fallback"):
        raise ValueError(f"{path}: Unigram byte_fallback is not supported")
    vocab, unk_id = model["vocab"], model.get("unk_id")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for tok_id, tok in added.items():
        if tok_id >= len(vocab) or vocab[tok_id][0] != tok["content"]:
            raise ValueError(f"{path}: added token {tok['content']!r} (id {tok_id}) is not in the Unigram vocab")
    num_pieces = len(vocab) - _trailing_sentinels(vocab, set(added))

    proto = sp_pb.ModelProto()
    for idx, (text, score) in enumerate(vocab[:num_pieces]):
        piece = proto.pieces.add(piece=text, score=score, type=Piece.NORMAL)
        if idx == unk_id:
            piece.type = Piece.UNKNOWN
        elif idx in added:  # <pad>, </s>: never produced from text by sentencepiece; we match them ourselves
            piece.type = Piece.CONTROL if added[idx].get("special", True) else Piece.USER_DEFINED

    names = [p.piece for p in proto.pieces]
    spec = proto.trainer_spec
    spec.model_type = sp_pb.TrainerSpec.UNIGRAM
    spec.vocab_size = num_pieces
    spec.unk_id = unk_id if unk_id is not None else -1
    spec.bos_id = -1  # T5 has no BOS
    spec.eos_id = names.index("</s>") if "</s>" in names else -1
    spec.pad_id = names.index("<pad>") if "<pad>" in names else -1

    charsmap = b""
    for norm in _flatten(data.get("normalizer")):
        if norm.get("type") == "Precompiled":
            charsmap = base64.b64decode(norm.get("precompiled_charsmap") or "")
    proto.normalizer_spec.name = "nmt_nfkc" if charsmap else "identity"
    proto.normalizer_spec.precompiled_charsmap = charsmap
    proto.normalizer_spec.add_dummy_prefix = _prepend_scheme_of(data) != "never"
    proto.normalizer_spec.remove_extra_whitespaces = True
    proto.normalizer_spec.escape_whitespaces = True
    return proto


def tokenizer_json_to_spiece(tokenizer_json_path: str | os.PathLike, out_spiece_path: str | os.PathLike) -> Path:
    """Convert a Hugging Face T5 tokenizer.json (Unigram) to an equivalent sentencepiece spiece.model file."""
    path = Path(tokenizer_json_path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer.json not found: {path}")
    proto = _proto_from_tokenizer_json(_read_json(path), path)
    out = Path(out_spiece_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    return out


# ---------------------------------------------------------------------------------------------------------------
# finding and loading


def _parse_proto(data: bytes, where: str) -> sp_pb.ModelProto:
    """Parse serialized sentencepiece model bytes, rejecting anything sentencepiece itself would not load."""
    proto = sp_pb.ModelProto()
    try:
        proto.ParseFromString(data)
        sentencepiece.SentencePieceProcessor(model_proto=data)  # the runtime's own validity checks
    except Exception as e:
        raise ValueError(f"{where}: not a valid sentencepiece model (expected a spiece.model) ({e})") from e
    if proto.trainer_spec.model_type != sp_pb.TrainerSpec.UNIGRAM:
        raise ValueError(f"{where}: expected a Unigram sentencepiece model, got model type {proto.trainer_spec.model_type}")
    return proto


def _is_unigram_json(path: Path) -> bool:
    """tokenizer.json files of CLIP tokenizers sit in the same kind of folders; only accept Unigram ones."""
    try:
        return _read_json(path).get("model", {}).get("type") == "Unigram"
    except (OSError, ValueError):
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
    and beside it (a diffusers text_encoder_2/ has its T5 tokenizer in ../tokenizer_2/). A folder whose number
    matches (text_encoder_3 -> tokenizer_3) is tried first.
    """
    path = Path(folder_or_file)
    if path.is_file() and path.name in (SPIECE_NAME, TOKENIZER_JSON_NAME):
        return path
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return None
    digits = re.search(r"_(\d+)$", folder.name)
    names = sorted(TOKENIZER_FOLDERS, key=lambda n: not (digits and n.endswith("_" + digits.group(1))))
    candidates = [folder] + [folder / n for n in names] + [folder.parent / n for n in names]
    for candidate in candidates:
        if candidate.is_dir() and (found := _tokenizer_in(candidate)):
            return found
    return None


def load_tokenizer(source: "str | os.PathLike | bytes | bytearray | memoryview | torch.Tensor") -> "T5Tokenizer":
    """Load a T5 tokenizer from a spiece.model, a tokenizer.json, a folder holding either (spiece.model preferred),
    or serialized sentencepiece model bytes (also a uint8 tensor, as ComfyUI checkpoints embed `spiece_model`)."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().to(torch.uint8).numpy().tobytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        return T5Tokenizer(_parse_proto(bytes(source), "sentencepiece model bytes"))

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
        data = _read_json(path)
        return T5Tokenizer(_proto_from_tokenizer_json(data, path), prepend_scheme=_prepend_scheme_of(data))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e}); {expected}") from e
    return T5Tokenizer(_parse_proto(data, str(path)))


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer


def _processor(proto: sp_pb.ModelProto, charsmap: bytes) -> sentencepiece.SentencePieceProcessor:
    """A processor over proto's pieces whose normalizer only applies charsmap: no dummy prefix, no whitespace
    handling. With an empty charsmap it leaves text untouched (then it is used only for segmentation)."""
    proto = sp_pb.ModelProto.FromString(proto.SerializeToString())
    spec = proto.normalizer_spec
    spec.name = "nmt_nfkc" if charsmap else "identity"
    spec.precompiled_charsmap = charsmap
    spec.add_dummy_prefix = spec.remove_extra_whitespaces = spec.escape_whitespaces = False
    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


class T5Tokenizer:
    """T5 text -> ids. Build with load_tokenizer(); `tok(texts)` gives padded (input_ids, attention_mask)."""

    def __init__(self, proto: sp_pb.ModelProto, prepend_scheme: str = "first"):
        if prepend_scheme not in PREPEND_SCHEMES:
            raise ValueError(f"prepend_scheme must be one of {PREPEND_SCHEMES}, got {prepend_scheme!r}")
        self._proto = proto
        spec = proto.normalizer_spec
        self._prepend_scheme = prepend_scheme if spec.add_dummy_prefix else "never"
        self._clean_whitespace = spec.remove_extra_whitespaces
        self._space = META if spec.escape_whitespaces else " "
        self._normalizer = _processor(proto, spec.precompiled_charsmap)  # characters only
        self._segmenter = _processor(proto, b"")  # Unigram on already-normalized text

        names = [p.piece for p in proto.pieces]
        # Tokens the HF tokenizer matches as whole units in the raw text ("added tokens"): control/unknown/user
        # pieces plus the sentinels, which come after the model's pieces in reverse order (<extra_id_0> is last).
        self._special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type != Piece.NORMAL}
        if not any(SENTINEL_RE.fullmatch(n) for n in names):
            for k in range(NUM_SENTINELS):
                self._special[f"<extra_id_{k}>"] = len(names) + NUM_SENTINELS - 1 - k
        self.vocab_size = max(len(names), max(self._special.values(), default=-1) + 1)
        # longest first, so at one position the longest special token wins (as HF's leftmost-longest match)
        alternatives = sorted(self._special, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives)))
        self._pad_id = self._segmenter.pad_id()
        self._eos_id = self._segmenter.eos_id()
        self._unk_id = self._segmenter.unk_id()
        if self._pad_id < 0 or self._eos_id < 0:
            raise ValueError("T5 tokenizer needs <pad> and </s> control pieces")

    def pad_id(self) -> int:
        return self._pad_id

    def eos_id(self) -> int:
        return self._eos_id

    def unk_id(self) -> int:
        return self._unk_id

    def _split_special(self, text: str):
        """Yield (start offset, chunk, special id or None) in order; chunks between special tokens get None."""
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                yield pos, text[pos : m.start()], None
            yield m.start(), m.group(), self._special[m.group()]
            pos = m.end()
        if pos < len(text):
            yield pos, text[pos:], None

    def _normalize(self, chunk: str, at_text_start: bool) -> str:
        """HF's normalizer + Metaspace for one chunk: character map, strip the right end, runs of spaces -> one
        "▁", spaces -> "▁", and a leading "▁" if the scheme asks for one and the chunk has none."""
        text = self._normalizer.normalize(chunk)
        if self._clean_whitespace:
            text = re.sub(" +", " ", text.rstrip(UNICODE_WHITESPACE))
        text = text.replace(" ", self._space)
        wants_prefix = self._prepend_scheme == "always" or (self._prepend_scheme == "first" and at_text_start)
        if text and wants_prefix and not text.startswith(META):
            text = META + text
        return text

    def encode_ids(self, text: str, add_eos: bool = True) -> list[int]:
        """Token ids of one text, with EOS appended unless add_eos=False. No truncation."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        ids: list[int] = []
        for start, chunk, special in self._split_special(text):
            if special is not None:
                ids.append(special)
                continue
            # Normalization can create special-token text (full-width "＜/s＞" -> "</s>"); HF's Unigram then picks
            # that vocab entry (score 0 beats any split), so cut again and map those to their ids too.
            for _, part, special2 in self._split_special(self._normalize(chunk, at_text_start=start == 0)):
                ids.extend([special2] if special2 is not None else self._segmenter.encode(part))
        if add_eos:
            ids.append(self._eos_id)
        return ids

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
        rows = []
        for index, text in enumerate(texts):
            ids = self.encode_ids(text, add_eos=False)
            if len(ids) + 1 > max_length:
                dropped = len(ids) + 1 - max_length
                warnings.warn(
                    f"prompt {index} has {len(ids) + 1} tokens (with EOS), more than max_length={max_length}; "
                    f"dropped its last {dropped} tokens",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
                ids = ids[: max_length - 1]
            rows.append(ids + [self._eos_id])

        longest = max((len(r) for r in rows), default=0)
        if pad_to is not None and pad_to < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest encoded prompt ({longest} tokens)")
        length = longest if pad_to is None else pad_to
        input_ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return input_ids, mask

    def save(self, folder: str | os.PathLike) -> Path:
        """Write folder/spiece.model, a plain sentencepiece model (no sentinels; loading adds them back)."""
        out = Path(folder) / SPIECE_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self._proto.SerializeToString())
        return out

    def __repr__(self) -> str:
        return f"T5Tokenizer(vocab_size={self.vocab_size}, prepend_scheme={self._prepend_scheme!r})"
