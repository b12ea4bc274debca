# Shared by the GPU probes: for out_dtype_probe.py and residual_epilogue_probe.py, transformers' own random init
# (t5core.bench.build_hf_reference) on the device, token ids for 1 and 8 prompts of 512 tokens, its float32
# outputs with TF32 off, and our bf16 encoder with fused norms built from the same weights; for the probes that
# need only kernels, an XXL-shaped encoder with random weights, CUDA graph capture and one call's kernels; for
# the GEMM probes, kernel time of back-to-back calls; for the clock and power probes, nvidia-smi sampled every
# 100 ms.
import os, statistics, subprocess, sys, threading
from datetime import datetime
sys.path.insert(0, ".")
import torch
from t5core.bench import build_hf_reference, time_calls
from t5core.hf import FastT5EncoderModel
from t5core.t5_common import T5AttnImpl, T5Config
from t5core.t5_encoder import T5EncoderStack


def random_xxl_encoder(dev: torch.device, attn_impl: T5AttnImpl = T5AttnImpl.SDPA, **config) -> T5EncoderStack:
    """Our XXL stack in bf16 with every parameter drawn from N(0, 0.02) (seed 0), no norm fusion: for probes
    that need the kernels, not a reference. config overrides the preset (UMT5: vocab_size, pos_emb_per_layer)."""
    torch.manual_seed(0)
    with torch.device(dev):
        model = T5EncoderStack(T5Config.from_name("xxl", dtype=torch.bfloat16, attn_impl=attn_impl, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def reference_and_encoder(dev: torch.device, size: str = "xxl"):
    """-> (ids {B: [B, 512] on the CPU}, float32 reference outputs {B: [B, 512, D]}, bf16 T5EncoderStack)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    hf = build_hf_reference(size, dev)
    ids = {B: torch.randint(3, 32000, (B, 512), generator=torch.Generator().manual_seed(B)) for B in (1, 8)}
    with torch.inference_mode():
        ref = {B: hf(input_ids=x.to(dev)).last_hidden_state.float() for B, x in ids.items()}
    base = FastT5EncoderModel.from_hf_model(hf, torch_dtype=torch.bfloat16, fuse_norms=True).encoder
    del hf
    torch.cuda.empty_cache()
    return ids, ref, base


def graphed(fn):
    """Capture fn() in a CUDA graph after two warm-up calls on a side stream (which compile) -> (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_kernels(fn) -> dict:
    """-> {kernel name: (launches, ms)} of one call of fn (a graph replay, say), from the profiler; the CUDA
    runtime's own entries (cudaGraphLaunch, synchronisation) are left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key: (e.count, e.device_time_total / 1e3) for e in prof.key_averages()
            if not e.key.startswith(("cuda", "cuLaunch", "Activity Buffer"))}


def kernel_ms(fn, seconds: float = 0.25) -> float:
    """Median ms of back-to-back calls on the current GPU (CUDA events, no sync between calls): kernel time,
    not latency."""
    return time_calls(fn, torch.device("cuda"), seconds=seconds, sync_each=False)["ms"]


class SmiSampler:
    """nvidia-smi's SM clock, power draw and throttle reasons every 100 ms, in a background thread (the raw lines
    also go to $OUT/smi.csv when OUT is set). Its pipe delivers samples seconds late: call clock() after stop()."""

    def __init__(self):
        self.samples = []  # (epoch s, SM MHz, W, throttle reasons)
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active",
             "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        self.raw = open(os.path.join(os.environ["OUT"], "smi.csv"), "w") if os.environ.get("OUT") else None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            if self.raw:
                self.raw.write(line)
            ts, mhz, watts, reasons = [f.strip() for f in line.split(",")]
            stamp = datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
            self.samples.append((stamp, float(mhz), float(watts), reasons))

    def clock(self, start: float, end: float):
        """-> (mean SM MHz, mean W, throttle reasons) of the samples in [start + 0.2 s, end]: the clock settles."""
        inside = [s for s in self.samples if start + 0.2 <= s[0] <= end]
        return (statistics.mean(s[1] for s in inside), statistics.mean(s[2] for s in inside),
                sorted({s[3] for s in inside})) if inside else (float("nan"), float("nan"), [])

    def stop(self):
        self.proc.terminate()
        self.reader.join(timeout=5)  # the lines still in the pipe


class ProjectionOperands:
    """One XXL projection's operands at M rows, for the GEMM probes: x [M, K] in dtype, a float32 residual [M, N]
    and its scale, and three copies of the weight [rows, K] (rows = 2N for gate/up) that w() hands out in turn, so
    the weights come from memory rather than L2, as in the encoder."""

    def __init__(self, M: int, N: int, K: int, geglu: bool, dev: torch.device, dtype: torch.dtype = torch.bfloat16):
        self.rows = 2 * N if geglu else N
        self.copies = [torch.randn(self.rows, K, device=dev, dtype=dtype) * K**-0.5 for _ in range(3)]
        self.x = torch.randn(M, K, device=dev, dtype=dtype)
        self.res, self.scale = torch.randn(M, N, device=dev), torch.tensor(0.5, device=dev)
        self.flops = 2 * M * K * self.rows
        self._turn = 0

    def w(self) -> torch.Tensor:
        self._turn = (self._turn + 1) % 3
        return self.copies[self._turn]

    def first_copy_next(self) -> None:
        """The next w() returns copies[0], the weight the float32 references use."""
        self._turn = 2
