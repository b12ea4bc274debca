"""Every weight format users have loads through the one detector and gives transformers parity; convert
writes files that load back bit-identically; bad files give errors that name the file and the problem."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

import t5core
from t5core.checkpoint import CheckpointError, open_checkpoint
from t5core.__main__ import main as cli
from tiny_models import TOKENIZER_DIR, make_hf_encoder, rel_err, save_hf

VOCAB = 512


@pytest.fixture(scope="module")
def hf():
    return make_hf_encoder("t5-v1_1", vocab_size=VOCAB, seed=2)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 21), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 12:] = False
    ids[~mask] = 0
    return ids, mask


def assert_parity(path, hf_model, batch, tol=1e-5, **kw):
    ids, mask = batch
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    out = t5core.load_encoder(path, **kw).encode(ids, mask)
    assert rel_err(out[mask], ref[mask]) <= tol


def comfy_state_dict(hf_model, prefix="", embed_tokens=False, dtype=torch.float32):
    sd = {prefix + k: v.to(dtype).clone() for k, v in hf_model.state_dict().items()
          if embed_tokens or k != "encoder.embed_tokens.weight"}
    return sd


def test_hf_folder(hf, batch, tmp_path):
    assert_parity(save_hf(hf, tmp_path), hf, batch)
    assert open_checkpoint(tmp_path).format == "safetensors"


def test_hf_sharded_folder(hf, batch, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_parity(tmp_path, hf, batch)


def test_pytorch_bin_folder(hf, batch, tmp_path):
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    shutil.copy(save_hf(hf, tmp_path / "cfg") / "config.json", tmp_path)
    assert_parity(tmp_path, hf, batch)


def test_diffusers_repo(hf, batch, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    hf.save_pretrained(tmp_path / "text_encoder_2", max_shard_size="200KB")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    assert_parity(tmp_path, hf, batch)  # found by itself
    assert_parity(tmp_path, hf, batch, subfolder="text_encoder_2")
    with pytest.raises(CheckpointError, match="no subfolder 'text_encoder_9'"):
        open_checkpoint(tmp_path, subfolder="text_encoder_9")


@pytest.mark.parametrize("prefix,embed_tokens", [("", False), ("", True), ("text_encoders.t5xxl.transformer.", False)])
def test_comfyui_single_file(hf, batch, tmp_path, prefix, embed_tokens):
    f = tmp_path / "t5xxl_fp16.safetensors"
    save_file(comfy_state_dict(hf, prefix, embed_tokens), str(f))
    ckpt = open_checkpoint(f)
    assert ckpt.config.num_layers == 3 and ckpt.config.vocab_size == VOCAB and ckpt.config.n_head == 4
    assert_parity(f, hf, batch)


def test_cli_uses_the_tokenizer_a_comfyui_file_embeds(hf, tmp_path):
    """ComfyUI's UMT5 files carry their sentencepiece model as a `spiece_model` tensor: with no tokenizer beside the
    file, encode tokenizes with it (not with the bundled T5 one)."""
    import sentencepiece as spm
    from safetensors.torch import load_file

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"a red fox number {i} runs through the snowy forest at night" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=40,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   model_type="unigram", minloglevel=2)
    proto = (tmp_path / "spm.model").read_bytes()
    f = tmp_path / "umt5_like.safetensors"
    save_file({**comfy_state_dict(hf), "spiece_model": torch.frombuffer(bytearray(proto), dtype=torch.uint8)}, str(f))
    cli(["encode", "--model", str(f), "--out", str(tmp_path / "e.safetensors"), "a red fox"])
    ids = load_file(str(tmp_path / "e.safetensors"))["input_ids"][0].tolist()
    assert ids == spm.SentencePieceProcessor(model_proto=proto).encode("a red fox") + [1]


def test_comfyui_fp16_file_loads_as_fp32(hf, batch, tmp_path):
    f = tmp_path / "t5.sft"
    save_file(comfy_state_dict(hf, dtype=torch.float16), str(f))
    assert_parity(f, hf, batch, tol=2e-3)


def test_comfyui_scaled_fp8(hf, batch, tmp_path):
    """float8 weights with a per-linear scale_weight are dequantized as weight.float() * scale."""
    sd, deq = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in comfy_state_dict(hf).items():
        if v.ndim == 2 and "SelfAttention.relative" not in k and k != "shared.weight":
            scale = v.abs().max() / 448
            q = (v / scale).to(torch.float8_e4m3fn)
            sd[k], sd[k.removesuffix("weight") + "scale_weight"] = q, scale.reshape(1)
            deq[k] = q.float() * scale
        else:
            sd[k] = deq[k] = v
    f = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(sd, str(f))
    assert open_checkpoint(f).format == "comfyui-scaled-fp8"
    ref = make_hf_encoder("t5-v1_1", vocab_size=VOCAB)
    ref.load_state_dict(deq, strict=False)
    assert_parity(f, ref, batch)


def test_full_encoder_decoder_checkpoint(batch, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    full = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=96,
                                               num_layers=2, feed_forward_proj="gated-gelu")).eval()
    full.save_pretrained(tmp_path)
    assert_parity(tmp_path, full.encoder, batch)


@pytest.mark.parametrize("kind", ["t5-v1_0", "mt5", "umt5"])
def test_architecture_inferred_from_keys(kind, batch, tmp_path):
    model = make_hf_encoder(kind, vocab_size=VOCAB, seed=5)
    f = tmp_path / "encoder.safetensors"
    save_file(comfy_state_dict(model), str(f))
    cfg = open_checkpoint(f).config
    assert cfg.pos_emb_per_layer == (kind == "umt5")
    assert (cfg.ffn_type.value == "ReLU") == (kind == "t5-v1_0")
    assert_parity(f, model, batch)


@pytest.mark.parametrize("fmt", ["tensorizer", "safetensors"])
@pytest.mark.parametrize("extra", [[], ["--fuse-norms"], ["--dtype", "float16", "--fp16-scales", "1,1/2,1"]])
def test_convert_round_trip_bit_identical(hf, tmp_path, fmt, extra):
    src = save_hf(hf, tmp_path / "src")
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", src)
    cli(["convert", str(src), str(tmp_path / "out"), "--format", fmt, *extra])
    out = tmp_path / "out"
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    if fmt == "tensorizer":
        assert (out / "enc.tensors").exists()
        t5core.T5Config.model_validate(json.loads((out / "config.json").read_text()))
    dtype = "float16" if "float16" in extra else "float32"
    first = t5core.load_encoder(src, dtype=dtype, fuse_norms="--fuse-norms" in extra,
                                fp16_scales=[1, 0.5, 1] if "float16" in extra else None)
    again = t5core.load_encoder(out, dtype=dtype)
    assert again.config.elementwise_affine == first.config.elementwise_affine
    assert again.config.enc_ffn_out_scales == first.config.enc_ffn_out_scales
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("extra", [[], ["--fuse-norms", "--dtype", "bfloat16"]])
def test_convert_to_one_safetensors_file(hf, tmp_path, capsys, extra):
    """A target named *.safetensors is that one file (as ComfyUI's text_encoders folder holds them): the same
    encoder loads back from it, though no config.json or tokenizer travels with it."""
    src = save_hf(hf, tmp_path / "src")
    shutil.copy(TOKENIZER_DIR / "tokenizer.json", src)
    out = tmp_path / "t5_small.safetensors"
    cli(["convert", str(src), str(out), *extra])
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["src", "t5_small.safetensors"]
    assert "tokenizer not written (weights only)" in capsys.readouterr().out
    dtype = "bfloat16" if extra else "float32"
    first = t5core.load_encoder(src, dtype=dtype, fuse_norms=bool(extra)).model.state_dict()
    again = t5core.load_encoder(out, dtype=dtype, fuse_norms=bool(extra)).model.state_dict()
    assert first.keys() == again.keys()
    for k in first:
        assert first[k].dtype == again[k].dtype and torch.equal(first[k], again[k]), k
    for args, error in ([], r"t5_small\.safetensors: exists; pass overwrite=True"), (
            ["--format", "tensorizer", "--overwrite"],
            r"t5_small\.safetensors: a \.safetensors file is written in format 'safetensors', not 'tensorizer'"):
        with pytest.raises(SystemExit):
            cli(["convert", str(src), str(out), *args])
        assert re.search(error, capsys.readouterr().err)


def test_safetensors_convert_is_readable_by_transformers(hf, batch, tmp_path):
    from transformers import T5EncoderModel

    cli(["convert", str(save_hf(hf, tmp_path / "src")), str(tmp_path / "out"), "--format", "safetensors", "--fuse-norms"])
    back = T5EncoderModel.from_pretrained(tmp_path / "out").eval()
    assert_parity(tmp_path / "out", back, batch)
    ids, mask = batch
    with torch.no_grad():
        assert rel_err(back(input_ids=ids, attention_mask=mask.long()).last_hidden_state[mask],
                       hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state[mask]) <= 1e-5


def test_chunked_read_ahead_is_exact(hf, tmp_path):
    """Tensors split over many small chunks, read on threads several chunks ahead, come back bit-exact and in
    order (the GPU path stages the same chunks through pinned buffers)."""
    sd = comfy_state_dict(hf, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "t5.safetensors"))
    ckpt = open_checkpoint(tmp_path / "t5.safetensors")
    keys = list(ckpt.keys)
    # destinations: read straight into when dtype and size match, ignored (a new tensor) when not
    into = {k: torch.zeros(sd[ckpt.keys[k]].shape, dtype=torch.bfloat16 if i % 2 else torch.float32)
            for i, k in enumerate(keys[:6])}
    got = list(ckpt.iter_tensors(keys, "cpu", into=into, threads=3, chunk_bytes=1000))
    assert [k for k, _ in got] == keys
    for key, t in got:
        assert torch.equal(t, sd[ckpt.keys[key]]), key
        dest = into.get(key)
        assert (t is dest) == (dest is not None and dest.dtype == torch.bfloat16), key


# ---------------------------------------------------------------------------------------------- bad input
def test_truncated_safetensors(hf, tmp_path):
    f = tmp_path / "t5.safetensors"
    save_file(comfy_state_dict(hf), str(f))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"t5\.safetensors: truncated"):
        t5core.load_encoder(f)


def test_corrupt_safetensors(tmp_path):
    f = tmp_path / "junk.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors: corrupt safetensors header"):
        t5core.load_encoder(f)
    f.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a safetensors file"):
        t5core.load_encoder(f)


def test_clip_file_is_rejected(tmp_path):
    f = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
               "text_model.embeddings.token_embedding.weight": torch.randn(10, 8)}, str(f))
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors: not a T5 encoder checkpoint.*text_model"):
        t5core.load_encoder(f)


def test_missing_tensor_is_named(hf, tmp_path):
    sd = comfy_state_dict(hf)
    del sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    f = tmp_path / "partial.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: missing weight for layers\.1\.ffn\.ff_out"):
        t5core.load_encoder(f)


def test_wrong_shape_is_named(hf, tmp_path):
    sd = comfy_state_dict(hf)
    sd["encoder.block.2.layer.0.SelfAttention.k.weight"] = torch.randn(32, 64)
    f = tmp_path / "bad.safetensors"
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match=r"SelfAttention\.k\.weight has shape \(32, 64\), expected \(64, 64\)"):
        t5core.load_encoder(f)


def test_unknown_dtype_and_missing_path(hf, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        t5core.load_encoder(save_hf(hf, tmp_path), dtype="float8")
    with pytest.raises(CheckpointError, match="nope: no such file"):
        t5core.load_encoder(tmp_path / "nope")


def test_streaming_load_keeps_host_memory_low(tmp_path):
    """Loading streams a few tensors at a time through host memory: peak RSS grows by far less than the file
    (the bfloat16 model itself is half of it)."""
    import subprocess
    import sys

    f = tmp_path / "big.safetensors"
    big = make_hf_encoder("t5-v1_1", vocab_size=32128, d_model=512, num_heads=8, d_kv=64, d_ff=2048, num_layers=6)
    save_file(comfy_state_dict(big, dtype=torch.float32), str(f))
    del big
    size = f.stat().st_size
    script = (
        "import resource, torch, t5core, gc\n"
        "gc.collect(); base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"m = t5core.load_encoder({str(f)!r}, dtype='bfloat16')\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)\n"
    )
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                               cwd=str(tmp_path), env={"PYTHONPATH": str(__import__("pathlib").Path(t5core.__file__).parents[1])}).stdout.split()[-1])
    # the bfloat16 model itself is half the file; streaming adds at most one tensor on top
    assert grown < 0.75 * size, (grown, size)
