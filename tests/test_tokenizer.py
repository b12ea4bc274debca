"""t5core.tokenizer against Hugging Face's T5 tokenizer.

The reference is `T5TokenizerFast(tokenizer_file=tokenizer.json)`, which runs the file's own pipeline. transformers 5's
`from_pretrained(folder)` rebuilds a T5 pipeline instead (WhitespaceSplit + prepend "always"), which differs from
tokenizer.json next to literal special tokens, so it is only compared on ordinary prompts.

Both sources give the same ids: the spiece.model route builds the tokenizer.json pipeline, scores included as
tokenizers reads them from JSON text (up to 1 ulp off their float32 values). That decides rare exact ties
(test_ties_follow_tokenizer_json); there transformers' own conversion of spiece.model and sentencepiece differ.
"""

import copy
import json
import pickle
import random
import warnings
from pathlib import Path

import pytest
import sentencepiece
import torch
from transformers import T5TokenizerFast

from t5core.tokenizer import BUNDLED_SPIECE, PromptTruncatedWarning, T5Tokenizer, find_tokenizer, load_tokenizer
from tiny_models import TOKENIZER_DIR

TOKENIZER_JSON = TOKENIZER_DIR / "tokenizer.json"

# ---------------------------------------------------------------------------------------------------------------
# prompts

# Ordinary prompts: here plain sentencepiece, transformers' sentencepiece backend and from_pretrained agree with
# tokenizer.json (no special-token text next to words, no exotic whitespace or combining-mark stacks).
ORDINARY = [
    "A photo of a cat wearing a tiny wizard hat, highly detailed, 8k",
    "  leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand newlines\r\n",
    "Café crème brûlée à la française, naïve coöperation",
    "Müller's Straße in Zürich",
    "日本語のテキストと English mixed",
    "emoji 😀🎉👍🏽 and ❤️ hearts",
    "ＦＵＬＬ－ＷＩＤＴＨ\u3000ｔｅｘｔ １２３",
    "ligatures: ﬁne ﬂow ﬀ",
    "numbers 3.14159 and 1,000,000 and 2024-01-01",
    "The quick brown fox jumps over the lazy dog.",
    "Quotes “smart” ‘single’ — em dash – en dash …",
    "unknown ☃ snowman ⚡",
    "URL https://example.com/path?q=1&x=2",
    "C++ code: int main() { return 0; }",
    "",
    "Ελληνικά και русский текст",
    "wow!!! so cool... really???",
    "aaaaaaa zzzzzz xxx",
]
ORDINARY_WITH_SPECIALS = ["fill <extra_id_0> the <extra_id_1> blanks", "text </s> inside", "a <pad> b <unk> c"]

# Edge cases written out, one concern each.
EDGE = [
    " ", "   ", "\t\n", "a", " a", "a ", "a  b", "▁", "a ▁b", "a▁▁b", "▁hello",
    "hello<extra_id_0>world", "hello <extra_id_0> world", "hello<extra_id_0> world", "hello <extra_id_0>world",
    "<extra_id_0>", "<extra_id_0>x", " <extra_id_0> x", "<extra_id_0>   <extra_id_1>", "<extra_id_99><extra_id_0>",
    "a</s>b", "</s>", "end </s>", "<pad><unk></s>", "x<unk>y",
    "<extra_id_100>", "<extra_id_1", "extra_id_0>", "<extra_id_-1>", "<EXTRA_ID_0>",
    "full-width ＜/s＞ and ＜extra_id_3＞ and ＜unk＞", "a＜/s＞b", "x＜extra_id_0＞y",
    "a\x85b\x85", "trailing nbsp\xa0", "line\u2028sep", "ideographic\u3000space\u3000", "zero\u200bwidth\ufeffbom",
    "soft\xadhyphen", "ctrl\x00\x01\x1f\x7fchars", "\x1c\x1d\x1e\x1f", "crlf\r\nline\rcr",
    "NFD: Ame\u0301lie cafe\u0301 n\u0303",
    "Vietnamese NFD: Tie\u0302\u0301ng Vie\u0323\u0302t",
    "stacked e\u0301\u0301\u0301",
    "zalgo: h\u0335\u0321\u0327e\u0336\u0322l\u0334\u031bl\u0337o\u0338",
    "full-width + mark: Ａ\u0301 ▁\u0302",
    "\u0301 leading mark",
    "ZWJ family 👨\u200d👩\u200d👧\u200d👦, flags 🇩🇪🇯🇵, keycap 1\ufe0f\u20e3, ©\ufe0f ™\ufe0f",
    "halfwidth ｶﾞｷﾞ ﾊﾟ", "Hangul jamo \u1100\u1161\u11a8 and 한국어", "Thai ภาษาไทย ำ", "Hindi हिन्दी क्ष",
    "Arabic العربية \u0600\u0661", "compat ①②③ ⑴ ½ ² ㎏ ℃ № ™ Ⅻ ㈱", "math 𝐀𝐁𝐂 𝒜 ℝ∑∫√∞≠≤",
    "Ǆǅǆ İı ß ẞ ﬅ", "xxx AAA !!! ... ??? ---- ==== lololol hahaha", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "mixed\tTABS\t\tand  \n\n newlines ", "<<>> </ s> < /s> <s> </S>",
]

