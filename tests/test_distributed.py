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
import torch, torch.distributed as dist
from t5core.distributed import init_from_env, load_fsdp
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
dist.destroy_process_group()
''')
    torchrun(script)
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    ref = hf_reference(hf, CAPTIONS[:4])
    out, mask = saved["out"], saved["mask"]
    assert rel_err(torch.cat([out[i, : int(mask[i].sum())] for i in range(4)]), torch.cat(ref)) <= 1e-5
    bf16 = saved["bf16"]
    assert rel_err(torch.cat([bf16[i, : int(mask[i].sum())] for i in range(4)]), torch.cat(ref)) <= 2e-2


@pytest.mark.parametrize("fsdp", [False, True])
def test_embed_captions_across_ranks(dcp_folder, tmp_path, fsdp):
    hf, _, root = dcp_folder
    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(CAPTIONS), encoding="utf-8")
    out = tmp_path / "emb"
    torchrun("-m", "t5core", "embed", "--model", root / "dcp", "--captions", captions, "--out", out,
             "--dtype", "float32", "--save-dtype", "float32", "--batch-size", "2",
             *(["--fsdp"] if fsdp else ["--format", "dcp"]))
    assert sorted(p.name for p in out.iterdir()) == ["embeddings-00000-of-00002.safetensors",
                                                    "embeddings-00001-of-00002.safetensors"]
    got = read_caption_embeddings(out)
    lines = [i for i, c in enumerate(CAPTIONS) if c.strip()]
    assert sorted(got) == lines  # blank line 1 skipped, every other line once
    refs = hf_reference(hf, [CAPTIONS[i] for i in lines])
    for line, ref in zip(lines, refs):
        assert got[line].shape == ref.shape, line
        assert rel_err(got[line], ref) <= 1e-5, line


def test_embed_truncates_long_captions_naming_the_line(dcp_folder, tmp_path):
    """One process: a caption over max_length keeps its first tokens plus EOS, like the tokenizer, and the warning
    names its line in the caption file."""
    from t5core.distributed import embed_captions
    from t5core.tokenizer import PromptTruncatedWarning

    hf, model, _ = dcp_folder
    tok = load_tokenizer(TOKENIZER_DIR)
    captions = [(0, CAPTIONS[0]), (2, CAPTIONS[2]), (3, CAPTIONS[3])]
    with pytest.warns(PromptTruncatedWarning, match="^line 3: "):
        embed_captions(model, tok, captions, tmp_path, max_length=16, save_dtype=torch.float32)
    got = read_caption_embeddings(tmp_path)
    ids, mask = tok([text for _, text in captions], max_length=16)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert [got[line].shape[0] for line, _ in captions] == mask.sum(1).tolist() and got[2].shape[0] == 16
    for row, (line, _) in enumerate(captions):
        assert rel_err(got[line], ref[row, : int(mask[row].sum())]) <= 1e-5, line


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
