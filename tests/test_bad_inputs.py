"""Files from strangers: no code runs, nothing is silently wrong, nothing is lost.

One test (or one parametrized case) per bad input, by class: each asserts the exception type and that the message
names the file, key, tensor or argument; that no pickle payload ran; that nothing was written or lost where
nothing should be; and (under an address-space limit, in a subprocess) that nothing is allocated beyond what the
file's bytes back."""
import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import t5core
from t5core.__main__ import main as cli
from t5core.checkpoint import CheckpointError, open_checkpoint
from t5core.save import save_encoder
from tiny_models import make_hf_encoder, save_hf

VOCAB = 512
ROOT = Path(__file__).resolve().parents[1]


# -- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    return make_hf_encoder("t5-v1_1", vocab_size=VOCAB, num_layers=2, seed=7)


@pytest.fixture(scope="module")
def hf_other():
    return make_hf_encoder("t5-v1_1", vocab_size=VOCAB, num_layers=2, seed=8)


@pytest.fixture
def folder(hf, tmp_path):
    """A Hugging Face folder: config.json + model.safetensors."""
    return save_hf(hf, tmp_path / "hf")


def state(hf_model, dtype=torch.float32) -> dict:
    return {k: v.to(dtype).clone().contiguous() for k, v in hf_model.state_dict().items()
            if k != "encoder.embed_tokens.weight"}


def single_file(hf_model, path: Path, dtype=torch.float32, **changes) -> Path:
    sd = state(hf_model, dtype)
    sd.update(changes)
    save_file(sd, str(path))
    return path