WORDS = (
    "a photo of the cat dog wearing hat in on red blue big small castle mountain sunset highly detailed 8k "
    "artstation trending portrait woman man cinematic lighting octane render masterpiece"
).split()
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789.,:;",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    " \t\n\r\x0b\x0c\x85\xa0\u2000\u2003\u200a\u3000\u2028\u2029\u202f\u205f\x1c\x1f\u1680",
    "\u0300\u0301\u0302\u0303\u0308\u0327\u0323\u20dd\u0345",
    "éèêëàáâäçñøåæœßÉÀÇ",
    "日本語中文字漢字のテキスト한국어텍스트",
    "😀👨\u200d👩\u200d👧🇩🇪👍🏽❤\ufe0f✨",
    "ＡＢＣａｂｃ１２３！？（）＜＞／ｓ",
    "ﬁﬂﬀﬃ№™℃㎏㈱①⑴ⅻ½²",
    "العربية हिन्दी ภาษาไทย Ελληνικά Русский",
    "▁_",
    "\u200b\u200c\ufeff\u00ad\x00\x01\x7f",
    "ǅǈǋ\u0130\u0131ﬅ\U0001d400\U0001d41a\u2126\u212b\u2160\u33a1\uff9e\uff76\uff9f",
]
SPECIALS = ["<extra_id_0>", "<extra_id_5>", "<extra_id_17>", "<extra_id_99>", "</s>", "<pad>", "<unk>",
            "<extra_id_100>", "＜/s＞"]
SEPARATORS = ["", " ", " ", " ", "  ", "\t", "\n", "\u3000", " \n "]
REPEATS = ["!!!", "...", "???", "xxx", "AAA", "zzzz", "----"]


def _random_prompt(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 15)):
        r = rng.random()
        if r < 0.4:
            parts.append(rng.choice(WORDS) + (rng.choice(REPEATS) if rng.random() < 0.2 else ""))
        elif r < 0.5:
            parts.append(rng.choice(SPECIALS))
        else:
            pool = rng.choice(POOLS)
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts)


def _long_prompts() -> list[str]:
    rng = random.Random(7)
    return [
        "a highly detailed painting of a castle on a mountain at sunset, " * 60,
        " ".join(_random_prompt(rng) for _ in range(80)),
        "<extra_id_0> " + "word " * 700 + "</s> tail",
    ]


def _prompts() -> list[str]:
    rng = random.Random(1234)
    prompts = ORDINARY + ORDINARY_WITH_SPECIALS + EDGE + [_random_prompt(rng) for _ in range(160)] + _long_prompts()
    return list(dict.fromkeys(prompts))  # without repeats


PROMPTS = _prompts()

