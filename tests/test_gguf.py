"""GGUF T5 / UMT5 encoder files: dequantization bit-identical to gguf.quants for every supported type, packed
weights that fuse row-wise, GGUFSource reading whole files written with gguf.GGUFWriter, transformers parity of
the loaded encoder, and clear errors for bad files."""
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

import t5core  # noqa: E402
from t5core.checkpoint import CheckpointError  # noqa: E402
from t5core.gguf import (QTYPES, PackedEmbedding, PackedLinear, PackedWeight, dequantize, is_packed,  # noqa: E402
                         open_gguf, tokenizer_fields)
from t5core.t5_common import T5FFNType  # noqa: E402
from tiny_models import make_hf_encoder, rel_err, run_python, run_under_malloc_async  # noqa: E402

VOCAB = 512
ALL_TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
QUANTIZABLE = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}  # gguf.quants.quantize has these
# byte offsets of the fp16 scale fields (d, and dmin / m) inside one block
SCALE_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q2_K: [80, 82],
                T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


# Hugging Face T5 key -> llama.cpp's encoder tensor, named by the gguf package (gguf.TENSOR_NAMES)
M = gguf.MODEL_TENSOR
GGUF_OF_HF = {"layer.0.SelfAttention.q": M.ENC_ATTN_Q, "layer.0.SelfAttention.k": M.ENC_ATTN_K,
              "layer.0.SelfAttention.v": M.ENC_ATTN_V, "layer.0.SelfAttention.o": M.ENC_ATTN_OUT,
              "layer.0.layer_norm": M.ENC_ATTN_NORM, "layer.0.SelfAttention.relative_attention_bias": M.ENC_ATTN_REL_B,
              "layer.1.DenseReluDense.wi_0": M.ENC_FFN_GATE, "layer.1.DenseReluDense.wi_1": M.ENC_FFN_UP,
              "layer.1.DenseReluDense.wi": M.ENC_FFN_UP, "layer.1.DenseReluDense.wo": M.ENC_FFN_DOWN,
              "layer.1.layer_norm": M.ENC_FFN_NORM}


def gguf_name_of(hf_key: str) -> str:
    if hf_key in ("shared.weight", "encoder.embed_tokens.weight"):
        return gguf.TENSOR_NAMES[M.TOKEN_EMBD] + ".weight"
    if hf_key == "encoder.final_layer_norm.weight":
        return gguf.TENSOR_NAMES[M.ENC_OUTPUT_NORM] + ".weight"
    block, rest = re.fullmatch(r"encoder\.block\.(\d+)\.(.+)\.weight", hf_key).groups()
    return gguf.TENSOR_NAMES[GGUF_OF_HF[rest]].format(bid=block) + ".weight"


def ref_dequant(data: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)


def bits(x) -> np.ndarray:
    """Compare float32 bit patterns: -0.0 vs 0.0 and every rounding count."""
    return np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32).view(np.int32)


def random_blocks(qtype, rows: int, cols: int, rng, std: float = 0.05) -> np.ndarray:
    """Random block bytes with the fp16 scale fields set to finite values giving elements of about `std`
    (a block's elements are linear in its fp16 fields, so rescaling those rescales the weight)."""
    _, block, size = QTYPES[int(qtype)]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    fields = SCALE_FIELDS[qtype]
    # both signs: a negative scale times a zero code must give -0.0 as the reference does
    scales = [rng.uniform(0.5, 1.5, (rows, cols // block)) * rng.choice([-1.0, 1.0], (rows, cols // block))
              for _ in fields]

    def put(factor):
        for at, s in zip(fields, scales):
            b[..., at:at + 2] = (s * factor).astype(np.float16)[..., None].view(np.uint8).reshape(rows, cols // block, 2)

    put(1.0)
    put(std / float(ref_dequant(b.reshape(rows, -1), qtype).std()))
    return b.reshape(rows, -1)


def encode_tensor(x: np.ndarray, qtype, rng) -> np.ndarray:
    """A float32 array as GGUF data of `qtype`: quantized where gguf.quants can, random blocks of the same spread
    for the K-quants (gguf.quants only dequantizes those)."""
    if qtype == T.F32:
        return x.astype(np.float32)
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(x, qtype)
    return random_blocks(qtype, x.shape[0], x.shape[1], rng, std=float(x.std()))


def blocks_tensor(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(data.shape[0], -1))


# --------------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantize_bit_identical(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 24, 768
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.01, 3, (rows, 1)).astype(np.float32)
    cases = [encode_tensor(x, qtype, rng)]
    if qtype in SCALE_FIELDS:  # raw random bytes too (every bit pattern of the quants), and all-0x00 / all-0xFF quants
        cases.append(random_blocks(qtype, rows, cols, rng, std=1.0))
        for fill in (0x00, 0xFF):
            b = cases[-1].reshape(rows, -1, QTYPES[int(qtype)][2]).copy()
            keep = np.zeros(b.shape[-1], bool)
            keep[[i for at in SCALE_FIELDS[qtype] for i in (at, at + 1)]] = True
            b[..., ~keep] = fill
            cases.append(b.reshape(rows, -1))
    for data in cases:
        ref = ref_dequant(data, qtype).reshape(rows, cols)
        out = dequantize(blocks_tensor(data), qtype, (rows, cols))
        assert out.dtype == torch.float32 and out.shape == (rows, cols)
        assert np.array_equal(bits(out), bits(ref)), qtype.name
        for dtype in (torch.bfloat16, torch.float16):  # one rounding from the exact value
            assert torch.equal(dequantize(blocks_tensor(data), qtype.name, (rows, cols), dtype),
                               torch.from_numpy(ref).to(dtype))


def test_dequantize_traces_without_graph_breaks():
    """Plain tensor ops only: every type traces as one graph (dynamo capture here; inductor in the slow test)."""
    rng = np.random.default_rng(0)
    for qtype in ALL_TYPES:
        data = encode_tensor(rng.standard_normal((4, 256)).astype(np.float32), qtype, rng)
        torch._dynamo.reset()
        f = torch.compile(lambda b, q=int(qtype): dequantize(b, q, (4, 256)), backend="eager", fullgraph=True)
        assert np.array_equal(bits(f(blocks_tensor(data))), bits(ref_dequant(data, qtype).reshape(4, 256))), qtype.name


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_K, T.Q6_K, T.F16], ids=lambda q: q.name)
def test_dequantize_inductor_bit_identical(qtype):
    """Compiled C++ (which may contract d*q - m into an FMA) gives the same bits: every product is exact."""
    rng = np.random.default_rng(1)
    data = encode_tensor(rng.standard_normal((64, 512)).astype(np.float32), qtype, rng)
    torch._dynamo.reset()
    f = torch.compile(lambda b: dequantize(b, qtype, (64, 512)), fullgraph=True)
    assert np.array_equal(bits(f(blocks_tensor(data))), bits(ref_dequant(data, qtype).reshape(64, 512)))


