"""Norm fusion and float16 residual scaling: invariance in float32, overflow caught and fixed by calibration."""
import pytest
import torch

import t5core
from t5core.calibrate import calibrate_fp16_scales, choose_scales
from t5core.fuse_norm_scales import fuse_norm_scales_enc
from t5core.fp16_scales import scale_residuals_enc
from t5core.weight_load import FusingDeserializer
from tiny_models import TOKENIZER_DIR, make_hf_encoder, rel_err, save_hf

PROMPTS = ["a photo of a cat", "illustration of a nice tree, watercolor, soft light", "hello world " * 30, "東京の夜景 🌃"]


@pytest.fixture(scope="module")
def tok():
    return t5core.load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf(make_hf_encoder("t5-v1_1", num_layers=4, seed=7), tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def overflow_hf():
    """FFN-out rows of layer 1 scaled up: its output (and the residual) pass 65504 in float16."""
    hf = make_hf_encoder("t5-v1_1", num_layers=4, seed=3)
    with torch.no_grad():
        hf.encoder.block[1].layer[1].DenseReluDense.wo.weight[:8] *= 4e5
    return hf


def test_fusion_after_load_is_invariant(folder, tok):
    ids, mask = tok(PROMPTS)
    ref = t5core.load_encoder(folder).encode(ids, mask)
    for via_f32 in (False, True):
        model = fuse_norm_scales_enc(t5core.load_encoder(folder).model, fuse_via_f32=via_f32)
        assert all(layer.ln1.weight is None and layer.ln2.weight is None for layer in model.layers)
        assert model.ln.weight is not None and model.config.elementwise_affine is False
        assert rel_err(t5core.Encoder(model).encode(ids, mask)[mask], ref[mask]) <= 1e-6


def test_fusion_while_loading_is_invariant(folder, tok):
    ids, mask = tok(PROMPTS)
    ref = t5core.load_encoder(folder).encode(ids, mask)
    fused = t5core.load_encoder(folder, fuse_norms=True)
    assert rel_err(fused.encode(ids, mask)[mask], ref[mask]) <= 1e-6


@pytest.mark.parametrize("via_f32", [True, False])
def test_usage_guide_fusing_deserializer(folder, tok, via_f32):
    """config elementwise_affine=False + FusingDeserializer.load_with_fusions, as in the usage guide (which
    leaves norm_fusion_via_f32 at its default, False)."""
    ids, mask = tok(PROMPTS)
    ref = t5core.load_encoder(folder).encode(ids, mask)
    config = t5core.open_checkpoint(folder).config.model_copy(update={"elementwise_affine": False})
    t5_enc = t5core.T5EncoderStack(config).eval()
    deserializer = FusingDeserializer(folder, lazy_load=True, dtype=torch.float32, device="cpu")
    deserializer.load_with_fusions(t5_enc, fuse_norm_scales=True, norm_fusion_via_f32=via_f32,
                                   enc_attn_out_scales=None, enc_ffn_out_scales=[1, 1, 1 / 2, 1 / 2])
    deserializer.close()
    assert rel_err(t5core.Encoder(t5_enc).encode(ids, mask)[mask], ref[mask]) <= 1e-6


@pytest.mark.parametrize("device_of_model", ["meta", "cpu"])
def test_usage_guide_float16_deserializer_dtype_wins(folder, tok, tmp_path, device_of_model):
    """The guide's float16 pattern: the model is built from a config.json that records float32 (as `convert`
    writes it), on `meta` or on the CPU; FusingDeserializer(dtype=torch.float16) decides the weights' dtype.
    Fused norms and FFN-out scales as the guide shows; the result matches the float32 model within float16 error
    and is closer to it than bfloat16."""
    import json

    from t5core.save import save_encoder

    t5_dir = save_encoder(t5core.load_encoder(folder).model, tmp_path / "enc")
    ids, mask = tok(PROMPTS)
    ref = t5core.load_encoder(t5_dir).encode(ids, mask)
    conf_dict = json.loads((t5_dir / "config.json").read_text())
    assert conf_dict["dtype"] == "float32"
    config = t5core.T5Config.model_validate(conf_dict).model_copy(update={"elementwise_affine": False})
    with torch.device(device_of_model):
        t5_enc = t5core.T5EncoderStack(config).eval()
    deserializer = FusingDeserializer(t5_dir / "enc.tensors", lazy_load=True, dtype=torch.float16, device="cpu")
    deserializer.load_with_fusions(t5_enc, fuse_norm_scales=True, norm_fusion_via_f32=True,
                                   enc_attn_out_scales=None, enc_ffn_out_scales=[1, 1, 1 / 2, 1 / 2])
    deserializer.close()
    assert t5_enc.layers[0].attn.qkv_proj.weight.dtype == torch.float16 and t5_enc.config.dtype == torch.float16
    with torch.inference_mode():
        emb = t5_enc(input_ids=ids, input_mask=mask)
    bf16 = t5core.load_encoder(t5_dir, dtype="bfloat16").encode(ids, mask)
    err16, err_bf16 = rel_err(emb[mask], ref[mask]), rel_err(bf16[mask], ref[mask])
    assert err16 <= 2e-3 and err16 <= err_bf16 / 4, (err16, err_bf16)


def test_scales_baked_in_a_checkpoint_are_the_baseline(folder, tok, tmp_path):
    """A scaled checkpoint loaded into a model built from an unscaled config, or loaded twice with new scales,
    still encodes exactly: new scales multiply onto the checkpoint's, never onto the model's."""
    from t5core.save import save_encoder

    ids, mask = tok(PROMPTS)
    ref = t5core.load_encoder(folder).encode(ids, mask)
    scaled = save_encoder(t5core.load_encoder(folder, dtype="float16", fp16_scales=[1, 1 / 2, 1, 1]).model.set_weight_dtype(torch.float32),
                          tmp_path / "scaled")
    unscaled_config = t5core.open_checkpoint(folder).config
    model = t5core.T5EncoderStack(unscaled_config).eval()
    FusingDeserializer(scaled).load_into_module(model)
    assert model.config.enc_ffn_out_scales == [1, 1 / 2, 1, 1]
    assert rel_err(t5core.Encoder(model).encode(ids, mask)[mask], ref[mask]) <= 2e-3  # the weights went through float16
    twice = t5core.T5EncoderStack(unscaled_config).eval()
    for _ in range(2):
        FusingDeserializer(folder).load_with_fusions(twice, enc_ffn_out_scales=[1, 1 / 2, 1, 1])
    assert twice.config.enc_ffn_out_scales == [1, 1 / 2, 1, 1]
    assert rel_err(t5core.Encoder(twice).encode(ids, mask)[mask], ref[mask]) <= 1e-6


def test_scaling_is_invariant_and_eps_follows(folder, tok):
    ids, mask = tok(PROMPTS)
    ref = t5core.load_encoder(folder).encode(ids, mask)
    model = scale_residuals_enc(t5core.load_encoder(folder, fuse_norms=True).model, [1, 1 / 2, 1, 1], [1 / 4, 1, 1, 1 / 2])
    assert rel_err(t5core.Encoder(model).encode(ids, mask)[mask], ref[mask]) <= 1e-6
    # the norm reading a stream scaled by c has eps * c**2; fusing afterwards keeps the scales
    assert model.layers[1].ln1.eps == pytest.approx(1e-6 / 16) and model.layers[1].ln2.eps == pytest.approx(1e-6 / 64)
    fuse_norm_scales_enc(model)
    assert model.config.enc_ffn_out_scales == [1 / 4, 1, 1, 1 / 2]


def test_scales_must_be_powers_of_two(folder):
    with pytest.raises(ValueError, match="layer 2 scale 0.3 is not a power of two"):
        scale_residuals_enc(t5core.load_encoder(folder).model, None, [1, 1, 0.3, 1])
    with pytest.raises(ValueError, match="3 scales given for 4 encoder layers"):
        t5core.load_encoder(folder, dtype="float16", fp16_scales=[1, 1, 1])


def test_choose_scales_greedy_with_headroom():
    # a layer-2 FFN output of 40000 with headroom 4 needs 1/4 (40000/4 = 10000 <= 16376); later layers inherit it
    attn, ffn = choose_scales([1.0] * 4, [10.0, 10.0, 40000.0, 100000.0], headroom=4)
    assert attn == [1, 1, 1, 1] and ffn == [1, 1, 1 / 4, 1 / 2]


def test_overflow_raises_then_calibration_fixes_it(overflow_hf, tok, tmp_path):
    folder = save_hf(overflow_hf, tmp_path / "overflow")
    ids, mask = tok(PROMPTS)
    with pytest.raises(t5core.NonFiniteOutputError, match=r"first at layers\.1\.ffn.*calibrate"):
        t5core.load_encoder(folder, dtype="float16", fp16_scales=None).encode(ids, mask)

    ref_model = t5core.load_encoder(folder)
    scales = calibrate_fp16_scales(ref_model.model, tok, headroom=4)
    assert scales.ffn[1] < 1 and scales.attn == (1,) * 4
    fp16 = t5core.load_encoder(folder, dtype="float16", fp16_scales=scales)
    bf16 = t5core.load_encoder(folder, dtype="bfloat16")
    hf_bf16 = make_hf_encoder("t5-v1_1", num_layers=4)
    hf_bf16.load_state_dict(overflow_hf.state_dict())
    hf_bf16 = hf_bf16.to(torch.bfloat16)

    from t5core.calibrate import BUILTIN_PROMPTS

    def random_batch(seed, n=25):  # n prompts of random token ids and lengths 2..200, padded
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 200, (n,), generator=gen)
        mask = torch.arange(200)[None, :] < lengths[:, None]
        return torch.randint(3, 32000, (n, 200), generator=gen) * mask, mask

    batches = [tok([p], max_length=512) for p in BUILTIN_PROMPTS] + [random_batch(s) for s in range(4)]
    errs = {"fp16": [], "bf16": [], "hf_bf16": []}
    for ids, mask in batches:
        ref = ref_model.encode(ids, mask)[mask]
        out16 = fp16.encode(ids, mask)[mask]  # raises if not finite
        errs["fp16"].append((out16 - ref).norm() ** 2)
        errs["bf16"].append((bf16.encode(ids, mask)[mask] - ref).norm() ** 2)
        with torch.no_grad():
            hf_out = hf_bf16(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()[mask]
        errs["hf_bf16"].append((hf_out - ref).norm() ** 2)
        errs.setdefault("ref", []).append(ref.norm() ** 2)
    rel = {k: (sum(v) / sum(errs["ref"])).sqrt().item() for k, v in errs.items() if k != "ref"}
    assert rel["fp16"] <= rel["hf_bf16"] / 8, rel
    assert rel["fp16"] <= rel["bf16"] / 6, rel  # ours in bfloat16 is already closer to float32 than transformers'


def test_load_encoder_calibrates_and_uses_saved_scales(overflow_hf, tok, tmp_path):
    from t5core.__main__ import main as cli

    folder = save_hf(overflow_hf, tmp_path / "m")
    cli(["calibrate", str(folder), "--tokenizer", str(TOKENIZER_DIR)])
    ids, mask = tok(PROMPTS)
    auto = t5core.load_encoder(folder, dtype="float16")  # picks up the saved scales
    assert auto.config.enc_ffn_out_scales[1] < 1
    now = t5core.load_encoder(folder, dtype="float16", fp16_scales="calibrate")
    assert now.config.enc_ffn_out_scales == auto.config.enc_ffn_out_scales
    assert torch.isfinite(auto.encode(ids, mask)).all()


def test_small_shape_fp16_with_preset_scales(tok, tmp_path):
    """T5 v1.1 small-shaped random model: float16 with the preset scales, against our own bfloat16 (the precision
    tool's report, tested in test_bench.py, also checks it against transformers' bfloat16 at 1/8)."""
    from t5core.demo import build_demo_model

    path = build_demo_model(tmp_path / "small")
    ids, mask = tok(PROMPTS * 3)
    ref = t5core.load_encoder(path).encode(ids, mask)[mask]
    fp16 = t5core.load_encoder(path, dtype="float16", fuse_norms=True)
    assert fp16.config.enc_ffn_out_scales == [1, 1, 1 / 2, 1, 1, 1, 1, 1 / 2]
    e16 = rel_err(fp16.encode(ids, mask)[mask], ref)
    e_bf16 = rel_err(t5core.load_encoder(path, dtype="bfloat16", fuse_norms=True).encode(ids, mask)[mask], ref)
    assert e16 <= e_bf16 / 6, (e16, e_bf16)
