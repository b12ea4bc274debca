"""A bench-only ComfyUI custom node for tools/comfyui_gpu_check.py (not part of the t5core package).

T5CoreBenchResetPeak (run after POST /free) resets the CUDA peak. T5CoreBenchSink takes CONDITIONING, waits for the GPU (torch.cuda.synchronize), records the peak of
torch.cuda.max_memory_allocated since the last sink (then resets it), the memory allocated now and the CUDA graph
memory the driver holds (graph_memory: torch's counters leave it out), and, when `name` is
not empty, saves the first entry's tensor (`cond`) and its `pooled_output` / `attention_mask` if present to
<ComfyUI output folder>/<name>.safetensors. The numbers come back in the node's "ui" output, so they show in
/history/<prompt_id>.

With T5CORE_BENCH_TE_CONFIG set (JSON, e.g. {"t5xxl_model_config": {...}}), comfy.sd.load_clip gets those
model_options merged in: the CPU test's tiny files have T5-XXL's key names and widths but fewer heads and a narrow
FFN, which ComfyUI's fixed XXL configs cannot load otherwise. Never set on a real run.
"""
import json
import os
import time

import torch


def _patch_load_clip(extra: dict) -> None:
    import comfy.sd

    original = comfy.sd.load_clip

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={}):  # noqa: B006  (ComfyUI's signature)
        return original(ckpt_paths, embedding_directory, clip_type, {**extra, **model_options})

    comfy.sd.load_clip = load_clip


if os.environ.get("T5CORE_BENCH_TE_CONFIG"):
    _patch_load_clip(json.loads(os.environ["T5CORE_BENCH_TE_CONFIG"]))


def graph_memory() -> int:
    """Bytes of CUDA graph memory the driver holds for the current GPU (t5core.runtime.graph_memory: torch's counters
    leave out the temporaries of graphs captured under cudaMallocAsync, until trimmed); 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    from t5core.runtime import graph_memory as driver_graph_memory  # (t5core: this repository, a custom node too)

    return driver_graph_memory(torch.device("cuda", torch.cuda.current_device()))


class T5CoreBenchSink:
    CATEGORY = "T5 (fast)/bench"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "sink"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "name": ("STRING", {"default": ""})}}

    def sink(self, conditioning, name=""):
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
            peak, now = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = now = 0
        done = time.time()
        cond, extra = conditioning[0]
        if name:
            import folder_paths
            from safetensors.torch import save_file

            tensors = {"cond": cond}
            tensors.update({k: extra[k] for k in ("pooled_output", "attention_mask") if torch.is_tensor(extra.get(k))})
            os.makedirs(folder_paths.get_output_directory(), exist_ok=True)
            path = os.path.join(folder_paths.get_output_directory(), name + ".safetensors")
            save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path)
        info = {"peak_allocated": peak, "allocated": now, "graph_memory": graph_memory(), "done": done,
                "shape": list(cond.shape),
                "device": str(cond.device), "dtype": str(cond.dtype)}
        return {"ui": {"bench": [info]}}


class T5CoreBenchResetPeak:
    """Run after POST /free: resets the peak, so the next sink's peak is the next graph's own; reports what is still
    allocated. `nonce` makes each run a new one for ComfyUI's cache."""
    CATEGORY = "T5 (fast)/bench"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "reset"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("STRING", {"default": ""})}}

    def reset(self, nonce=""):
        now = 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            now = torch.cuda.memory_allocated()
        return {"ui": {"bench": [{"allocated": now, "graph_memory": graph_memory(), "done": time.time()}]}}


NODE_CLASS_MAPPINGS = {"T5CoreBenchSink": T5CoreBenchSink, "T5CoreBenchResetPeak": T5CoreBenchResetPeak}
NODE_DISPLAY_NAME_MAPPINGS = {"T5CoreBenchSink": "T5 bench sink (t5core check)",
                              "T5CoreBenchResetPeak": "T5 bench reset peak (t5core check)"}
