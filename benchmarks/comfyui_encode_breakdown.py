"""Where the time of one ComfyUI text encode goes, in one process (no server): ComfyUI's own CLIP and t5core's CLIP
("T5 Encoder to CLIP (fast)") for a family, on the model files tools/comfyui_gpu_check.py writes. Per prompt change,
CUDA-synchronized wall times of: ComfyUI's tokenize; the whole encode_from_tokens_scheduled (what CLIPTextEncode runs);
ComfyUI's T5 SDClipModel.encode_token_weights alone (its T5 part, with ComfyUI's padding, embeddings and mask);
the CLIP-L part alone (flux) and the GPU kernel time inside it (torch.profiler: what of its wall time the GPU is
busy); t5core's Encoder.encode alone on ids of the padded length. Then CUDA-graph captures
per encode (t5core.runtime.Encoder._capture counted) and a cProfile of t5core's encodes without graphs (host time by
function). Variants: comfy (ComfyUI's own CLIP), t5core_fp16 / _bf16 / _fp32 (the Load node's weight_dtype),
with _nographs: the compiled layers without CUDA graphs.

On the GPU machine, after `tools/comfyui_gpu_check.py` has written the models (/tmp/t5core_gpucheck_models):
    python3 benchmarks/comfyui_encode_breakdown.py --comfy .comfy/ComfyUI --family flux
    python3 benchmarks/comfyui_encode_breakdown.py --comfy .comfy/ComfyUI --family flux --malloc-async
(--malloc-async: the allocator ComfyUI's main.py picks, cudaMallocAsync, under which t5core builds its compiled layers
with inductor's C++ wrapper to capture them.)
"""
import argparse
import asyncio
import cProfile
import importlib.util
import io
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--comfy", required=True)
ap.add_argument("--models", default="/tmp/t5core_gpucheck_models")
ap.add_argument("--family", choices=("flux", "wan"), default="flux")
ap.add_argument("--variants", default="comfy,t5core_fp16,t5core_bf16,t5core_fp16_nographs,t5core_bf16_nographs")
ap.add_argument("--prompts", type=int, default=20)
ap.add_argument("--no-compile", dest="compile", action="store_false")
ap.add_argument("--malloc-async", action="store_true", help="PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync")
ap.add_argument("--cpu", action="store_true", help="ComfyUI --cpu (a smoke test of this script on tiny models)")
args = ap.parse_args()
command = " ".join(sys.argv)
if args.malloc_async:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"

sys.path[:0] = [args.comfy, str(REPO), str(REPO / "tools")]  # ComfyUI's `nodes` first, then t5core
from comfy_standins import write_standins  # noqa: E402
from comfyui_gpu_check import FILES, PRECISION_PROMPT, prompts  # noqa: E402

STANDINS = Path(tempfile.mkdtemp(prefix="comfy_standins_"))
if write_standins(STANDINS, sys.path):
    sys.path.insert(0, str(STANDINS))
sys.argv = ["main.py"] + (["--cpu"] if args.cpu else [])
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
logging.basicConfig(level=logging.WARNING)
import torch  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

folder_paths.add_model_folder_path("text_encoders", args.models, is_default=True)
spec = importlib.util.spec_from_file_location("t5core_nodes_pkg", str(REPO / "__init__.py"))
pkg = importlib.util.module_from_spec(spec)
sys.modules["t5core_nodes_pkg"] = pkg
spec.loader.exec_module(pkg)
ours = {n.GET_SCHEMA().node_id: n for n in asyncio.run(asyncio.run(pkg.comfy_entrypoint()).get_node_list())}
import t5core.runtime  # noqa: E402

captures = [0]
_capture = t5core.runtime.Encoder._capture


def counted_capture(self, *a, **k):
    captures[0] += 1
    return _capture(self, *a, **k)


t5core.runtime.Encoder._capture = counted_capture
T5 = "t5xxl" if args.family == "flux" else "umt5xxl"
ADD = {"guidance": 3.5} if args.family == "flux" else {}


