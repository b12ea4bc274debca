# Experiment (2026-11-29, H200): programmatic dependent launch for inductor's kernels. One profiled graph replay
# at 1x512 holds about 8 ms of kernels but a call takes about 9 ms: about 4 us between each of ~230 kernels.
# With TORCHINDUCTOR_ENABLE_PDL=1 inductor's Triton kernels wait on their producer inside the kernel
# (gdc_wait) and are launched early, so their launch can overlap the previous kernel's tail. cuBLAS's and cuDNN's
# kernels are launched as before. The setting is read when code is generated, so each mode runs in its own
# process: base, pdl, base, pdl. Each process builds the same random XXL encoder (seed 0), compiles its layers,
# and times encode() (one CUDA graph per shape) at 1x512, 8x512 and pad8x256 with SDPA and flex; it also sums the
# kernels of one profiled replay. The outputs of the two modes are compared.
# Run: python3 benchmarks/pdl_probe.py
import json, os, statistics, subprocess, sys
import torch
import torch._inductor.config
sys.path.insert(0, ".")

SHAPES = ("1x512", "8x512", "pad8x256")


def child(mode: str) -> None:
    from gpu_base import random_xxl_encoder, replay_kernels
    from t5core.bench import make_inputs, parse_shapes, time_calls
    from t5core.t5_common import T5AttnImpl

    assert torch._inductor.config.triton.enable_pdl == (mode == "pdl")
    dev = torch.device("cuda")
    for impl in (T5AttnImpl.SDPA, T5AttnImpl.Flex):
        m = random_xxl_encoder(dev, impl).compile_layers()
        for shape in parse_shapes(",".join(SHAPES)):
            inp = make_inputs(shape, 32128, dev)
            out = m.encode(inp.ids, inp.mask)
            torch.save(out.cpu(), f"/tmp/pdl_{impl.value}_{shape.name}_{mode}.pt")
            ms = time_calls(lambda: m.encode(inp.ids, inp.mask), dev, 2.0, max_runs=3000)["ms"]
            graph = m._graphs[(*inp.ids.shape, inp.mask is not None)][0]
            kernel_ms = sum(t for _, t in replay_kernels(graph.replay).values())
            print(json.dumps({"mode": mode, "impl": impl.value, "shape": shape.name, "ms": ms,
                              "kernel_ms": kernel_ms}), flush=True)
        del m
        torch.cuda.empty_cache()


def main() -> None:
    results = []
    for _ in range(2):
        for mode in ("base", "pdl"):
            env = dict(os.environ, TORCHINDUCTOR_ENABLE_PDL="1" if mode == "pdl" else "0")
            run = subprocess.run([sys.executable, __file__, mode], env=env, capture_output=True, text=True)
            lines = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
            if run.returncode:
                print(run.stderr[-3000:])
            results += lines
    print(f"## pdl_probe, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| attention | shape | base ms (runs) | pdl ms (runs) | pdl / base - 1 | kernel ms base / pdl | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for impl in ("sdpa", "flex"):
        for shape in SHAPES:
            rows = {mode: [r for r in results if (r["mode"], r["impl"], r["shape"]) == (mode, impl, shape)]
                    for mode in ("base", "pdl")}
            if not all(rows.values()):
                continue
            ms = {mode: statistics.median(r["ms"] for r in rs) for mode, rs in rows.items()}
            kms = {mode: statistics.median(r["kernel_ms"] for r in rs) for mode, rs in rows.items()}
            a, b = (torch.load(f"/tmp/pdl_{impl}_{shape}_{mode}.pt") for mode in ("base", "pdl"))
            runs = {mode: " ".join(f"{r['ms']:.2f}" for r in rs) for mode, rs in rows.items()}
            print(f"| {impl} | {shape} | {ms['base']:.2f} ({runs['base']}) | {ms['pdl']:.2f} ({runs['pdl']}) | "
                  f"{ms['pdl'] / ms['base'] - 1:+.1%} | {kms['base']:.2f} / {kms['pdl']:.2f} | "
                  f"{(a.float() - b.float()).abs().max().item():.1e} |")


if __name__ == "__main__":
    child(sys.argv[1]) if len(sys.argv) > 1 else main()