def test_dequantize_rejects_bad_input():
    b = torch.zeros(4, 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs 272 bytes"):
        dequantize(b, "Q8_0", (4, 64))
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        dequantize(b, "Q8_0", (4, 33))
    with pytest.raises(ValueError, match="IQ4_NL"):
        dequantize(b, T.IQ4_NL, (4, 32))


# --------------------------------------------------------------------------------------------------
# Packed weights
# --------------------------------------------------------------------------------------------------
def test_packed_weight_concat_is_the_fused_weight():
    rng = np.random.default_rng(3)
    cols = 512

    def part(qtype, rows):
        data = encode_tensor(rng.standard_normal((rows, cols)).astype(np.float32), qtype, rng)
        return PackedWeight(blocks_tensor(data), qtype, (rows, cols)), ref_dequant(data, qtype).reshape(rows, cols)

    q, k, v = (part(T.Q4_K, 64) for _ in range(3))
    fused = PackedWeight.cat([q[0], k[0], v[0]])
    assert fused.qtype == T.Q4_K and fused.shape == (192, cols)
    assert torch.equal(fused.blocks, torch.cat([q[0].blocks, k[0].blocks, v[0].blocks]))  # plain row concatenation
    assert np.array_equal(bits(fused()), bits(np.concatenate([q[1], k[1], v[1]])))
    # a K_M file: attn_v in Q6_K beside Q4_K q and k, and a float32 part; bfloat16 output
    v6, f32 = part(T.Q6_K, 64), part(T.F32, 32)
    mixed = PackedWeight.cat([q[0], k[0], v6[0], f32[0]])
    assert mixed.qtype is None and mixed.shape == (224, cols)
    ref = np.concatenate([q[1], k[1], v6[1], f32[1]])
    assert np.array_equal(bits(mixed()), bits(ref))
    assert torch.equal(mixed(torch.bfloat16), torch.from_numpy(ref).to(torch.bfloat16))
    # model.to(dtype) leaves the blocks alone; linear and embedding lookups dequantize on use
    holder = torch.nn.Module()
    holder.w = fused
    holder.to(torch.bfloat16)
    assert fused.blocks.dtype == torch.uint8
    x = torch.randn(3, cols)
    torch.testing.assert_close(x @ fused().T, x @ torch.from_numpy(np.concatenate([q[1], k[1], v[1]])).T)
    ids = torch.tensor([[5, 0], [191, 64]])
    assert torch.equal(fused.embedding(ids), fused()[ids])


def test_planar_weight_keeps_its_values():
    """make_planar_ reorders a one-type Q8_0 weight's bytes into planes (the same bytes, other order); the weight,
    its scaled bfloat16 form and embedding rows stay bit-identical, and other types are left as they are."""
    rng = np.random.default_rng(5)
    rows, cols = 48, 512
    data = random_blocks(T.Q8_0, rows, cols, rng, std=1.0)
    w = PackedWeight(blocks_tensor(data).clone(), T.Q8_0, (rows, cols))
    before, scaled = w(), w(torch.bfloat16, torch.tensor(0.25))
    w.make_planar_()
    assert w.planar and w.nbytes == data.size and not torch.equal(w.blocks.reshape(-1), blocks_tensor(data).reshape(-1))
    assert np.array_equal(bits(w()), bits(before)) and torch.equal(w(torch.bfloat16, torch.tensor(0.25)), scaled)
    ids = torch.tensor([[0, 7, 7], [rows - 1, 3, 0]])
    assert torch.equal(w.embedding(ids), before[ids])
    other = PackedWeight(blocks_tensor(random_blocks(T.Q6_K, rows, cols, rng)), T.Q6_K, (rows, cols))
    other.make_planar_()
    assert not other.planar


def check_kernels(device: str, dtypes) -> None:
    """t5core.gguf_kernels.expand on `device` gives (dequantize(blocks) * scale).to(dtype), bit for bit, for the
    blocks of every quantized type (random bytes, all-0x00 and all-0xFF codes, both signs of the fp16 fields), so
    does expand_q8_0_planes for Q8_0 reordered into planes, and expand for segmented weights: one of all types, and
    one whose Q4_K and Q5_K segments start at byte offsets that are not multiples of 4."""
    from t5core import gguf_kernels

    rng = np.random.default_rng(7)
    rows, cols, scale = 24, 768, torch.tensor(0.5, device=device)
    parts = []
    for qtype in SCALE_FIELDS:
        b = random_blocks(qtype, rows, cols, rng, std=1.0)
        for fill in (None, 0x00, 0xFF):
            data = b.reshape(rows, -1, QTYPES[int(qtype)][2]).copy()
            if fill is not None:
                keep = np.zeros(data.shape[-1], bool)
                keep[[i for at in SCALE_FIELDS[qtype] for i in (at, at + 1)]] = True
                data[..., ~keep] = fill
            blocks = blocks_tensor(data.reshape(rows, -1))
            want = dequantize(blocks, qtype, (rows, cols)) * scale.cpu()
            for dtype in dtypes:
                got = gguf_kernels.expand(blocks.to(device), [int(qtype), *QTYPES[int(qtype)][1:], 0, rows, 0],
                                           [rows, cols], scale, dtype)
                assert torch.equal(got.cpu(), want.to(dtype)), (qtype.name, fill, dtype)
            if qtype == T.Q8_0:  # reordered into planes (PackedWeight.make_planar_): the planar kernel
                planar = PackedWeight(blocks.clone(), qtype, (rows, cols))
                planar.make_planar_()
                for dtype in dtypes:
                    got = gguf_kernels.expand_q8_0_planes(planar.blocks.to(device), [rows, cols], scale, dtype)
                    assert torch.equal(got.cpu(), want.to(dtype)), (qtype.name, fill, dtype, "planes")
        parts.append((qtype, blocks))
    check_segmented(gguf_kernels, parts, rows, cols, device)
    # segments of one row after a 210-byte Q6_K block: Q5_K and Q4_K codes (read as words) at unaligned offsets
    rows, cols = 1, 256
    check_segmented(gguf_kernels, [(q, blocks_tensor(random_blocks(q, rows, cols, rng, std=1.0)))
                                   for q in (T.Q6_K, T.Q5_K, T.Q4_K, T.Q6_K)], rows, cols, device)


def check_segmented(gguf_kernels, parts, rows: int, cols: int, device: str) -> None:
    """A segmented weight of `parts` ((qtype, blocks of `rows` rows), one after another) expands bit for bit."""
    starts = np.cumsum([0] + [b.numel() for _, b in parts]).tolist()
    segments = [x for i, (q, _) in enumerate(parts) for x in (int(q), *QTYPES[int(q)][1:], i * rows, rows, starts[i])]
    flat = torch.cat([b.reshape(-1) for _, b in parts]).to(device)
    want = torch.cat([dequantize(b, q, (rows, cols)) for q, b in parts])
    got = gguf_kernels.expand(flat, segments, [len(parts) * rows, cols], torch.ones((), device=device), torch.float32)
    assert np.array_equal(bits(got.cpu()), bits(want)), [QTYPES[int(q)][0] for q, _ in parts]


def test_kernels_bit_identical_in_triton_interpreter():
    """The Triton kernels run by Triton's interpreter on the CPU (float32 and float16 outputs; the interpreter
    truncates float32 to bfloat16 where a GPU rounds to nearest: bfloat16 is in the GPU test)."""
    pytest.importorskip("triton")
    run_python("import test_gguf, torch; test_gguf.check_kernels('cpu', (torch.float32, torch.float16)); print('OK')",
               cwd=Path(__file__).parent, TRITON_INTERPRET="1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure path: a machine without CUDA")
def test_kernel_that_cannot_launch_leaves_the_torch_code(caplog):
    """Where Triton cannot launch the kernel (here: no CUDA device) the probe says so in one logged line and
    answers False, so that PackedWeight computes with the torch code instead of failing."""
    gguf_kernels = pytest.importorskip("t5core.gguf_kernels")
    with caplog.at_level("WARNING", logger="t5core"):
        assert gguf_kernels.launches.__wrapped__(0) is False
    assert "expand with torch code: Triton could not run its kernel" in caplog.text


@pytest.mark.gpu
def test_kernels_bit_identical_on_cuda():
    assert t5core.gguf.gguf_kernels.launches(torch.cuda.current_device())
    check_kernels("cuda", (torch.float32, torch.bfloat16, torch.float16))
    # compiled (the kernel inside an inductor graph), a weight of three segments: what the torch code gives
    rng = np.random.default_rng(8)
    parts = [PackedWeight(blocks_tensor(random_blocks(q, 64, 512, rng)), q, (64, 512))
             for q in (T.Q5_K, T.Q5_K, T.Q6_K)]
    fused = PackedWeight.cat(parts).cuda()
    assert fused.use_kernel and len(fused.segments) == 3
    scale = torch.tensor(0.25, device="cuda")
    got = torch.compile(lambda: fused(torch.bfloat16, scale), fullgraph=True)()
    fused.use_kernel = False
    assert torch.equal(got, fused(torch.bfloat16, scale))


# --------------------------------------------------------------------------------------------------
# Whole files
# --------------------------------------------------------------------------------------------------
TOKENS = ["<pad>", "</s>", "<unk>", "\u2581the", "\u2581caf\u00e9", "\u2581\u732b"] + [f"t{i}" for i in range(VOCAB - 6)]


def fake_tokenizer(writer) -> None:
    writer.add_tokenizer_model("t5")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([-float(i) / 7 for i in range(VOCAB)])
    writer.add_token_types([3, 3, 2] + [1] * (VOCAB - 3))
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    writer.add_precompiled_charsmap(bytes(range(256)) * 3)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_pad_token_id(0)


def spiece_tokenizer(writer, rows: int = 32128) -> None:
    """The bundled T5 spiece.model as llama.cpp's convert_hf_to_gguf.py writes a T5 tokenizer: its pieces, scores
    and types, then unused '[PADn]' pieces up to the embedding's 32128 rows, the charsmap and the options.
    Fewer rows: its first `rows` pieces (a small tokenizer that still builds)."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb
    from t5core.tokenizer import BUNDLED_SPIECE

    proto = sp_pb.ModelProto.FromString(BUNDLED_SPIECE.read_bytes())
    del proto.pieces[rows:]
    pad = [f"[PAD{i}]" for i in range(1, rows - len(proto.pieces) + 1)]
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p.piece for p in proto.pieces] + pad)
    writer.add_token_scores([p.score for p in proto.pieces] + [-1000.0] * len(pad))
    writer.add_token_types([p.type for p in proto.pieces] + [5] * len(pad))
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    writer.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    writer.add_eos_token_id(proto.trainer_spec.eos_id)
    writer.add_unk_token_id(proto.trainer_spec.unk_id)
    writer.add_pad_token_id(proto.trainer_spec.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)


def write_gguf(path: Path, hf, type_of, arch="t5encoder", metadata=True, tokenizer=None, drop=(), meta_override=None,
               extra=None, seed=0) -> dict[str, torch.Tensor]:
    """Write hf's encoder as a llama.cpp-named GGUF, each matrix in type_of(gguf_name, index among the matrices)
    (vectors and relative biases in F32, as llama.cpp writes them), then `extra` {name: float32 array}; tokenizer:
    a function adding tokenizer.ggml.* fields to the writer.
    -> {HF key: the dequantized float32 weight the file holds} (gguf.quants' dequantization of the bytes written)."""
    rng = np.random.default_rng(seed)
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    if metadata:
        meta = {"context_length": 512, "embedding_length": cfg.d_model, "feed_forward_length": cfg.d_ff,
                "block_count": cfg.num_layers, "head_count": cfg.num_heads, "key_length": cfg.d_kv,
                "value_length": cfg.d_kv, "layer_norm_eps": cfg.layer_norm_epsilon,
                "relative_attn_buckets_count": cfg.relative_attention_num_buckets,
                "layer_norm_rms_eps": cfg.layer_norm_epsilon, **(meta_override or {})}
        for name, value in meta.items():
            getattr(writer, f"add_{name}")(value)
    if tokenizer:
        tokenizer(writer)
    ref, i = {}, 0
    for key, p in hf.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # the same tensor as shared.weight
        name = gguf_name_of(key)
        if name in drop:
            continue
        x = p.detach().float().numpy()
        plain = x.ndim == 1 or "attn_rel_b" in name
        qtype = T.F32 if plain else type_of(name, i)
        i += not plain
        data = encode_tensor(x, qtype, rng)
        ref[key] = torch.from_numpy(ref_dequant(data, qtype).reshape(x.shape).copy())
        writer.add_tensor(name, data, raw_dtype=None if data.dtype in (np.float32, np.float16) else qtype)
    for name, x in (extra or {}).items():
        writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


def with_weights(hf, ref: dict[str, torch.Tensor]):
    """hf with the file's (dequantized) weights: what transformers computes from the GGUF."""
    import copy

    model = copy.deepcopy(hf)
    sd = model.state_dict()
    with torch.no_grad():
        for key, t in ref.items():
            sd[key].copy_(t)
    return model


def tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.fixture(scope="module")
def models():
    kw = dict(vocab_size=VOCAB, d_model=256, num_heads=4, d_kv=64, d_ff=512, num_layers=2, std=0.5)
    return {kind: make_hf_encoder(kind, seed=7, **kw) for kind in ("t5-v1_1", "umt5", "t5-v1_0")}


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 13), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 9:] = False
    ids[~mask] = 0
    return ids, mask