# Character-level random text for the property test: every character drawn from a mixed alphabet, with literal
# special-token text (real, full-width and unknown ones) dropped in.
ALPHABET = "".join(POOLS) + "aaaeeeooo    "
LITERALS = SPECIALS + ["<s>", "＜extra_id_5＞", "<extra_id_5"]


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 6)):
        parts.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12))))
        if rng.random() < 0.4:
            parts.append(rng.choice(LITERALS))
    return "".join(parts)


_rng = random.Random(2026)
RANDOM_TEXTS = [_random_text(_rng) for _ in range(2000)]

# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def hf_fast():
    return T5TokenizerFast(tokenizer_file=str(TOKENIZER_JSON))


@pytest.fixture(scope="module")
def hf_ids(hf_fast):
    return hf_fast(PROMPTS)["input_ids"]


@pytest.fixture(scope="module")
def tok_json() -> T5Tokenizer:
    return load_tokenizer(TOKENIZER_JSON)


@pytest.fixture(scope="module")
def tok_spiece() -> T5Tokenizer:
    return load_tokenizer(BUNDLED_SPIECE)


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("spiece")
    (folder / "spiece.model").write_bytes(BUNDLED_SPIECE.read_bytes())
    return folder


# ---------------------------------------------------------------------------------------------------------------
# ids against Hugging Face


def test_prompt_set_is_varied_enough(tok_json):
    assert len(PROMPTS) >= 200
    assert max(len(tok_json.encode_ids(p)) for p in PROMPTS) > 512
    assert len(set(RANDOM_TEXTS)) > 1900


@pytest.mark.parametrize("route", ["tokenizer.json", "spiece.model", "spiece folder", "spiece uint8 tensor"])
def test_ids_match_hf(route, tok_json, tok_spiece, spiece_folder, hf_ids):
    if route == "tokenizer.json":
        tok = tok_json
    elif route == "spiece.model":
        tok = tok_spiece
    elif route == "spiece folder":
        tok = load_tokenizer(spiece_folder)
    else:  # as ComfyUI checkpoints embed it
        tok = load_tokenizer(torch.frombuffer(bytearray(BUNDLED_SPIECE.read_bytes()), dtype=torch.uint8))
    for prompt, expected in zip(PROMPTS, hf_ids):
        assert tok.encode_ids(prompt) == expected, repr(prompt)


@pytest.mark.parametrize("source", ["tokenizer.json", "spiece.model"])
def test_random_text_matches_hf(source, tok_json, tok_spiece, hf_fast):
    tok = tok_json if source == "tokenizer.json" else tok_spiece
    expected = hf_fast(RANDOM_TEXTS)["input_ids"]
    for text, ids in zip(RANDOM_TEXTS, expected):
        assert tok.encode_ids(text) == ids, repr(text)
    batch, mask = tok(RANDOM_TEXTS, max_length=10_000)
    assert [row[m].tolist() for row, m in zip(batch, mask)] == expected


def test_spiece_route_builds_the_tokenizer_json_pipeline(tok_json, tok_spiece):
    """The bundled spiece.model becomes T5's tokenizer.json exactly: normalizer, pre-tokenizer, added tokens,
    post-processor, decoder, pieces and scores (as tokenizers reads them from JSON text)."""
    from_json, from_spiece = (json.loads(tok._tokenizer.to_str()) for tok in (tok_json, tok_spiece))
    vocab_json, vocab_spiece = from_json["model"].pop("vocab"), from_spiece["model"].pop("vocab")
    assert from_json == from_spiece
    assert vocab_json == vocab_spiece


def test_ties_follow_tokenizer_json(tok_json, tok_spiece, hf_fast):
    """"----" can be "---" "-" or "-" "---" (same pieces); the scores' last bits decide. Both our sources follow
    tokenizer.json; sentencepiece (float32 scores, as transformers' own conversion of spiece.model) splits the other
    way, which is what the spiece.model route would give without reading its scores back from JSON."""
    expected = hf_fast("incat----")["input_ids"]
    assert hf_fast.convert_ids_to_tokens(expected) == ["▁", "incat", "---", "-", "</s>"]
    assert tok_json.encode_ids("incat----") == tok_spiece.encode_ids("incat----") == expected
    sp = sentencepiece.SentencePieceProcessor(model_file=str(BUNDLED_SPIECE))
    assert sp.encode("incat----", out_type=str) == ["▁", "incat", "-", "---"]


