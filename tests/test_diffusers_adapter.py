"""t5core.hf inside real diffusers pipelines, fully offline: tiny random Flux, SD3, PixArt-Sigma, Chroma, Wan (UMT5),
LTX-Video and Mochi pipelines run once with transformers' T5 / UMT5 encoder and once with FastT5EncoderModel on the
same weights.

Needs diffusers, transformers, sentencepiece and accelerate (for enable_model_cpu_offload)."""
import json
import random
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
import sentencepiece  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL, AutoencoderKLLTXVideo, AutoencoderKLMochi, AutoencoderKLWan, ChromaPipeline, ChromaTransformer2DModel,
    DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline,
    FluxTransformer2DModel, LTXPipeline, LTXVideoTransformer3DModel, MochiPipeline, MochiTransformer3DModel,
    PixArtSigmaPipeline, PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline, WanPipeline,
    WanTransformer3DModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer,
    UMT5EncoderModel,
)

from t5core import CheckpointError  # noqa: E402
from t5core.hf import FastT5EncoderModel, swap_text_encoder  # noqa: E402
from tiny_models import make_hf_encoder, save_hf  # noqa: E402

T5_DIM = 64  # make_hf_encoder's d_model; SD3 needs CLIP-L + CLIP-G widths (32 + 32) <= this
CLIP_DIM = 32
PROMPT = "a tiny red fox under the blue moon"
SIZE = 8  # image height and width
# video pipelines: their denoised latents (no clamping VAE decode); 32 tokens leave padding after PROMPT's 19
VIDEO = {"height": 16, "width": 16, "num_frames": 5, "output_type": "latent", "max_sequence_length": 32}


# --------------------------------------------------------------------------------------------------
# Tokenizers and text encoders, made locally
# --------------------------------------------------------------------------------------------------
def _sentences(n: int = 400) -> list[str]:
    rng = random.Random(0)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    words += PROMPT.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory) -> T5Tokenizer:
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_prefix=str(folder / "spiece"), vocab_size=150,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return T5Tokenizer.from_pretrained(folder, extra_ids=0)


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255 (GPT-2 / CLIP convention)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory) -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every byte alone and word-final, no merges."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    chars = _byte_level_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _clip(tokenizer: CLIPTokenizer, with_projection: bool, seed: int):
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=CLIP_DIM, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, projection_dim=CLIP_DIM, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return make_hf_encoder(vocab_size=len(tokenizer), d_model=T5_DIM)


def _umt5(tokenizer: T5Tokenizer) -> UMT5EncoderModel:
    """UMT5 (Wan's text encoder): a relative-position bias table in every layer, not only the first."""
    return make_hf_encoder("umt5", vocab_size=len(tokenizer), d_model=T5_DIM)


def _vae(latent_channels: int) -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(4,), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5).eval()


# --------------------------------------------------------------------------------------------------
# Pipelines (transformers' T5 inside), their calls, and the slot holding T5
# --------------------------------------------------------------------------------------------------
def build_flux(t5_tok, clip_tok):
    torch.manual_seed(2)
    transformer = FluxTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=CLIP_DIM,
                                         axes_dims_rope=(4, 4, 8))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=_clip(clip_tok, False, 3),
                        tokenizer=clip_tok, text_encoder_2=_t5(t5_tok), tokenizer_2=t5_tok, transformer=transformer.eval())


def build_sd3(t5_tok, clip_tok):
    torch.manual_seed(2)
    transformer = SD3Transformer2DModel(sample_size=SIZE, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, joint_attention_dim=T5_DIM, caption_projection_dim=32,
                                        pooled_projection_dim=2 * CLIP_DIM, out_channels=4)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(4),
        text_encoder=_clip(clip_tok, True, 3), tokenizer=clip_tok, text_encoder_2=_clip(clip_tok, True, 4),
        tokenizer_2=clip_tok, text_encoder_3=_t5(t5_tok), tokenizer_3=t5_tok)


def build_pixart(t5_tok, clip_tok):
    torch.manual_seed(2)
    transformer = PixArtTransformer2DModel(sample_size=SIZE, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=3, caption_channels=T5_DIM, in_channels=4,
                                           cross_attention_dim=24, out_channels=8, norm_elementwise_affine=False)
    return PixArtSigmaPipeline(tokenizer=t5_tok, text_encoder=_t5(t5_tok), vae=_vae(4), transformer=transformer.eval(),
                               scheduler=DDIMScheduler())


