"""Distributed checkpoints, FSDP2 sharded loading and caption embedding across ranks: real torchrun processes on
the CPU (gloo), compared with transformers on the same weights."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import t5core
from t5core.checkpoint import CheckpointError, open_checkpoint
from t5core.distributed import read_caption_embeddings
from t5core.embed import EmbedSettings, embed_captions, plan_batches, read_captions
from t5core.runtime import length_bucket
from t5core.save import save_encoder
from t5core.tokenizer import load_tokenizer
from tiny_models import TOKENIZER_DIR, make_hf_encoder, rel_err, save_hf

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a cat on a mat", "", "a very long caption " * 40, "dog", "x y z", "a red car under a blue sky", "ö ü 漢字"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


@pytest.fixture(scope="module")
def dcp_folder(tmp_path_factory):
    """A tiny v1.1 encoder (full vocabulary, for the real tokenizer) as an HF folder and as a fused dcp folder."""
    root = tmp_path_factory.mktemp("dist")
    hf = make_hf_encoder("t5-v1_1", seed=3)
    save_hf(hf, root / "hf")
    model = t5core.load_encoder(root / "hf", fuse_norms=True)
    save_encoder(model.model, root / "dcp", "dcp", load_tokenizer(TOKENIZER_DIR))
    return hf, model, root


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *map(str, args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def hf_reference(hf, texts):
    ids, mask = load_tokenizer(TOKENIZER_DIR)(texts, max_length=512)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    return [out[i, : int(mask[i].sum())] for i in range(len(texts))]


def test_dcp_folder_round_trip(dcp_folder):
    hf, model, root = dcp_folder
    ckpt = open_checkpoint(root / "dcp", format="dcp")  # never detected: its .metadata is a pickle
    assert ckpt.format == "dcp" and ckpt.native and ckpt.config.elementwise_affine is False
    back = t5core.load_encoder(root / "dcp", format="dcp")
    for (name, a), (_, b) in zip(model.model.named_parameters(), back.model.named_parameters()):
        assert torch.equal(a, b), name
    tok = load_tokenizer(root / "dcp")  # the tokenizer was saved beside the weights
    ids, mask = tok(CAPTIONS[:4], max_length=512)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert rel_err(back.encode(ids, mask)[mask], ref[mask]) <= 1e-5


def test_fsdp_shards_and_parity(dcp_folder, tmp_path):
    """Two ranks load the dcp folder sharded (FSDP2): each holds half of a layer weight (layer 0's QKV is
    checked), and the sharded forward equals transformers."""
    hf, _, root = dcp_folder
    script = tmp_path / "worker.py"
    script.write_text(f'''
import torch
from t5core.distributed import end_process_group, init_from_env, load_fsdp
from t5core.tokenizer import load_tokenizer
rank, world, device = init_from_env("cpu")
model = load_fsdp({str(root / "dcp")!r}, dtype="float32", device=device)
w = model.model.layers[0].attn.qkv_proj.weight
assert w.to_local().shape[0] * world == w.shape[0], (w.to_local().shape, w.shape)
ids, mask = load_tokenizer({str(TOKENIZER_DIR)!r})({CAPTIONS[:4]!r}, max_length=512)
out = model.encode(ids, mask)
bf16 = load_fsdp({str(root / "dcp")!r}, dtype="bfloat16", device=device).encode(ids, mask)  # mixed-dtype groups
if rank == 0:
    torch.save({{"out": out, "bf16": bf16, "mask": mask}}, {str(tmp_path / "out.pt")!r})
del model, w  # before the process group they hold
end_process_group()
''')
    torchrun(script)
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = hf_reference(hf, CAPTIONS[:4])
    out, mask = saved["out"], saved["mask"]
    assert rel_err(torch.cat([out[i, : int(mask[i].sum())] for i in range(4)]), torch.cat(ref)) <= 1e-5
    bf16 = saved["bf16"]
    assert rel_err(torch.cat([bf16[i, : int(mask[i].sum())] for i in range(4)]), torch.cat(ref)) <= 2e-2


EMBED_ARGS = ("--dtype", "float32", "--save-dtype", "float32", "--tokens-per-batch", "64", "--shard-size", "2")


def shard_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fsdp", [False, True])
def test_embed_captions_across_ranks_and_resume(dcp_folder, tmp_path, fsdp):
    """Two ranks: every caption once, equal to transformers and to one process. A run whose ranks stop after their
    first shard (the on_shard hook raises), rerun with the same command, gives the same files byte for byte."""
    hf, model, root = dcp_folder
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS), encoding="utf-8")
    fsdp_flag = ["--fsdp"] if fsdp else ["--format", "dcp"]
    out = tmp_path / "emb"
    torchrun("-m", "t5core", "embed", "--model", root / "dcp", "--captions", captions, "--out", out, *EMBED_ARGS,
             *fsdp_flag)
    # 6 captions: rank 0 holds lines 0, 3, 5 (shards of 2 and 1), rank 1 lines 2, 4, 6
    assert sorted(shard_files(out)) == ["manifest.json", "shard-00000-00000.safetensors",
                                        "shard-00000-00001.safetensors", "shard-00001-00000.safetensors",
                                        "shard-00001-00001.safetensors"]
    got = read_caption_embeddings(out)
    lines = [i for i, c in enumerate(CAPTIONS) if c.strip()]
    assert sorted(got) == lines  # blank line 1 skipped, every other line once
    refs = hf_reference(hf, [CAPTIONS[i] for i in lines])
    single = tmp_path / "single"
    embed_captions(model, load_tokenizer(TOKENIZER_DIR), read_captions(captions), single,
                   settings=EmbedSettings(save_dtype="float32", tokens_per_batch=64, shard_size=2))
    one_process = read_caption_embeddings(single)
    for line, ref in zip(lines, refs):
        assert got[line].shape == ref.shape, line
        assert rel_err(got[line], ref) <= 1e-5, line
        assert rel_err(got[line], one_process[line]) <= 1e-6, line

    resumed = tmp_path / "resumed"
    script = tmp_path / "stop_after_one_shard.py"
    script.write_text(f'''
from t5core.__main__ import main
from t5core import embed
real = embed.embed_captions
class Stop(Exception):
    pass
def stop(path):
    raise Stop(path)
embed.embed_captions = lambda *args, **kwargs: real(*args, **{{**kwargs, "on_shard": stop}})
try:
    main({["embed", "--model", str(root / "dcp"), "--captions", str(captions), "--out", str(resumed), *EMBED_ARGS,
           *fsdp_flag]!r})
except Stop as e:
    print("stopped after", e)
''')
    printed = torchrun(script)
    assert printed.count("stopped after") == 2
    # a shard may finish while its hook call is pending: remove each rank's second one, as if killed before it
    for rank in range(2):
        (resumed / f"shard-{rank:05d}-00001.safetensors").unlink(missing_ok=True)
    assert sorted(p.name for p in resumed.glob("shard-*")) == ["shard-00000-00000.safetensors",
                                                             "shard-00001-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="2 of 4 shards are not written yet .*rerun the same embed command"):
        read_caption_embeddings(resumed)
    printed = torchrun("-m", "t5core", "embed", "--model", root / "dcp", "--captions", captions, "--out", resumed,
                       *EMBED_ARGS, *fsdp_flag)
    assert "2 shards in" in printed and "(1 were already there)" in printed
    assert shard_files(resumed) == shard_files(out)


def test_embed_restart_skips_finished_shards_and_refuses_changes(dcp_folder, tmp_path):
    """One process, stopped by its hook after two shards (and a stale partial file): the rerun writes only the
    rest, the files equal an uninterrupted run's; another setting or caption file is refused by name."""
    _, model, _ = dcp_folder
    tok = load_tokenizer(TOKENIZER_DIR)
    captions = [(i, f"caption {i} " + "word " * (i * 7 % 40)) for i in range(13)]
    settings = EmbedSettings(save_dtype="bfloat16", tokens_per_batch=96, shard_size=4)
    clean = tmp_path / "clean"
    embed_captions(model, tok, captions, clean, settings=settings)
    out, written = tmp_path / "out", []

    def stop_after_two(path):
        written.append(path.name)
        if len(written) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_captions(model, tok, captions, out, settings=settings, on_shard=stop_after_two)
    (out / "shard-00000-00003.safetensors").unlink(missing_ok=True)  # it may have finished before the hook ran
    (out / "shard-00000-00003.safetensors.tmp").write_bytes(b"partial")  # a killed writer's leftover
    written.clear()
    paths = embed_captions(model, tok, captions, out, settings=settings, on_shard=lambda p: written.append(p.name))
    assert [p.name for p in paths] == [f"shard-00000-{i:05d}.safetensors" for i in range(4)]
    assert written[-1] == "shard-00000-00003.safetensors" and "shard-00000-00000.safetensors" not in written
    assert shard_files(out) == shard_files(clean)
    got = read_caption_embeddings(out)
    assert sorted(got) == list(range(13)) and got[5].dtype == torch.bfloat16

    with pytest.raises(ValueError, match=r"max_length 512 -> 256; tokens_per_batch 96 -> 64\. Rerun with the same"):
        embed_captions(model, tok, captions, out, settings=EmbedSettings(
            max_length=256, save_dtype="bfloat16", tokens_per_batch=64, shard_size=4))
    with pytest.raises(ValueError, match=r"the caption file \(13 captions, sha256 \w+ -> 12 captions"):
        embed_captions(model, tok, captions[:12], out, settings=settings)
    with pytest.raises(ValueError, match=r"world_size 1 -> 2"):
        embed_captions(model, tok, captions, out, rank=1, world=2, settings=settings)


