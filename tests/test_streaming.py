"""The runtime while an offloading manager streams some weights (Encoder.stream_weights, what ComfyUI's partial
loading sets): eager, at the prompt's length, no compiled code, no CUDA graphs; and the addresses its graphs check."""
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import t5core
from t5core.t5_common import T5Config
from t5core.t5_encoder import T5EncoderStack

CPU = torch.device("cpu")


def tiny_encoder() -> t5core.Encoder:
    config = T5Config(vocab_size=64, hidden_dim=32, n_head=2, head_dim=16, ff_dim=48, num_layers=2)
    torch.manual_seed(0)
    model = T5EncoderStack(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return t5core.Encoder(model)


def test_streaming_runs_eagerly_and_compiles_nothing():
    enc = tiny_encoder()
    ids = torch.randint(0, 64, (2, 7))
    want = enc.encode(ids)
    enc.compile_layers()  # nothing is compiled before the first compiled call
    enc.stream_weights(CPU)
    assert not enc.compiled and enc.device == CPU
    graphs = counters["stats"]["unique_graphs"]
    got = enc.encode(ids)
    assert counters["stats"]["unique_graphs"] == graphs  # the compiled layers ran as written
    assert got.shape == (2, 7, 32) and torch.equal(got, want)
    enc.stream_weights(None)
    assert enc.compiled and enc.device == CPU


def test_graph_addresses_cover_buffers():
    """Norm eps and residual scales move with their modules under a partial load: a CUDA graph must not keep reading
    their old addresses."""
    enc = tiny_encoder()
    before = enc._weight_ptrs()
    enc.model.layers[1].ln2.eps = enc.model.layers[1].ln2.eps.clone()  # as Module.to() replaces a buffer
    assert enc._weight_ptrs() != before


@pytest.mark.slow
def test_compiled_layers_run_through_comfyuis_cast_classes(monkeypatch):
    """The nodes' models carry ComfyUI's cast-weights contract (nodes/lowvram.py, comfy.ops faked): loaded whole,
    compile_layers() compiles through it; one module left streaming -> eager; loaded whole again -> compiled."""
    import comfy_fakes

    for name, module in comfy_fakes.core_modules([]).items():
        monkeypatch.setitem(sys.modules, name, module)
    from nodes.lowvram import make_streamable

    enc = tiny_encoder()
    ids = torch.randint(0, 64, (2, 16))
    want = enc.encode(ids)
    make_streamable(enc.model)
    enc.compile_layers()
    qkv = enc.model.layers[0].attn.qkv_proj
    assert type(qkv).__name__ == "ComfyLinear"
    graphs = counters["stats"]["unique_graphs"]
    assert (enc.encode(ids) - want).abs().max() <= 1e-5 and counters["stats"]["unique_graphs"] > graphs
    qkv.comfy_cast_weights = True  # as ComfyUI's partial load leaves a module it streams
    enc.stream_weights(CPU)
    assert torch.equal(enc.encode(ids), want)
    qkv.comfy_cast_weights = False
    enc.stream_weights(None)
    assert (enc.encode(ids) - want).abs().max() <= 1e-5


def test_comfyuis_embedding_reports_where_the_encoder_runs():
    """ComfyUI makes the ids, textual-inversion vectors and the attention mask it multiplies the output by on
    get_input_embeddings().weight.device: where the encoder runs, also when a partial load left the table behind."""
    from nodes.clip import Embedding

    enc = tiny_encoder()
    embedding = Embedding(enc)
    assert embedding.weight is enc.model.vocab_embed.weight
    enc.stream_weights(torch.device("meta"))  # the layers run there, the table stays on the CPU and streams
    assert embedding.weight.device == torch.device("meta") and embedding.weight.numel() == 0