def build_chroma(t5_tok, clip_tok):
    torch.manual_seed(2)
    transformer = ChromaTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                           num_attention_heads=2, joint_attention_dim=T5_DIM, axes_dims_rope=(4, 4, 8),
                                           approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(1), text_encoder=_t5(t5_tok),
                          tokenizer=t5_tok, transformer=transformer.eval())


def build_wan(t5_tok, clip_tok):
    torch.manual_seed(2)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=4, text_dim=T5_DIM, freq_dim=16, ffn_dim=16, num_layers=1,
                                        rope_max_seq_len=32)
    torch.manual_seed(1)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4)
    return WanPipeline(tokenizer=t5_tok, text_encoder=_umt5(t5_tok), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer.eval())


def build_ltx(t5_tok, clip_tok):
    torch.manual_seed(2)
    transformer = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                             cross_attention_dim=16, num_layers=1, caption_channels=T5_DIM)
    torch.manual_seed(1)
    vae = AutoencoderKLLTXVideo(latent_channels=4, block_out_channels=(4,) * 4, decoder_block_out_channels=(4,) * 4,
                                layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False), patch_size=1, patch_size_t=1)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=_t5(t5_tok),
                       tokenizer=t5_tok, transformer=transformer.eval())


def build_mochi(t5_tok, clip_tok):
    torch.manual_seed(2)
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                          pooled_projection_dim=16, in_channels=12, text_embed_dim=T5_DIM,
                                          time_embed_dim=4, max_sequence_length=VIDEO["max_sequence_length"])
    torch.manual_seed(1)
    vae = AutoencoderKLMochi(latent_channels=12, encoder_block_out_channels=(32,) * 4,  # GroupNorm(32 groups) inside
                             decoder_block_out_channels=(32,) * 4, layers_per_block=(1,) * 5)
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=_t5(t5_tok),
                         tokenizer=t5_tok, transformer=transformer.eval())


PIPELINES = {
    # name: (builder, T5 slot, extra call arguments)
    "flux": (build_flux, "text_encoder_2", {"max_sequence_length": 512}),
    "sd3": (build_sd3, "text_encoder_3", {}),
    "pixart": (build_pixart, "text_encoder", {"use_resolution_binning": False, "clean_caption": False}),
    "chroma": (build_chroma, "text_encoder", {}),
    "wan": (build_wan, "text_encoder", VIDEO),
    "ltx": (build_ltx, "text_encoder", {**VIDEO, "height": 32, "width": 32, "num_frames": 9}),
    "mochi": (build_mochi, "text_encoder", VIDEO),
}
MASKED = ("pixart", "chroma", "wan", "mochi")  # these pass the padding mask to T5 (LTX only to its transformer)


def run(pipe, name: str) -> torch.Tensor:
    """The image (or, for video pipelines, the denoised latents) after two steps."""
    args = {"height": SIZE, "width": SIZE, "output_type": "pt", **PIPELINES[name][2]}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=2, generator=generator, **args)
    return out.frames if hasattr(out, "frames") else out.images


@pytest.fixture(scope="module")
def tokenizers(t5_tokenizer, clip_tokenizer):
    return t5_tokenizer, clip_tokenizer


@pytest.fixture(scope="module")
def flux_dir(tokenizers, tmp_path_factory):
    """A saved Flux pipeline with transformers' T5, and its image."""
    pipe = build_flux(*tokenizers)
    folder = tmp_path_factory.mktemp("flux_hf")
    pipe.save_pretrained(folder)
    return folder, run(pipe, "flux")


def _ignore_mask(model: FastT5EncoderModel, monkeypatch) -> None:
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids, attention_mask=None, **kw: forward(input_ids, **kw))


# --------------------------------------------------------------------------------------------------
# Same weights, same image
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_image_matches_transformers_t5(name, tokenizers, monkeypatch):
    pipe = PIPELINES[name][0](*tokenizers)
    slot = PIPELINES[name][1]
    reference = run(pipe, name)

    swap_text_encoder(pipe)
    ours = getattr(pipe, slot)
    assert isinstance(ours, FastT5EncoderModel)
    assert pipe.config[slot] == ("t5core.hf", "FastT5EncoderModel")
    image = run(pipe, name)
    assert (image - reference).abs().max().item() <= 1e-4
    if name == "wan":  # UMT5: every layer's own position-bias table was taken over
        assert ours.config.model_type == "umt5" and ours.encoder.config.pos_emb_per_layer

    if name in MASKED:  # dropping the padding mask must change the output
        _ignore_mask(ours, monkeypatch)
        assert (run(pipe, name) - reference).abs().max().item() > 1e-3