def make(variant: str):
    """-> (ComfyUI CLIP, t5core.Encoder or None)."""
    te = Path(args.models)
    if variant == "comfy":
        paths = [te / FILES["clip_l"], te / FILES["t5"]] if args.family == "flux" else [te / FILES["umt5"]]
        clip = comfy.sd.load_clip([str(p) for p in paths], clip_type=getattr(comfy.sd.CLIPType, args.family.upper()))
        return clip, None
    enc = ours["T5CoreLoadEncoder"].execute(model_name=FILES["t5" if args.family == "flux" else "umt5"],
                                            weight_dtype=variant.split("_")[1], attention="auto",
                                            compile=args.compile, device="default").args[0]
    extra = {}
    if args.family == "flux":
        extra["clip"] = comfy.sd.load_clip([str(te / FILES["clip_l"])])
    clip = ours["T5CoreEncoderToCLIP"].execute(t5_encoder=enc, family=args.family, **extra).args[0]
    return clip, enc


def sync():
    if torch.cuda.is_available() and not args.cpu:
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - t0) * 1e3


def kernel_ms(fn) -> float:
    """CUDA kernel time (ms) of one call of fn, summed over its kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e3


def without_graphs(enc) -> None:
    """The compiled layers run as they are, without CUDA graphs (t5core before graphs of eager layers under
    cudaMallocAsync): the runtime's own no-graph path."""
    enc.patcher()
    enc._runtime._graphs_ok = lambda: False


def run(variant: str, texts: list) -> dict:
    clip, enc = make(variant)
    if variant.endswith("_nographs"):
        without_graphs(enc)
    for text in (PRECISION_PROMPT, *texts[:2]):  # load, compile, capture
        clip.encode_from_tokens_scheduled(clip.tokenize(text), add_dict=ADD)
    rows = {k: [] for k in ("tokenize", "encode", "t5_part", "clip_l_part", "clip_l_kernels", "t5core_alone",
                            "captures")}
    for text in texts[2:]:
        before = captures[0]
        tokens, ms = timed(lambda: clip.tokenize(text))
        rows["tokenize"].append(ms)
        rows["encode"].append(timed(lambda: clip.encode_from_tokens_scheduled(tokens, add_dict=ADD))[1])
        rows["captures"].append(captures[0] - before)
        clip.load_model()
        model = clip.cond_stage_model
        rows["t5_part"].append(timed(lambda: getattr(model, T5).encode_token_weights(tokens[T5]))[1])
        if "l" in tokens:
            rows["clip_l_part"].append(timed(lambda: model.clip_l.encode_token_weights(tokens["l"]))[1])
            if torch.cuda.is_available() and not args.cpu:
                rows["clip_l_kernels"].append(kernel_ms(lambda: model.clip_l.encode_token_weights(tokens["l"])))
        if enc is not None:
            ids, runtime = torch.tensor([[t[0] for t in tokens[T5][0]]]), enc.on_device()
            rows["t5core_alone"].append(timed(lambda: runtime.encode(ids))[1])
    out = {k: round(statistics.median(v), 2) for k, v in rows.items() if v}
    out["t5_tokens"] = len(tokens[T5][0])
    if enc is not None and variant == "t5core_fp16_nographs":
        prof = cProfile.Profile()
        prof.enable()
        for text in texts[:10]:
            clip.encode_from_tokens_scheduled(clip.tokenize(text), add_dict=ADD)
        sync()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        print(f"== cProfile, 10 encodes of {variant} (host time) ==\n" + s.getvalue()[-6000:], flush=True)
    return out


def run_and_free(variant: str, texts: list) -> dict:
    out = run(variant, texts)
    mm.unload_all_models()
    mm.soft_empty_cache()
    return out


texts = prompts(args.prompts + 2, seed=3)
device = "CPU" if args.cpu else f"{torch.cuda.get_device_name()}, allocator {torch.cuda.get_allocator_backend()}"
print(f"# python3 {command}\n# torch {torch.__version__}, {device}", flush=True)
results = {v: run_and_free(v, texts) for v in args.variants.split(",")}
cols = ("t5_tokens", "tokenize", "encode", "t5_part", "clip_l_part", "clip_l_kernels", "t5core_alone", "captures")
print("| variant | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
for v, r in results.items():
    print(f"| {v} | " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
