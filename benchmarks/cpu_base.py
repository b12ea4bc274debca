# Shared by cpu_interleaved.py: T5 v1.1 base shape with transformers' own random init (bench.build_hf_reference),
# saved once; 1 x 128 token ids; and interleaved timing, every variant in turn each round, so the VM's drift lands
# on all of them alike.
import statistics, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this file (it puts the checkout first)
import torch
from bench import build_hf_reference


def base_model():
    """-> (transformers encoder, its saved folder, ids [1, 128])."""
    hf = build_hf_reference("base", torch.device("cpu"))
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    return hf, folder, torch.randint(3, 32000, (1, 128), generator=torch.Generator().manual_seed(0))


def interleaved_median_ms(fns: dict, rounds: int) -> dict:
    """Two warm-up calls each, then `rounds` rounds of one call each -> {name: median ms}."""
    with torch.inference_mode():
        for f in fns.values():
            f(); f()
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in fns.items():
                t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
