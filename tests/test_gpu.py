"""The CUDA-only paths: pinned, chunked reads straight into parameters; regional compilation with CUDA graph
replay (new inputs, padding, recapture after the weights change); float32 parity with TF32 off."""
import pytest
import torch

import t5core
from t5core.checkpoint import open_checkpoint
from tiny_models import make_hf_encoder, rel_err, run_python, run_under_malloc_async, save_hf

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def hf_and_folder(tmp_path_factory):
    """A bf16 checkpoint, and transformers in float32 on the GPU holding exactly its (bf16-rounded) weights."""
    hf = make_hf_encoder("t5-v1_1", vocab_size=512, num_layers=3, seed=11).to(torch.bfloat16)
    folder = save_hf(hf, tmp_path_factory.mktemp("bf16"))
    return folder, hf.to(CUDA, torch.float32)


def batch(B: int, L: int, lengths=None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(lengths or []):
        mask[b, n:] = False
        ids[b, n:] = 0
    return ids, mask


@pytest.mark.parametrize("fuse_norms", [False, True])
def test_cuda_load_equals_cpu_load(hf_and_folder, fuse_norms):
    folder, _ = hf_and_folder
    gpu = t5core.load_encoder(folder, "bfloat16", "cuda", fuse_norms=fuse_norms)
    cpu = t5core.load_encoder(folder, "bfloat16", "cpu", fuse_norms=fuse_norms)
    for (name, a), (_, b) in zip(gpu.model.named_parameters(), cpu.model.named_parameters()):
        assert a.is_cuda and torch.equal(a.cpu(), b), name


def test_chunked_pinned_reads_into_parameters(hf_and_folder):
    """Tiny chunks through the pinned buffers; matching destinations are filled in place and returned as such."""
    folder, _ = hf_and_folder
    ckpt = open_checkpoint(folder)
    keys = list(ckpt.keys)
    ref = {k: t for k, t in ckpt.iter_tensors(keys, "cpu")}
    into = {k: torch.empty(ref[k].shape, dtype=ref[k].dtype, device=CUDA) for k in keys[::2]}
    got = list(ckpt.iter_tensors(keys, CUDA, into=into, chunk_bytes=4096, slots=3))
    assert [k for k, _ in got] == keys
    for k, t in got:
        assert (t is into[k]) if k in into else t.is_cuda
        assert torch.equal(t.cpu(), ref[k]), k


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
def test_float32_parity_compiled_with_graphs(hf_and_folder, attn):
    folder, hf = hf_and_folder
    torch.backends.cuda.matmul.allow_tf32 = False  # the default; float32 must mean float32 on both sides
    model = t5core.load_encoder(folder, "float32", "cuda", attn_impl=attn, compile=True)
    # a second unpadded batch replays the same graph; 50 tokens run as the 56-token bucket's padded graph
    for seed, L, lengths in ((0, 64, None), (1, 64, None), (2, 64, [64, 9]), (3, 50, None), (4, 50, [50, 20])):
        ids, mask = batch(2, L, lengths, seed)
        with torch.no_grad():
            ref = hf(input_ids=ids.to(CUDA), attention_mask=mask.long().to(CUDA)).last_hidden_state
        out = model.encode(ids, mask)
        assert out.shape == ref.shape and rel_err(out[mask.to(CUDA)], ref[mask.to(CUDA)]) <= 1e-5, (attn, seed)
    # input embeddings (ComfyUI's path) and a hidden layer replay graphs of their own, with the same results
    with torch.no_grad():
        embeds = hf.shared(ids.to(CUDA))
        hidden = hf(input_ids=ids.to(CUDA), attention_mask=mask.long().to(CUDA), output_hidden_states=True).hidden_states
    out = model.encode(None, mask, embeds=embeds)
    assert rel_err(out[mask.to(CUDA)], ref[mask.to(CUDA)]) <= 1e-5, attn
    first = model.encode(ids, mask, num_layers=1)  # layer 1's output through the final norm
    want = hf.encoder.final_layer_norm(hidden[1])
    assert rel_err(first[mask.to(CUDA)], want[mask.to(CUDA)]) <= 1e-5, attn
    assert set(model._graphs) == {(2, 64, False, False, None), (2, 64, True, False, None), (2, 56, True, False, None),
                                  (2, 56, 64, True, True, None), (2, 56, True, False, 1)}  # embeddings: [B, L, D]


def test_compiled_umt5_takes_flex_by_default(tmp_path):
    """No attn_impl: a compiled UMT5 on CUDA runs flex attention (its per-layer bias tables read in the kernel) in
    16 bits, SDPA in float32 and uncompiled; flex compiled equals transformers' UMT5 in float32, padded prompts
    included."""
    hf = make_hf_encoder("umt5", vocab_size=512, num_layers=3, seed=12)
    folder = save_hf(hf, tmp_path)
    hf = hf.to(CUDA)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert t5core.load_encoder(folder, "bfloat16", "cuda", compile=True).config.attn_impl == t5core.T5AttnImpl.Flex
    assert t5core.load_encoder(folder, "float32", "cuda", compile=True).config.attn_impl == t5core.T5AttnImpl.SDPA
    assert t5core.load_encoder(folder, "bfloat16", "cuda").config.attn_impl == t5core.T5AttnImpl.SDPA
    model = t5core.load_encoder(folder, "float32", "cuda", attn_impl="flex", compile=True)
    for seed, lengths in ((0, None), (1, [64, 9])):
        ids, mask = batch(2, 64, lengths, seed)
        with torch.no_grad():
            ref = hf(input_ids=ids.to(CUDA), attention_mask=mask.long().to(CUDA)).last_hidden_state
        out = model.encode(ids, mask)
        assert rel_err(out[mask.to(CUDA)], ref[mask.to(CUDA)]) <= 1e-5, seed


@pytest.mark.parametrize("wdtype", ["bfloat16", "float16"])
def test_float32_compute_on_16_bit_weights_splits_on_tensor_cores(hf_and_folder, wdtype):
    """weight_dtype bfloat16 / float16 with float32 compute: the file's bf16 weights (exact in float16 too) at half
    float32's memory, through split_linear's 16-bit matmuls, compiled with graphs: float32 compute's output up to
    the 16-bit tensor cores' accumulation. With float16 accumulation on (ComfyUI's --fast), which cuBLAS refuses with
    a float32 output, float16 weights take the cast-to-float32 path instead of failing."""
    folder, hf = hf_and_folder
    torch.backends.cuda.matmul.allow_tf32 = False
    model = t5core.load_encoder(folder, "float32", "cuda", weight_dtype=wdtype, compile=True)
    weight = model.model.layers[0].ffn.ff_in.weight
    assert t5core.t5_common.split_gemms(CUDA, weight.dtype) and weight.dtype == getattr(torch, wdtype)
    ids, mask = batch(2, 64, [64, 9])
    with torch.no_grad():
        ref = hf(input_ids=ids.to(CUDA), attention_mask=mask.long().to(CUDA)).last_hidden_state
    for _ in range(2):  # compiled, then a graph replay
        out = model.encode(ids, mask)
        assert rel_err(out[mask.to(CUDA)], ref[mask.to(CUDA)]) <= 2e-5
    if wdtype == "float16" and hasattr(torch.backends.cuda.matmul, "allow_fp16_accumulation"):
        torch.backends.cuda.matmul.allow_fp16_accumulation = True
        try:
            eager = t5core.load_encoder(folder, "float32", "cuda", weight_dtype=wdtype)
            assert not t5core.t5_common.split_gemms(CUDA, torch.float16)
            assert rel_err(eager.encode(ids, mask)[mask.to(CUDA)], ref[mask.to(CUDA)]) <= 1e-5
        finally:
            torch.backends.cuda.matmul.allow_fp16_accumulation = False


def test_compiled_layers_captured_under_cuda_malloc_async(hf_and_folder):
    """ComfyUI starts torch with the cudaMallocAsync allocator, under which capturing layers compiled with
    inductor's Python wrapper failed ("CUDA driver error: invalid argument", then an abort): a compiled encoder
    compiles them with its C++ wrapper there and captures them, close to the eager model, with SDPA or flex
    attention, fp8 weights or fp8 matmuls; dropping the graphs gives their memory back to the device (CUDA graph
    memory, which torch's empty_cache does not trim). A process of its own (the allocator is chosen at CUDA's
    start)."""
    folder, _ = hf_and_folder
    run_under_malloc_async(f"""
import torch, t5core
assert torch.cuda.get_allocator_backend() == "cudaMallocAsync"
ids = torch.randint(3, 512, (2, 40))
mask = torch.ones(2, 40, dtype=torch.bool)
mask[1, 25:] = False

def close(enc, want):
    for _ in range(2):
        out = enc.encode(ids, mask)
    assert enc._cpp_wrapper and len(enc._graphs) == 1, (enc._cpp_wrapper, len(enc._graphs))
    err = ((out[mask] - want[mask]).norm() / want[mask].norm()).item()
    assert err < 2e-2, err  # fused kernels round differently

eager = t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda").encode(ids, mask)
enc = t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda", compile=True)
close(enc, eager)
from t5core.runtime import graph_memory
before = graph_memory(torch.device("cuda", 0))
enc.drop_graphs()
torch.cuda.synchronize()
after = graph_memory(torch.device("cuda", 0))
assert before > 0 and after == 0, (before, after)

close(t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda", attn_impl="flex", compile=True), eager)
for w in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
    want = t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda", weight_dtype=w).encode(ids, mask)
    close(t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda", weight_dtype=w, compile=True), want)
print("OK")
""")


def test_without_a_cpp_compiler_under_cuda_malloc_async(hf_and_folder, tmp_path):
    """Where inductor's C++ wrapper cannot build (here: no C++ compiler, and an empty compile cache), a compiled
    encoder under cudaMallocAsync says so once and compiles its layers with the Python wrapper: the graphs capture
    the eager layers (the eager model's output), and with flex attention named the compiled layers run without
    graphs; a UMT5 given flex by default goes back to SDPA, whose eager layers are captured."""
    folder, _ = hf_and_folder
    umt5 = save_hf(make_hf_encoder("umt5", vocab_size=512, num_layers=2, seed=13).to(torch.bfloat16), tmp_path / "umt5")
    run_python(f"""
import logging, torch, t5core
records = []
logging.getLogger("t5core").addHandler(type("H", (logging.Handler,), {{"emit": lambda s, r: records.append(r)}})())
ids = torch.randint(3, 512, (2, 40))
eager = t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda").encode(ids)
enc = t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda", compile=True)
for _ in range(2):
    out = enc.encode(ids)
assert not enc._cpp_wrapper and len(enc._graphs) == 1 and ((out - eager).norm() / eager.norm()).item() < 1e-6
assert sum("C++ wrapper could not build" in r.getMessage() for r in records) == 1, [r.getMessage() for r in records]
flex = t5core.load_encoder({str(folder)!r}, "bfloat16", "cuda", attn_impl="flex", compile=True)
assert ((flex.encode(ids) - eager).norm() / eager.norm()).item() < 3e-2 and not flex._graphs
want = t5core.load_encoder({str(umt5)!r}, "bfloat16", "cuda").encode(ids)
enc = t5core.load_encoder({str(umt5)!r}, "bfloat16", "cuda", compile=True)
assert enc.flex_by_default and enc.config.attn_impl == t5core.T5AttnImpl.Flex
for _ in range(2):
    out = enc.encode(ids)
assert enc.config.attn_impl == t5core.T5AttnImpl.SDPA and len(enc._graphs) == 1
assert ((out - want).norm() / want.norm()).item() < 1e-6
assert any("SDPA instead of flex" in r.getMessage() for r in records)
print("OK")
""", PYTORCH_CUDA_ALLOC_CONF="backend:cudaMallocAsync", CXX="/nonexistent/c++",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))


