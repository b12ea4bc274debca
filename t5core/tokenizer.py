"""T5 tokenizer giving the same ids as Hugging Face's T5 `tokenizer.json`, without transformers / tokenizers.

Loads a sentencepiece `spiece.model`, a Hugging Face `tokenizer.json` (Unigram) or raw serialized model bytes.
Both file kinds become one sentencepiece ModelProto (so both routes give identical ids, and `save` writes a plain
spiece.model); the sentencepiece runtime validates it and names pad / eos / unk.

The encoding itself is done here rather than by `SentencePieceProcessor.encode`, because the HF tokenizer (the
reference) differs from it in ways that change ids:
- it first cuts the text at special tokens written literally in it (`<extra_id_0>`, `</s>`, ...), then normalizes
  and tokenizes each piece separately, with a leading "▁" only on the piece that starts the text (Metaspace
  prepend_scheme "first"); it strips trailing Unicode whitespace, not just spaces;
- its character map (NFKC-like) works per grapheme cluster and uses the shortest matching key, where
  sentencepiece takes the longest key at each position (differs e.g. for letters with two combining accents);
- its Viterbi sums scores in float64, sentencepiece in float32, which decides exact ties ("xxx", "!!!") differently.
"""

import base64
import json
import os
import re
import struct
import unicodedata
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
SENTINEL_RE = re.compile(r"<extra_id_\d+>")
META = "\u2581"  # "▁", sentencepiece's visible space
# What Rust's char::is_whitespace accepts (Unicode White_Space), which HF's Strip normalizer uses.
# Python's str.isspace differs (it also takes \x1c-\x1f), so spell the set out.
UNICODE_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
PREPEND_SCHEMES = ("first", "always", "never")
WORD_CACHE_SIZE = 1 << 16

# The real T5 v1.1 tokenizer (32000 pieces + 100 sentinels), converted from tokenizer.json: a fallback when
# no tokenizer lies beside the weights.
BUNDLED_SPIECE = Path(__file__).parent / "data" / "t5_spiece.model"


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


def _has_sentinel_tail(vocab: list, added_ids: set[int]) -> bool:
    """Does vocab end with the standard added block <extra_id_99> ... <extra_id_0>?

    That block is what T5 tokenizers add on top of spiece.model. We leave it out of the proto and add it back on
    load, so the written spiece.model is a plain 32000-piece one, as other sentencepiece users expect.
    """
    if len(vocab) < NUM_SENTINELS:
        return False
    return all(
        len(vocab) - 1 - k in added_ids and vocab[len(vocab) - 1 - k][0] == f"<extra_id_{k}>"
        for k in range(NUM_SENTINELS)
    )


def _proto_from_tokenizer_json(data: dict, path: Path) -> sp_pb.ModelProto:
    model = data.get("model") or {}
    if model.get("type") != "Unigram":
        kind = model.get("type")
        raise ValueError(f"{path}: expected a Unigram (sentencepiece) tokenizer.json, got model type {kind!r}")
    if model.get("byte_fallback"):
        raise ValueError(f"{path}: Unigram byte_fallback is not supported")
    vocab, unk_id = model.get("vocab"), model.get("unk_id")
    if not isinstance(vocab, list) or not vocab:
        raise ValueError(f"{path}: the Unigram model has no vocab")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for tok_id, tok in added.items():
        if tok_id >= len(vocab) or vocab[tok_id][0] != tok["content"]:
            raise ValueError(f"{path}: added token {tok['content']!r} (id {tok_id}) is not in the Unigram vocab")
    num_pieces = len(vocab) - (NUM_SENTINELS if _has_sentinel_tail(vocab, set(added)) else 0)

    proto = sp_pb.ModelProto()
    for idx, (text, score) in enumerate(vocab[:num_pieces]):
        piece = proto.pieces.add(piece=text, score=score, type=Piece.NORMAL)
        if idx == unk_id:
            piece.type = Piece.UNKNOWN
        elif idx in added:  # <pad>, </s>: special tokens, matched in the raw text, never produced by segmentation
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
    norm_spec = proto.normalizer_spec
    norm_spec.name = "nmt_nfkc" if charsmap else "identity"
    norm_spec.precompiled_charsmap = charsmap
    norm_spec.add_dummy_prefix = _prepend_scheme_of(data) != "never"
    norm_spec.remove_extra_whitespaces = True
    norm_spec.escape_whitespaces = True
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
# character normalization, as Hugging Face's Precompiled normalizer does it

