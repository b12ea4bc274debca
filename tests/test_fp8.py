"""Float8 weights (t5core.fp8): fp8 storage against float32 on the same dequantized weights, fp8 files used as they
are (bytes kept, bit-identical round trip through convert), memory, scale checks, the fp8 matmul's math on the
CPU, residual scales and norm fusion, the adapter."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import t5core
from t5core import CheckpointError, T5Config, T5EncoderStack
from t5core.__main__ import main as cli
from t5core.checkpoint import open_checkpoint
from t5core.fp16_scales import Scales, scale_residuals_enc
from t5core.fp8 import Fp8Linear, dequantize, quantize_rows
from t5core import t5_encoder
from t5core.t5_common import split_linear
from t5core.t5_encoder import CastLinear
from t5core.weight_load import build_empty, load_checkpoint_into
from tiny_models import make_hf_encoder, rel_err, save_hf

E4M3 = torch.float8_e4m3fn
PROJECTIONS = ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
               "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo")


def batch(B=2, L=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L // 2:] = False
    return ids, mask


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny T5 v1.1 and UMT5 as Hugging Face folders (float32)."""
    root = tmp_path_factory.mktemp("fp8")
    return {kind: save_hf(make_hf_encoder(kind, vocab_size=512, seed=3), root / kind) for kind in ("t5-v1_1", "umt5")}


