"""The nodes inside a real ComfyUI server, measured against ComfyUI's own CLIP loaders on the same fp16 files.

What it does, in phases (each printed with its time; --skip-* flags leave phases out):
  1. models: random weights (transformers' T5 init, fixed seed, never zeros) written as ComfyUI ships them:
     t5xxl_fp16.safetensors (T5 v1.1 XXL, Hugging Face T5EncoderModel key names), umt5_xxl_fp16.safetensors
     (UMT5-XXL, a relative-position bias per layer, the sentencepiece model embedded as `spiece_model`: t5core's
     bundled T5 spiece.model with sentinel pieces appended up to UMT5's 256300 pieces, so that ComfyUI's and
     t5core's tokenizers accept the file; prompts tokenize as with T5's pieces) and a
     CLIP-L (transformers' CLIPTextModelWithProjection keys, which ComfyUI detects as clip_l). Generated on the GPU,
     streamed to disk tensor by tensor; kept in --models for the next run (same sizes and seed: not rewritten).
     --tiny: T5-XXL's key names and widths (ComfyUI recognises XXL by 24 layers of 4096) with 2 heads and a 32-wide
     FFN; ComfyUI's loaders get the small config through tools/comfyui_sink (T5CORE_BENCH_TE_CONFIG).
  2. server: `python3 main.py` of --comfy with --base-directory in --work: custom_nodes/ holds this repository and
     tools/comfyui_sink (T5CoreBenchSink: synchronizes CUDA, reports and resets the peak of
     torch.cuda.max_memory_allocated, saves the conditioning when named); --front-end-root is a one-page folder (no
     frontend package needed), --disable-api-nodes. Missing start-up modules: wheels from --wheels (default
     .comfy/wheels, from tools/comfy_bundle.sh) installed with pip --target (without pip: the zip files); `av` (and torchvision, where it does not import) get stand-in packages.
  3. per family (flux, wan) and variant, over the HTTP API (POST /prompt, GET /history): POST /free (unload, clear
     the cache), then the precision prompt (its conditioning saved; reported as "first encode incl. load") and
     --prompts different prompts (~100-250 T5 tokens). Variants: comfy = ComfyUI's DualCLIPLoader(clip_l, t5xxl,
     flux) -> CLIPTextEncodeFlux / CLIPLoader(umt5, wan) -> CLIPTextEncode; t5core_fp16 / _bf16 / _fp32 = Load T5
     Encoder (fast) on the same file (weight_dtype fp16 with its preset scales / bf16 / fp32, the last keeping the
     file's float16 weights as ComfyUI does, its float32 inputs split for 16-bit matmuls; compiled on the GPU) -> T5
     Encoder to CLIP (fast) (flux: with ComfyUI's CLIPLoader clip_l) -> the same encode node. Blocks, not
     interleaved, so that each variant's peak VRAM is its own (--interleave N adds N rounds alternating between
     the variants, all loaded, for times alone). Time per encode: the prompt's execution_start ->
     execution_success timestamps in /history (ms), and the client's wall clock from POST to the history entry.
     Memory: the peak of torch.cuda.max_memory_allocated, and the CUDA graph memory the driver holds (which torch's
     counters leave out: graphs captured under cudaMallocAsync), during the block and after the /free that follows.
  4. precision (a subprocess with ComfyUI imported): float32 reference = ComfyUI's own CLIP for the family built
     from the same file with model_options dtype float32, TF32 off, on the GPU; the saved prompt through ComfyUI's
     tokenizer and encode path; relative error ||a-b||/||b|| and |diff| quantiles of each variant's saved output.
  5. --lowvram-mode reserve | novram | lowvram (default reserve): the server restarted with --reserve-vram R (a GPU
     short of room: ComfyUI loads the text encoder partially onto the GPU, streaming the rest; R defaults to the
     GPU's memory less 6 GB, leaving 6, less than T5-XXL's 9.5: about 133 on an H200, 73 on an H100), --novram,
     or --lowvram --reserve-vram R; the t5core_fp16 flux graph on --lowvram-prompts prompts (the precision prompt
     first, compared with the normal-mode conditioning); time and peak VRAM; not compiled unless --lowvram-compile;
     each prompt stops after --lowvram-timeout. ComfyUI's own lines on what it loaded where go into the JSON (with today's
     nodes, as for ComfyUI's own T5, --novram / --lowvram put the text encoder on the CPU).
Writes --out/comfyui_gpu_check.json and --out/comfyui_server.log (both servers' logs) and prints a markdown table.

On the GPU machine (repository root; .comfy/ built here by tools/comfy_bundle.sh and carried), everything at once:
    python3 tools/comfyui_gpu_check.py --comfy .comfy/ComfyUI --out $OUT
or in three calls that each stay well inside a 10-minute limit (the model files in /tmp/t5core_gpucheck_models and
the saved conditioning in /tmp/t5core_gpucheck_work are reused while the machine stays up):
    python3 tools/comfyui_gpu_check.py --comfy .comfy/ComfyUI --out $OUT --families flux --lowvram-mode none
    python3 tools/comfyui_gpu_check.py --comfy .comfy/ComfyUI --out $OUT --families wan --lowvram-mode none
    python3 tools/comfyui_gpu_check.py --comfy .comfy/ComfyUI --out $OUT --families flux --skip-bench
CPU test (2 cores, a few minutes):
    PYTHONPATH=/tmp/comfy_site /work/main/.venv/bin/python tools/comfyui_gpu_check.py --comfy /tmp/comfyui \
        --tiny --cpu --prompts 4 --out /tmp/gpucheck_out
"""
import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SINK = ROOT / "tools" / "comfyui_sink"
sys.path.insert(0, str(ROOT))  # t5core (the bundled spiece.model)
from comfy_standins import write_standins  # noqa: E402  (tools/, this script's folder)
XXL = {"d_model": 4096, "num_heads": 64, "d_kv": 64, "d_ff": 10240, "num_layers": 24}
TINY = {"d_model": 4096, "num_heads": 2, "d_kv": 16, "d_ff": 32, "num_layers": 24}
T5_VOCAB, UMT5_VOCAB, UMT5_PIECES = 32128, 256384, 256300
FILES = {"t5": "t5xxl_fp16.safetensors", "umt5": "umt5_xxl_fp16.safetensors", "clip_l": "clip_l.safetensors"}
FAMILIES = ("flux", "wan")
VARIANTS = ("comfy", "t5core_fp16", "t5core_bf16", "t5core_fp32")
WORDS = ("a red fox sitting in snowy birch forest at dawn soft golden light shallow depth of field photograph old "
         "lighthouse on rocky cliff stormy sea waves crashing cinematic wide shot woman reading book cozy cafe rain "
         "window neon reflections night city street market stalls lanterns steam rising from bowls of noodles "
         "portrait of an elderly fisherman weathered face detailed skin texture 85mm lens bokeh mountains reflected "
         "calm alpine lake mist early morning watercolor painting vibrant colors children playing kites meadow "
         "summer afternoon dramatic clouds")