ZERO_WIDTH_JOINERS = "\u200c\u200d"
# Characters that join the preceding grapheme cluster although their category is not M*: halfwidth katakana
# voiced marks, Thai/Lao sara am (UAX #29 Extend / SpacingMark).
EXTRA_EXTENDERS = ZERO_WIDTH_JOINERS + "\uff9e\uff9f\u0e33\u0eb3"


def _is_control(ch: str) -> bool:
    """UAX #29 Control (plus CR/LF): nothing joins to it, it joins to nothing."""
    cat = unicodedata.category(ch)
    if cat == "Cf":  # format chars are Control, except joiners and emoji tag characters (Extend)
        return ch not in ZERO_WIDTH_JOINERS and not 0xE0020 <= ord(ch) <= 0xE007F
    return cat in ("Cc", "Zl", "Zp")


def _extends(ch: str) -> bool:
    """UAX #29 Extend / ZWJ / SpacingMark: joins the grapheme cluster before it."""
    return (
        unicodedata.category(ch) in ("Mn", "Me", "Mc")
        or ch in EXTRA_EXTENDERS
        or 0x1F3FB <= ord(ch) <= 0x1F3FF  # emoji skin-tone modifiers
        or 0xE0020 <= ord(ch) <= 0xE007F  # emoji tag characters
    )


def _graphemes(text: str):
    """Split text into extended grapheme clusters (UAX #29), reduced to the rules that matter here: CR LF,
    controls, and marks joining their base. The omitted rules (Prepend, Hangul syllables, emoji ZWJ sequences,
    regional indicator pairs, Indic conjuncts) give clusters of 6+ UTF-8 bytes, which the character map handles
    character by character anyway, or clusters starting with a character the map leaves alone, which map the
    same as their characters one by one."""
    start = 0
    for i in range(1, len(text)):
        prev, ch = text[i - 1], text[i]
        if prev == "\r" and ch == "\n":
            continue
        if _is_control(prev) or _is_control(ch) or not _extends(ch):  # CR and LF are controls too
            yield text[start:i]
            start = i
    if text:
        yield text[start:]


def _unit_offset(unit: int) -> int:
    """darts-clone unit layout: child offset in bits 10..31, scaled by 256 when bit 9 is set."""
    return (unit >> 10) << ((unit & (1 << 9)) >> 6)


class _CharsMap:
    """sentencepiece's precompiled character map: a darts-clone double-array trie over UTF-8 keys whose values
    are offsets into a blob of NUL-terminated replacement strings. An empty map changes nothing."""

    def __init__(self, blob: bytes):
        self._units: tuple[int, ...] = ()
        self._strings = b""
        if blob:
            (trie_bytes,) = struct.unpack_from("<I", blob)
            self._units = struct.unpack_from(f"<{trie_bytes // 4}I", blob, 4)
            self._strings = blob[4 + trie_bytes :]
        self._char_cache: dict[str, str] = {}

    def _shortest_match(self, key: bytes) -> str | None:
        """Replacement of the shortest map key that is a prefix of `key` (None if none), walking the trie."""
        units = self._units
        pos = _unit_offset(units[0])
        for byte in key:
            pos ^= byte
            unit = units[pos]
            if unit & ((1 << 31) | 0xFF) != byte:  # label check: no edge for this byte
                return None
            pos ^= _unit_offset(unit)
            if unit & (1 << 8):  # a key ends here; its value sits in the unit at pos
                start = units[pos] & ((1 << 31) - 1)
                return self._strings[start : self._strings.index(b"\0", start)].decode("utf-8")
        return None

    def _char(self, ch: str) -> str:
        if ch not in self._char_cache:
            found = self._shortest_match(ch.encode("utf-8"))
            self._char_cache[ch] = ch if found is None else found
        return self._char_cache[ch]

    def normalize(self, text: str) -> str:
        """Map text as HF's Precompiled normalizer does: a cluster under 6 UTF-8 bytes whose start matches a key
        is replaced as a whole by that key's replacement (even if the key covers only its first character);
        any other cluster is mapped character by character."""
        if not self._units:
            return text
        out = []
        for cluster in _graphemes(text):
            if len(cluster) > 1 and len(encoded := cluster.encode("utf-8")) < 6:
                found = self._shortest_match(encoded)
                if found is not None:
                    out.append(found)
                    continue
            out.extend(self._char(ch) for ch in cluster)
        return "".join(out)