def test_plan_batches_by_token_budget():
    """Longest first; every caption once; within the token budget; with buckets one row count per width."""
    lengths = [(i * 37) % 300 + 5 for i in range(500)]
    for buckets in (False, True):
        batches = plan_batches(lengths, 1024, batch_size=40, buckets=buckets)
        assert sorted(i for b in batches for i in b.members) == list(range(500))
        firsts = [lengths[b.members[0]] for b in batches]
        assert firsts == sorted(firsts, reverse=True)
        for b in batches:
            assert len(b.members) <= b.rows <= 40 and max(lengths[i] for i in b.members) <= b.width
            assert b.rows * b.width <= 1024
        shapes = {}
        for b in batches:
            shapes.setdefault(b.width, set()).add(b.rows)
        if buckets:
            assert all(len(rows) == 1 and w == length_bucket(w) for w, rows in shapes.items())
        else:
            assert all(b.rows == len(b.members) and b.width == lengths[b.members[0]] for b in batches)
    assert [b.rows for b in plan_batches([600, 3], 512)] == [1, 1]  # longer than the budget: alone


@pytest.mark.parametrize("flag, value, message", [
    ("--max-length", "0", "must be in [1, 8192], got 0"),
    ("--max-length", "9000", "must be in [1, 8192], got 9000"),
    ("--tokens-per-batch", "0", "must be in [1, 1048576], got 0"),
    ("--batch-size", "0", "must be in [1, 65536], got 0"),
    ("--shard-size", "-1", "must be in [1, 16777216], got -1"),
    ("--save-dtype", "int8", "unknown dtype 'int8'"),
])
def test_embed_validates_arguments(tmp_path, capsys, flag, value, message):
    from t5core.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["embed", "--model", str(tmp_path / "none"), "--captions", str(tmp_path / "none.txt"), "--out",
              str(tmp_path), flag, value])
    assert exit_.value.code == 2
    assert f"t5core: error: argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("max_length", 0, r"^max_length: must be an integer from 1 to 8192, got 0"),
    ("tokens_per_batch", 0, r"^tokens_per_batch: must be an integer >= 1, got 0"),
    ("batch_size", 2.5, r"^batch_size: must be an integer >= 1, got 2.5"),
    ("shard_size", 0, r"^shard_size: must be an integer >= 1, got 0"),
    ("save_dtype", "int8", r"^save_dtype: must be float16, bfloat16 or float32, got 'int8'"),
])
def test_embed_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        EmbedSettings(**{field: value})
    assert EmbedSettings(save_dtype="fp16") == EmbedSettings()  # names normalized: the manifest compares them