class Payload:
    """Unpickling this creates the marker file: what a hostile .metadata / .bin would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def cli_error(capsys, argv) -> str:
    """Run the CLI expecting one expected failure: exit status 2 and one `t5core: error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("t5core: error:")]
    assert len(err) == 1, err
    return err[0]


def under_memory_limit(code: str, limit_gb: float = 3.0) -> str:
    """Run `code` in a fresh interpreter whose address space may grow by at most limit_gb after importing t5core:
    a load that allocates from a shape or config the file does not back fails there (MemoryError / RuntimeError)
    instead of passing. -> its stdout and stderr."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, t5core
        from t5core.checkpoint import CheckpointError
        vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        limit = vm + int({limit_gb} * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    """) + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc.stdout + proc.stderr


# ==================================================================================================================
# 1. No code execution
# ==================================================================================================================
def write_malicious_dcp(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)


def test_payload_really_runs_when_unpickled(tmp_path):
    """The payload is real: plain unpickling creates the marker (so its absence below means nothing ran)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_hidden_metadata_does_not_take_over_an_hf_folder(hf, folder, tmp_path):
    marker = tmp_path / "PWNED"
    write_malicious_dcp(folder, marker)
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "safetensors"
    model = t5core.load_encoder(folder)
    assert model.config.num_layers == 2
    assert not marker.exists()


def test_an_open_checkpoint_is_loaded_as_opened(folder, tmp_path):
    """load_encoder(open_checkpoint(...)) reads what was opened (the same encoder as from the path); format and
    subfolder are open_checkpoint's choices, so format="dcp" beside it cannot turn the load into a pickle read."""
    marker = tmp_path / "PWNED"
    write_malicious_dcp(folder, marker)
    ckpt = open_checkpoint(folder)
    for kwargs in ({"format": "dcp"}, {"subfolder": "text_encoder_2"}):
        with pytest.raises(ValueError, match=r"subfolder and format are open_checkpoint's arguments"):
            t5core.load_encoder(ckpt, **kwargs)
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.equal(t5core.load_encoder(ckpt).encode(ids), t5core.load_encoder(folder).encode(ids))
    assert not marker.exists()


def test_metadata_only_folder_asks_for_the_format(tmp_path):
    marker = tmp_path / "PWNED"
    write_malicious_dcp(tmp_path / "dcp", marker)
    with pytest.raises(CheckpointError, match=r"dcp: only a distributed checkpoint .*format='dcp'.*--format dcp"):
        t5core.load_encoder(tmp_path / "dcp")
    with pytest.raises(CheckpointError, match=r"\.metadata: a distributed checkpoint's metadata.*format='dcp'"):
        open_checkpoint(tmp_path / "dcp" / ".metadata")
    assert not marker.exists()


def test_cli_never_reads_dcp_unless_named(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    write_malicious_dcp(tmp_path / "dcp", marker)
    line = cli_error(capsys, ["convert", str(tmp_path / "dcp"), str(tmp_path / "out")])
    assert "dcp" in line and "--format dcp" in line
    line = cli_error(capsys, ["encode", "--model", str(tmp_path / "dcp"), "--out", str(tmp_path / "e.st"), "a"])
    assert "only a distributed checkpoint" in line
    assert not marker.exists() and not (tmp_path / "out").exists() and not (tmp_path / "e.st").exists()


def test_dcp_named_explicitly_still_reads_a_real_one(hf, tmp_path):
    """format="dcp" is the opt-in: a folder convert --format dcp wrote loads back exactly."""
    model = t5core.load_encoder(save_hf(hf, tmp_path / "hf")).model
    save_encoder(model, tmp_path / "dcp", "dcp")
    with pytest.raises(CheckpointError, match="only a distributed checkpoint"):
        t5core.load_encoder(tmp_path / "dcp")
    back = t5core.load_encoder(tmp_path / "dcp", format="dcp")
    for (name, a), (_, b) in zip(model.named_parameters(), back.model.named_parameters()):
        assert torch.equal(a, b), name
    cli(["convert", str(tmp_path / "dcp"), str(tmp_path / "st"), "--input-format", "dcp", "--format", "safetensors"])
    again = t5core.load_encoder(tmp_path / "st")
    for (name, a), (_, b) in zip(model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match=r"format: expected one of .*'pickle'"):
        open_checkpoint(tmp_path / "dcp", format="pickle")
    with pytest.raises(CheckpointError, match=r"hf: format 'dcp' given but there is no distributed checkpoint"):
        open_checkpoint(tmp_path / "hf", format="dcp")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "t5.pt", "t5.pth"])
def test_pickled_torch_file_runs_nothing(hf, tmp_path, name):
    marker = tmp_path / "PWNED"
    target = tmp_path / "m" / name
    target.parent.mkdir()
    torch.save({**state(hf), "evil": Payload(marker)}, target)
    shutil.copy(save_hf(hf, tmp_path / "cfg") / "config.json", target.parent)
    with pytest.raises(CheckpointError, match=rf"{name}: not a loadable tensor-only torch file"):
        t5core.load_encoder(target.parent if name == "pytorch_model.bin" else target)
    assert not marker.exists()


def test_plain_tensor_bin_still_loads(hf, tmp_path):
    torch.save(state(hf), tmp_path / "pytorch_model.bin")
    shutil.copy(save_hf(hf, tmp_path / "cfg") / "config.json", tmp_path)
    assert t5core.load_encoder(tmp_path).config.num_layers == 2


def test_bin_tied_embedding_still_loads(hf, tmp_path):
    """Old transformers .bin files store the tied embedding under each name, one storage: the same tensor."""
    sd = state(hf)
    sd["encoder.embed_tokens.weight"] = sd["lm_head.weight"] = sd["shared.weight"]
    torch.save(sd, tmp_path / "t5.bin")
    assert t5core.load_encoder(tmp_path / "t5.bin").config.vocab_size == VOCAB


@pytest.mark.parametrize("case", ["stride-0", "shared-storage", "strided"])
def test_bin_views_cannot_claim_more_than_the_file(hf, tmp_path, case):
    """A few-KB .bin of expand() views loaded as a model of the shapes they claim; so did views of one storage."""
    sd = state(hf)
    if case == "stride-0":
        sd[K] = torch.ones(1).expand(sd[K].shape)
    elif case == "shared-storage":
        sd[Q] = sd["encoder.block.0.layer.0.SelfAttention.k.weight"]
    else:
        sd[K] = torch.zeros(sd[K].shape[1], sd[K].shape[0]).t()
    torch.save(sd, tmp_path / "t5.bin")
    key = Q if case == "shared-storage" else K
    with pytest.raises(CheckpointError, match=rf"t5\.bin: tensor.* '{key}'"):
        t5core.load_encoder(tmp_path / "t5.bin")


# ==================================================================================================================
# 2. Safetensors headers checked before anything is allocated
# ==================================================================================================================
def raw_safetensors(path: Path, header, data: bytes = b"", header_len=None) -> Path:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


Q = "encoder.block.0.layer.0.SelfAttention.q.weight"
BAD_HEADERS = [
    ("not-object", ["a", "list"], b"", "not an object"),
    ("entry-not-object", {Q: [1, 2, 3]}, b"", rf"tensor '{Q}': header entry is a JSON list"),
    ("no-offsets", {Q: {"dtype": "F32", "shape": [2, 2]}}, b"\0" * 16, rf"tensor '{Q}': 'data_offsets' is missing"),
    ("offsets-wrong-type", {Q: {"dtype": "F32", "shape": [2, 2], "data_offsets": "0-16"}}, b"\0" * 16,
     rf"tensor '{Q}': 'data_offsets' is missing or not two integers"),
    ("no-shape", {Q: {"dtype": "F32", "data_offsets": [0, 16]}}, b"\0" * 16, rf"tensor '{Q}': 'shape' is missing"),
    ("shape-floats", {Q: {"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}}, b"\0" * 16,
     rf"tensor '{Q}': 'shape' is missing or not a list of integers"),
    ("no-dtype", {Q: {"shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16, rf"tensor '{Q}': 'dtype' is missing"),
    ("unknown-dtype", {Q: {"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16,
     rf"tensor '{Q}' has unsupported dtype Q4"),
    ("negative-offset", {Q: {"dtype": "F32", "shape": [2, 2], "data_offsets": [-16, 0]}}, b"\0" * 16,
     rf"tensor '{Q}': data_offsets \[-16, 0\] are negative or reversed"),
    ("reversed-offsets", {Q: {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 0]}}, b"\0" * 16,
     "negative or reversed"),
    ("out-of-file", {Q: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1 << 40]}}, b"\0" * 16,
     rf"truncated: tensor '{Q}' ends at byte"),
    ("size-disagrees", {Q: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, b"\0" * 16,
     rf"tensor '{Q}': shape \[4, 4\] of F32 needs 64 bytes but data_offsets \[0, 16\] hold 16"),
    ("negative-dim", {Q: {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, b"\0" * 16,
     rf"tensor '{Q}': shape \[-2, -2\] has a negative or huge dimension"),
    ("huge-dim-zero-size", {Q: {"dtype": "F32", "shape": [0, 1 << 50], "data_offsets": [0, 0]}}, b"",
     rf"tensor '{Q}': shape \[0, {1 << 50}\] has a negative or huge dimension"),
    ("overlap", {Q: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                 "shared.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, b"\0" * 24,
     rf"tensors '{Q}' and 'shared.weight' overlap"),
    # an empty entry between two overlapping spans hid them from a check of neighbours only
    ("overlap-behind-empty", {"shared.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
                              "empty": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                              Q: {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, b"\0" * 64,
     rf"tensors 'shared.weight' and '{Q}' overlap"),
]


@pytest.mark.parametrize("case,header,data,message", BAD_HEADERS, ids=[c[0] for c in BAD_HEADERS])
def test_bad_safetensors_header(tmp_path, case, header, data, message):
    f = raw_safetensors(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError, match=rf"{case}\.safetensors: .*{message}"):
        t5core.load_encoder(f)


def test_header_length_larger_than_the_file(tmp_path):
    f = raw_safetensors(tmp_path / "long.safetensors", {}, header_len=1 << 40)
    with pytest.raises(CheckpointError, match=r"long\.safetensors: not a safetensors file \(bad header length"):
        open_checkpoint(f)


@pytest.fixture(scope="module")
def allocation_cases(hf, tmp_path_factory) -> dict:
    """Both allocation cases run in one interpreter under the memory limit (one torch import). -> case: output."""
    root = tmp_path_factory.mktemp("alloc")
    # The old reader took shapes on trust: the embedding of a 300 KB file claims [2**26, 64], and the config
    # inferred from it asked for a 16 GB embedding.
    f = root / "liar.safetensors"
    save_file(state(hf), str(f))
    blob = f.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header["shared.weight"]["shape"] = [1 << 26, 64]
    raw_safetensors(f, header, blob[8 + n:])  # data_offsets count from the end of the header: still valid
    # A 700-byte config.json asking for a 4M x 65536 embedding (1 TB) over the tiny weights.
    folder = save_hf(hf, root / "hf")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(vocab_size=1 << 22, d_model=1 << 16)
    (folder / "config.json").write_text(json.dumps(cfg))
    out = under_memory_limit(f"""
        for case, path in (("shape", {str(f)!r}), ("config", {str(folder)!r})):
            try:
                t5core.load_encoder(path)
                print(case, "LOADED")
            except CheckpointError as e:
                print(case, "CheckpointError:", e)
            except BaseException as e:
                print(case, "OTHER", type(e).__name__, str(e)[:300])
        """)
    return {line.split(" ", 1)[0]: line for line in out.splitlines() if line.startswith(("shape ", "config "))} | \
        {"all": out}


def test_shape_the_bytes_do_not_back_allocates_nothing(allocation_cases):
    """Under a 3 GB address-space limit the load ends in a CheckpointError naming the file and tensor."""
    out = allocation_cases.get("shape", allocation_cases["all"])
    assert "CheckpointError:" in out and "liar.safetensors" in out and "'shared.weight'" in out, out


def test_config_the_weights_do_not_back_allocates_nothing(allocation_cases):
    """The shapes are checked against the config on the meta device: nothing is allocated before the error."""
    out = allocation_cases.get("config", allocation_cases["all"])
    assert "CheckpointError:" in out and "model.safetensors" in out and "has shape" in out, out
    assert "config says vocab 4194304, hidden 65536" in out, out


# ==================================================================================================================
# 3. Config and weights agree
# ==================================================================================================================
BAD_CONFIGS = [
    ("num_layers", 0, r"key 'num_layers' is 0, outside \[1, 1024\]"),
    ("num_heads", -4, r"key 'num_heads' is -4, outside"),
    ("layer_norm_epsilon", -1, r"key 'layer_norm_epsilon' is -1, outside"),
    ("vocab_size", None, r"key 'vocab_size' is missing"),
    ("num_heads", "4", r"key 'num_heads' must be an integer, got '4'"),
    ("d_ff", 0, r"key 'd_ff' is 0, outside"),
    ("d_model", 10 ** 12, r"key 'd_model' is 1000000000000, outside"),
    ("num_layers", 10 ** 9, r"key 'num_layers' is 1000000000, outside"),
    ("relative_attention_max_distance", 1 << 40, r"key 'relative_attention_max_distance' is \d+, outside"),
    ("pad_token_id", 10 ** 6, r"key 'pad_token_id' is 1000000, outside"),
    ("num_layers", True, r"key 'num_layers' must be an integer, got True"),
    ("layer_norm_epsilon", "tiny", r"key 'layer_norm_epsilon' must be a number"),
]


@pytest.mark.parametrize("key,value,message", BAD_CONFIGS, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_CONFIGS])
def test_bad_hf_config_value(folder, key, value, message):
    cfg = json.loads((folder / "config.json").read_text())
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        t5core.load_encoder(folder)


def test_width_not_divisible_by_heads(folder):
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["d_kv"]
    cfg["num_heads"] = 5
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: 'd_model' 64 is not divisible by 'num_heads' 5"):
        open_checkpoint(folder)


def test_inferred_width_not_divisible_by_heads(hf, tmp_path):
    f = single_file(hf, tmp_path / "odd.safetensors", **{
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": torch.randn(32, 5)})
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: .*q\.weight has 64 rows, not divisible by the 5 heads"):
        open_checkpoint(f)


def test_config_not_an_object(folder):
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got a list"):
        open_checkpoint(folder)


def test_native_config_bad_key(hf, tmp_path):
    save_encoder(t5core.load_encoder(save_hf(hf, tmp_path / "hf")).model, tmp_path / "tz")
    cfg = json.loads((tmp_path / "tz" / "config.json").read_text())
    cfg["n_head"] = -1
    (tmp_path / "tz" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tz/config\.json: key 'n_head': n_head is -1, outside"):
        t5core.load_encoder(tmp_path / "tz")


def test_fewer_layers_in_config_than_in_weights(folder):
    """Used to load one layer of two, silently."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: encoder\.block\.1\..* belongs to layer 1, but the "
                                              r"config says num_layers=1"):
        t5core.load_encoder(folder)


def test_more_layers_in_config_than_in_weights(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing weight for layers\.2\."):
        t5core.load_encoder(folder)


def test_missing_first_projection(hf, tmp_path):
    """The first attention output projection is where the stored dtype is read (found by fuzzing: a KeyError)."""
    sd = state(hf)
    del sd["encoder.block.0.layer.0.SelfAttention.o.weight"]
    save_file(sd, tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: missing tensor 'encoder\.block\.0\.layer\.0\."
                                              r"SelfAttention\.o\.weight'"):
        t5core.load_encoder(tmp_path / "cut.safetensors")


def test_vocab_in_config_disagrees_with_weights(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = VOCAB * 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shared\.weight has shape \(512, 64\), expected \(1024, 64\).*vocab 1024"):
        t5core.load_encoder(folder)


# ==================================================================================================================
# 4. Sharded indexes stay inside their folder
# ==================================================================================================================
@pytest.fixture
def sharded(hf, tmp_path):
    hf.save_pretrained(tmp_path / "sh", max_shard_size="100KB")
    return tmp_path / "sh"


def rewrite_index(folder: Path, change) -> Path:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data)
    index.write_text(json.dumps(data))
    return index


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entry_outside_the_folder(sharded, bad):
    def change(data):
        data["weight_map"]["shared.weight"] = bad
    rewrite_index(sharded, change)
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map entry 'shared\.weight' points outside"):
        t5core.load_encoder(sharded)


def test_index_entry_symlink_escaping(sharded, tmp_path):
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    (sharded / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")

    def change(data):
        data["weight_map"]["shared.weight"] = "link.safetensors"
    rewrite_index(sharded, change)
    with pytest.raises(CheckpointError, match=r"weight_map entry 'shared\.weight' \('link\.safetensors'\) is a link"):
        t5core.load_encoder(sharded)


def test_tensor_in_two_shards(hf, tmp_path):
    """A key in two shards was last-one-wins, and the index's weight_map was never compared with the shards."""
    sd = state(hf)
    folder = tmp_path / "dup"
    folder.mkdir()
    save_file(sd, str(folder / "a.safetensors"))
    save_file({Q: torch.zeros_like(sd[Q])}, str(folder / "b.safetensors"))
    weight_map = {k: "a.safetensors" for k in sd} | {K: "b.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"a\.safetensors: holds tensor '{K}', which .*index\.json maps to "
                                              r"b\.safetensors"):
        open_checkpoint(folder)
    weight_map[K] = "a.safetensors"
    weight_map["encoder.final_layer_norm.weight"] = "b.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"a\.safetensors: holds tensor 'encoder\.final_layer_norm\.weight'"):
        open_checkpoint(folder)
    del weight_map["encoder.final_layer_norm.weight"]
    save_file({"y": torch.zeros(1)}, str(folder / "b.safetensors"))
    weight_map["x"] = "b.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"b\.safetensors: has no tensor 'x', which .*index\.json maps to it"):
        open_checkpoint(folder)
    # .bin shards: a key in both files (and in none of the index's entries) names both
    torch.save(sd, folder / "a.bin")
    torch.save({Q: torch.zeros_like(sd[Q]), "x": torch.zeros(1)}, folder / "b.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {K: "a.bin", "x": "b.bin"}}))
    for f in ("a.safetensors", "b.safetensors", "model.safetensors.index.json"):
        (folder / f).unlink()
    with pytest.raises(CheckpointError, match=rf"tensor '{Q}' is in two files, .*a\.bin and .*b\.bin"):
        open_checkpoint(folder)


def test_two_different_token_embeddings(hf, folder):
    """shared.weight and encoder.embed_tokens.weight both present: equal they load, different they are refused
    (t5core read embed_tokens, transformers shared)."""
    sd = state(hf)
    save_file(sd | {"encoder.embed_tokens.weight": sd["shared.weight"].clone()}, str(folder / "model.safetensors"))
    assert torch.equal(t5core.load_encoder(folder).model.vocab_embed.weight, sd["shared.weight"])
    save_file(sd | {"encoder.embed_tokens.weight": torch.zeros_like(sd["shared.weight"])},
              str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: shared\.weight and encoder\.embed_tokens\.weight "
                                              r"differ"):
        t5core.load_encoder(folder)


def test_index_missing_shard_and_missing_weight_map(sharded):
    def change(data):
        data["weight_map"]["shared.weight"] = "model-00099-of-00099.safetensors"
    rewrite_index(sharded, change)
    with pytest.raises(CheckpointError, match=r"index\.json: shard files missing: \['model-00099-of-00099"):
        t5core.load_encoder(sharded)
    rewrite_index(sharded, lambda data: data.pop("weight_map"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: no 'weight_map'"):
        t5core.load_encoder(sharded)


# ==================================================================================================================
# 5. Non-finite values caught at load
# ==================================================================================================================
K = "encoder.block.1.layer.1.DenseReluDense.wo.weight"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])  # float32 is read in place, the others converted
def test_non_finite_weight_is_named(hf, tmp_path, value, dtype):
    if dtype == torch.float8_e4m3fn and math.isinf(value):
        pytest.skip("float8 e4m3fn has no infinity (torch casts it to 448)")
    w = state(hf, dtype)[K]
    w[3, 5] = value
    f = single_file(hf, tmp_path / "nan.safetensors", dtype, **{K: w})
    with pytest.raises(CheckpointError, match=rf"nan\.safetensors: tensor '{K}' holds NaN or infinite values"):
        t5core.load_encoder(f)


@pytest.mark.parametrize("scale", [0.0, math.nan, math.inf])
def test_bad_fp8_scale_is_named(hf, tmp_path, scale):
    sd = state(hf)
    w = sd[K]
    sd[K] = (w / (w.abs().max() / 448)).to(torch.float8_e4m3fn)
    sd[K.removesuffix("weight") + "scale_weight"] = torch.tensor([scale])
    f = tmp_path / "fp8.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"fp8\.safetensors: tensor '.*wo\.scale_weight' \(the float8 scale of "
                                              rf"'{K}'\) is 0, NaN or infinite"):
        t5core.load_encoder(f)


def fp8_projections(hf_model, scale_name="scale_weight", drop=()) -> dict:
    """ComfyUI-style scaled fp8: every projection e4m3 with its scale under `scale_name`, except keys in `drop`."""
    sd = state(hf_model)
    for key in [k for k in sd if k.endswith(("q.weight", "k.weight", "v.weight", "o.weight", "wo.weight", "wi_0.weight",
                                             "wi_1.weight"))]:
        scale = sd[key].abs().amax() / 448
        sd[key] = (sd[key] / scale).to(torch.float8_e4m3fn)
        if key not in drop:
            sd[key.removesuffix("weight") + scale_name] = scale.reshape(1)
    return sd


@pytest.mark.parametrize("marker", [True, False])
def test_missing_fp8_scale_in_a_scaled_file(hf, tmp_path, marker):
    """One scale_weight removed: that projection loaded with scale 1 (relative error 1.26)."""
    sd = fp8_projections(hf, drop={K})
    if marker:
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(CheckpointError, match=rf"fp8\.safetensors: float8 tensor '{K}' has no "
                                              r"'.*wo\.scale_weight', but the file is scaled fp8"):
        t5core.load_encoder(tmp_path / "fp8.safetensors")


@pytest.mark.parametrize("scale_name", ["weight_scale", "SCB", "input_scale"])
def test_fp8_with_scales_of_another_convention(hf, tmp_path, scale_name):
    """Scales named weight_scale were ignored and the weights read unscaled (relative error 1.45)."""
    save_file(fp8_projections(hf, scale_name), str(tmp_path / "fp8.safetensors"))
    with pytest.raises(CheckpointError, match=rf"fp8\.safetensors: float8 tensor '.*' comes with \['.*\.{scale_name}'\]"):
        t5core.load_encoder(tmp_path / "fp8.safetensors")


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool])
def test_integer_weights_refused(hf, tmp_path, dtype):
    """A bitsandbytes-style int8 file (int8 projections + .SCB) loaded its raw codes (values up to 127) as floats."""
    sd = state(hf)
    sd[K] = (sd[K] * 100).to(dtype)
    sd[K.removesuffix("weight") + "SCB"] = torch.ones(sd[K].shape[0])
    save_file(sd, str(tmp_path / "q.safetensors"))
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"q\.safetensors: {K} is stored as {name}, not floating point"):
        t5core.load_encoder(tmp_path / "q.safetensors")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedded_tokenizer_of_the_wrong_dtype(hf, tmp_path, dtype):
    """A bf16 `spiece_model` raised a TypeError from open_checkpoint."""
    f = single_file(hf, tmp_path / "t.safetensors", spiece_model=torch.zeros(8, dtype=dtype))
    with pytest.raises(CheckpointError, match=r"t\.safetensors: tensor 'spiece_model' is .* not the 1-D uint8"):
        open_checkpoint(f)


def test_non_finite_in_a_tensorizer_file(hf, tmp_path):
    model = t5core.load_encoder(save_hf(hf, tmp_path / "hf")).model
    with torch.no_grad():
        model.layers[1].ffn.ff_out.weight[0, 0] = math.nan
    save_encoder(model, tmp_path / "tz")
    with pytest.raises(CheckpointError, match=r"enc\.tensors: tensor 'layers\.1\.ffn\.ff_out\.weight' holds NaN"):
        t5core.load_encoder(tmp_path / "tz")


def test_non_finite_check_deferred_for_gpu_reads(hf, tmp_path):
    """GPU reads collect the per-tensor flags without a host sync and check them once at the end; the error still
    names the tensor (exercised here with CPU tensors)."""
    w = state(hf)[K]
    w[0, 0] = math.inf
    ckpt = open_checkpoint(single_file(hf, tmp_path / "inf.safetensors", **{K: w}))
    pending = []
    for key in ckpt.keys:
        ckpt._checked(key, ckpt.source.get(ckpt.keys[key]), pending)
    assert len(pending) == len(ckpt.keys)
    with pytest.raises(CheckpointError, match=rf"inf\.safetensors: tensor '{K}' holds NaN or infinite values"):
        ckpt._raise_non_finite(pending)


# ==================================================================================================================
# 6. Corrupt tensorizer files detected
# ==================================================================================================================
def test_flipped_bytes_in_enc_tensors(hf, tmp_path):
    save_encoder(t5core.load_encoder(save_hf(hf, tmp_path / "hf")).model, tmp_path / "tz")
    f = tmp_path / "tz" / "enc.tensors"
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"enc\.tensors: cannot read tensor '.*' \(HashMismatchError"):
        t5core.load_encoder(tmp_path / "tz")


# ==================================================================================================================
# 7. Writing loses nothing
# ==================================================================================================================
def test_convert_refuses_another_models_folder(hf, hf_other, tmp_path, capsys):
    src = save_hf(hf, tmp_path / "src")
    target = save_hf(hf_other, tmp_path / "target")
    before = snapshot(target)
    line = cli_error(capsys, ["convert", str(src), str(target), "--format", "safetensors"])
    assert f"t5core: error: {target}: already holds model files (config.json" in line and "--overwrite" in line
    assert snapshot(target) == before
    with pytest.raises(FileExistsError, match=r"target: already holds model files"):
        save_encoder(t5core.load_encoder(src).model, target, "tensorizer")
    assert snapshot(target) == before


@pytest.mark.parametrize("old_format,new_format", [("tensorizer", "safetensors"), ("dcp", "safetensors"),
                                                   ("safetensors", "tensorizer"), ("dcp", "tensorizer")])
def test_overwrite_replaces_the_model_and_removes_stale_weights(hf, hf_other, tmp_path, old_format, new_format):
    old = t5core.load_encoder(save_hf(hf_other, tmp_path / "old")).model
    new = t5core.load_encoder(save_hf(hf, tmp_path / "new")).model
    target = tmp_path / "target"
    save_encoder(old, target, old_format)
    (target / "fp16_scales.json").write_text(json.dumps({"enc_attn_out_scales": [1, 1], "enc_ffn_out_scales": [1, 1]}))
    cli(["convert", str(tmp_path / "new"), str(target), "--format", new_format, "--overwrite"])
    names = {p.name for p in target.iterdir()}
    assert not names & {".metadata", "__0_0.distcp", "fp16_scales.json"} - set()
    assert ("enc.tensors" in names) == (new_format == "tensorizer")
    assert ("model.safetensors" in names) == (new_format == "safetensors")
    assert not [n for n in names if n.startswith(".t5core-partial")]
    back = t5core.load_encoder(target)
    for (name, a), (_, b) in zip(new.named_parameters(), back.model.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("fmt", ["safetensors", "tensorizer"])
def test_failing_convert_leaves_the_previous_output(hf, hf_other, tmp_path, monkeypatch, fmt):
    target = tmp_path / "target"
    save_encoder(t5core.load_encoder(save_hf(hf_other, tmp_path / "old")).model, target, fmt)
    before = snapshot(target)

    def fail_half_way(*args, **kwargs):
        path = Path(args[1] if fmt == "safetensors" else args[0])
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    if fmt == "safetensors":
        monkeypatch.setattr("safetensors.torch.save_file", fail_half_way)
    else:
        monkeypatch.setattr("tensorizer.TensorSerializer", fail_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_encoder(t5core.load_encoder(save_hf(hf, tmp_path / "new")).model, target, fmt, overwrite=True)
    assert snapshot(target) == before  # no partial file, nothing lost
    assert t5core.load_encoder(target).config.num_layers == 2


def test_fp8_save_over_a_fused_norm_save_leaves_no_stale_config(hf, tmp_path):
    """save_pretrained of an fp8 model (which writes no config.json) over a fused-norm one left the old config.json
    ("elementwise_affine": false), and reloading dropped the file's norm scales."""
    from t5core.save import save_hf_folder

    src = save_hf(hf, tmp_path / "hf")
    out = tmp_path / "out"
    save_hf_folder(t5core.load_encoder(src, fuse_norms=True).model, out)
    assert json.loads((out / "config.json").read_text())["t5core"] == {"elementwise_affine": False}
    fp8 = t5core.load_encoder(src, weight_dtype="fp8_e4m3fn").model
    save_hf_folder(fp8, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert t5core.load_encoder(out).config.elementwise_affine


def test_config_saying_fused_norms_over_real_ones(hf, folder):
    """A config.json that says the norms are fused, beside weights whose norms are not all ones: refused, not the
    norms silently dropped."""
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"t5core": {"elementwise_affine": False}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: encoder\.block\.0\.layer\.0\.layer_norm\.weight "
                                              r"holds norm scales other than 1 but the config says the norms are fused"):
        t5core.load_encoder(folder)


def test_calibrate_with_weight_dtype_expands_gguf(tmp_path):
    """fp16_scales="calibrate" with a weight_dtype measured in float32 with the GGUF blocks kept packed, where
    fuse_norms is refused: the same call without calibrate worked."""
    pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType
    from test_gguf import one_type, write_gguf

    path = tmp_path / "t5.gguf"
    write_gguf(path, make_hf_encoder("t5-v1_1", vocab_size=32128, num_layers=2, seed=7),
               one_type(GGMLQuantizationType.Q8_0))
    enc = t5core.load_encoder(path, dtype="float16", fp16_scales="calibrate", weight_dtype="fp8_e4m3fn",
                              fuse_norms=True)
    assert enc.config.weight_dtype == "fp8_e4m3fn" and enc.config.elementwise_affine is False


def test_interrupted_write_leaves_nothing_that_loads(hf, tmp_path):
    """What a killed convert leaves behind (a temporary name) is never taken for weights."""
    target = tmp_path / "target"
    target.mkdir()
    (target / ".t5core-partial-123-model.safetensors.tmp").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match=r"target: expected one weight file .*found none"):
        open_checkpoint(target)
    save_hf(hf, target)
    assert open_checkpoint(target).format == "safetensors"


def test_calibrate_sidecar_written_atomically(folder, monkeypatch):
    from t5core import save as save_mod
    from t5core.fp16_scales import Scales, save_sidecar

    sidecar = save_sidecar(folder, Scales((1.0, 1.0), (1.0, 0.5)), 4.0)
    before = sidecar.read_bytes()

    def no_sync(path):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(save_mod, "_fsync_path", no_sync)
    with pytest.raises(OSError, match="Input/output error"):
        save_sidecar(folder, Scales((1.0, 1.0), (0.25, 0.25)), 4.0)
    assert sidecar.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "fp16_scales.json", "model.safetensors"]


# ==================================================================================================================
# 8. Arguments validated
# ==================================================================================================================
BAD_ARGS = [
    (["encode", "--max-length", "0"], r"argument --max-length: must be in \[1, 8192\], got 0"),
    (["encode", "--max-length", "100000"], r"argument --max-length: must be in \[1, 8192\], got 100000"),
    (["encode", "--pad-to", "100000"], r"argument --pad-to: must be in \[1, 8192\], got 100000"),
    (["encode", "--pad-to", "-3"], r"argument --pad-to: must be in \[1, 8192\], got -3"),
    (["encode", "--fp16-scales", "1/0"], r"argument --fp16-scales: fp16 scales: cannot read '1/0'"),
    (["encode", "--fp16-scales", "1,3"], r"argument --fp16-scales: FFN-out scales: layer 1 scale 3 is not a power of two"),
    (["encode", "--fp16-scales", "1;1;1"], r"argument --fp16-scales: fp16 scales '1;1;1': expected 'FFN scales' or"),
    (["embed", "--batch-size", "-1"], r"argument --batch-size: must be in \[1, 65536\], got -1"),
    (["embed", "--batch-size", "0"], r"argument --batch-size: must be in \[1, 65536\], got 0"),
    (["calibrate", "--headroom", "-1"], r"argument --headroom: must be a finite number >= 1, got '-1'"),
    (["calibrate", "--headroom", "inf"], r"argument --headroom: must be a finite number >= 1, got 'inf'"),
    (["calibrate", "--headroom", "0"], r"argument --headroom: must be a finite number >= 1, got '0'"),
    (["calibrate", "--headroom", "nan"], r"argument --headroom: must be a finite number >= 1, got 'nan'"),
]
_REQUIRED = {"encode": ["--model", "M", "--out", "O", "p"], "embed": ["--model", "M", "--captions", "C", "--out", "O"],
             "calibrate": ["M"]}


@pytest.mark.parametrize("argv,message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_cli_argument(tmp_path, capsys, monkeypatch, argv, message):
    import re

    monkeypatch.chdir(tmp_path)  # the relative paths M, O, C: nothing may be written there
    line = cli_error(capsys, [*argv, *_REQUIRED[argv[0]]])
    assert re.match(rf"t5core: error: {message}", line), line
    assert not list(tmp_path.iterdir())


def test_headroom_and_scales_in_the_library(folder):
    from t5core.calibrate import calibrate_fp16_scales, check_headroom

    for bad in (-1, 0, math.inf, math.nan, 0.5):
        with pytest.raises(ValueError, match=r"headroom: must be a finite number >= 1"):
            check_headroom(bad)
    with pytest.raises(ValueError, match=r"headroom: must be a finite number >= 1, got -1"):
        calibrate_fp16_scales(None, None, headroom=-1)
    from t5core.calibrate import choose_scales

    for bad in (-1, 0, math.inf):
        with pytest.raises(ValueError, match=r"headroom: must be a finite number >= 1"):
            choose_scales([10.0], [10.0], headroom=bad)
    with pytest.raises(ValueError, match=r"enc_ffn_out_scales: layer 1 scale 3 is not a power of two"):
        t5core.load_encoder(folder, dtype="float16", fp16_scales=[1, 3])


def test_token_ids_outside_the_vocabulary(folder):
    model = t5core.load_encoder(folder)
    with pytest.raises(ValueError, match=rf"input_ids: token id {VOCAB} is outside the model's vocabulary \[0, {VOCAB}\)"):
        model.encode(torch.tensor([[1, 2, VOCAB]]))
    with pytest.raises(ValueError, match=r"input_ids: token id -1 is outside"):
        model.encode(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"input_ids: expected a \[batch, length\] tensor with at least one prompt"):
        model.encode(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids: expected integer token ids"):
        model.encode(torch.zeros(1, 5))


def test_cli_tokens_beyond_a_small_vocabulary(folder, tmp_path, capsys):
    """The bundled 32k tokenizer over a 512-token model: a one-line error, not an IndexError."""
    line = cli_error(capsys, ["encode", "--model", str(folder), "--out", str(tmp_path / "e.safetensors"),
                              "zebra xylophone quantum"])
    assert "input_ids: token id" in line and "outside the model's vocabulary [0, 512)" in line
    assert not (tmp_path / "e.safetensors").exists()


def test_embed_with_zero_captions(folder, tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n  \n")
    line = cli_error(capsys, ["embed", "--model", str(folder), "--captions", str(tmp_path / "c.txt"), "--out",
                              str(tmp_path / "emb"), "--device", "cpu"])
    assert line == f"t5core: error: --captions: {tmp_path / 'c.txt'} has no captions (only blank lines)"
    assert not (tmp_path / "emb").exists()


def test_embed_captions_arguments(tmp_path):
    from t5core.distributed import EmbedSettings, embed_captions

    for kwargs, name in (({"batch_size": -1}, "batch_size"), ({"batch_size": 0}, "batch_size"),
                         ({"max_length": 0}, "max_length"), ({"tokens_per_batch": 0}, "tokens_per_batch")):
        with pytest.raises(ValueError, match=rf"^{name}: "):
            EmbedSettings(**kwargs)
    with pytest.raises(ValueError, match=r"^rank, world: "):
        embed_captions(None, None, [(0, "a")], tmp_path, rank=2, world=2)
    assert not list(tmp_path.iterdir())


# ==================================================================================================================
# 9. Sidecar files named when corrupt
# ==================================================================================================================
def sidecar(folder: Path) -> Path:
    """Where calibrate saves scales for this model (model.safetensors.fp16_scales.json for a single file)."""
    from t5core.fp16_scales import sidecar_path

    return sidecar_path(open_checkpoint(folder).path)


@pytest.mark.parametrize("content,message", [
    ("{not json", r"fp16_scales\.json: unreadable JSON"),
    ('{"enc_ffn_out_scales": "half"}', r"fp16_scales\.json: calibrated scales: 'enc_ffn_out_scales' must be a list"),
    ('{"enc_ffn_out_scales": [1, 0]}', r"fp16_scales\.json: calibrated scales: enc_ffn_out_scales: layer 1 scale 0 is not"),
    ("[1, 2]", r"fp16_scales\.json: calibrated scales: must be an object"),
])
def test_corrupt_sidecar_is_named_and_float32_never_reads_it(folder, content, message):
    sidecar(folder).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        t5core.load_encoder(folder, dtype="float16")
    assert t5core.load_encoder(folder).config.num_layers == 2  # float32: the sidecar is not read at all


def test_sidecar_with_wrong_layer_count(folder):
    sidecar(folder).write_text(json.dumps({"enc_attn_out_scales": [1, 1, 1], "enc_ffn_out_scales": [1, 1, 1]}))
    with pytest.raises(ValueError, match=r"enc_attn_out_scales: 3 scales given for 2 encoder layers"):
        t5core.load_encoder(folder, dtype="float16")


@pytest.mark.parametrize("scales,message", [
    ({"attn": [1, 1], "ffn": [1, "x"]}, r"'ffn' must be a list of numbers"),
    ({"attn": [1, 1], "ffn": [1, 3]}, r"ffn: layer 1 scale 3 is not a power of two"),
    ({"ffn": [1, 1, 1]}, r"ffn: 3 scales given for 2 encoder layers"),
])
def test_scales_in_config_json_checked(folder, scales, message):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["t5core_fp16_scales"] = scales
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: key 't5core_fp16_scales': " + message):
        open_checkpoint(folder)


# ==================================================================================================================
# 10. Nodes never return non-finite CONDITIONING
# ==================================================================================================================
@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The node package loaded into a fake ComfyUI (tests/comfy_fakes.py) with a tiny 32k-vocabulary T5 and the
    bundled tokenizer."""
    import comfy_fakes
    from test_comfy_nodes import _cleanup, load_like_comfyui, registered
    from t5core.tokenizer import BUNDLED_SPIECE

    root = tmp_path_factory.mktemp("ComfyUI")
    tok = root / "tok"
    tok.mkdir()
    shutil.copy(BUNDLED_SPIECE, tok / "spiece.model")
    model = make_hf_encoder(vocab_size=32128, d_model=32, num_heads=2, d_kv=16, d_ff=48, num_layers=2)
    fakes = comfy_fakes.install(root, tok)
    save_file(state(model), str(root / "models" / "text_encoders" / "t5_tiny.safetensors"))
    module = load_like_comfyui(ROOT)
    nodes, _ = registered(module)
    yield SimpleNamespace(nodes=nodes)
    _cleanup(fakes)


def node(comfy, node_id, **inputs):
    cls = comfy.nodes[node_id]
    return getattr(cls(), cls.FUNCTION)(**inputs)["result"]


def loaded(comfy, **options):
    return node(comfy, "T5CoreLoadEncoder", model_name="t5_tiny.safetensors",
                **{"weight_dtype": "fp32", "attention": "auto", "compile": False, "device": "default", **options})[0]


@pytest.mark.parametrize("text,message", [
    ("a (cat:nan) on a mat", r"the weight of '\(cat:nan\)' is nan"),
    ("a (cat:inf)", r"the weight of '\(cat:inf\)' is inf"),
    ("a (cat:1e400)", r"the weight of '\(cat:1e400\)' is inf"),
    ("(" * 5000 + "cat" + ")" * 5000, r"brackets nest 5000 deep, at most 64"),
    ("a (cat:1e38) dog", r"weighting overflows float32"),
])
def test_prompt_weights_never_give_non_finite_conditioning(comfy, text, message):
    encoder = loaded(comfy)
    with pytest.raises(ValueError, match=rf"^T5 Encode Prompt \(fast\): prompt weights: {message}"):
        node(comfy, "T5CoreEncodePrompt", t5_encoder=encoder, text=text, family="plain T5", guidance=3.5)


def test_ordinary_weighted_prompt_still_works(comfy):
    cond = node(comfy, "T5CoreEncodePrompt", t5_encoder=loaded(comfy), text="a ((cat)) (dog:1.3)", family="Flux",
                guidance=3.5)[0]
    assert torch.isfinite(cond[0][0]).all() and cond[0][0].shape[1] == 256


@pytest.mark.parametrize("option,value", [("weight_dtype", "fp8"), ("attention", "xformers"), ("device", "tpu"),
                                          ("compile", "yes")])
def test_unknown_load_option(comfy, option, value):
    with pytest.raises(ValueError, match=rf"^Load T5 Encoder \(fast\): {option}: unknown option '{value}'; choose one of"):
        loaded(comfy, **{option: value})


def test_unknown_encode_and_scale_options(comfy):
    encoder = loaded(comfy)
    with pytest.raises(ValueError, match=r"^T5 Encode Prompt \(fast\): family: unknown family 'SDXL'"):
        node(comfy, "T5CoreEncodePrompt", t5_encoder=encoder, text="a", family="SDXL", guidance=3.5)
    with pytest.raises(ValueError, match=r"^T5 Encode Prompt \(fast\): guidance: must be a finite number, got nan"):
        node(comfy, "T5CoreEncodePrompt", t5_encoder=encoder, text="a", family="Flux", guidance=math.nan)
    with pytest.raises(ValueError, match=r"^T5 FP16 Scale \(fast\): mode: unknown option 'magic'"):
        node(comfy, "T5CoreFP16Scale", t5_encoder=encoder, mode="magic", custom_scales="")
    with pytest.raises(ValueError, match=r"^T5 FP16 Scale \(fast\): fp16 scales: cannot read '1/0'"):
        node(comfy, "T5CoreFP16Scale", t5_encoder=encoder, mode="custom", custom_scales="1/0,1")
    with pytest.raises(ValueError, match=r"^T5 FP16 Scale \(fast\): fp16 scales: cannot read '1e400'"):
        node(comfy, "T5CoreFP16Scale", t5_encoder=encoder, mode="custom", custom_scales="1e400,1")


# ==================================================================================================================
# 11. The CLI prints one line per expected failure
# ==================================================================================================================
def test_cli_one_line_for_bad_file_and_traceback_with_debug(tmp_path, capsys):
    f = raw_safetensors(tmp_path / "junk.safetensors", {Q: {"dtype": "F32", "shape": [2, 2]}}, b"\0" * 16)
    line = cli_error(capsys, ["convert", str(f), str(tmp_path / "out")])
    assert line.startswith(f"t5core: error: {f}: tensor '{Q}': 'data_offsets' is missing")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="'data_offsets' is missing"):
        cli(["--debug", "convert", str(f), str(tmp_path / "out")])
    with pytest.raises(CheckpointError, match="'data_offsets' is missing"):
        cli(["convert", str(f), str(tmp_path / "out"), "--debug"])


def test_cli_one_line_for_missing_files(folder, tmp_path, capsys):
    line = cli_error(capsys, ["encode", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "a"])
    assert line == f"t5core: error: {tmp_path / 'nope'}: no such file or folder"
    line = cli_error(capsys, ["embed", "--model", str(folder), "--captions", str(tmp_path / "none.txt"), "--out",
                              str(tmp_path / "emb"), "--device", "cpu"])
    assert "none.txt" in line and "No such file" in line


def test_cli_one_line_for_bad_output_and_caption_files(folder, tmp_path, capsys):
    line = cli_error(capsys, ["encode", "--model", str(folder), "--out", str(tmp_path / "no" / "e.safetensors"), "a"])
    assert line == f"t5core: error: --out: the folder of {tmp_path / 'no' / 'e.safetensors'} does not exist"
    (tmp_path / "c.txt").write_bytes(b"caption \xff\xfe\n")
    line = cli_error(capsys, ["embed", "--model", str(folder), "--captions", str(tmp_path / "c.txt"), "--out",
                              str(tmp_path / "emb"), "--device", "cpu"])
    assert line.startswith(f"t5core: error: {tmp_path / 'c.txt'}: not UTF-8 text")
    assert not (tmp_path / "emb").exists() and not (tmp_path / "no").exists()


def test_diffusers_repo_with_odd_subfolder_config(hf, tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text("[]")
    hf.save_pretrained(tmp_path / "text_encoder_2")
    assert open_checkpoint(tmp_path).config.num_layers == 2


def test_cli_one_line_for_argument_conflicts(folder, tmp_path, capsys):
    line = cli_error(capsys, ["convert", str(folder), str(tmp_path / "o"), "--fp16-scales", "1,1"])
    assert line == "t5core: error: --fp16-scales: needs --dtype float16"
    line = cli_error(capsys, ["convert", str(folder), str(tmp_path / "o"), "--dtype", "float8"])
    assert line.startswith("t5core: error: argument --dtype: unknown dtype 'float8'")
    line = cli_error(capsys, ["convert", str(folder), str(tmp_path / "o"), "--device", "tpu:0"])
    assert line.startswith("t5core: error: argument --device: unknown device 'tpu:0'")
    assert not (tmp_path / "o").exists()