def test_bfloat16_graphs_follow_new_weights(hf_and_folder):
    """bf16 compiled + graphs is as close to float32 as eager bf16, and recaptures after a weight reload."""
    folder, hf = hf_and_folder
    compiled = t5core.load_encoder(folder, "bfloat16", "cuda", fuse_norms=True, compile=True)
    eager = t5core.load_encoder(folder, "bfloat16", "cuda", fuse_norms=True)
    ids, mask = batch(4, 128, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids.to(CUDA)).last_hidden_state
    err_compiled, err_eager = rel_err(compiled.encode(ids), ref), rel_err(eager.encode(ids), ref)
    assert err_compiled <= 1.25 * err_eager + 1e-3, (err_compiled, err_eager)
    other = make_hf_encoder("t5-v1_1", vocab_size=512, num_layers=3, seed=12)
    state = {k: v.to(CUDA, torch.bfloat16) for k, v in
             t5core.load_encoder(save_hf(other, folder.parent / "other"), "bfloat16", fuse_norms=True).model.state_dict().items()}
    compiled.model.load_state_dict(state)
    eager.model.load_state_dict(state)
    assert rel_err(compiled.encode(ids), eager.encode(ids)) <= 2e-2
    # weights swapped behind the model's back, as ComfyUI's patcher (setattr) and offloaders (.data) do
    for m in (compiled, eager):
        ffn = m.model.layers[1].ffn
        ffn.ff_out.weight = torch.nn.Parameter(ffn.ff_out.weight * 2, requires_grad=False)
        ffn.ff_in.weight.data = ffn.ff_in.weight.data * 0.5
    assert rel_err(compiled.encode(ids), eager.encode(ids)) <= 2e-2