# ---------------------------------------------------------------------------------------------------------------
# Unigram segmentation


class _Unigram:
    """Viterbi segmentation of one word with the Unigram scores, done as Hugging Face's Unigram model does it:
    float64 sums; on a tie the path whose last piece starts first wins; a character that starts no
    single-character piece gets an unknown node; runs of unknowns become one unk id."""

    def __init__(self, vocab: list[tuple[str, float]], unk_id: int):
        self._scores = [score for _, score in vocab]
        self._unk_id = unk_id
        self._unk_score = min(self._scores) - 10.0  # the unknown-piece penalty of HF and sentencepiece
        # every prefix of every piece -> piece id, or -1 if the prefix is no piece; lets the scan stop early
        self._lookup: dict[str, int] = {}
        for piece_id, (piece, _) in enumerate(vocab):
            for end in range(1, len(piece)):
                self._lookup.setdefault(piece[:end], -1)
            self._lookup[piece] = piece_id
        self._cache: dict[str, tuple[int, ...]] = {}  # prompts repeat words; a plain dict keeps this picklable

    def encode_word(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= WORD_CACHE_SIZE:
                self._cache.clear()
            ids = self._cache[word] = self._viterbi(word)
        return ids

    def _viterbi(self, word: str) -> tuple[int, ...]:
        n = len(word)
        best_score: list[float | None] = [0.0] + [None] * n  # best path score ending at each position
        best_from: list[tuple[int, int]] = [(0, -1)] * (n + 1)  # (start of its last piece, piece id)

        def offer(start: int, end: int, piece_id: int, score: float) -> None:
            if best_score[end] is None or score > best_score[end]:  # strict: on a tie the earlier offer stays
                best_score[end], best_from[end] = score, (start, piece_id)

        for start in range(n):
            base = best_score[start]
            has_single_char_piece = False
            end = start + 1
            while end <= n and (piece_id := self._lookup.get(word[start:end])) is not None:
                if piece_id >= 0:
                    offer(start, end, piece_id, base + self._scores[piece_id])
                    has_single_char_piece |= end == start + 1
                end += 1
            if not has_single_char_piece:
                offer(start, start + 1, self._unk_id, base + self._unk_score)

        ids, end = [], n
        while end > 0:
            start, piece_id = best_from[end]
            # unknown runs fuse into one unk (a literal "<unk>" piece included, as in HF)
            if not (piece_id == self._unk_id and ids and ids[-1] == self._unk_id):
                ids.append(piece_id)
            end = start
        return tuple(reversed(ids))


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer


class T5Tokenizer:
    """T5 text -> ids. Build with load_tokenizer(); `tok(texts)` gives padded (input_ids, attention_mask)."""

    def __init__(self, proto: sp_pb.ModelProto, prepend_scheme: str = "first"):
        if prepend_scheme not in PREPEND_SCHEMES:
            raise ValueError(f"prepend_scheme must be one of {PREPEND_SCHEMES}, got {prepend_scheme!r}")
        # kept serialized: what save() writes, and picklable (the sentencepiece proto class is not)
        self._model_bytes = proto.SerializeToString()
        processor = sentencepiece.SentencePieceProcessor(model_proto=self._model_bytes)  # validates the model
        self._pad_id, self._eos_id, self._unk_id = processor.pad_id(), processor.eos_id(), processor.unk_id()
        if self._pad_id < 0 or self._eos_id < 0:
            raise ValueError("a T5 tokenizer needs <pad> and </s> control pieces")

        spec = proto.normalizer_spec
        self._prepend_scheme = prepend_scheme if spec.add_dummy_prefix else "never"
        self._clean_whitespace = spec.remove_extra_whitespaces
        self._space = META if spec.escape_whitespaces else " "
        self._charsmap = _CharsMap(spec.precompiled_charsmap)

        vocab = [(p.piece, p.score) for p in proto.pieces]
        # Tokens the HF tokenizer matches as whole units in the raw text ("added tokens"): control/unknown/user
        # pieces plus the sentinels, which follow the model's pieces in reverse order (<extra_id_0> is last).
        matchable = (Piece.CONTROL, Piece.UNKNOWN, Piece.USER_DEFINED)
        self._special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in matchable}
        if not any(SENTINEL_RE.fullmatch(piece) for piece, _ in vocab):
            sentinels = [f"<extra_id_{k}>" for k in reversed(range(NUM_SENTINELS))]
            self._special.update({name: len(vocab) + i for i, name in enumerate(sentinels)})
            vocab += [(name, 0.0) for name in sentinels]  # score 0, as in HF's tokenizer.json
        self.vocab_size = len(vocab)
        # longest first, so at one position the longest special token wins (as HF's leftmost-longest match)
        self._special_re = re.compile("|".join(map(re.escape, sorted(self._special, key=len, reverse=True))))
        # HF's Unigram knows all vocab entries, special ones included (score 0): normalized text that spells one,
        # e.g. full-width "＜/s＞" -> "</s>", becomes that token.
        self._unigram = _Unigram(vocab, self._unk_id)

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
        text = self._charsmap.normalize(chunk)
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
            normalized = self._normalize(chunk, at_text_start=start == 0)
            # HF's Metaspace splits before every "▁" and segments each word on its own
            for word in re.split(f"(?={META})", normalized):
                if word:
                    ids.extend(self._unigram.encode_word(word))
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
        for index, text in enumerate(texts):  # a loop, not a comprehension: the warning's stacklevel counts frames
            rows.append(self.truncate(self.encode_ids(text, add_eos=False), max_length, f"prompt {index} has"))
        return self.pad_rows(rows, pad_to)

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
        """Write folder/spiece.model, a plain sentencepiece model (no sentinels; loading adds them back).

        A tokenizer.json whose Metaspace prepends "▁" to every chunk ('always', older files) saves as one that
        prepends only at the start of the text ('first'): a spiece.model cannot say the difference.
        """
        out = Path(folder) / SPIECE_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(self._model_bytes)
        return out

    def __repr__(self) -> str:
        return f"T5Tokenizer(vocab_size={self.vocab_size}, prepend_scheme={self._prepend_scheme!r})"