def test_embed_truncates_long_captions_naming_the_line(dcp_folder, tmp_path):
    """One process: a caption over max_length keeps its first tokens plus EOS, like the tokenizer, and the warning
    names its line in the caption file."""
    from t5core.tokenizer import PromptTruncatedWarning

    hf, model, _ = dcp_folder
    tok = load_tokenizer(TOKENIZER_DIR)
    captions = [(0, CAPTIONS[0]), (2, CAPTIONS[2]), (3, CAPTIONS[3])]
    with pytest.warns(PromptTruncatedWarning, match="^line 3: "):
        embed_captions(model, tok, captions, tmp_path, settings=EmbedSettings(max_length=16, save_dtype="float32"))
    got = read_caption_embeddings(tmp_path)
    ids, mask = tok([text for _, text in captions], max_length=16)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert [got[line].shape[0] for line, _ in captions] == mask.sum(1).tolist() and got[2].shape[0] == 16
    for row, (line, _) in enumerate(captions):
        assert rel_err(got[line], ref[row, : int(mask[row].sum())]) <= 1e-5, line


def test_embed_names_the_line_that_overflows_float16(dcp_folder, tmp_path):
    _, model, _ = dcp_folder
    tok = load_tokenizer(TOKENIZER_DIR)
    model.model.ln.weight.data[3] *= 1e6  # every token's channel 3 past 65504
    try:
        with pytest.raises(FloatingPointError, match=r"^line 8: embedding overflows float16; save in float32"):
            embed_captions(model, tok, [(7, "a cat")], tmp_path)
    finally:
        model.model.ln.weight.data[3] /= 1e6
    assert not list(tmp_path.glob("shard-*"))