def test_special_ids_and_vocab(tok_json, tok_spiece, hf_fast):
    for tok in (tok_json, tok_spiece):
        assert (tok.pad_id(), tok.eos_id(), tok.unk_id(), tok.vocab_size) == (0, 1, 2, 32100)
        assert tok.encode_ids("<extra_id_0>", add_eos=False) == [32099]
        assert tok.encode_ids("<extra_id_99>", add_eos=False) == [32000]
        names = [f"<extra_id_{k}>" for k in range(100)] + ["<pad>", "</s>", "<unk>"]
        assert [tok.encode_ids(n, add_eos=False)[0] for n in names] == hf_fast.convert_tokens_to_ids(names)
        assert tok.encode_ids("") == [1]
        assert tok.encode_ids("a photo", add_eos=False) + [1] == tok.encode_ids("a photo")


def test_bundled_spiece_is_a_plain_sentencepiece_model(tok_spiece):
    """32000 pieces without sentinels, like T5's own spiece.model; the sentencepiece runtime reads it and agrees on
    ordinary text."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(BUNDLED_SPIECE))
    assert sp.get_piece_size() == 32000 and not any("extra_id" in sp.id_to_piece(i) for i in range(32000))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    for prompt in ORDINARY:
        assert sp.encode(prompt) == tok_spiece.encode_ids(prompt, add_eos=False), repr(prompt)


@pytest.mark.parametrize("source", ["tokenizer.json", "spiece.model"])
def test_save_writes_tokenizer_json_that_loads_back(source, tok_json, tok_spiece, tmp_path):
    tok = tok_json if source == "tokenizer.json" else tok_spiece
    saved = tok.save(tmp_path / "out")
    assert saved == tmp_path / "out" / "tokenizer.json"
    again = load_tokenizer(saved.parent)
    hf = T5TokenizerFast(tokenizer_file=str(saved))
    expected = [tok.encode_ids(p) for p in PROMPTS]
    assert [again.encode_ids(p) for p in PROMPTS] == expected
    assert hf(PROMPTS)["input_ids"] == expected
    from_folder = T5TokenizerFast.from_pretrained(str(saved.parent))
    assert from_folder(ORDINARY)["input_ids"] == expected[: len(ORDINARY)]


def test_transformers_from_pretrained_agrees_on_ordinary_prompts(tok_json, spiece_folder):
    """transformers' own slow->fast conversion of spiece.model, and its from_pretrained of the tokenizer.json folder."""
    for folder in (spiece_folder, TOKENIZER_DIR):
        hf = T5TokenizerFast.from_pretrained(str(folder))
        for prompt in ORDINARY + ORDINARY_WITH_SPECIALS:
            assert hf(prompt)["input_ids"] == tok_json.encode_ids(prompt), (folder.name, prompt)


def test_pickle_and_deepcopy(tok_spiece):
    prompt = "a cat <extra_id_0> wearing a hat"
    for clone in (pickle.loads(pickle.dumps(tok_spiece)), copy.deepcopy(tok_spiece)):
        assert clone.encode_ids(prompt) == tok_spiece.encode_ids(prompt)
        assert clone.eos_id() == 1 and clone.vocab_size == 32100


# ---------------------------------------------------------------------------------------------------------------
# batches: truncation and padding


@pytest.mark.parametrize("max_length", [1, 5, 77, 512])
def test_truncation_and_padding_match_hf(max_length, tok_json, hf_fast):
    texts = ORDINARY + ORDINARY_WITH_SPECIALS + _long_prompts()
    expected = hf_fast(texts, max_length=max_length, truncation=True, padding="max_length", return_tensors="pt")
    with pytest.warns(PromptTruncatedWarning):
        ids, mask = tok_json(texts, max_length=max_length, pad_to=max_length)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(mask, expected["attention_mask"].bool())