@pytest.mark.parametrize("make", [_t5, _umt5], ids=["t5", "umt5"])
def test_encoder_outputs_match_transformers(make, tokenizers):
    hf = make(tokenizers[0])
    ours = FastT5EncoderModel.from_hf_model(hf)
    batch = tokenizers[0](["a red fox", PROMPT], padding="max_length", max_length=24, truncation=True,
                              return_tensors="pt")
    ref = hf(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    out = ours(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    assert torch.allclose(out[0], ref.last_hidden_state, atol=1e-5)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert torch.allclose(mine, theirs, atol=1e-5)
    plain = ours(batch.input_ids, attention_mask=batch.attention_mask, return_dict=False)
    assert isinstance(plain, tuple) and torch.equal(plain[0], out.last_hidden_state)
    assert not out.last_hidden_state.is_inference()  # usable in later autograd
    if hf.config.model_type == "umt5":  # every layer keeps its own position-bias table, shared with hf
        for layer, block in zip(ours.encoder.layers, hf.encoder.block, strict=True):
            table = block.layer[0].SelfAttention.relative_attention_bias.weight
            assert layer.attn.relative_attention_bias.weight.data_ptr() == table.data_ptr()


def test_from_hf_model_shares_weights(tokenizers):
    hf = _t5(tokenizers[0])
    ours = FastT5EncoderModel.from_hf_model(hf)
    attn = hf.encoder.block[0].layer[0].SelfAttention
    assert ours.encoder.vocab_embed.weight.data_ptr() == hf.shared.weight.data_ptr()
    assert ours.encoder.layers[1].ffn.ff_out.weight.data_ptr() == hf.encoder.block[1].layer[1].DenseReluDense.wo.weight.data_ptr()
    assert attn.q.weight.data_ptr() == ours.encoder.layers[0].attn.qkv_proj.weight.data_ptr()  # q is a view now
    ids = torch.tensor([[5, 6, 7, 1]])
    assert torch.allclose(hf(ids)[0], ours(ids)[0], atol=1e-5)  # the transformers model still works


@pytest.mark.parametrize("kind", ["t5-v1_1", "t5-v1_0", "umt5"])
def test_save_pretrained_writes_a_transformers_folder(kind, tmp_path):
    """Fused norms are written back as identity norms; transformers and t5core both read the folder."""
    hf = make_hf_encoder(kind, vocab_size=100)
    save_hf(hf, tmp_path / "src")
    ours = FastT5EncoderModel.from_pretrained(tmp_path / "src", fuse_norms=True)
    ours.save_pretrained(tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [9, 8, 7, 1, 0, 0]])
    mask = ids.ne(0)
    ref = hf(ids, attention_mask=mask)[0]
    hf_class = UMT5EncoderModel if kind == "umt5" else T5EncoderModel
    assert torch.allclose(hf_class.from_pretrained(tmp_path / "out")(ids, attention_mask=mask)[0], ref, atol=1e-5)
    assert torch.allclose(FastT5EncoderModel.from_pretrained(tmp_path / "out")(ids, attention_mask=mask)[0], ref, atol=1e-5)


def test_float16_scales_survive_save_and_reload(tmp_path):
    """Saved weights are unscaled (transformers reads them right); a float16 reload applies the saved scales."""
    hf = make_hf_encoder(vocab_size=100)
    save_hf(hf, tmp_path / "src")
    half = FastT5EncoderModel.from_pretrained(tmp_path / "src", torch_dtype="float16", fp16_scales=[1, 0.5, 1])
    half.save_pretrained(tmp_path / "out")
    ids = torch.tensor([[5, 6, 7, 8, 9, 1]])
    ref = hf(ids)[0]
    from_hf = T5EncoderModel.from_pretrained(tmp_path / "out", dtype=torch.float32)(ids)[0]
    assert (from_hf - ref).abs().max() < 1e-2 * ref.abs().max()  # float16 weights, unscaled
    reloaded = FastT5EncoderModel.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.float16 and reloaded.encoder.config.enc_ffn_out_scales == [1, 0.5, 1]
    assert torch.equal(reloaded(ids)[0], half(ids)[0])


def test_dtype_reports_weights_not_norms(tmp_path, tokenizers):
    save_hf(_t5(tokenizers[0]), tmp_path)
    model = FastT5EncoderModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert model.encoder.ln.weight.dtype == torch.float32
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    assert model(torch.tensor([[5, 6, 1]])).last_hidden_state.dtype == torch.bfloat16
    assert FastT5EncoderModel.from_pretrained(tmp_path).dtype == torch.float32  # stored dtype when none is asked


# --------------------------------------------------------------------------------------------------
# diffusers loading, saving, from_pipe, offload
# --------------------------------------------------------------------------------------------------
def test_from_pretrained_with_our_encoder_passed_in(flux_dir):
    folder, reference = flux_dir
    ours = FastT5EncoderModel.from_pretrained(folder, subfolder="text_encoder_2")
    pipe = DiffusionPipeline.from_pretrained(folder, text_encoder_2=ours, local_files_only=True)
    assert isinstance(pipe, FluxPipeline) and pipe.text_encoder_2 is ours
    pipe.to("cpu")
    assert (run(pipe, "flux") - reference).abs().max().item() <= 1e-4


def test_save_and_reload_pipeline_with_our_encoder(flux_dir, tmp_path):
    folder, reference = flux_dir
    pipe = FluxPipeline.from_pretrained(folder, text_encoder_2=FastT5EncoderModel.from_pretrained(folder), local_files_only=True)
    image = run(pipe, "flux")
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["text_encoder_2"] == ["t5core.hf", "FastT5EncoderModel"]

    reloaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(reloaded.text_encoder_2, FastT5EncoderModel)
    assert torch.equal(run(reloaded, "flux"), image)

    # the saved encoder folder is a plain transformers T5 folder too
    hf = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2")
    ids = torch.tensor([[5, 6, 7, 8, 1]])
    assert torch.allclose(hf(ids)[0], pipe.text_encoder_2(ids)[0], atol=1e-5)


def test_from_pipe_keeps_our_encoder(flux_dir):
    folder, reference = flux_dir
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    swap_text_encoder(pipe)
    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    assert img2img.text_encoder_2 is pipe.text_encoder_2
    with torch.no_grad():
        out = img2img(PROMPT, image=reference, strength=0.5, num_inference_steps=2, height=SIZE, width=SIZE,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == reference.shape


def test_model_cpu_offload(flux_dir):
    """diffusers refuses enable_model_cpu_offload() without an accelerator; device="cpu" still installs and runs
    accelerate's offload hooks, which is the code path that matters for the encoder (GPU runs are the same hooks)."""
    folder, reference = flux_dir
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.enable_model_cpu_offload(device="cpu")
    swap_text_encoder(pipe)  # re-applies the offload hooks to the new encoder
    assert hasattr(pipe.text_encoder_2, "_hf_hook")
    assert (run(pipe, "flux") - reference).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_wrong_subfolder_names_the_choices(flux_dir):
    folder, _ = flux_dir
    with pytest.raises(CheckpointError, match="no subfolder 'text_encoder_9'.*text_encoder_2"):
        FastT5EncoderModel.from_pretrained(folder, subfolder="text_encoder_9")


def test_loader_arguments_are_checked(flux_dir):
    folder, _ = flux_dir
    with pytest.raises(CheckpointError, match="local files only"):
        FastT5EncoderModel.from_pretrained("google/t5-v1_1-xxl")
    with pytest.raises(TypeError, match="unexpected arguments.*'colour'"):
        FastT5EncoderModel.from_pretrained(folder, colour="red")
    with pytest.raises(NotImplementedError, match="device_map='auto'"):
        FastT5EncoderModel.from_pretrained(folder, device_map="auto")


def test_clip_folder_is_not_t5(flux_dir):
    folder, _ = flux_dir
    with pytest.raises(CheckpointError, match="not a T5 encoder checkpoint"):
        FastT5EncoderModel.from_pretrained(folder, subfolder="text_encoder")


def test_float16_encoder_in_float32_pipeline_is_refused(flux_dir):
    folder, _ = flux_dir
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    with pytest.raises(ValueError, match=r"float16 but pipe.transformer is torch.float32.*torch_dtype=torch.float32"):
        swap_text_encoder(pipe, torch_dtype=torch.float16)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel)  # left as it was


def test_pipeline_without_t5_is_refused(tokenizers):
    class NoT5(DiffusionPipeline):
        def __init__(self, text_encoder):
            super().__init__()
            self.register_modules(text_encoder=text_encoder)

    with pytest.raises(ValueError, match="no transformers T5 encoder.*CLIPTextModel"):
        swap_text_encoder(NoT5(_clip(tokenizers[1], False, 0)))


def test_import_t5core_needs_no_transformers():
    code = "import sys, t5core; assert not {'transformers', 'diffusers', 't5core.hf'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