PRECISION_PROMPT = ("a highly detailed photograph of a red fox sitting in a snowy birch forest at dawn, (soft golden "
                    "light:1.2), frost on the branches, breath visible in the cold air, shallow depth of field, 85mm "
                    "lens, bokeh, the fox looks straight at the camera with amber eyes, tufts of fur catch the "
                    "light, a small stream in the background reflects the pale blue sky, cinematic composition, "
                    "rule of thirds, National Geographic style, ultra sharp, 8k")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def prompts(n: int, seed: int = 0) -> list[str]:
    """n different prompts of 70-170 words (about 100-250 T5 tokens: Flux pads to 256, WAN to 512)."""
    rng, words = random.Random(seed), WORDS.split()
    return [f"prompt {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(70, 170))) for i in range(n)]


# -- 1. model files -------------------------------------------------------------------------------------------------
def t5_specs(cfg: dict, vocab: int, per_layer_bias: bool):
    """(name, shape, std) in Hugging Face T5EncoderModel names, transformers' init stds (factor 1); std None: ones."""
    D, H, Dh, F, L = cfg["d_model"], cfg["num_heads"], cfg["d_kv"], cfg["d_ff"], cfg["num_layers"]
    inner = H * Dh
    yield "shared.weight", (vocab, D), 1.0
    for i in range(L):
        p = f"encoder.block.{i}.layer."
        yield f"{p}0.SelfAttention.q.weight", (inner, D), (D * Dh) ** -0.5
        yield f"{p}0.SelfAttention.k.weight", (inner, D), D ** -0.5
        yield f"{p}0.SelfAttention.v.weight", (inner, D), D ** -0.5
        yield f"{p}0.SelfAttention.o.weight", (D, inner), inner ** -0.5
        if i == 0 or per_layer_bias:
            yield f"{p}0.SelfAttention.relative_attention_bias.weight", (32, H), D ** -0.5
        yield f"{p}0.layer_norm.weight", (D,), None
        yield f"{p}1.DenseReluDense.wi_0.weight", (F, D), D ** -0.5
        yield f"{p}1.DenseReluDense.wi_1.weight", (F, D), D ** -0.5
        yield f"{p}1.DenseReluDense.wo.weight", (D, F), F ** -0.5
        yield f"{p}1.layer_norm.weight", (D,), None
    yield "encoder.final_layer_norm.weight", (D,), None


def write_safetensors(path: Path, entries: list, meta: dict) -> None:
    """entries: (name, shape, dtype, make) with make() -> tensor; written one tensor at a time (no full copy in host
    memory), under a temporary name renamed when complete."""
    import torch

    codes = {torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8"}
    header, offset = {"__metadata__": meta}, 0
    for name, shape, dtype, _ in entries:
        size = dtype.itemsize
        for s in shape:
            size *= s
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype, make in entries:
            t = make().to(dtype).contiguous().cpu()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.numpy().data)
    tmp.rename(path)


def t5_entries(cfg: dict, vocab: int, per_layer_bias: bool, device, seed: int) -> list:
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def maker(shape, std):
        if std is None:
            return lambda: torch.ones(shape, device=device)
        return lambda: torch.empty(shape, device=device).normal_(0, std, generator=gen)

    return [(n, s, torch.float16, maker(s, std)) for n, s, std in t5_specs(cfg, vocab, per_layer_bias)]


def padded_spiece(pieces: int) -> bytes:
    """t5core's bundled T5 spiece.model with NORMAL pieces '<extra_id_N>' appended up to `pieces`, as UMT5's own
    spiece.model holds its sentinels: a repeated ModelProto field 1 (SentencePiece {piece = 1, score = 2}) appended
    to the serialized message is parsed as more pieces, so no protobuf package is needed. Ordinary text never
    produces them; the other ids and the special tokens stay T5's."""
    from t5core.tokenizer import BUNDLED_SPIECE

    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    score, parts = b"\x15" + struct.pack("<f", -1e4), [BUNDLED_SPIECE.read_bytes()]
    for i in range(pieces - 32000):
        text = f"<extra_id_{i}>".encode()
        msg = b"\x0a" + bytes([len(text)]) + text + score
        parts.append(b"\x0a" + varint(len(msg)) + msg)
    return b"".join(parts)


def clip_l_entries(device, seed: int) -> list:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
    with torch.device(device):
        model = CLIPTextModelWithProjection(cfg)
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("bias") or v.float().abs().max() == 0:
                v.normal_(0, 0.02)  # never zeros
    return [(k, tuple(v.shape), torch.float16, (lambda v=v: v)) for k, v in sd.items() if v.is_floating_point()]


def make_models(folder: Path, tiny: bool, device: str, families: list, seed: int = 0) -> dict:
    """Write the files the families need unless a file with the same recipe is there; -> {file: seconds spent}."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    cfg = TINY if tiny else XXL
    spiece = padded_spiece(32000 if tiny or "wan" not in families else UMT5_PIECES)
    umt5_vocab = T5_VOCAB if tiny else UMT5_VOCAB
    recipes = {
        "t5": (lambda: t5_entries(cfg, T5_VOCAB, False, device, seed), {"cfg": cfg, "vocab": T5_VOCAB}),
        "umt5": (lambda: t5_entries(cfg, umt5_vocab, True, device, seed + 1) + [
            ("spiece_model", (len(spiece),), torch.uint8, lambda: torch.frombuffer(bytearray(spiece), dtype=torch.uint8))],
            {"cfg": cfg, "vocab": umt5_vocab, "pieces": len(spiece)}),
        "clip_l": (lambda: clip_l_entries(device, seed + 2), {"clip": "L"}),
    }
    needed = {"flux": ("t5", "clip_l"), "wan": ("umt5",)}
    spent = {}
    for key, (entries, recipe) in recipes.items():
        if not any(key in needed[f] for f in families):
            continue
        path, tag = folder / FILES[key], json.dumps({**recipe, "seed": seed}, sort_keys=True)
        marker = path.with_name(path.name + ".recipe")
        if path.exists() and marker.exists() and marker.read_text() == tag:
            log(f"models: {path.name} reused")
            continue
        t0 = time.perf_counter()
        write_safetensors(path, entries(), {"recipe": tag})
        marker.write_text(tag)
        spent[FILES[key]] = round(time.perf_counter() - t0, 1)
        log(f"models: {path.name} written ({path.stat().st_size / 2**30:.2f} GiB) in {spent[FILES[key]]} s")
    if device != "cpu":
        torch.cuda.empty_cache()
    return spent


# -- 2. the server --------------------------------------------------------------------------------------------------
def server_pythonpath(work: Path, wheels: str) -> str:
    """PYTHONPATH for the server: wheels installed with --target (only packages this Python lacks, so its own win),
    then stand-ins for av / torchvision where they do not import, then the caller's PYTHONPATH."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    whls = sorted(str(w) for w in Path(wheels).glob("*.whl")) if wheels and Path(wheels).is_dir() else []
    site = work / "site"
    if whls and not site.exists():
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--disable-pip-version-check", "--target", str(site), *whls], check=False)
        if pip.returncode != 0:  # no pip: pure-Python wheels import from the zip files themselves
            shutil.rmtree(site, ignore_errors=True)
            log("server: pip failed; the wheels go on PYTHONPATH as they are (pure Python only)")
    if whls:
        paths.extend([str(site)] if site.exists() else whls)
    stubs = work / "stubs"
    if written := write_standins(stubs, paths):
        log(f"server: no importable {' or '.join(written)} here: stand-in packages (no node this check runs uses them)")
        paths.insert(0, str(stubs))
    return os.pathsep.join(paths)


def make_base(work: Path, models: Path) -> Path:
    """A --base-directory: custom_nodes/{t5core -> repo, t5core_bench_sink}; models/text_encoders/<files>."""
    base = work / "base"
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    for name, target in (("t5core", ROOT), ("t5core_bench_sink", SINK)):
        if not (base / "custom_nodes" / name).exists():
            (base / "custom_nodes" / name).symlink_to(target)
    te = base / "models" / "text_encoders"
    te.mkdir(parents=True, exist_ok=True)
    for f in FILES.values():
        link = te / f
        if link.is_symlink():
            link.unlink()
        link.symlink_to((models / f).resolve())
    (base / "output").mkdir(exist_ok=True)
    (work / "frontend").mkdir(exist_ok=True)
    (work / "frontend" / "index.html").write_text("<!doctype html><title>ComfyUI (t5core check)</title>\n")
    return base


class Server:
    """A ComfyUI server subprocess and its HTTP API."""

    def __init__(self, args, base: Path, env: dict, flags: list, log_file):
        cmd = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(args.port), "--base-directory",
               str(base), "--front-end-root", str(base.parent / "frontend"), "--disable-auto-launch",
               "--disable-api-nodes", *(["--cpu"] if args.cpu else []), *flags]
        log_file.write(f"\n===== {' '.join(cmd)}\n")
        log_file.flush()
        self.url = f"http://127.0.0.1:{args.port}"
        self.nonce = 0  # makes each peak-reset prompt new to ComfyUI's cache
        self.proc = subprocess.Popen(cmd, cwd=args.comfy, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + args.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"ComfyUI exited with {self.proc.returncode} (see the server log)")
            try:
                self.get("/object_info/T5CoreBenchSink")
                if "T5CoreEncoderToCLIP" in self.get("/object_info/T5CoreEncoderToCLIP"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise SystemExit(f"ComfyUI did not start in {args.start_timeout} s")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise SystemExit(f"POST {path}: {e.code} {e.read().decode(errors='replace')[:2000]}") from e
        try:
            return json.loads(body) if body else None
        except ValueError:
            return None

    def run(self, graph: dict, timeout: float) -> dict:
        """Queue a graph, wait for its history entry -> {exec_ms, wall_ms, ui of the sink}."""
        t0 = time.perf_counter()
        pid = self.post("/prompt", {"prompt": graph})["prompt_id"]
        while True:
            entry = self.get(f"/history/{pid}").get(pid)  # added when the prompt has finished
            if entry:
                break
            if time.perf_counter() - t0 > timeout:
                self.post("/interrupt", {})
                raise TimeoutError(f"prompt {pid} not done in {timeout} s")
            time.sleep(0.005)
        wall = (time.perf_counter() - t0) * 1000
        stamps = {name: data.get("timestamp") for name, data in entry["status"]["messages"]}
        if entry["status"]["status_str"] != "success":
            err = next((d for n, d in entry["status"]["messages"] if n == "execution_error"), {})
            raise RuntimeError(f"prompt failed: {err.get('node_type')}: {err.get('exception_message')}")
        ui = entry["outputs"]["sink"]["bench"][0]
        return {"exec_ms": stamps["execution_success"] - stamps["execution_start"], "wall_ms": round(wall, 1), **ui}


    def free(self) -> dict:
        """Unload every model and clear the node cache (the next prompt loads again), then reset the CUDA peak;
        -> {allocated, graph_memory}: bytes still held."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(2.0)
        self.nonce += 1
        reset = {"sink": {"class_type": "T5CoreBenchResetPeak", "inputs": {"nonce": str(self.nonce)}}}
        return self.run(reset, 60)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- 3. graphs and runs ---------------------------------------------------------------------------------------------
def graph(family: str, variant: str, text: str, name: str, compile_: bool) -> dict:
    """API-format graph: the variant's CLIP -> the family's ComfyUI encode node -> T5CoreBenchSink."""
    g = {}
    if variant == "comfy":
        if family == "flux":
            g["load"] = {"class_type": "DualCLIPLoader", "inputs": {
                "clip_name1": FILES["clip_l"], "clip_name2": FILES["t5"], "type": "flux", "device": "default"}}
        else:
            g["load"] = {"class_type": "CLIPLoader", "inputs": {
                "clip_name": FILES["umt5"], "type": "wan", "device": "default"}}
        clip = ["load", 0]
    else:
        g["t5"] = {"class_type": "T5CoreLoadEncoder", "inputs": {
            "model_name": FILES["t5" if family == "flux" else "umt5"], "weight_dtype": variant.split("_")[1],
            "attention": "auto", "compile": compile_, "device": "default"}}
        inputs = {"t5_encoder": ["t5", 0], "family": family}
        if family == "flux":
            g["clip_l"] = {"class_type": "CLIPLoader", "inputs": {
                "clip_name": FILES["clip_l"], "type": "stable_diffusion", "device": "default"}}
            inputs["clip"] = ["clip_l", 0]
        g["to_clip"] = {"class_type": "T5CoreEncoderToCLIP", "inputs": inputs}
        clip = ["to_clip", 0]
    if family == "flux":
        g["encode"] = {"class_type": "CLIPTextEncodeFlux", "inputs": {
            "clip": clip, "clip_l": text, "t5xxl": text, "guidance": 3.5}}
    else:
        g["encode"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": text}}
    g["sink"] = {"class_type": "T5CoreBenchSink", "inputs": {"conditioning": ["encode", 0], "name": name}}
    return g


def summary(values: list) -> dict:
    if not values:
        return {}
    q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {"median": round(statistics.median(values), 2), "p10": round(q[0], 2), "p90": round(q[-1], 2),
            "n": len(values)}


def gpu_apps() -> list:
    """nvidia-smi's compute apps (pid, used memory MiB), if nvidia-smi is there."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def run_block(server: Server, family: str, variant: str, texts: list, args, tag: str = "", compile_=None) -> dict:
    """Free everything, run the precision prompt (saved; includes load) and then `texts`."""
    compile_ = args.compile if compile_ is None else compile_
    before = server.free()
    name = f"{tag}{family}_{variant}"
    first = server.run(graph(family, variant, PRECISION_PROMPT, name, compile_), args.prompt_timeout)
    runs, deadline = [], time.time() + args.block_budget
    for i, text in enumerate(texts):
        if time.time() > deadline:
            log(f"{name}: block budget ({args.block_budget} s) spent after {i} prompts")
            break
        runs.append(server.run(graph(family, variant, text, "", compile_), args.prompt_timeout))
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    # (graph memory: the CUDA graph memory the driver holds, which torch's counters leave out; after the /free that
    # starts this block, that of the block before it)
    out = {"allocated_after_free_GiB": gib(before["allocated"]),
           "graph_memory_after_free_GiB": gib(before.get("graph_memory", 0)),
           "graph_memory_GiB": gib(max(r.get("graph_memory", 0) for r in [first, *runs])),
           "first_ms": first["exec_ms"], "first_peak_GiB": gib(first["peak_allocated"]),
           "exec_ms": summary([r["exec_ms"] for r in runs]), "wall_ms": summary([r["wall_ms"] for r in runs]),
           "peak_GiB": gib(max(r["peak_allocated"] for r in [first, *runs])),
           "resident_GiB": gib(runs[-1]["allocated"]) if runs else None,
           "encode_peak_GiB": gib(max([r["peak_allocated"] for r in runs], default=0)),
           "cond_shape": first["shape"], "saved": name, "nvidia_smi": gpu_apps(),
           "exec_ms_all": [r["exec_ms"] for r in runs]}
    log(f"{name}: first (incl. load) {out['first_ms']} ms, encode median {out['exec_ms'].get('median')} ms "
        f"(p10 {out['exec_ms'].get('p10')}, p90 {out['exec_ms'].get('p90')}), peak {out['peak_GiB']} GiB, graph memory "
        f"{out['graph_memory_GiB']} GiB (after the /free before: {out['graph_memory_after_free_GiB']})")
    return out


def run_interleaved(server: Server, family: str, variants: list, rounds: int, args) -> dict:
    """All the family's variants loaded at once (no /free), prompts alternating between them round by round, so
    that a drift in the machine's speed hits every variant alike. Times only: the peaks mix the variants."""
    texts = prompts(rounds + 1, seed=2)
    for v in variants:  # loaded (and compiled) again after the blocks' /free: not timed
        server.run(graph(family, v, texts[0], "", args.compile), args.prompt_timeout)
    times = {v: [] for v in variants}
    for text in texts[1:]:
        for v in variants:
            times[v].append(server.run(graph(family, v, text, "", args.compile), args.prompt_timeout)["exec_ms"])
    out = {v: summary(t) for v, t in times.items()}
    log(f"{family} interleaved: " + ", ".join(f"{v} {out[v].get('median')} ms" for v in variants))
    return out


# -- 4. precision (runs in a subprocess with ComfyUI imported) ------------------------------------------------------
def metrics(a, b) -> dict:
    import torch

    a, b = a.double().flatten(), b.double().flatten()
    if a.shape != b.shape:
        return {"error": f"shape {tuple(a.shape)} vs {tuple(b.shape)}"}
    d = (a - b).abs()
    q = torch.quantile(d[:: max(1, d.numel() // 4_000_000)], torch.tensor([0.5, 0.99], dtype=d.dtype))
    return {"rel": float((a - b).norm() / b.norm()), "abs_p50": float(q[0]), "abs_p99": float(q[1]),
            "abs_max": float(d.max())}


def reference_job(job: dict) -> None:
    """float32 reference of ComfyUI's own CLIP for each family, TF32 off; metrics of each saved output."""
    sys.path.insert(0, job["comfy"])
    sys.argv = ["main.py"] + (["--cpu"] if job["cpu"] else [])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.sd
    import torch
    from safetensors.torch import load_file

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    te, out = Path(job["models"]), {}
    for family, saved in job["saved"].items():
        paths = [te / FILES["clip_l"], te / FILES["t5"]] if family == "flux" else [te / FILES["umt5"]]
        options = {**job["te_config"], "dtype": torch.float32}
        t0 = time.perf_counter()
        clip = comfy.sd.load_clip([str(p) for p in paths], clip_type=getattr(comfy.sd.CLIPType, family.upper()),
                                  model_options=options)
        tokens = clip.tokenize(job["text"])
        t5 = "t5xxl" if family == "flux" else "umt5xxl"
        cond = clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": 3.5} if family == "flux" else {})
        ref, extra = cond[0]
        out[family] = {"t5_tokens": sum(1 for s in tokens[t5] for t in s if t[0] != 0), "ref_shape": list(ref.shape),
                       "ref_seconds": round(time.perf_counter() - t0, 1), "vs_float32": {}}
        for variant, file in saved.items():
            got = load_file(file)
            m = {"cond": metrics(got["cond"], ref)}
            if "pooled_output" in got and torch.is_tensor(extra.get("pooled_output")):
                m["pooled"] = metrics(got["pooled_output"], extra["pooled_output"])
            out[family]["vs_float32"][variant] = m
        del clip, cond, ref
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    Path(job["out"]).write_text(json.dumps(out, indent=1))


# -- 5. report ------------------------------------------------------------------------------------------------------
def table(result: dict) -> str:
    header = ("| family | variant | first encode incl. load (ms) | encode median (p10-p90) ms | wall median ms | "
              "peak VRAM GiB | CUDA graph memory GiB | rel. error vs float32 |")
    rows = [header, "|---|---|---|---|---|---|---|---|"]
    for key, block in result["blocks"].items():
        family, variant = key.split("/")
        prec = result.get("precision", {}).get(family, {}).get("vs_float32", {}).get(variant, {}).get("cond", {})
        e = block["exec_ms"]
        rows.append(f"| {family} | {variant} | {block['first_ms']} | {e.get('median')} ({e.get('p10')}-{e.get('p90')})"
                    f" | {block['wall_ms'].get('median')} | {block['peak_GiB']} | {block.get('graph_memory_GiB')} | "
                    f"{prec.get('rel', float('nan')):.2e} |")
    for family in FAMILIES:
        comfy, ours = result["blocks"].get(f"{family}/comfy"), result["blocks"].get(f"{family}/t5core_fp16")
        if comfy and ours and ours["exec_ms"] and comfy["exec_ms"]:
            ratio = comfy["exec_ms"]["median"] / max(ours["exec_ms"]["median"], 1e-9)
            rows.append(f"\n{family}: median time per encode, ComfyUI's loader / t5core fp16 = {ratio:.1f}x")
    for family, times in result.get("interleaved", {}).items():
        rows.append(f"\n{family}, interleaved (all variants loaded, prompts alternating): "
                    + ", ".join(f"{v} median {t.get('median')} ms (p10 {t.get('p10')}, p90 {t.get('p90')})"
                                for v, t in times.items()))
    if "lowvram" in result:
        lv, block = result["lowvram"], result["lowvram"].get("block", {})
        rows.append(f"\nlow-VRAM phase (server flags: {lv['flags'] or 'none, --cpu'}; {lv['variant']}): first encode "
                    f"incl. load {block.get('first_ms')} ms, then {block.get('exec_ms')} ms, peak "
                    f"{block.get('peak_GiB')} GiB; vs the normal-mode conditioning: {lv.get('vs_normal')}"
                    + (f"; error: {lv['error']}" if "error" in lv else ""))
    return "\n".join(rows)


def memory_lines(path: Path, offset: int) -> list:
    """ComfyUI's own lines about what it loaded where (Requested to load / loaded completely / loaded partially)."""
    with open(path, errors="replace") as f:
        f.seek(offset)
        return [line.strip() for line in f if any(k in line for k in ("Requested to load", "loaded completely",
                                                                       "loaded partially", "Device:", "VRAM"))][-30:]


def compare_saved(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    return metrics(load_file(a)["cond"], load_file(b)["cond"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", required=True, help="ComfyUI source folder (main.py)")
    ap.add_argument("--out", required=True, help="where the JSON and the server log go")
    ap.add_argument("--wheels", default=str(ROOT / ".comfy" / "wheels"), help="wheels for what ComfyUI lacks")
    ap.add_argument("--models", default=None, help="model folder (default /tmp/t5core_gpucheck_models[_tiny])")
    ap.add_argument("--work", default=None, help="work folder, kept between runs: the low-VRAM phase compares with "
                    "the conditioning a normal run saved there (default /tmp/t5core_gpucheck_work[_tiny])")
    ap.add_argument("--tiny", action="store_true", help="small models (CPU test)")
    ap.add_argument("--cpu", action="store_true", help="ComfyUI --cpu, models generated on the CPU")
    ap.add_argument("--prompts", type=int, default=20, help="timed prompt changes per variant")
    ap.add_argument("--interleave", type=int, default=0, help="after each family's blocks, this many rounds of "
                    "prompts alternating between its variants, all loaded (times only)")
    ap.add_argument("--families", default="flux,wan")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="t5core without torch.compile")
    ap.add_argument("--skip-models", action="store_true", help="use --models as it is")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-precision", action="store_true")
    ap.add_argument("--lowvram-mode", choices=("reserve", "novram", "lowvram", "none"), default="reserve")
    ap.add_argument("--reserve-vram", type=float, default=None,
                    help="GB, with --lowvram-mode reserve / lowvram (default: the GPU's memory less 6 GB)")
    ap.add_argument("--lowvram-prompts", type=int, default=5, help="prompts in the low-VRAM phase, the first saved")
    ap.add_argument("--lowvram-variant", choices=VARIANTS, default="t5core_fp16")
    ap.add_argument("--lowvram-compile", action="store_true", help="compile in the low-VRAM phase too")
    ap.add_argument("--lowvram-timeout", type=float, default=150.0, help="seconds per prompt in the low-VRAM phase")
    ap.add_argument("--block-budget", type=float, default=120.0, help="seconds of timed prompts per variant at most")
    ap.add_argument("--prompt-timeout", type=float, default=300.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--server-flags", default="", help="more flags for the server of phase 3 (e.g. "
                    "--disable-cuda-malloc: torch's own allocator instead of cudaMallocAsync)")
    args = ap.parse_args()
    args.comfy = str(Path(args.comfy).resolve())
    if args.cpu:
        args.compile = False  # CPU inductor needs a C++ toolchain; the CPU run checks the path, not the speed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or f"/tmp/t5core_gpucheck_work{'_tiny' if args.tiny else ''}")
    work.mkdir(parents=True, exist_ok=True)
    models = Path(args.models or f"/tmp/t5core_gpucheck_models{'_tiny' if args.tiny else ''}")
    families = [f for f in args.families.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    result = {"args": vars(args), "phases_s": {}, "blocks": {}}
    t_start = time.perf_counter()

    def phase(name, t0):  # the JSON is rewritten after each phase: a run stopped by a time limit keeps the rest
        result["phases_s"][name] = round(time.perf_counter() - t0, 1)
        log(f"phase {name}: {result['phases_s'][name]} s")
        (out / "comfyui_gpu_check.json").write_text(json.dumps(result, indent=1))

    t0 = time.perf_counter()
    if not args.skip_models:
        result["models_written_s"] = make_models(models, args.tiny, "cpu" if args.cpu else "cuda", families)
    phase("models", t0)

    base = make_base(work, models)
    te_config = {"t5xxl_model_config": {k: v for k, v in TINY.items() if k != "d_model"},
                 "umt5xxl_model_config": {**{k: v for k, v in TINY.items() if k != "d_model"}, "vocab_size": T5_VOCAB}
                 } if args.tiny else {}
    env = dict(os.environ, PYTHONPATH=server_pythonpath(work, args.wheels), PYTHONUNBUFFERED="1")
    if te_config:
        env["T5CORE_BENCH_TE_CONFIG"] = json.dumps(te_config)
    texts = prompts(args.prompts)
    log_file = open(out / "comfyui_server.log", "w")  # noqa: SIM115  (closed at the end)
    output_dir = base / "output"
    try:
        if not args.skip_bench:
            t0 = time.perf_counter()
            # interleaving needs every variant's loader outputs kept: ComfyUI's default cache keeps only the last
            # prompt's, so alternating graphs would load again each time
            server = Server(args, base, env, (["--cache-lru", "64"] if args.interleave else [])
                            + shlex.split(args.server_flags), log_file)
            phase("server_start", t0)
            try:
                for family in families:
                    for variant in variants:
                        t0 = time.perf_counter()
                        result["blocks"][f"{family}/{variant}"] = run_block(server, family, variant, texts, args)
                        phase(f"{family}/{variant}", t0)
                    if args.interleave:
                        t0 = time.perf_counter()
                        result.setdefault("interleaved", {})[family] = run_interleaved(server, family, variants,
                                                                                       args.interleave, args)
                        phase(f"{family}/interleaved", t0)
            finally:
                server.stop()
        if not args.skip_precision and not args.skip_bench:
            t0 = time.perf_counter()
            job = {"comfy": args.comfy, "cpu": args.cpu, "models": str(models), "te_config": te_config,
                   "text": PRECISION_PROMPT, "out": str(work / "precision.json"),
                   "saved": {f: {v: str(output_dir / f"{f}_{v}.safetensors") for v in variants} for f in families}}
            (work / "job.json").write_text(json.dumps(job))
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--reference-job", str(work / "job.json")],
                           cwd=args.comfy, env=env, stdout=log_file, stderr=subprocess.STDOUT, check=True)
            result["precision"] = json.loads((work / "precision.json").read_text())
            phase("precision", t0)
        if args.lowvram_mode != "none":
            t0 = time.perf_counter()
            reserve = args.reserve_vram
            if reserve is None and not args.cpu:  # asked of nvidia-smi: no CUDA context in this process
                mib = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=memory.total", "--format=csv,noheader,"
                                      "nounits"], capture_output=True, text=True, check=True).stdout
                reserve = int(mib) // 1024 - 6  # ComfyUI's GB are GiB
            flags = {"reserve": ["--reserve-vram", str(reserve)], "novram": ["--novram"],
                     "lowvram": ["--lowvram", "--reserve-vram", str(reserve)]}[args.lowvram_mode]
            if args.cpu:  # ComfyUI refuses the VRAM flags with --cpu: the CPU test restarts and compares only
                flags = []
            log_file.flush()
            mark = log_file.tell()
            server = Server(args, base, env, flags, log_file)
            lv = {"flags": " ".join(flags), "variant": args.lowvram_variant, "compile": args.lowvram_compile}
            args.prompt_timeout = args.lowvram_timeout
            try:
                lv["block"] = run_block(server, "flux", args.lowvram_variant, prompts(args.lowvram_prompts - 1, seed=1),
                                        args, tag="lowvram_", compile_=args.lowvram_compile)
            except (TimeoutError, RuntimeError) as e:
                lv["error"] = str(e)
                log(f"lowvram: {e}")
            finally:
                server.stop()
            log_file.flush()
            lv["memory_log"] = memory_lines(out / "comfyui_server.log", mark)
            normal = output_dir / f"flux_{args.lowvram_variant}.safetensors"
            low = output_dir / f"lowvram_flux_{args.lowvram_variant}.safetensors"
            if normal.exists() and low.exists():
                lv["vs_normal"] = compare_saved(low, normal)
            result["lowvram"] = lv
            phase("lowvram", t0)
    finally:
        log_file.close()
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        (out / "comfyui_gpu_check.json").write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-job":
        reference_job(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
