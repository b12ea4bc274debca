"""Where a compiled GGUF encoder's time goes on a GPU: median ms per 1x512 encode (CUDA events, 10 after 3 warm-ups),
then torch.profiler's tables (by host time, by GPU time) over two encodes. Writes the XXL-shaped random file with
benchmarks/gguf_gpu.py's writer when it is missing. Run under the allocator to look at, for example ComfyUI's:

    PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync python benchmarks/gguf_profile_gpu.py --file /dev/shm/gguf/t5-xxl-Q5_K_M.gguf
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch.profiler import ProfilerActivity, profile

import gguf_gpu
import t5core


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", type=Path, required=True, help="a GGUF file; written (XXL, random) when missing")
    p.add_argument("--type", default="Q5_K_M", help="the type of a file to write (default Q5_K_M)")
    args = p.parse_args()
    if not args.file.exists():
        args.file.parent.mkdir(parents=True, exist_ok=True)
        gguf_gpu.write_file(args.file, "xxl", args.type, "cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, allocator {torch.cuda.get_allocator_backend()}")
    enc = t5core.load_encoder(args.file, dtype="bfloat16", device="cuda", compile=True)
    ids, mask = torch.randint(0, 32000, (1, 512)), torch.ones(1, 512, dtype=torch.long)
    for _ in range(3):
        enc.encode(ids, mask)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        enc.encode(ids, mask)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    print(f"{args.file.name}: {statistics.median(times):.2f} ms per encode (median of 10)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            enc.encode(ids, mask)
        torch.cuda.synchronize()
    for key in ("self_cpu_time_total", "self_cuda_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