# ---------------------------------------------------------------------------------------------------------------
# finding and loading


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


def _parse_proto(data: bytes, where: str) -> sp_pb.ModelProto:
    try:
        proto = sp_pb.ModelProto.FromString(data)
    except Exception as e:  # protobuf's DecodeError
        raise ValueError(f"{where}: not a sentencepiece model ({e})") from e
    if proto.trainer_spec.model_type != sp_pb.TrainerSpec.UNIGRAM:
        kind = sp_pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise ValueError(f"{where}: expected a Unigram sentencepiece model, got model type {kind}")
    return proto


def _build(proto: sp_pb.ModelProto, where: str, prepend_scheme: str = "first") -> T5Tokenizer:
    """T5Tokenizer(proto), with sentencepiece's complaints about a broken model turned into a ValueError naming
    where the model came from."""
    try:
        return T5Tokenizer(proto, prepend_scheme)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{where}: not a usable T5 sentencepiece model ({e})") from e


def load_tokenizer(source: "str | os.PathLike | bytes | bytearray | memoryview | torch.Tensor") -> T5Tokenizer:
    """Load a T5 tokenizer from a spiece.model, a tokenizer.json, a folder holding either (spiece.model preferred),
    or serialized sentencepiece model bytes (also a uint8 tensor, as ComfyUI checkpoints embed `spiece_model`)."""
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().to(torch.uint8).numpy().tobytes()
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = "sentencepiece model bytes"
        return _build(_parse_proto(bytes(source), where), where)

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
        return _build(_proto_from_tokenizer_json(data, path), str(path), _prepend_scheme_of(data))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e}); {expected}") from e
    return _build(_parse_proto(data, str(path)), str(path))
