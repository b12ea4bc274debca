"""Float32 parity with transformers (same random weights) for every architecture, both attention kernels."""
import pytest
import torch

import t5core
from t5core.runtime import length_bucket
from tiny_models import make_hf_encoder, rel_err, save_hf


def _batch(vocab: int, lengths: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.zeros(len(lengths), L, dtype=torch.long)
    mask = torch.zeros(len(lengths), L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = torch.randint(3, vocab, (n - 1,), generator=gen)
        ids[b, n - 1] = 1  # EOS
        mask[b, :n] = True
    return ids, mask


@pytest.fixture(scope="module", params=["t5-v1_1", "t5-v1_0", "mt5", "umt5"])
def pair(request, tmp_path_factory):
    hf = make_hf_encoder(request.param, vocab_size=512, seed=1)
    folder = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, folder


def test_default_attention():
    """No attn_impl: flex only for a compiled UMT5 in 16 bits on CUDA (its per-layer bias tables read inside the
    kernel); float32 takes SDPA, whose float32 kernel is far faster than flex's."""
    from t5core.weight_load import default_attention

    umt5 = t5core.T5Config.from_name("small", pos_emb_per_layer=True)
    t5 = t5core.T5Config.from_name("small")
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert default_attention(umt5, bf16, "cuda", compile=True) == "flex"
    assert default_attention(umt5, fp16, torch.device("cuda", 1), compile=True) == "flex"
    for config, dtype, device, compile in ((umt5, bf16, "cpu", True), (umt5, bf16, "cuda", False),
                                           (t5, bf16, "cuda", True), (umt5, fp32, "cuda", True)):
        assert default_attention(config, dtype, device, compile) == "sdpa"


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
@pytest.mark.parametrize("lengths", [[1], [7, 3, 5], [64, 1, 33, 64], [512, 200, 17]])
def test_float32_parity(pair, attn, lengths):
    kind, hf, folder = pair
    model = t5core.load_encoder(folder, dtype="float32", attn_impl=attn)
    ids, mask = _batch(512, lengths, seed=len(lengths))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    out = model.encode(ids, mask)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out[mask], ref[mask]) <= 1e-5, (kind, attn, lengths)


def test_sdpa_matches_transformers_on_pad_rows_too(pair):
    """Without pad-query masking the SDPA path reproduces transformers on every row, pads included."""
    _, hf, folder = pair
    model = t5core.load_encoder(folder, attn_impl="sdpa")
    ids, mask = _batch(512, [9, 4], seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert rel_err(model.encode(ids, mask), ref) <= 1e-5


def test_flex_pad_queries_masked(pair):
    """mask_pad_queries drops pad rows; real-token rows must not change."""
    _, _, folder = pair
    model = t5core.load_encoder(folder, attn_impl="flex").model
    ids, mask = _batch(512, [40, 10], seed=4)
    with torch.inference_mode():
        keys_only = model(ids, block_mask=t5core.make_self_attn_block_mask(mask, mask_pad_queries=False))
        both = model(ids, block_mask=t5core.make_self_attn_block_mask(mask=mask, mask_pad_queries=True))
    assert rel_err(both[mask], keys_only[mask]) <= 1e-6


def test_flex_takes_input_mask_as_block_mask(pair):
    """Flex turns input_mask into the usage guide's padding block mask (keys only), so pad rows come out as
    transformers computes them; lengths over 128 give skipped and partial blocks."""
    kind, hf, folder = pair
    model = t5core.load_encoder(folder, attn_impl="flex").model
    ids, mask = _batch(512, [150, 5, 131], seed=6)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    with torch.inference_mode():
        by_input_mask = model(ids, input_mask=mask)
        by_block_mask = model(ids, block_mask=t5core.make_self_attn_block_mask(mask))
    assert torch.equal(by_input_mask, by_block_mask)
    assert rel_err(by_input_mask, ref) <= 1e-5, kind


def test_bucket_examples():
    from t5core.t5_common import relative_position_bucket

    offsets = torch.tensor([-200, -128, -8, -7, 0, 1, 8, 127, 128])
    assert relative_position_bucket(offsets).tolist() == [15, 15, 8, 7, 0, 17, 24, 31, 31]


def test_one_bias_table_serves_every_length(pair):
    """Buckets stop changing at max_distance (128), so one [n, H, 2*128+1] table covers short and long prompts
    (test_float32_parity checks 512 tokens against transformers): bind_score_mods has nothing to bind, and only
    checks its seq_len."""
    kind, _, folder = pair
    model = t5core.load_encoder(folder).model
    assert model.offset_bias().shape == (3 if kind == "umt5" else 1, 4, 257)
    model.bind_score_mods(seq_len=16)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="seq_len"):
            model.bind_score_mods(seq_len=bad)


@pytest.mark.parametrize("L", [5, 128, 200, 300])
@pytest.mark.parametrize("mask_pad_queries", [False, True])
def test_block_mask_matches_create_block_mask(L, mask_pad_queries):
    """The tensor-op block mask selects the same blocks as flex's create_block_mask and attends identically,
    for right padding and for arbitrary holes."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gen = torch.Generator().manual_seed(L)
    lengths = torch.randint(1, L + 1, (3,), generator=gen)
    for mask in (torch.arange(L)[None] < lengths[:, None], torch.rand(3, L, generator=gen) > 0.5):
        mask[:, 0] = True

        def mask_mod(b, h, q, kv):
            return (mask[b, kv] & mask[b, q]) if mask_pad_queries else mask[b, kv]

        ours = t5core.make_self_attn_block_mask(mask, mask_pad_queries=mask_pad_queries)
        ref = create_block_mask(mask_mod, 3, None, L, L, device="cpu")
        assert torch.equal(ours.kv_num_blocks + ours.full_kv_num_blocks, ref.kv_num_blocks + ref.full_kv_num_blocks)
        q, k, v = (torch.randn(3, 2, L, 16, generator=gen) for _ in range(3))
        rows = mask if mask_pad_queries else torch.ones_like(mask)
        diff = (flex_attention(q, k, v, block_mask=ours) - flex_attention(q, k, v, block_mask=ref)).transpose(1, 2)
        assert diff[rows].abs().max() < 1e-5


def test_cpu_compile_freezes_weights_and_compiles_once(pair):
    """compile=True on the CPU: parity with transformers, one compilation per shape (the bias table stays out of
    the compiled region), and weights really frozen into the compiled code (what makes MKL's packed GEMM
    possible): an in-place weight change reaches the output only after reset()."""
    kind, hf, folder = pair
    model = t5core.load_encoder(folder, compile=True)
    ids, mask = _batch(512, [24, 24], seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
    torch._dynamo.utils.counters.clear()
    first = model.encode(ids)
    assert rel_err(first, ref) <= 1e-5, kind
    with torch.no_grad():
        model.model.layers[0].ffn.ff_out.weight.mul_(2)
    assert torch.equal(model.encode(ids), first)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    model.reset()
    assert rel_err(model.encode(ids), first) > 1e-3


def test_layer_trace_sees_every_layer_of_a_cpu_compiled_model(tmp_path):
    """precision.trace_layers (the float16 overflow diagnosis, the precision report) runs the model eagerly: on a
    CPU-compiled model, whose whole forward is one frozen compilation, its hooks once saw nothing."""
    from t5core.precision import trace_layers

    hf = make_hf_encoder("t5-v1_1", vocab_size=512, num_layers=2, seed=7)
    folder = save_hf(hf, tmp_path)
    ids, mask = _batch(512, [12, 7], seed=7)
    eager = trace_layers(t5core.load_encoder(folder).model, ids, mask)
    compiled = t5core.load_encoder(folder, compile=True)
    compiled.encode(ids, mask)
    traced = trace_layers(compiled.model, ids, mask)
    assert [s.name for s in traced] == [s.name for s in eager] and len(eager) == 2 * 4 + 1
    assert [s.absmax for s in traced] == pytest.approx([s.absmax for s in eager], rel=1e-5)


def test_compiled_layers_take_more_shapes_than_dynamos_default_limit(tmp_path):
    """Regional compilation at fixed shapes: every prompt length is an entry of the one compiled layer code
    object. Under fullgraph, dynamo's default limit of 8 entries made the ninth length a hard error. (The limit is
    dynamo's, so the eager backend shows it without inductor's compile time; it is process-wide, so the test sets
    the default back first: an earlier test may have raised it.)"""
    hf = make_hf_encoder("t5-v1_1", vocab_size=512, num_layers=2, seed=4)
    with torch._dynamo.config.patch(cache_size_limit=8):
        model = t5core.load_encoder(save_hf(hf, tmp_path)).compile_layers(backend="eager")
        for L in (16, 20, 24, 28, 32, 40, 48, 56, 64, 80):  # 10 length buckets
            ids, mask = _batch(512, [L, L - 3], seed=L)
            with torch.no_grad():
                ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            assert rel_err(model.encode(ids, mask)[mask], ref[mask]) <= 1e-5, L


def test_regional_compile_makes_one_entry_per_shape(tmp_path):
    """All layers share one compiled forward. The first layer's inputs must look like every other layer's to
    dynamo's guards, or each new prompt length pays two compilations (a scale made in inference mode once did)."""
    from torch._dynamo.testing import CompileCounter

    hf = make_hf_encoder("t5-v1_1", vocab_size=512, num_layers=3, seed=5)
    counter = CompileCounter()
    model = t5core.load_encoder(save_hf(hf, tmp_path)).compile_layers(backend=counter)
    for L in (16, 20):  # length buckets: no padding added
        ids, mask = _batch(512, [L, L - 4], seed=L)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        assert rel_err(model.encode(ids, mask)[mask], ref[mask]) <= 1e-5, L
        model.encode(ids[:1])  # unpadded: no mask, another entry
    assert counter.frame_count == 4