def test_fsdp_refuses_other_formats_and_no_process_group(dcp_folder):
    from t5core.distributed import load_fsdp

    _, _, root = dcp_folder
    with pytest.raises(CheckpointError, match=r"convert it once: python -m t5core convert .* --format dcp"):
        load_fsdp(root / "hf")
    with pytest.raises(RuntimeError, match="needs a process group: run under torchrun"):
        load_fsdp(root / "dcp")


def test_embed_fsdp_refuses_options_it_cannot_apply(tmp_path, capsys):
    """A sharded load takes the dcp folder as converted: options that would change the weights or the compute
    are refused by name rather than ignored (before any process group or file is touched)."""
    from t5core.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["embed", "--model", str(tmp_path / "none"), "--captions", str(tmp_path / "none.txt"), "--out",
              str(tmp_path), "--fsdp", "--compile", "--fuse-norms"])
    assert exit_.value.code == 2
    assert re.search(r"^t5core: error: --compile: .*--compile, --fuse-norms do not apply .*convert --format dcp",
                     capsys.readouterr().err)


def test_truncated_dcp_shard_is_named(dcp_folder, tmp_path):
    _, _, root = dcp_folder
    bad = tmp_path / "dcp"
    bad.mkdir()
    for f in (root / "dcp").iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".distcp" else data)
    with pytest.raises(CheckpointError, match=r"dcp: cannot read tensor"):
        t5core.load_encoder(bad, format="dcp")


def test_sharded_write_and_fsdp_parity_script(dcp_folder, tmp_path):
    """A two-rank `convert --format dcp` (what the guide's serialize script did) gives one shard file per rank,
    which loads whole with parity and, through the guide's FSDP parity script, sharded identical to the whole
    model."""
    hf, _, root = dcp_folder
    out = tmp_path / "dcp2"
    torchrun("-m", "t5core", "convert", root / "hf", out, "--format", "dcp", "--fuse-norms", "--tokenizer",
             TOKENIZER_DIR)
    assert sorted(p.name for p in out.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ids, mask = load_tokenizer(out)(CAPTIONS[:3], max_length=512)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert rel_err(t5core.load_encoder(out, format="dcp").encode(ids, mask)[mask], ref[mask]) <= 1e-5
    printed = torchrun("t5core/scripts/t5_encoder_parity_fsdp.py", out)
    assert "local shard [96, 64] of [192, 64]" in printed
    err = float(printed.split("relative error ")[1].split()[0])
    assert err <= 1e-6, printed


def test_embed_throughput_benchmark_runs_on_the_cpu():
    """benchmarks/embed_throughput.py at a tiny size: the synthetic captions tokenize to their intended lengths,
    every caption comes back once, and the table is printed last."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_captions import caption_lengths, make_captions

    tok = load_tokenizer(TOKENIZER_DIR)
    lengths = caption_lengths(200, seed=5)
    assert [len(tok.encode_ids(c)) for c in make_captions(200, tok, seed=5)] == lengths
    assert min(lengths) >= 5 and max(lengths) <= 300 and len(set(lengths)) > 100
    proc = subprocess.run([sys.executable, "benchmarks/embed_throughput.py", "--size", "tiny", "--device", "cpu",
                           "--eager", "--captions", "120", "--shard-size", "50", "--profile-batches", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.strip().splitlines()
    assert "every caption once" in proc.stdout and table[-1].startswith("| max rel err vs. encoded alone | ")
    assert any(row.startswith("| end to end / encoder alone | ") for row in table)