def test_padding_to_longest_and_pad_to(tok_json):
    texts = ["a cat", "", "a photo of a cat wearing a hat"]
    rows = [tok_json.encode_ids(t) for t in texts]
    ids, mask = tok_json(texts)
    assert ids.shape == mask.shape == (3, max(map(len, rows)))
    for i, row in enumerate(rows):
        assert ids[i, : len(row)].tolist() == row and mask[i].sum() == len(row)
        assert (ids[i, len(row) :] == 0).all() and not mask[i, len(row) :].any()
    assert ids[1].tolist()[:1] == [1]  # the empty prompt is just EOS

    ids, mask = tok_json(texts, pad_to=20)
    assert ids.shape == (3, 20) and mask.sum().item() == sum(map(len, rows))
    with pytest.raises(ValueError, match="pad_to"):
        tok_json(texts, pad_to=3)
    single, _ = tok_json("a cat")
    assert single.tolist() == [rows[0]]
    ids, mask = tok_json([])
    assert ids.shape == mask.shape == (0, 0)


def test_truncation_warns_with_index_and_count(tok_json):
    long_text = "word " * 600
    n = len(tok_json.encode_ids(long_text))
    with pytest.warns(PromptTruncatedWarning, match=rf"prompt 1 .*dropped its last {n - 512} tokens") as record:
        ids, mask = tok_json(["short", long_text], max_length=512)
    assert record[0].filename == __file__  # the warning points at the caller
    assert ids.shape == (2, 512) and ids[1, -1].item() == 1 and mask[1].all()
    assert ids[1].tolist() == tok_json.encode_ids(long_text)[:511] + [1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fitting prompts, including exactly max_length tokens, do not warn
        tok_json(["short", long_text], max_length=n)
    with pytest.raises(ValueError, match="max_length"):
        tok_json("x", max_length=0)


def test_non_text_is_a_type_error(tok_json):
    with pytest.raises(TypeError, match="NoneType"):
        tok_json.encode_ids(None)
    with pytest.raises(TypeError, match="int"):
        tok_json(["a cat", 3])


# ---------------------------------------------------------------------------------------------------------------
# finding files, errors


def _write_clip_like_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    (folder / "vocab.json").write_text("{}")


def test_find_tokenizer_layouts(tmp_path):
    spiece = BUNDLED_SPIECE.read_bytes()
    # Flux-style diffusers repo: CLIP in tokenizer/, T5 in tokenizer_2/
    flux = tmp_path / "flux"
    (flux / "text_encoder_2").mkdir(parents=True)
    (flux / "text_encoder_2" / "model.safetensors").write_bytes(b"")
    _write_clip_like_tokenizer(flux / "tokenizer")
    (flux / "tokenizer_2").mkdir()
    (flux / "tokenizer_2" / "spiece.model").write_bytes(spiece)
    expected = flux / "tokenizer_2" / "spiece.model"
    assert find_tokenizer(flux / "text_encoder_2") == expected
    assert find_tokenizer(flux / "text_encoder_2" / "model.safetensors") == expected
    assert find_tokenizer(flux) == expected  # repo root: CLIP's tokenizer.json is skipped
    assert find_tokenizer(expected) == expected

    # SD3-style: T5 in tokenizer_3/ as tokenizer.json only
    sd3 = tmp_path / "sd3"
    (sd3 / "text_encoder_3").mkdir(parents=True)
    _write_clip_like_tokenizer(sd3 / "tokenizer")
    _write_clip_like_tokenizer(sd3 / "tokenizer_2")
    (sd3 / "tokenizer_3").mkdir()
    (sd3 / "tokenizer_3" / "tokenizer.json").write_bytes(TOKENIZER_JSON.read_bytes())
    assert find_tokenizer(sd3 / "text_encoder_3") == sd3 / "tokenizer_3" / "tokenizer.json"

    # tokenizer in the same folder as the weights
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "t5.safetensors").write_bytes(b"")
    (flat / "spiece.model").write_bytes(spiece)
    assert find_tokenizer(flat / "t5.safetensors") == flat / "spiece.model"

    empty = tmp_path / "empty" / "text_encoder"
    empty.mkdir(parents=True)
    assert find_tokenizer(empty) is None
    assert find_tokenizer(tmp_path / "does-not-exist" / "x.safetensors") is None