def test_length_buckets():
    buckets = sorted({length_bucket(n) for n in range(1, 513)})
    assert buckets == [16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    assert all(n <= length_bucket(n) < 1.25 * n for n in range(17, 5000))


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
def test_compiled_encode_pads_to_length_buckets(tmp_path, attn):
    """A compiled encoder runs 17..20 tokens as 20, masking the added keys: one compilation for the padded
    lengths and one for the unpadded 20. Every output is transformers' unpadded encoding, cut to the prompt."""
    from torch._dynamo.testing import CompileCounter

    hf = make_hf_encoder("umt5", vocab_size=512, num_layers=2, seed=6)
    counter = CompileCounter()
    model = t5core.load_encoder(save_hf(hf, tmp_path), attn_impl=attn).compile_layers(backend=counter)
    for L in (17, 18, 19, 20):
        ids, _ = _batch(512, [L], seed=L)
        with torch.no_grad():
            ref = hf(input_ids=ids).last_hidden_state
        out = model.encode(ids)
        assert out.shape == ref.shape and out.is_contiguous()
        assert rel_err(out, ref) <= 1e-5, L
    assert counter.frame_count == 2


def test_per_layer_bias_tables_become_dense_one_layer_at_a_time(tmp_path):
    """UMT5 has a bias table per layer. SDPA's dense biases for all layers at once took n*B*H*L*L elements (at
    XXL in bf16: 0.8 GB per prompt length, 6.4 GB for a padded 8x512 batch). No tensor of a padded forward may be
    larger than one layer's [B, H, L, L]."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LargestTensor(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
            return out

    hf = make_hf_encoder("umt5", vocab_size=512, num_layers=3, seed=8)
    model = t5core.load_encoder(save_hf(hf, tmp_path), attn_impl="sdpa")
    ids, mask = _batch(512, [64, 30], seed=8)
    with LargestTensor() as seen:
        out = model.encode(ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert rel_err(out[mask], ref[mask]) <= 1e-5
    assert seen.numel == 2 * 4 * 64 * 64


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
def test_input_embeddings_and_hidden_layers(pair, attn):
    """encode(None, mask, embeds=...) (ComfyUI passes embeddings, textual inversions spliced in) equals encode(ids)
    for the ids' embeddings; num_layers=k is transformers' hidden state after layer k, through the final norm."""
    kind, hf, folder = pair
    model = t5core.load_encoder(folder, dtype="float32", attn_impl=attn)
    ids, mask = _batch(512, [9, 4], seed=3)
    embeds = model.model.vocab_embed(ids).float()
    torch.testing.assert_close(model.encode(None, mask, embeds=embeds), model.encode(ids, mask), rtol=0, atol=0)
    with torch.no_grad():
        states = hf(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        expected = hf.encoder.final_layer_norm(states[2])
    out = model.encode(None, mask, embeds=embeds, num_layers=2)
    assert rel_err(out[mask], expected[mask]) <= 1e-5, (kind, attn)
    with pytest.raises(ValueError, match=r"embeds: expected \[batch, length, 64\] input embeddings and no input_ids"):
        model.encode(ids, mask, embeds=embeds)
