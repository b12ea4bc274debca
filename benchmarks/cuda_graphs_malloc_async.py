"""Does capturing t5core's layers in a CUDA graph work under an allocator? (ComfyUI starts torch with
cudaMallocAsync unless given --disable-cuda-malloc.) A random T5 v1.1 small in bfloat16, one encode of 1 x 100 ids,
in one of these modes (each in a process of its own: the allocator is chosen when CUDA starts, and a failed capture
aborts the process):
  default       what t5core does: compiled, CUDA graphs of the compiled layers (under cudaMallocAsync built with
                inductor's C++ wrapper, which launches their kernels from C++: t5core.runtime.Encoder.compile_layers)
  graphs        compiled with inductor's Python wrapper, the compiled layers captured whatever the allocator
  eager-graphs  not compiled, the eager layers captured
Inductor's launcher is chosen by TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER (0: Triton's own).

    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python benchmarks/cuda_graphs_malloc_async.py graphs
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER=0 \\
        python benchmarks/cuda_graphs_malloc_async.py graphs
    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python benchmarks/cuda_graphs_malloc_async.py default
    python benchmarks/cuda_graphs_malloc_async.py graphs                                      # torch's allocator
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

import t5core
from t5core import runtime

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("default", "graphs", "eager-graphs"))
    mode = ap.parse_args().mode
    print("allocator", torch.cuda.get_allocator_backend(), "static launcher",
          os.environ.get("TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER", "default"), "mode", mode, flush=True)
    with torch.device("cuda"):
        model = t5core.T5EncoderStack(t5core.T5Config.from_name("small", dtype=torch.bfloat16))
        for p in model.parameters():
            torch.nn.init.normal_(p, 0, 0.05)
    enc = t5core.Encoder(model)
    ids = torch.randint(1, 1000, (1, 100))
    want = enc.encode(ids)
    if mode == "eager-graphs":
        with torch.inference_mode():
            out = enc._graphed_forward(ids.cuda(), None)
            out = enc._graphed_forward(ids.cuda(), None)
    else:
        if mode == "graphs":  # before compiling: compile_layers() would choose the C++ wrapper
            runtime.compiled_code_captures = lambda: True
        enc.compile()
        out = enc.encode(ids)
        out = enc.encode(ids)
    torch.cuda.synchronize()
    err = float((out.float() - want.float()).norm() / want.float().norm())
    print(mode, "OK", tuple(out.shape), "graphs:", len(enc._graphs), f"rel. diff to eager {err:.1e}", flush=True)