def comfy_scaled_file(hf_folder, path, scale_weights=True, mutate=None):
    """ComfyUI's scaled fp8 convention from an HF folder: projections in e4m3 with one float32 `scale_weight` [] per
    tensor (or none: plain fp8), the `scaled_fp8` marker, the embedding in bf16, the rest as it is."""
    sd = load_file(str(hf_folder / "model.safetensors"))
    sd.pop("encoder.embed_tokens.weight", None)
    out = {}
    for key, t in sd.items():
        if key.endswith(".weight") and any(p in key for p in PROJECTIONS):
            scale = t.abs().amax() / 448 if scale_weights else torch.tensor(1.0)
            out[key] = (t / scale).clamp(-448, 448).to(E4M3)
            if scale_weights:
                out[key.removesuffix("weight") + "scale_weight"] = scale.float()
        else:
            out[key] = t.to(torch.bfloat16) if key == "shared.weight" else t
    if scale_weights:
        out["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    if mutate:
        mutate(out)
    save_file(out, str(path))
    return path


def bytes_of(t):
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


# -- fp8 storage is exactly "dequantize, then the usual math" --------------------------------------------------------
@pytest.mark.parametrize("kind", ["t5-v1_1", "umt5"])
def test_storage_matches_float32_on_the_dequantized_weights(folders, kind):
    fp8 = t5core.load_encoder(folders[kind], "float32", weight_dtype="fp8_e4m3fn")
    ref = t5core.load_encoder(folders[kind], "float32")
    with torch.no_grad():
        for name, m in fp8.model.named_modules():
            if isinstance(m, Fp8Linear):
                ref.model.get_submodule(name).weight.copy_(dequantize(m.weight, m.scale, torch.float32))
    assert fp8.config.weight_dtype == "fp8_e4m3fn" and ref.config.weight_dtype is None
    ids, mask = batch()
    out, expected = fp8.encode(ids, mask), ref.encode(ids, mask)
    assert rel_err(out[mask], expected[mask]) <= 1e-5
    assert rel_err(out[mask], t5core.load_encoder(folders[kind]).encode(ids, mask)[mask]) < 0.05  # fp8's own error


def test_quantize_rows():
    w = torch.randn(6, 32) * torch.logspace(-3, 2, 6)[:, None]
    w[2] = 0
    q, s = quantize_rows(w, E4M3)
    assert q.dtype == E4M3 and s.dtype == torch.float32 and s.shape == (6,)
    assert s[2] == 1 and torch.equal(s[[0, 1, 3, 4, 5]], w[[0, 1, 3, 4, 5]].abs().amax(1) / 448)
    assert torch.equal(q.float().abs().amax(1)[[0, 1, 3, 4, 5]], torch.full((5,), 448.0))
    assert rel_err(dequantize(q, s, torch.float32), w) < 0.04  # e4m3: 3 mantissa bits


def test_module_bytes_about_half_of_bfloat16(folders, tmp_path):
    def nbytes(m):
        return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))

    with torch.device("meta"):  # the real XXL module, every parameter and buffer
        fp8 = T5EncoderStack(T5Config.from_name("xxl", dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn"))
        bf16 = T5EncoderStack(T5Config.from_name("xxl", dtype=torch.bfloat16))
    assert nbytes(fp8) <= 0.55 * nbytes(bf16)
    folder = save_hf(make_hf_encoder(vocab_size=256, d_model=256, d_kv=64, d_ff=512), tmp_path / "wide")
    fp8, bf16 = (t5core.load_encoder(folder, "bfloat16", weight_dtype=w).model for w in ("fp8_e4m3fn", "auto"))
    assert nbytes(fp8) <= 0.55 * nbytes(bf16)


def test_set_weight_dtype_keeps_fp8(folders):
    model = t5core.load_encoder(folders["t5-v1_1"], "float32", weight_dtype="fp8_e5m2").model
    model.set_weight_dtype(torch.bfloat16)
    proj = model.layers[0].ffn.ff_in
    assert proj.weight.dtype == torch.float8_e5m2 and proj.scale.dtype == torch.float32
    assert model.vocab_embed.weight.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16


# -- fp8 files: used as they are -------------------------------------------------------------------------------------
def test_scaled_files_keep_their_bytes_and_round_trip(folders, tmp_path):
    src = comfy_scaled_file(folders["t5-v1_1"], tmp_path / "t5_fp8_scaled.safetensors")
    stored = load_file(str(src))
    enc = t5core.load_encoder(src, "bfloat16")  # weight_dtype "auto": stays fp8
    assert enc.config.weight_dtype == "fp8_e4m3fn" and open_checkpoint(src).format == "comfyui-scaled-fp8"
    qkv = enc.model.layers[1].attn.qkv_proj
    for part, name in enumerate("qkv"):
        key = f"encoder.block.1.layer.0.SelfAttention.{name}."
        rows = slice(part * 64, (part + 1) * 64)
        assert torch.equal(bytes_of(qkv.weight[rows]), bytes_of(stored[key + "weight"]))
        assert torch.equal(qkv.scale[rows], stored[key + "scale_weight"].expand(64))
    # convert writes the same file back: bytes, scales, marker, everything
    again = tmp_path / "again.safetensors"  # one file, as ComfyUI's text_encoders folder holds them
    cli(["convert", str(src), str(again), "--weight-dtype", "fp8_e4m3fn", "--dtype", "bfloat16"])
    written = load_file(str(again))
    assert written.keys() == stored.keys()
    for key in stored:
        assert written[key].dtype == stored[key].dtype and torch.equal(bytes_of(written[key]), bytes_of(stored[key])), key


def test_ours_round_trip_and_plain_fp8(folders, tmp_path):
    cli(["convert", str(folders["umt5"]), str(tmp_path / "a"), "--weight-dtype", "fp8_e4m3fn", "--dtype", "bf16"])
    cli(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--weight-dtype", "fp8_e4m3fn", "--dtype", "bf16"])
    a, b = (load_file(str(tmp_path / x / "model.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(bytes_of(a[k]), bytes_of(b[k])) for k in a)
    assert a["encoder.block.0.layer.0.SelfAttention.q.scale_weight"].shape == ()  # per tensor, as ComfyUI reads
    ids, mask = batch()
    expected = t5core.load_encoder(folders["umt5"]).encode(ids, mask)
    assert rel_err(t5core.load_encoder(tmp_path / "a").encode(ids, mask)[mask], expected[mask]) < 0.05
    # plain fp8 (no scales: scale 1), e.g. t5xxl_fp8_e4m3fn.safetensors
    plain = comfy_scaled_file(folders["t5-v1_1"], tmp_path / "plain.safetensors", scale_weights=False)
    enc = t5core.load_encoder(plain, weight_dtype="auto")
    assert enc.config.weight_dtype == "fp8_e4m3fn" and torch.equal(enc.model.layers[0].attn.o_proj.scale, torch.ones(64))
    expanded = t5core.load_encoder(plain, "float32", weight_dtype="float32")
    assert expanded.config.weight_dtype is None
    assert rel_err(enc.encode(ids, mask), expanded.encode(ids, mask)) <= 1e-5


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), "shape"])
@pytest.mark.parametrize("weight_dtype", ["auto", "float32"])
def test_bad_scales_are_named_errors(folders, tmp_path, bad, weight_dtype):
    key = "encoder.block.1.layer.1.DenseReluDense.wo.scale_weight"

    def corrupt(sd):
        sd[key] = torch.ones(3) if bad == "shape" else torch.tensor(bad)

    path = comfy_scaled_file(folders["t5-v1_1"], tmp_path / "bad.safetensors", mutate=corrupt)
    with pytest.raises(CheckpointError) as e:
        t5core.load_encoder(path, weight_dtype=weight_dtype)
    assert str(path) in str(e.value) and key in str(e.value)


def test_refuses_to_requantize_fp8_files(folders, tmp_path):
    src = comfy_scaled_file(folders["t5-v1_1"], tmp_path / "scaled.safetensors")
    with pytest.raises(ValueError, match="re-quantize"):
        t5core.load_encoder(src, weight_dtype="fp8_e5m2")
    with pytest.raises(CheckpointError, match="re-quantize"):
        t5core.load_encoder(src, fuse_norms=True)
    with pytest.raises(ValueError, match="re-quantize"):  # 16-bit storage: not for fp8 files either
        t5core.load_encoder(src, "float32", weight_dtype="bfloat16")
    with pytest.raises(ValueError, match="expands the weights to the model.s dtype"):
        t5core.load_encoder(src, "float16", weight_dtype="bfloat16")
    with pytest.raises(ValueError, match="safetensors"):
        t5core.save.save_encoder(t5core.load_encoder(src).model, tmp_path / "t", "tensorizer")


# -- fusion and residual scales --------------------------------------------------------------------------------------
def test_norm_fusion_before_quantizing(folders):
    ids, mask = batch()
    expected = t5core.load_encoder(folders["t5-v1_1"]).encode(ids, mask)
    fused = t5core.load_encoder(folders["t5-v1_1"], weight_dtype="fp8_e4m3fn", fuse_norms=True)
    assert not fused.config.elementwise_affine and fused.model.layers[0].ln1.weight is None
    assert rel_err(fused.encode(ids, mask)[mask], expected[mask]) < 0.05


def test_residual_scales_scale_the_float32_scales(folders):
    """Residual factors multiply the per-row scales, never the fp8 bytes: exact."""
    path = comfy_scaled_file(folders["t5-v1_1"], folders["t5-v1_1"].parent / "scaled_res.safetensors")
    ckpt = open_checkpoint(path)
    config = ckpt.config.model_copy(update={"weight_dtype": "fp8_e4m3fn"})
    plain = load_checkpoint_into(build_empty(config, "cpu"), ckpt)
    scaled = load_checkpoint_into(build_empty(config, "cpu"), ckpt, scales=Scales.of([1, 0.5, 1], [0.25, 1, 1], 3))
    factors = Scales.from_config(scaled.config).weight_factors()
    for name, m in scaled.named_modules():
        if isinstance(m, Fp8Linear):
            base = plain.get_submodule(name)
            assert torch.equal(bytes_of(m.weight), bytes_of(base.weight))
            assert torch.equal(m.scale, base.scale * factors.get(f"{name}.weight", 1.0))
    ids, mask = batch()
    with torch.inference_mode():
        assert rel_err(scaled(ids, mask)[mask], plain(ids, mask)[mask]) <= 1e-6
    later = scale_residuals_enc(load_checkpoint_into(build_empty(config, "cpu"), ckpt), [1, 0.5, 1], [0.25, 1, 1])
    assert all(torch.equal(a, b) for a, b in zip(later.parameters(), scaled.parameters()))


# -- the fp8 matmul (CUDA-only in the model; its math checked through the CPU's torch._scaled_mm) ----------------
@pytest.mark.parametrize("f32_out", [False, True])
def test_fp8_matmul_is_per_token_quantized_activations_times_the_weights(f32_out):
    torch.manual_seed(0)
    w, x = torch.randn(48, 64), (torch.randn(2, 5, 64) * torch.logspace(-2, 2, 5)[:, None]).to(torch.bfloat16)
    m = Fp8Linear(64, 48, E4M3, f32_out=f32_out, compute=True)
    with torch.no_grad():
        m.weight.copy_(quantize_rows(w, E4M3)[0])
        m.scale.copy_(quantize_rows(w, E4M3)[1])
    m.mm_out_dtype = torch.float32 if f32_out else torch.bfloat16  # as on a GPU with cuBLAS's float32 output
    out = m.fp8_matmul(x)
    assert out.shape == (2, 5, 48) and out.dtype == (torch.float32 if f32_out else torch.bfloat16)
    xq, xs = quantize_rows(x.reshape(-1, 64), E4M3)
    emulated = (dequantize(xq, xs, torch.float32) @ dequantize(m.weight, m.scale, torch.float32).t()).view(2, 5, 48)
    assert rel_err(out, emulated) <= (1e-6 if f32_out else 4e-3)
    assert rel_err(out, m(x)) < 0.06  # against fp8 storage: the activations' e4m3 rounding


def test_fp8_layers_trace_as_one_graph(folders):
    """No graph break in a layer with fp8 projections (fullgraph, as the runtime's regional compile). On the CPU
    the layer dequantizes; the fp8 matmul itself is traced as one projection's fp8_matmul."""
    model = t5core.load_encoder(folders["t5-v1_1"], "bfloat16", weight_dtype="fp8_e4m3fn_fast").model
    layer = model.layers[0]
    x = torch.randn(2, 8, 64)
    bias = torch.zeros(4, 15)
    with torch.inference_mode():
        eager = layer(x, torch.zeros_like(x), model.unit_scale, bias)
        traced = torch.compile(layer, fullgraph=True, backend="eager")(x, torch.zeros_like(x), model.unit_scale, bias)
        assert all(torch.equal(a, b) for a, b in zip(eager, traced))
        fp8_mm = torch.compile(lambda v: layer.attn.qkv_proj.fp8_matmul(v), fullgraph=True, backend="aot_eager")
        assert rel_err(fp8_mm(x.to(torch.bfloat16)), layer.attn.qkv_proj.fp8_matmul(x.to(torch.bfloat16))) <= 1e-6
    assert not layer.ffn.ff_out.compute  # wo keeps the dequantizing matmul (t5core.fp8)


# -- the adapter -----------------------------------------------------------------------------------------------------
def test_adapter_weight_dtype_and_save(folders, tmp_path):
    from t5core.hf import FastT5EncoderModel

    model = FastT5EncoderModel.from_pretrained(folders["t5-v1_1"], torch_dtype=torch.float32, weight_dtype="fp8_e4m3fn")
    assert model.dtype == torch.float32 and isinstance(model.encoder.layers[0].attn.qkv_proj, Fp8Linear)
    ids, mask = batch()
    out = model(ids, attention_mask=mask).last_hidden_state
    model.save_pretrained(tmp_path / "saved")  # ComfyUI's scaled fp8 file
    again = FastT5EncoderModel.from_pretrained(tmp_path / "saved", torch_dtype=torch.float32)
    assert again.encoder.config.weight_dtype == "fp8_e4m3fn"
    assert rel_err(again(ids, attention_mask=mask).last_hidden_state[mask], out[mask]) < 0.05


# -- 16-bit storage, float32 compute (ComfyUI's float16 weights on the CPU) ------------------------------------------
def projections(model):
    return [m for layer in model.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.ffn.ff_in, layer.ffn.ff_out)]


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory):
    """Tiny T5 v1.1 as a float16 Hugging Face folder (as t5xxl_fp16.safetensors)."""
    return save_hf(make_hf_encoder(vocab_size=512, seed=3).half(), tmp_path_factory.mktemp("fp16") / "t5")


def test_float16_storage_is_float32_compute_on_the_float16_weights(fp16_folder):
    stored = t5core.load_encoder(fp16_folder, "float32", weight_dtype="float16")
    ref = t5core.load_encoder(fp16_folder, "float32")  # the float16 weights upcast to float32
    assert stored.config.weight_dtype == "float16" and ref.config.weight_dtype is None
    assert all(isinstance(m, CastLinear) and m.weight.dtype == torch.float16 for m in projections(stored.model))
    assert stored.model.vocab_embed.weight.dtype == stored.model.layers[0].ln1.weight.dtype == torch.float32
    for ours, theirs in zip(projections(stored.model), projections(ref.model)):
        assert torch.equal(ours.weight.float(), theirs.weight)  # the file's values, not rounded again
        assert 2 * ours.weight.nbytes == theirs.weight.nbytes
    ids, mask = batch()
    out, expected = stored.encode(ids, mask), ref.encode(ids, mask)
    assert out.dtype == torch.float32 and rel_err(out[mask], expected[mask]) <= 1e-6
    stored.compile()  # CPU: not frozen into float32 constants
    assert rel_err(stored.encode(ids, mask)[mask], expected[mask]) <= 1e-6
    assert projections(stored.model)[0].weight.dtype == torch.float16


@pytest.mark.parametrize("wdtype, bound", [(torch.float16, 3e-7), (torch.bfloat16, 4e-6)])
def test_split_linear_is_float32_compute_on_16_bit_weights(wdtype, bound):
    """What CastLinear runs on a GPU: the float32 activation as two 16-bit parts, one matmul. Against float64 on the
    same 16-bit weights, at any magnitude (float16 itself would overflow at 1e5 and flush 1e-30 to zero) and for a
    row of zeros: float32 compute's error (3e-7) for float16 weights, 2^-16 parts for bfloat16 ones. Compiled too:
    inductor drops a float16 round trip inside a kernel (a split by casting gave 2e-4 compiled)."""
    torch.manual_seed(0)
    w = (torch.randn(96, 256) * 0.05).to(wdtype)
    compiled = torch.compile(split_linear, dynamic=False)
    for size in (1.0, 1e5, 1e-30):
        x = torch.randn(2, 9, 256, dtype=torch.float64) * size
        x[0, 0] = 0
        ref = x @ w.double().t()
        assert rel_err(x.float() @ w.float().t(), ref) < 3e-7  # float32 compute, the bar
        for split in (split_linear, compiled):
            out = split(x.float(), w)
            assert out.dtype == torch.float32 and out.shape == (2, 9, 96)
            assert torch.equal(out[0, 0], torch.zeros(96))
            assert rel_err(out.double(), ref) < bound, (size, split)


def test_float16_storage_split_on_the_gpu_path(fp16_folder, monkeypatch):
    """The encoder with CastLinear's GPU path (split_linear) taken on the CPU, eager and compiled: float32 compute's
    output."""
    ids, mask = batch()
    stored = t5core.load_encoder(fp16_folder, "float32", weight_dtype="float16")
    expected = stored.encode(ids, mask)  # the weights cast to float32
    calls = []
    monkeypatch.setattr(t5_encoder, "split_linear", lambda x, w: calls.append(w) or split_linear(x, w))
    monkeypatch.setattr(t5_encoder, "split_gemms", lambda device, dtype: True)
    out = stored.encode(ids, mask)
    assert len(calls) == 4 * stored.config.num_layers
    assert rel_err(out[mask], expected[mask]) < 1e-6
    stored.compile()
    assert rel_err(stored.encode(ids, mask)[mask], expected[mask]) < 1e-6
    assert len(calls) > 4 * stored.config.num_layers  # traced through split_linear


def test_16_bit_storage_of_wider_files_fusion_and_saving(folders, fp16_folder, tmp_path):
    """float32 / bfloat16 files round once at load; fuse_norms folds in float32, then rounds once; saved (tensorizer,
    Hugging Face, convert --weight-dtype) the weights are the 16-bit ones."""
    ids, mask = batch()
    f32 = t5core.load_encoder(folders["t5-v1_1"])
    bf16 = t5core.load_encoder(folders["t5-v1_1"], weight_dtype="bf16")
    assert projections(bf16.model)[0].weight.dtype == torch.bfloat16
    for ours, theirs in zip(projections(bf16.model), projections(f32.model)):
        assert torch.equal(ours.weight, theirs.weight.to(torch.bfloat16))
    fused = t5core.load_encoder(folders["t5-v1_1"], weight_dtype="float16", fuse_norms=True)
    ln1 = f32.model.layers[0].ln1.weight
    assert torch.equal(fused.model.layers[0].attn.qkv_proj.weight, (f32.model.layers[0].attn.qkv_proj.weight * ln1).half())
    assert rel_err(fused.encode(ids, mask)[mask], f32.encode(ids, mask)[mask]) < 2e-3  # float16's rounding
    stored = t5core.load_encoder(fp16_folder, weight_dtype="float16")
    expected = stored.encode(ids, mask)
    t5core.save.save_encoder(stored.model, tmp_path / "tz", "tensorizer")
    t5core.save.save_encoder(stored.model, tmp_path / "hf", "safetensors")
    cli(["convert", str(fp16_folder), str(tmp_path / "cli"), "--dtype", "float32", "--weight-dtype", "float16"])
    for out in ("tz", "hf", "cli"):
        ckpt = open_checkpoint(tmp_path / out)
        assert ckpt.projection_dtype() == torch.float16, out
        again = t5core.load_encoder(ckpt, weight_dtype="fp16")
        assert torch.equal(again.encode(ids, mask), expected), out


def test_16_bit_storage_refuses_what_it_is_not(fp16_folder, folders):
    with pytest.raises(ValueError, match=r"expands the weights to the model's dtype, which is torch.bfloat16: pass "
                                         r"dtype='float16' too \(or dtype='float32': 16-bit weights"):
        t5core.load_encoder(fp16_folder, "bfloat16", weight_dtype="float16")
    with pytest.raises(ValueError, match="needs dtype float32"):
        T5Config.from_name("small", dtype=torch.bfloat16, weight_dtype="float16")
    with pytest.raises(ValueError, match="weight_dtype 'fp16'"):  # the config takes the full names only
        T5Config.from_name("small", weight_dtype="fp16")
    model = t5core.load_encoder(folders["t5-v1_1"], weight_dtype="bfloat16").model
    with pytest.raises(ValueError, match="set_weight_dtype: the projections store bfloat16 weights"):
        model.set_weight_dtype(torch.float16)

