"""Files damaged at random (seeded): bytes of the header overwritten, the file cut short (a tokenizer file:
bytes anywhere). Loading one, reading its tokenizer and encoding with it either works (the bytes changed were ones
nothing reads, or data no format can check) or fails with a ValueError (CheckpointError included) that names the
file: never another exception, never a message that leaves the user guessing which file. Each format's own tests
name the faults one by one; these look for the ones nobody thought of (they found a KeyError for a missing first
projection, a tokenizer error that named no file, a TypeError for a piece that is not UTF-8, and a Rust panic for a
tokenizer.json whose charsmap is corrupt)."""
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

import t5core
from t5core.save import save_encoder
from tiny_models import make_hf_encoder, save_hf

CASES = 40
VOCAB = 512


@pytest.fixture(scope="module")
def hf():
    return make_hf_encoder("t5-v1_1", vocab_size=VOCAB, d_model=256, num_heads=4, d_kv=64, d_ff=512, num_layers=2,
                           seed=3)


def load_and_encode(path: Path) -> None:
    ckpt = t5core.open_checkpoint(path)
    ckpt.own_tokenizer()
    t5core.load_encoder(ckpt).encode(torch.randint(3, VOCAB, (1, 8)))


def survive(load, name: str) -> str:
    """load() -> 'loaded' or 'refused'; any other exception, or a ValueError that does not name `name`, fails the
    test."""
    try:
        load()
        return "loaded"
    except ValueError as e:
        assert name in str(e), f"the error does not name {name}: {e}"
        return "refused"


def damaged(data: bytes, rng: random.Random, header_end: int) -> bytes:
    """One to three header bytes overwritten, or the file cut anywhere."""
    if rng.random() < 0.2:
        return data[:rng.randrange(len(data))]
    b = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        b[rng.randrange(header_end)] = rng.randrange(256)
    return bytes(b)


def refused(good: Path, header_end: int, seed: int) -> int:
    """How many of CASES damaged copies of `good` were refused (each one checked by `survive`)."""
    data, rng, seen = good.read_bytes(), random.Random(seed), {"loaded": 0, "refused": 0}
    bad = good.with_name("bad" + good.suffix)
    load_and_encode(good)
    for _ in range(CASES):
        bad.write_bytes(damaged(data, rng, header_end))
        seen[survive(lambda: load_and_encode(bad), bad.name)] += 1
    return seen["refused"]


def test_damaged_safetensors(hf, tmp_path):
    path = save_hf(hf, tmp_path / "hf") / "model.safetensors"
    assert refused(path, 8 + struct.unpack("<Q", path.read_bytes()[:8])[0], seed=1) > CASES // 2


def test_damaged_scaled_fp8_safetensors(hf, tmp_path):
    model = t5core.load_encoder(save_hf(hf, tmp_path / "hf"), weight_dtype="fp8_e4m3fn").model
    path = save_encoder(model, tmp_path / "fp8", "safetensors") / "model.safetensors"
    assert refused(path, 8 + struct.unpack("<Q", path.read_bytes()[:8])[0], seed=2) > CASES // 2


def test_safetensors_header_entries_changed(hf, tmp_path):
    """Valid JSON with one entry's dtype, shape or offsets changed, or dropped."""
    path = save_hf(hf, tmp_path / "hf") / "model.safetensors"
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    rng, bad, outcomes = random.Random(3), tmp_path / "bad.safetensors", []
    for _ in range(CASES):
        h = json.loads(json.dumps(header))
        key = rng.choice(sorted(k for k in h if k != "__metadata__"))
        change = rng.choice(["dtype", "shape", "start", "end", "drop"])
        if change == "dtype":
            h[key]["dtype"] = rng.choice(["F16", "BF16", "F8_E4M3", "I8", "F64", "BOOL"])
        elif change == "shape":
            h[key]["shape"] = [rng.choice([0, 1, 2, 256, 512]) for _ in h[key]["shape"]]
        elif change == "drop":
            del h[key]
        else:
            h[key]["data_offsets"][change == "end"] = rng.randrange(len(body))
        raw = json.dumps(h).encode()
        bad.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
        outcomes.append(survive(lambda: load_and_encode(bad), bad.name))
    assert outcomes.count("refused") > CASES // 2