# -- float8 (t5core.fp8) ---------------------------------------------------------------------------------------------
def fp8_matmuls(encoder) -> bool:
    from t5core.fp8 import fp8_matmul_support

    return fp8_matmul_support(encoder.device)[0]


def test_fp8_compute_close_to_fp8_storage(hf_and_folder):
    """fp8_e4m3fn_fast against fp8 storage of the same file, both bf16 compute, eager. The only new rounding is
    the activations' per-token e4m3 rounding before qkv, o and ff_in (3 mantissa bits: at most 2^-4 relative, about
    3.6% RMS per element, mostly averaging out in each dot product). The CPU emulation of the same math
    (tests/test_fp8.py runs torch._scaled_mm on the CPU) puts the two 0.009 apart on this 3-layer model; 0.03 leaves
    room for cuBLAS's accumulation order and bf16 rounding flipping fp8 roundings, and fails on a wrong scale,
    layout or transposition (errors of order 1)."""
    folder, hf = hf_and_folder
    storage = t5core.load_encoder(folder, "bfloat16", "cuda", weight_dtype="fp8_e4m3fn")
    fast = t5core.load_encoder(folder, "bfloat16", "cuda", weight_dtype="fp8_e4m3fn_fast")
    if not fp8_matmuls(fast):
        pytest.skip("no fp8 matmuls on this GPU (compute capability < 8.9)")
    assert all(layer.attn.qkv_proj.fp8_mm and layer.attn.o_proj.fp8_mm and layer.ffn.ff_in.fp8_mm
               and not layer.ffn.ff_out.fp8_mm for layer in fast.model.layers)
    ids, mask = batch(4, 128, [128, 100, 64, 17], seed=5)
    a, b = storage.encode(ids, mask), fast.encode(ids, mask)
    m = mask.to(CUDA)
    assert rel_err(b[m], a[m]) <= 3e-2, rel_err(b[m], a[m])
    with torch.no_grad():
        ref = hf(input_ids=ids.to(CUDA), attention_mask=mask.long().to(CUDA)).last_hidden_state
    assert rel_err(b[m], ref[m]) <= 1.6 * rel_err(a[m], ref[m])
    assert torch.cuda.memory_allocated() > 0 and storage.model.layers[0].attn.qkv_proj.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast"])
def test_fp8_compiled_with_graphs(hf_and_folder, weight_dtype):
    """Regional compile + CUDA graphs with fp8 projections: close to eager, new inputs replay, and moving the
    weights away and back recaptures (the fp8 matmul follows the module to its device) with the same result."""
    folder, _ = hf_and_folder
    compiled = t5core.load_encoder(folder, "bfloat16", "cuda", weight_dtype=weight_dtype, compile=True)
    eager = t5core.load_encoder(folder, "bfloat16", "cuda", weight_dtype=weight_dtype)
    for seed, lengths in ((0, None), (1, [64, 30])):
        ids, mask = batch(2, 64, lengths, seed)
        m = mask.to(CUDA)
        out = compiled.encode(ids, mask)
        assert rel_err(out[m], eager.encode(ids, mask)[m]) <= 2e-2, seed  # fused kernels round differently
    compiled.model.to("cpu")
    assert not compiled.model.layers[0].attn.qkv_proj.fp8_mm
    compiled.model.to(CUDA)
    assert compiled.model.layers[0].attn.qkv_proj.fp8_mm == (weight_dtype.endswith("fast") and fp8_matmuls(compiled))
    assert rel_err(compiled.encode(ids, mask), out) <= 1e-6