def one_type(qtype):
    return lambda name, i: qtype


def mixed(name, i):  # every type somewhere, as a K_M file mixes them per tensor
    return ALL_TYPES[i % len(ALL_TYPES)]


CASES = [(kind, q.name, one_type(q)) for kind in ("t5-v1_1", "umt5")
         for q in (T.F16, T.Q8_0, T.Q4_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K)]
CASES += [("t5-v1_1", "mixed", mixed), ("umt5", "mixed", mixed), ("t5-v1_0", "Q5_K", one_type(T.Q5_K))]


@pytest.mark.parametrize("kind,label,type_of", CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_gguf_file_loads_with_transformers_parity(models, batch, tmp_path, kind, label, type_of):
    hf = models[kind]
    path = tmp_path / f"{kind}-{label}.gguf"
    ref = write_gguf(path, hf, type_of, tokenizer=fake_tokenizer if label == "mixed" else None)
    source, config, tok = open_gguf(path)
    # every tensor, in Hugging Face naming, is exactly what gguf.quants dequantizes from the file
    assert set(source.keys()) == set(ref)
    for key, want in ref.items():
        got = source.get(key)
        assert got.dtype == torch.float32 and got.shape == want.shape and np.array_equal(bits(got), bits(want)), key
    assert (config.vocab_size, config.hidden_dim, config.num_layers, config.n_head, config.head_dim, config.ff_dim) == (
        VOCAB, 256, 2, 4, 64, 512)
    assert config.pos_emb_per_layer == (kind == "umt5")
    assert config.ffn_type == (T5FFNType.ReLU if kind == "t5-v1_0" else T5FFNType.GEGLU)
    if label == "mixed":
        assert {t.type_name for t in source.entries.values()} == {t.name for t in ALL_TYPES}
        assert tok["tokens"] == TOKENS and tok["token_types"][:4] == [3, 3, 2, 1] and tok["model"] == "t5"
        assert tok["scores"][7] == pytest.approx(-1.0) and tok["eos_token_id"] == 1 and tok["add_space_prefix"] is True
        assert tok["precompiled_charsmap"] == bytes(range(256)) * 3 and tokenizer_fields(path) == tok
    else:
        assert tok is None
    ids, mask = batch
    with torch.no_grad():
        want = with_weights(hf, ref)(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    # by default the weights stay compressed: the module holds about the file's tensor bytes
    compressed = t5core.load_encoder(path)
    out = compressed.encode(ids, mask)
    assert rel_err(out[mask], want[mask]) <= 1e-5
    assert tensor_bytes(compressed.model) <= 1.15 * sum(source.nbytes(k) for k in source.keys())
    assert is_packed(compressed.model) and isinstance(compressed.model.layers[0].ffn.ff_out, PackedLinear)
    # weight_dtype expands them at load, through the plain streaming path: the same output
    model = t5core.load_encoder(path, weight_dtype="fp32")
    assert not is_packed(model.model) and torch.equal(model.encode(ids, mask), out)
    if label in ("mixed", "Q8_0"):  # the packed, fused weights (q|k|v, gate|up by row concatenation) are the
        params = dict(model.model.named_parameters())  # expanded ones, one-type Q8_0 ones reordered into planes
        packed = {name: m.packed for name, m in compressed.model.named_modules()
                  if isinstance(m, (PackedLinear, PackedEmbedding))}
        assert sum(isinstance(m, PackedLinear) for m in compressed.model.modules()) == 4 * config.num_layers
        for name, w in packed.items():
            assert np.array_equal(bits(w()), bits(params[name + ".weight"].detach())), name
            assert w.planar == (w.qtype == T.Q8_0), name
        assert label == "Q8_0" or packed["layers.0.attn.qkv_proj"].qtype is None  # mixed q, k, v: segments
        rows = torch.tensor([[0, 5, 5], [VOCAB - 1, 2, 0]])
        assert torch.equal(compressed.model.vocab_embed(rows), params["vocab_embed.weight"][rows])


def test_full_t5_file_and_packed_reads(models, tmp_path):
    """A 't5' (encoder-decoder) file: decoder tensors are left out; packed() gives the raw blocks."""
    hf = models["t5-v1_1"]
    path = tmp_path / "full.gguf"
    decoder = {"dec.blk.0.attn_q.weight": np.ones((256, 256), np.float32), "output.weight": np.ones((VOCAB, 256), np.float32)}
    ref = write_gguf(path, hf, one_type(T.Q5_K), arch="t5", extra=decoder)
    source, config, _ = open_gguf(path)
    assert set(source.keys()) == set(ref)
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    w = source.packed(key)
    assert w.qtype == T.Q5_K and w.shape == (256, 512) and w.blocks.shape == (256, 512 // 256 * 176)
    assert np.array_equal(bits(w()), bits(ref[key]))
    assert source.metadata["t5.block_count"] == 2 and source.architecture == "t5"


# --------------------------------------------------------------------------------------------------
# The compressed model in use
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_file(models, tmp_path_factory):
    """Every type, starting from a Q8_0 embedding; layer 1's o_proj is F16."""
    path = tmp_path_factory.mktemp("mixed") / "t5-mixed.gguf"
    return path, write_gguf(path, models["t5-v1_1"], lambda name, i: mixed(name, i + 3))


def test_compressed_model_options(batch, mixed_file, tmp_path):
    """float16 residual scales, set_weight_dtype, fuse_norms, weight_dtype, saving, device and the CUDA-graph
    address check on a model that keeps GGUF blocks."""
    from t5core.runtime import Encoder
    from t5core.save import save_encoder

    path, _ = mixed_file
    ids, mask = batch
    # float16 residual scales: a power-of-two factor after dequantization, as exact as scaling expanded weights
    # (factors are cumulative: layer 0's ff_out and every output projection after it carry 1/2)
    scaled = t5core.load_encoder(path, dtype="float16", fp16_scales=[0.5, 1])
    layers = scaled.model.layers
    assert [layers[0].attn.o_proj.scale.item(), layers[0].ffn.ff_out.scale.item(), layers[1].ffn.ff_out.scale.item()] == [
        1, 0.5, 0.5]
    assert not isinstance(layers[1].attn.o_proj, PackedLinear)  # F16 in a float16 model: a plain, scaled weight
    expanded = t5core.load_encoder(path, dtype="float16", fp16_scales=[0.5, 1], weight_dtype="fp16")
    assert torch.equal(scaled.encode(ids, mask), expanded.encode(ids, mask))
    # set_weight_dtype leaves the blocks alone; the embedding's rows follow the dtype
    model = t5core.load_encoder(path).model
    blocks = model.layers[0].attn.qkv_proj.packed.blocks
    model.set_weight_dtype(torch.bfloat16)
    assert model.layers[0].attn.qkv_proj.packed.blocks is blocks and blocks.dtype == torch.uint8
    assert model.vocab_embed.dtype == torch.bfloat16
    runtime = Encoder(model)
    assert runtime.device == torch.device("cpu")
    assert torch.equal(runtime.encode(ids, mask), t5core.load_encoder(path, dtype="bfloat16").encode(ids, mask))
    # moved blocks are buffers, and still change the addresses CUDA graphs were captured with
    before = runtime._weight_ptrs()
    model.layers[1].ffn.ff_in.packed.blocks = model.layers[1].ffn.ff_in.packed.blocks.clone()
    assert runtime._weight_ptrs() != before
    # what cannot be done to blocks says so
    with pytest.raises(ValueError, match=r"t5-mixed\.gguf: fuse_norms=True cannot fold norm scales into GGUF blocks "
                                         r"kept compressed.*weight_dtype='float32'"):
        t5core.load_encoder(path, fuse_norms=True)
    assert not t5core.load_encoder(path, fuse_norms=True, weight_dtype="fp32").config.elementwise_affine
    with pytest.raises(ValueError, match=r"weight_dtype='bf16' expands the weights to the model's dtype, which is "
                                         r"torch.float32: pass dtype='bf16' too"):
        t5core.load_encoder(path, weight_dtype="bf16")
    with pytest.raises(ValueError, match="keeps GGUF weights compressed: load it with weight_dtype"):
        save_encoder(model, tmp_path / "out", "safetensors")


def test_graphs_choice_where_compiled_code_cannot_be_captured(mixed_file, monkeypatch):
    """Under cudaMallocAsync (compiled_code_captures false) the layers compiled by inductor compile with its C++
    wrapper, and CUDA encodes capture them. Layers compiled otherwise (another backend, or after the C++ wrapper
    failed to build) cannot be captured there: encodes capture the eager layers, except with GGUF blocks kept
    (eager, many passes per weight; the kernel cannot launch inside such a capture) or flex attention: those run
    compiled, without graphs. Elsewhere every compiled CUDA encode replays graphs."""
    from t5core import runtime

    path, _ = mixed_file
    encoders = [t5core.load_encoder(path, dtype="float32"),  # GGUF blocks, plain weights, flex attention
                t5core.load_encoder(path, dtype="float32", weight_dtype="fp32"),
                t5core.load_encoder(path, dtype="float32", weight_dtype="fp32", attn_impl="flex")]
    assert [is_packed(e.model) for e in encoders] == [True, False, False]
    monkeypatch.setattr(runtime, "compiled_code_captures", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [e._graphs_ok() for e in encoders] == [False, True, False]
    assert [e.compile_layers(backend="eager")._graphs_ok() for e in encoders] == [False, True, False]
    assert [e.compile_layers()._graphs_ok() for e in encoders] == [True, True, True]
    monkeypatch.setattr(runtime, "compiled_code_captures", lambda: True)
    assert [e.compile_layers(backend="eager")._graphs_ok() for e in encoders] == [True, True, True]


@pytest.mark.slow  # about 100 s on 2 loaded cores: inductor compiles every type's dequantization
def test_compressed_model_compiled_on_cpu(models, batch, mixed_file):
    path, ref = mixed_file
    ids, mask = batch
    with torch.no_grad():
        want = with_weights(models["t5-v1_1"], ref)(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch._dynamo.reset()
    compiled = t5core.load_encoder(path, compile=True)
    assert is_packed(compiled.model)
    assert rel_err(compiled.encode(ids, mask)[mask], want[mask]) <= 1e-5


def test_diffusers_adapter_reads_gguf(batch, mixed_file):
    from t5core.hf import FastT5EncoderModel

    path, _ = mixed_file
    ids, mask = batch
    model = FastT5EncoderModel.from_pretrained(path)  # float32, as transformers dequantizes GGUF
    assert model.dtype == torch.float32 and is_packed(model.encoder)
    out = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert torch.equal(out, t5core.load_encoder(path).encode(ids, mask))
    states = model(input_ids=ids, output_hidden_states=True).hidden_states  # eager, hooks; packed embedding rows
    assert len(states) == 3 and torch.equal(states[0], t5core.load_encoder(path).model.vocab_embed(ids))


def test_convert_gguf_to_safetensors_for_transformers(models, batch, mixed_file, tmp_path):
    """`python -m t5core convert` expands the blocks; transformers reads the folder with the file's exact weights."""
    from transformers import T5EncoderModel

    from t5core.__main__ import main

    path, ref = mixed_file
    main(["convert", str(path), str(tmp_path / "hf"), "--format", "safetensors"])
    hf = T5EncoderModel.from_pretrained(tmp_path / "hf").eval()
    state = hf.state_dict()
    for key, want in ref.items():
        assert np.array_equal(bits(state[key]), bits(want)), key
    ids, mask = batch
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert rel_err(out[mask], t5core.load_encoder(path).encode(ids, mask)[mask]) <= 1e-6


@pytest.fixture(scope="module")
def t5_vocab_model():
    """A tiny T5 v1.1 with T5's 32128-row embedding, for the real tokenizer's fields."""
    return make_hf_encoder("t5-v1_1", vocab_size=32128, d_model=256, num_heads=4, d_kv=64, d_ff=512, num_layers=1,
                           seed=7, std=0.5)


def test_header_reads_as_gguf_reader_reads_it(t5_vocab_model, tmp_path):
    """t5core reads the header itself (gguf.GGUFReader takes seconds over a tokenizer's fields): every tensor's
    type, shape, offset and size and every metadata value as the gguf package reads them."""
    from t5core.gguf import _read_header

    path = tmp_path / "t5.gguf"
    write_gguf(path, t5_vocab_model, mixed, tokenizer=spiece_tokenizer)
    fields, tensors = _read_header(path)
    reader = gguf.GGUFReader(path)
    assert {n: (t.qtype, t.shape, t.offset, t.nbytes) for n, t in tensors.items()} == {
        t.name: (int(t.tensor_type), tuple(reversed(t.shape.tolist())), int(t.data_offset), int(t.n_bytes))
        for t in reader.tensors}
    theirs = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}  # GGUF.*: the reader's own
    assert fields.keys() == theirs.keys()
    for key, f in theirs.items():
        ours = fields[key].value
        ours = (ours.decode() if isinstance(ours, bytes) else [b.decode() for b in ours] if isinstance(ours, list)
                else ours.tolist() if isinstance(ours, np.ndarray) else ours)
        assert ours == f.contents(), key


def test_tokenizer_from_gguf_fields(t5_vocab_model, tmp_path, capsys):
    """No tokenizer beside the file: the one in its tokenizer.ggml.* fields (as llama.cpp writes T5's) gives the
    ids of the spiece.model the fields were written from."""
    from t5core.calibrate import BUILTIN_PROMPTS
    from t5core.tokenizer import BUNDLED_SPIECE

    path = tmp_path / "t5-tok.gguf"
    write_gguf(path, t5_vocab_model, one_type(T.Q8_0), tokenizer=spiece_tokenizer)
    ckpt = t5core.open_checkpoint(path)
    assert ckpt.format == "gguf" and ckpt.tokenizer is None and ckpt.tokenizer_bytes
    ours, theirs = t5core.load_tokenizer(ckpt.tokenizer_bytes), t5core.load_tokenizer(BUNDLED_SPIECE)
    prompts = [*BUILTIN_PROMPTS, "<extra_id_0> sentinel", "  leading and  double  spaces ", "ﬁne ｆｕｌｌ width"]
    for text in prompts:
        assert torch.equal(ours([text], max_length=1024)[0], theirs([text], max_length=1024)[0]), text
    assert ours.vocab_size == theirs.vocab_size
    # the CLI's encode (as embed and calibrate) uses it
    from safetensors.torch import load_file

    from t5core.__main__ import main

    text = "the, a. of and to in"
    main(["encode", "--model", str(path), "--out", str(tmp_path / "emb.safetensors"), text])
    assert torch.equal(load_file(tmp_path / "emb.safetensors")["input_ids"], theirs([text])[0])
    assert "bundled" not in capsys.readouterr().err  # the fields' tokenizer, not the fallback
    # a tokenizer file beside the weights wins
    (tmp_path / "spiece.model").write_bytes(BUNDLED_SPIECE.read_bytes())
    ckpt = t5core.open_checkpoint(path)
    assert ckpt.tokenizer == tmp_path / "spiece.model" and ckpt.tokenizer_bytes is None


# --------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_file(models, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "t5.gguf"
    write_gguf(path, models["t5-v1_1"], one_type(T.Q8_0))
    return path


def patch_tensor_info(src: Path, dst: Path, name: str, field: str, value: int) -> None:
    """Rewrite one tensor's ne[0] or type id in the header."""
    data = bytearray(src.read_bytes())
    at = data.find(name.encode()) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    pos = at + 4 if field == "ne0" else at + 4 + 8 * n_dims
    width = 8 if field == "ne0" else 4
    data[pos:pos + width] = value.to_bytes(width, "little")
    dst.write_bytes(bytes(data))


def test_truncated_file(good_file, tmp_path):
    data = good_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-5000])
    with pytest.raises(CheckpointError, match=r"cut\.gguf.*truncated: tensor '.*' \((Q8_0|F32)"):
        open_gguf(cut)
    cut.write_bytes(data[:300])
    with pytest.raises(CheckpointError, match="truncated in its header"):
        open_gguf(cut)


def test_unknown_and_unsupported_types(good_file, models, tmp_path):
    bad = tmp_path / "unknown.gguf"
    patch_tensor_info(good_file, bad, "enc.blk.1.attn_k.weight", "type", 99)
    with pytest.raises(CheckpointError, match=r"unknown\.gguf.*'enc\.blk\.1\.attn_k\.weight'.*unknown type 99"):
        open_gguf(bad)
    iq = tmp_path / "iq.gguf"  # a GGML type t5core does not dequantize (it claims fewer bytes: no overlap)
    patch_tensor_info(good_file, iq, "enc.blk.0.ffn_up.weight", "type", int(T.IQ4_NL))
    with pytest.raises(CheckpointError, match=r"'enc\.blk\.0\.ffn_up\.weight' has type IQ4_NL.*cannot dequantize"):
        open_gguf(iq)


def test_llama_gguf(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"llama\.gguf: a GGUF 'llama' model, not a T5 encoder"):
        open_gguf(path)
    path = tmp_path / "decoder-only.gguf"
    writer = gguf.GGUFWriter(str(path), "t5")
    writer.add_tensor("dec.blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"decoder-only\.gguf: a GGUF 't5' file without encoder tensors"):
        open_gguf(path)


def test_missing_tensor_and_metadata_mismatch(models, tmp_path):
    path = tmp_path / "missing.gguf"
    write_gguf(path, models["umt5"], one_type(T.Q8_0), drop=("enc.blk.1.ffn_down.weight",))
    with pytest.raises(CheckpointError, match=r"missing\.gguf: tensor 'enc\.blk\.1\.ffn_down\.weight' is missing"):
        open_gguf(path)
    path = tmp_path / "meta.gguf"
    write_gguf(path, models["t5-v1_1"], one_type(T.Q8_0), meta_override={"block_count": 3})
    with pytest.raises(CheckpointError, match=r"metadata t5encoder\.block_count = 3 but the number of encoder blocks"):
        open_gguf(path)


def test_byte_size_disagrees_with_type_and_shape(good_file, tmp_path):
    bad = tmp_path / "ne0.gguf"  # a Q8_0 row of 250 elements is not whole blocks of 32
    patch_tensor_info(good_file, bad, "enc.blk.0.attn_o.weight", "ne0", 250)
    with pytest.raises(CheckpointError, match=r"'enc\.blk\.0\.attn_o\.weight' \(Q8_0.*not whole blocks of 32"):
        open_gguf(bad)
    bad = tmp_path / "rows.gguf"  # claims more bytes than lie before the next tensor
    patch_tensor_info(good_file, bad, "enc.blk.0.attn_q.weight", "type", int(T.F16))
    with pytest.raises(CheckpointError, match=r"'enc\.blk\.0\.attn_q\.weight' \(F16.*needs 131072 bytes.*next tensor"):
        open_gguf(bad)


@pytest.mark.parametrize("qtype", [*SCALE_FIELDS, T.F16, T.BF16, T.F32], ids=lambda t: T(t).name)
def test_non_finite_values_are_refused_compressed(models, tmp_path, qtype):
    """Kept compressed, a NaN or an infinity in a block's float16 scales (or in a 16-bit tensor) used to load and
    give NaN embeddings; expanded (F32 always is), it was refused. Now both refuse it, naming the tensor as the file
    does."""
    good = tmp_path / "good.gguf"
    write_gguf(good, models["t5-v1_1"], one_type(qtype))
    t = open_gguf(good)[0].entries["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    tsize = QTYPES[int(qtype)][2]
    plain = {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F32: torch.float32}.get(qtype)
    for at in SCALE_FIELDS.get(qtype, [0]):
        for value in (float("nan"), float("inf")):
            data = bytearray(good.read_bytes())
            pos = t.offset + tsize + at  # the second block's field, or the second value
            code = torch.tensor([value], dtype=plain or torch.float16).view(torch.uint8).tolist()
            data[pos:pos + len(code)] = bytes(code)
            bad = tmp_path / "bad.gguf"
            bad.write_bytes(bytes(data))
            with pytest.raises(CheckpointError, match=r"bad\.gguf: tensor 'enc\.blk\.1\.ffn_down\.weight' holds NaN or "
                                                      r"infinite"):
                t5core.load_encoder(bad)


def test_imports_without_gguf_package(good_file, monkeypatch):
    """t5core.gguf imports and dequantizes without the gguf package; reading a file then says what to install."""
    import importlib

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.delitem(sys.modules, "t5core.gguf")
    fresh = importlib.import_module("t5core.gguf")
    assert fresh.dequantize(torch.zeros(2, 34, dtype=torch.uint8), "Q8_0", (2, 32)).abs().sum() == 0
    with pytest.raises(CheckpointError, match=r"t5\.gguf: reading GGUF files needs the gguf package: pip install 't5core\[gguf\]'"):
        fresh.open_gguf(good_file)


def raw_gguf(path: Path, body: bytes, n_kv: int, n_tensors: int) -> Path:
    """A GGUF v3 file from raw bytes: the counts, then `body` (metadata and tensor infos as written)."""
    path.write_bytes(b"GGUF" + u32(3) + u64(n_tensors) + u64(n_kv) + body)
    return path


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


KEY_K = u64(1) + b"k"  # the metadata key 'k'
CRAFTED_HEADERS = [  # (label, body, n_kv, n_tensors, what the error says)
    ("array of 2^62 u64", KEY_K + u32(9) + u32(10) + u64(1 << 62) + b"x" * 16, 1, 0,
     r"metadata key 'k' \(an array of 4611686018427387904 u64\): 36893488147419103232 bytes needed from byte 49, "
     r"but the file has 65: truncated in its header, or corrupt"),
    ("array past the value limit", KEY_K + u32(9) + u32(0) + u64((1 << 21) + 1) + bytes((1 << 21) + 1), 1, 0,
     r"metadata key 'k': an array of 2097153 u8 brings the metadata past 2097152 values"),
    ("array of arrays", KEY_K + u32(9) + u32(9) + u64(1) + b"x" * 16, 1, 0, r"metadata key 'k' is an array of arrays"),
    ("key length 2^62", u64(1 << 62) + b"x" * 16, 1, 0,
     r"the name of metadata entry 0 is 4611686018427387904 bytes long \(at most 65535\)"),
    ("key past the end", u64(1000) + b"x" * 16, 1, 0, r"the name of metadata entry 0: 1000 bytes needed"),
    ("string length 2^63+1", KEY_K + u32(8) + u64((1 << 63) + 1), 1, 0,
     r"metadata key 'k' \(a string of 9223372036854775809 bytes\): 9223372036854775809 bytes needed"),
    ("2^60 metadata entries", b"x" * 16, 1 << 60, 0, r"the metadata count 1152921504606846976 \(13 bytes or more"),
    ("2^60 tensors", b"x" * 16, 0, 1 << 60, r"the tensor count 1152921504606846976 \(24 bytes or more"),
    ("2^32-1 dimensions", u64(1) + b"t" + u32((1 << 32) - 1) + b"x" * 16, 0, 1,
     r"tensor 't' \(4294967295 dimensions\): 34359738372 bytes needed"),
]


@pytest.mark.parametrize("label,body,n_kv,n_tensors,match", CRAFTED_HEADERS, ids=[c[0] for c in CRAFTED_HEADERS])
def test_crafted_header_counts(tmp_path, label, body, n_kv, n_tensors, match):
    """Every length and count in the header is checked against the bytes left before it is read or looped over
    (gguf.GGUFReader trusts them: an array of 2^62 values in a file of 65 bytes keeps it looping until memory runs
    out)."""
    path = raw_gguf(tmp_path / "crafted.gguf", body, n_kv, n_tensors)
    with pytest.raises(CheckpointError, match=r"crafted\.gguf: not a readable GGUF file: " + match):
        open_gguf(path)


def tokenizer_with(key: str, value, vtype, sub_type=None):
    """fake_tokenizer with tokenizer.ggml.{key} replaced."""
    def add(writer):
        fake_tokenizer(writer)
        writer.add_key_value(f"tokenizer.ggml.{key}", value, vtype, sub_type)
    return add


V = gguf.GGUFValueType
BAD_TOKENIZERS = [
    ("types short", tokenizer_with("token_type", [1] * (VOCAB - 10), V.ARRAY, V.INT32),
     r"tokenizer\.ggml\.token_type has 502 entries but tokenizer\.ggml\.tokens has 512"),
    ("scores short", tokenizer_with("scores", [0.0] * 10, V.ARRAY, V.FLOAT32),
     r"tokenizer\.ggml\.scores has 10 entries but tokenizer\.ggml\.tokens has 512"),
    ("nan score", tokenizer_with("scores", [0.0] * 7 + [float("nan")] * (VOCAB - 7), V.ARRAY, V.FLOAT32),
     r"tokenizer\.ggml\.scores has nan for token 7; scores must be finite"),
    ("type 0", tokenizer_with("token_type", [3, 3, 2] + [0] * (VOCAB - 3), V.ARRAY, V.INT32),
     r"tokenizer\.ggml\.token_type has 0 for token 3; token types are 1 to 6"),
    ("tokens as numbers", tokenizer_with("tokens", list(range(VOCAB)), V.ARRAY, V.INT32),
     r"tokenizer\.ggml\.tokens has value type array of i32; expected an array of strings"),
    ("unk id a string", tokenizer_with("unknown_token_id", "x", V.STRING),
     r"tokenizer\.ggml\.unknown_token_id is 'x'; expected an integer"),
    ("pad id past the tokens", tokenizer_with("padding_token_id", 10**9, V.UINT32),
     r"tokenizer\.ggml\.padding_token_id is 1000000000, not a token id \(tokenizer\.ggml\.tokens has 512\)"),
    ("bool a string", tokenizer_with("add_space_prefix", "false", V.STRING),
     r"tokenizer\.ggml\.add_space_prefix is 'false'; expected a bool"),
]


@pytest.mark.parametrize("label,tokenizer,match", BAD_TOKENIZERS, ids=[c[0] for c in BAD_TOKENIZERS])
def test_bad_tokenizer_fields(models, tmp_path, label, tokenizer, match):
    path = tmp_path / "tok.gguf"
    write_gguf(path, models["t5-v1_1"], one_type(T.F32), tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match=r"tok\.gguf: " + match):
        open_gguf(path)


def test_unusable_tokenizer_names_the_file(t5_vocab_model, models, tmp_path):
    """Fields that pass their checks can still make no tokenizer (found by fuzzing: the error named neither), and
    a tokenizer with more tokens than the embedding has rows is not the model's (fuzzing: token_embd cut to 1 row
    loaded, and failed only at encode)."""
    def bad_charsmap(writer):
        spiece_tokenizer(writer)
        writer.add_key_value("tokenizer.ggml.precompiled_charsmap", [255] * 16, V.ARRAY, V.UINT8)

    path = tmp_path / "tok.gguf"
    write_gguf(path, t5_vocab_model, one_type(T.F32), tokenizer=bad_charsmap)
    ckpt = t5core.open_checkpoint(path)  # the weights are fine
    with pytest.raises(ValueError, match=r"tok\.gguf \(its tokenizer\.ggml\.\* fields\): not a usable sentencepiece "
                                         r"model .*precompiled_charsmap"):
        ckpt.own_tokenizer()
    write_gguf(path, models["t5-v1_1"], one_type(T.F32), tokenizer=spiece_tokenizer)
    with pytest.raises(CheckpointError, match=r"tok\.gguf: tokenizer\.ggml\.tokens has 32128 tokens, more than the "
                                              r"512 rows of token_embd\.weight"):
        t5core.open_checkpoint(path)


REL_B, EMBD = "enc.blk.0.attn_rel_b.weight", "token_embd.weight"
BAD_CONFIGS = [  # (label, write_gguf arguments, what the error says)
    ("rel_b 1-D", dict(drop=(REL_B,), extra={REL_B: np.zeros(128, np.float32)}),
     r"tensor 'enc\.blk\.0\.attn_rel_b\.weight' has shape \(128,\), not a non-empty matrix"),
    ("rel_b 3-D", dict(drop=(REL_B,), extra={REL_B: np.zeros((1, 32, 4), np.float32)}),
     r"tensor 'enc\.blk\.0\.attn_rel_b\.weight' has shape \(1, 32, 4\), not a non-empty matrix"),
    ("zero heads", dict(drop=(REL_B,), extra={REL_B: np.zeros((32, 0), np.float32)}),
     r"tensor 'enc\.blk\.0\.attn_rel_b\.weight' has shape \(32, 0\), not a non-empty matrix"),
    ("token_embd 3-D", dict(drop=(EMBD,), extra={EMBD: np.zeros((1, VOCAB, 256), np.float32)}),
     r"tensor 'token_embd\.weight' has shape \(1, 512, 256\), not a non-empty matrix"),
    ("eps -1", dict(meta_override={"layer_norm_rms_eps": -1.0}),
     r"metadata t5encoder\.attention\.layer_norm_rms_epsilon is -1\.0; it must be a finite number in \(0, 1\)"),
    ("eps nan", dict(meta_override={"layer_norm_rms_eps": float("nan")}),
     r"metadata t5encoder\.attention\.layer_norm_rms_epsilon is nan"),
    ("2 buckets", dict(metadata=False, drop=(REL_B,), extra={REL_B: np.zeros((2, 4), np.float32)}),
     r"the architecture from its tensor shapes and metadata is invalid: key 'relative_attention_num_buckets': "
     r"relative_attention_num_buckets is 2, outside \[4, 4096\]"),
]


@pytest.mark.parametrize("label,kwargs,match", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_shapes_and_metadata(models, tmp_path, label, kwargs, match):
    path = tmp_path / "cfg.gguf"
    write_gguf(path, models["t5-v1_1"], one_type(T.F32), **kwargs)
    with pytest.raises(CheckpointError, match=r"cfg\.gguf: " + match):
        open_gguf(path)


@pytest.mark.gpu
def test_compressed_model_on_cuda(models, batch, mixed_file, tmp_path):
    """On a GPU, eager and compiled (CUDA graphs): the blocks kept compressed compute what the same blocks expanded
    to bf16 at load compute; NaN scales are refused there too (their check runs on the GPU)."""
    path, ref = mixed_file
    ids, mask = batch
    with torch.no_grad():
        want = with_weights(models["t5-v1_1"], ref)(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    expanded = t5core.load_encoder(path, dtype="bfloat16", device="cuda", weight_dtype="bf16").encode(ids, mask).cpu()
    for compile in (False, True):
        enc = t5core.load_encoder(path, dtype="bfloat16", device="cuda", compile=compile)
        assert is_packed(enc.model)
        got = enc.encode(ids, mask).cpu()
        assert rel_err(got[mask], expanded[mask]) <= 1e-2 and rel_err(got[mask], want[mask]) <= 3e-2
    t = next(t for t in open_gguf(path)[0].entries.values() if t.qtype in SCALE_FIELDS)  # a quantized tensor
    data, at = bytearray(path.read_bytes()), t.offset + SCALE_FIELDS[t.qtype][0]
    data[at:at + 2] = bytes(torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).tolist())
    (tmp_path / "nan.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"nan\.gguf: tensor '{re.escape(t.name)}' holds NaN"):
        t5core.load_encoder(tmp_path / "nan.gguf", dtype="bfloat16", device="cuda")


@pytest.mark.gpu
def test_compressed_model_under_cuda_malloc_async(batch, mixed_file, tmp_path):
    """ComfyUI's default allocator (cudaMallocAsync): a compiled GGUF encoder captures its layers, compiled with
    inductor's C++ wrapper (the Triton kernel among them), close to the eager model. And the kernel launched from
    Python, which aborted the process inside such a capture (its output graph memory), stays out of one: a
    captured weight is the torch code's, bit for bit the kernel's. A process of its own (the allocator is chosen at
    CUDA's start)."""
    path, _ = mixed_file
    ids, mask = batch
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    run_under_malloc_async(f"""
import torch, t5core
assert torch.cuda.get_allocator_backend() == "cudaMallocAsync"
b = torch.load({str(tmp_path / "batch.pt")!r})
m = b["mask"]
eager = t5core.load_encoder({str(path)!r}, "bfloat16", "cuda").encode(b["ids"], m)
enc = t5core.load_encoder({str(path)!r}, "bfloat16", "cuda", compile=True)
for _ in range(2):
    out = enc.encode(b["ids"], m)
err = ((out[m] - eager[m]).norm() / eager[m].norm()).item()
assert enc._cpp_wrapper and len(enc._graphs) == 1 and err < 1e-2, (err, len(enc._graphs))

w = next(w for w in enc.model.modules() if isinstance(w, t5core.gguf.PackedWeight) and w.use_kernel)
want = w(torch.bfloat16)  # the kernel
side, graph = torch.cuda.Stream(), torch.cuda.CUDAGraph()
with torch.cuda.stream(side):
    w(torch.bfloat16)
    with torch.cuda.graph(graph, stream=side):
        got = w(torch.bfloat16)
graph.replay()
torch.cuda.synchronize()
assert torch.equal(got, want)
print("OK")
""")