def test_folder_prefers_spiece_model(tmp_path, tok_spiece):
    (tmp_path / "spiece.model").write_bytes(BUNDLED_SPIECE.read_bytes())
    (tmp_path / "tokenizer.json").write_text("not json at all")  # would fail if it were read
    assert load_tokenizer(tmp_path).encode_ids("a cat") == tok_spiece.encode_ids("a cat")


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "spiece.model"
    with pytest.raises(FileNotFoundError, match="nope") as err:
        load_tokenizer(missing)
    assert "spiece.model" in str(err.value) and "tokenizer.json" in str(err.value)

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_folder.*expected"):
        load_tokenizer(empty)

    spiece = BUNDLED_SPIECE.read_bytes()
    cases = {
        "garbage.model": b"this is not a sentencepiece model \x00\xff\x13",
        "truncated.model": spiece[:5000],
        "empty.model": b"",
        "broken.json": b'{"model": {"type": "Unigram", "vocab": [',
        "bpe.json": json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}).encode(),
        "no_eos.json": TOKENIZER_JSON.read_text(encoding="utf-8").replace("</s>", "</eos>").encode(),
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            load_tokenizer(path)
    with pytest.raises(ValueError, match="sentencepiece model bytes"):
        load_tokenizer(b"\x00\x01garbage")


def _spiece_with(change) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    proto = sp_pb.ModelProto.FromString(BUNDLED_SPIECE.read_bytes())
    change(proto)
    return proto.SerializeToString()


@pytest.mark.parametrize("charsmap", [b"\x01", b"\x04\0\0\0\xff\xff\xff\xff\x41\x00",
                                      b"\x08\0\0\0" + b"\xff" * 8 + b"abc"])
def test_corrupt_charsmap_is_a_value_error_at_load(tmp_path, charsmap):
    """A corrupt precompiled charsmap gave a bare Exception at load, or a Rust panic (pyo3's PanicException, a
    BaseException nothing catches) at the first encode."""
    path = tmp_path / "spiece.model"
    path.write_bytes(_spiece_with(lambda p: setattr(p.normalizer_spec, "precompiled_charsmap", charsmap)))
    with pytest.raises(ValueError, match=rf"{path}: "):
        load_tokenizer(path)


def test_non_finite_piece_score(tmp_path):
    def nan_score(proto):
        proto.pieces[100].score = float("nan")

    path = tmp_path / "spiece.model"
    path.write_bytes(_spiece_with(nan_score))
    with pytest.raises(ValueError, match=rf"{path}: piece 100 \('.*'\) has score nan"):
        load_tokenizer(path)


def test_save_is_atomic(tok_json, tmp_path, monkeypatch):
    """A failing save leaves the previous tokenizer.json as it was and no partial file."""
    old = tok_json.save(tmp_path).read_bytes()
    write_text = Path.write_text

    def half_then_fail(path, text, *args, **kwargs):
        write_text(path, text[:100], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        tok_json.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    assert (tmp_path / "tokenizer.json").read_bytes() == old


def test_cli_folder_without_a_tokenizer_falls_back_with_a_warning(tmp_path, caplog):
    """embed --fsdp reads a dcp folder: with no tokenizer in it, the bundled one, said in the same logged warning
    as a checkpoint without one (Checkpoint.tokenizer_or_bundled)."""
    import argparse

    from t5core.__main__ import _tokenizer_for
    from t5core.tokenizer import BUNDLED_SPIECE, load_tokenizer

    with caplog.at_level("WARNING", logger="t5core"):
        tok = _tokenizer_for(argparse.Namespace(tokenizer=None), folder=tmp_path)
    assert f"no tokenizer in {tmp_path}; using the bundled T5 tokenizer" in caplog.text
    ids, _ = tok(["a cat on a mat"], max_length=16)
    assert torch.equal(ids, load_tokenizer(BUNDLED_SPIECE)(["a cat on a mat"], max_length=16)[0])
