"""Does capturing t5core's compiled layers in a CUDA graph work under an allocator? (ComfyUI starts torch with
cudaMallocAsync unless given --disable-cuda-malloc.) A random T5 v1.1 small in bfloat16, compiled, one encode of
1 x 100 ids; `graphs` forces CUDA graphs, `default` is what t5core does (no graphs under cudaMallocAsync:
t5core.runtime.cuda_graphs_ok). Each in a process of its own: the allocator is chosen when CUDA starts.

    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python benchmarks/cuda_graphs_malloc_async.py graphs   # aborted
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python benchmarks/cuda_graphs_malloc_async.py default
    python benchmarks/cuda_graphs_malloc_async.py graphs                                                  # native
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

import t5core
from t5core import runtime

if __name__ == "__main__":
    force = sys.argv[1:] == ["graphs"]
    print("allocator", torch.cuda.get_allocator_backend())
    with torch.device("cuda"):
        model = t5core.T5EncoderStack(t5core.T5Config.from_name("small", dtype=torch.bfloat16))
        for p in model.parameters():
            torch.nn.init.normal_(p, 0, 0.05)
    enc = t5core.Encoder(model).compile()
    if force:
        runtime.cuda_graphs_ok = lambda: True
    out = enc.encode(torch.randint(1, 1000, (1, 100)))
    torch.cuda.synchronize()
    print("graphs forced" if force else "default", "OK", tuple(out.shape), "graphs:", len(enc._graphs))