def test_damaged_tensorizer(hf, tmp_path):
    model = t5core.load_encoder(save_hf(hf, tmp_path / "hf")).model
    folder = save_encoder(model, tmp_path / "tz", "tensorizer")
    data, rng = (folder / "enc.tensors").read_bytes(), random.Random(4)
    ids = torch.arange(3, 11)[None]
    want, bad, outcomes = t5core.load_encoder(folder).encode(ids), tmp_path / "bad", []

    def load():
        assert torch.equal(t5core.load_encoder(bad).encode(ids), want), "a damaged tensorizer file loaded other weights"

    for _ in range(CASES):
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(folder, bad)
        (bad / "enc.tensors").write_bytes(damaged(data, rng, len(data)))  # tensorizer hashes its tensors: anywhere
        outcomes.append(survive(load, "enc.tensors"))
    assert outcomes.count("refused") > CASES // 2


def test_damaged_gguf(hf, tmp_path):
    """A mixed-type file with the first 512 pieces of T5's tokenizer in its fields."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import spiece_tokenizer, write_gguf

    T = gguf.GGMLQuantizationType
    path = tmp_path / "t5.gguf"
    types = [T.Q8_0, T.Q5_K, T.Q4_K, T.Q6_K, T.F16]
    write_gguf(path, hf, lambda name, i: types[i % len(types)], tokenizer=lambda w: spiece_tokenizer(w, VOCAB))
    data = path.read_bytes()
    infos, end = data.find(b"token_embd.weight") - 8, gguf.GGUFReader(str(path)).data_offset - 8  # the tensor infos
    # the metadata: mostly the tokenizer's strings, where a changed byte is another token, which no check can tell
    assert refused(path, infos, seed=5) >= CASES // 4
    rng, bad, outcomes = random.Random(6), tmp_path / "bad.gguf", []
    for _ in range(CASES):  # the tensor infos: names, dimensions, types, offsets, set to edge values
        b = bytearray(data)
        at, width = rng.randrange(infos, end), rng.choice([4, 8])
        value = rng.choice([0, 1, 255, 2**31 - 1, 2**32 - 1, 2**63 - 1]) % (1 << 8 * width)
        b[at:at + width] = value.to_bytes(width, "little")
        bad.write_bytes(bytes(b))
        outcomes.append(survive(lambda: load_and_encode(bad), bad.name))
    assert outcomes.count("refused") > CASES // 2


@pytest.mark.parametrize("name", ["spiece.model", "tokenizer.json"])
def test_damaged_tokenizer_file(tmp_path, name):
    from t5core.tokenizer import BUNDLED_SPIECE
    from tiny_models import TOKENIZER_DIR

    data = (BUNDLED_SPIECE if name == "spiece.model" else TOKENIZER_DIR / name).read_bytes()
    rng, bad, outcomes = random.Random(7), tmp_path / name, []
    noise = b'0123456789,:[]{}"-. aZ' if name.endswith(".json") else bytes(range(256))  # JSON: mostly still parses
    for _ in range(CASES):
        b = bytearray(data)  # a byte anywhere: pieces, scores, the charsmap, the options
        for _ in range(rng.randint(1, 5)):
            b[rng.randrange(len(b))] = rng.choice(noise)
        bad.write_bytes(bytes(b) if rng.random() < 0.7 else data[:rng.randrange(len(data))])
        outcomes.append(survive(lambda: t5core.load_tokenizer(bad).encode_ids("A cat, 123 \u00e9 <extra_id_3>"), name))
    assert outcomes.count("refused") > CASES // 2
