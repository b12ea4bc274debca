"""Check the nodes against REAL ComfyUI code (CPU, --cpu): for every T5 / UMT5 family the ComfyUI checkout has, the
CONDITIONING of ComfyUI's own text-encode nodes with the CLIP from "T5 Encoder to CLIP (fast)" equals that with
ComfyUI's own text encoder (its CLIP loaders picking the family from the type argument) on the same random weights,
within 1e-5 in float32; also the Encode Prompt node, the memory manager, partial loading by ComfyUI's ModelPatcher
(fp32, fp8, GGUF, fused norms, float16: the conditioning equals the whole model's within 1e-6), LoRAs through
ComfyUI's LoRA loader (CLIP-L and T5: equal to ComfyUI's own CLIP with the LoRA; float16 weights, partial loads, a
scaled fp8 file against ComfyUI's own fp8 CLIP), and the error cases.

Not part of the test run (ComfyUI is not on PyPI). Usage, with a ComfyUI checkout and its requirements installed:
    COMFYUI_DIR=/path/to/ComfyUI python tools/check_against_comfyui.py
(COMFYUI_EXTRA_SITE may name a folder of extra packages ComfyUI needs.) The weights are tiny but shaped so that
ComfyUI's detect_te_model recognises them: 24 layers, T5-XXL's 4096 width (1024 for Cosmos' T5 v1.0) with 2 heads
and a 32-wide FFN; ComfyUI is told the small sizes through its <model>_model_config option. The UMT5 file embeds a
small sentencepiece model trained here, as ComfyUI's UMT5 files embed theirs. HiDream also gets a Llama: Llama 3.1's
key names, 128256-token vocabulary and 128-wide heads (ComfyUI's Llama2Config fixes head_dim), 4 layers of width 64
(llama_model_config); its CLIP input is ComfyUI's own QuadrupleCLIPLoader CLIP (clip_l, clip_g, t5xxl, llama: ComfyUI
loads three files as SD3 whatever the type, so clip_l + clip_g + llama alone cannot be a HiDream CLIP) or its
CLIPLoader(llama, hidream) CLIP, compared with QuadrupleCLIPLoader / DualCLIPLoader(t5xxl, llama, hidream), through
CLIPTextEncode and CLIPTextEncodeHiDream."""
import asyncio
import atexit
import gc
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ["COMFYUI_DIR"])
sys.path.insert(1, str(REPO))  # this checkout's t5core, not an installed one (after ComfyUI: its `nodes` stays first)
if os.environ.get("COMFYUI_EXTRA_SITE"):
    sys.path.append(os.environ["COMFYUI_EXTRA_SITE"])
import transformers.models.clip  # noqa: E402,F401  (before the stand-ins: transformers looks for torchvision)
import transformers.models.t5  # noqa: E402,F401
from comfy_standins import write_standins  # noqa: E402  (tools/, this script's folder)

STANDINS = Path(tempfile.mkdtemp(prefix="comfy_standins_"))
if write_standins(STANDINS, sys.path):
    sys.path.insert(0, str(STANDINS))
sys.argv = ["main.py", "--cpu"] + sys.argv[1:]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
logging.basicConfig(level=logging.WARNING)
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, LlamaConfig, LlamaModel  # noqa: E402
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel  # noqa: E402

import comfy.hooks  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

tmp = Path(tempfile.mkdtemp())
atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # about 5 GB of model files
te = tmp / "text_encoders"
te.mkdir()
folder_paths.folder_names_and_paths["text_encoders"] = ([str(te)], folder_paths.supported_pt_extensions)
SMALL = {"num_layers": 24, "num_heads": 2, "d_kv": 16, "d_ff": 32}
UMT5_VOCAB = 256  # at least the pieces of the sentencepiece model below (about 160), at most twice as many
LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 2,
         "num_key_value_heads": 1}  # ComfyUI's llama_model_config; head_dim is ComfyUI's fixed 128


def randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n or n.endswith("norm.weight"):  # T5's layer_norm, Llama's RMSNorms
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "shared" in n or "embed" in n or "relative" in n:
                p.normal_(0, 1)
            else:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def t5_file(name, kind, d_model, vocab_size=32128, extra=None):
    cfg_cls, model_cls = (UMT5Config, UMT5EncoderModel) if kind == "umt5" else (T5Config, T5EncoderModel)
    ffn = "relu" if kind == "t5-v1_0" else "gated-gelu"
    cfg = cfg_cls(vocab_size=vocab_size, d_model=d_model, feed_forward_proj=ffn, dropout_rate=0.0, **SMALL)
    model = model_cls(cfg).eval()
    sd = randomize(model, seed=len(name))
    save_file({**sd, **(extra or {})}, te / name)
    return model


def clip_file(name, hidden, layers, heads):
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, projection_dim=hidden,
                         hidden_act="gelu" if hidden == 1280 else "quick_gelu")
    torch.manual_seed(hidden)
    save_file({k: v.clone().contiguous() for k, v in CLIPTextModelWithProjection(cfg).state_dict().items()}, te / name)


def llama_file(name):
    """A Llama as ComfyUI's loaders detect it (model.layers.0.post_attention_layernorm.weight: LLAMA3_8; no k_proj
    bias: not a Qwen), with Llama 3.1's vocabulary (HiDream's pad id 128009 must exist) and head width."""
    cfg = LlamaConfig(vocab_size=128256, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, **LLAMA)
    sd = randomize(LlamaModel(cfg).eval(), seed=len(name))
    save_file({f"model.{k}": v for k, v in sd.items()}, te / name)


def umt5_spiece() -> bytes:
    """A small unigram sentencepiece model with UMT5's special ids (pad 0, eos 1, unk 2)."""
    words = ("a red fox in the snow detailed photo of cat dog running through forest at night with moon light over "
             "water city street rain neon sign old man young woman painting oil canvas bright colors").split()
    text = tmp / "spm.txt"
    text.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)))
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp / "spm"), vocab_size=64,
                                       hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                       model_type="unigram", logstream=quiet)
    return (tmp / "spm.model").read_bytes()


t5_v11 = t5_file("t5_v11.safetensors", "t5-v1_1", 4096)  # ComfyUI: T5_XXL
sys.path.insert(0, str(REPO / "tests"))
from gguf import GGMLQuantizationType  # noqa: E402
from test_gguf import one_type, write_gguf  # noqa: E402

write_gguf(te / "t5_v11-Q8_0.gguf", t5_v11, one_type(GGMLQuantizationType.Q8_0))  # t5core keeps the Q8_0 blocks
t5_file("t5_v10.safetensors", "t5-v1_0", 1024)  # ComfyUI: T5_XXL_OLD (Cosmos)
spiece = umt5_spiece()
t5_file("umt5.safetensors", "umt5", 4096, vocab_size=UMT5_VOCAB,
        extra={"spiece_model": torch.frombuffer(bytearray(spiece), dtype=torch.uint8)})  # ComfyUI: T5_XXL, WAN
clip_file("clip_l.safetensors", 768, 12, 12)
clip_file("clip_g.safetensors", 1280, 32, 20)
llama_file("llama.safetensors")
print("files written to", te)

# our package, loaded the way ComfyUI loads a custom node
name = str(REPO).replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, str(REPO / "__init__.py"))
pkg = importlib.util.module_from_spec(spec)
sys.modules[name] = pkg
spec.loader.exec_module(pkg)
print("t5core from", sys.modules["t5core"].__file__)
from t5core.__main__ import main as t5core_cli  # noqa: E402  (the checkout's, loaded above)
print("V1 mappings:", getattr(pkg, "NODE_CLASS_MAPPINGS", None) is not None, "V3:", hasattr(pkg, "comfy_entrypoint"))
ext = asyncio.run(pkg.comfy_entrypoint())
ours = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
for n in ours.values():
    info = n.GET_NODE_INFO_V1()  # what /object_info sends
    print(" ", info["name"], "|", info["display_name"], "|", info["output"], list(info["input"]["required"]),
          list(info["input"].get("optional", {})))
families = ours["T5CoreEncoderToCLIP"].GET_NODE_INFO_V1()["input"]["required"]["family"][1]["options"]
print("families offered:", families)

small = {"t5xxl_model_config": SMALL, "umt5xxl_model_config": {**SMALL, "vocab_size": UMT5_VOCAB},
         "llama_model_config": LLAMA, "dtype": torch.float32}
FILES = {"cosmos": "t5_v10.safetensors", "wan": "umt5.safetensors"}
P = lambda *f: [str(te / x) for x in f]  # noqa: E731
TEXTS = ["a (red:1.3) fox in the snow, ((detailed))", "", "a photo of a cat " * 70]
encoders = {}


def our_encoder(file):
    if file not in encoders:
        enc = ours["T5CoreLoadEncoder"].execute(model_name=file, weight_dtype="fp32", attention="auto",
                                                compile=False, device="default")
        encoders[file] = enc.args[0]
    return encoders[file]


def our_clip(family, clip=None):
    enc = our_encoder(FILES.get(family, "t5_v11.safetensors"))
    clip_arg = {"clip": clip} if clip else {}
    return ours["T5CoreEncoderToCLIP"].execute(t5_encoder=enc, family=family, **clip_arg).args[0]


def llama_text(text):
    """The text with Llama 3 special tokens around it, which a checkout without llama_tokenizer/tokenizer.json still
    tokenizes (each to its own id, unlike words): the Llama's input then differs from text to text."""
    return f"<|start_header_id|>user<|end_header_id|> {text} <|reserved_special_token_{len(text) % 200}|><|eot_id|>"


def text_encode(clip, text, family, node=None):
    if node == "CLIPTextEncodeHiDream":  # one text per encoder: each field reaches its own
        from comfy_extras.nodes_hidream import CLIPTextEncodeHiDream

        other = TEXTS[(TEXTS.index(text) + 1) % len(TEXTS)]
        return CLIPTextEncodeHiDream.execute(clip, clip_l=text, clip_g=other, t5xxl=text,
                                             llama=llama_text(other)).args[0]
    if family == "flux":
        from comfy_extras.nodes_flux import CLIPTextEncodeFlux

        return CLIPTextEncodeFlux.execute(clip, text, text, 3.5).args[0]
    return comfy_nodes.CLIPTextEncode().encode(clip, text)[0]


worst = 0.0


def compare(tag, mine, ref):
    global worst
    (a, da), (b, db) = mine[0], ref[0]
    errs = [(a.double() - b.double()).abs().max().item() if a.shape == b.shape else float("inf")]
    for k in db:
        if torch.is_tensor(db[k]):
            errs.append((da[k].double() - db[k].double()).abs().max().item() if da[k].shape == db[k].shape
                        else float("inf"))
        elif da.get(k) != db[k]:
            errs.append(float("inf"))
    ok = sorted(da) == sorted(db) and max(errs) <= 1e-5
    worst = max(worst, max(errs))
    llama = f" llama3 {tuple(db['conditioning_llama3'].shape)}" if "conditioning_llama3" in db else ""
    print(f"{'OK  ' if ok else 'FAIL'} {tag:34s} cond {tuple(a.shape)}{llama} keys {sorted(db)} "
          f"max |diff| {max(errs):.2e}")
    return ok


results = []
clip_l = comfy.sd.load_clip(P("clip_l.safetensors"), clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options=small)
# CLIP inputs of several GB are loaded when their case comes (a function) and freed after it
clip_lg = lambda: comfy.sd.load_clip(P("clip_l.safetensors", "clip_g.safetensors"),  # noqa: E731
                                     clip_type=comfy.sd.CLIPType.SD3, model_options=small)
clip_lg_sdxl = lambda: comfy.sd.load_clip(P("clip_l.safetensors", "clip_g.safetensors"),  # noqa: E731
                                          clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options=small)
quad = P("clip_l.safetensors", "clip_g.safetensors", "t5_v11.safetensors", "llama.safetensors")
clip_lgtl = lambda: comfy.sd.load_clip(quad, model_options=small)  # noqa: E731  (QuadrupleCLIPLoader: no type)
llama = comfy.sd.load_clip(P("llama.safetensors"), clip_type=comfy.sd.CLIPType.HIDREAM, model_options=small)
for what, text in [("text 0", TEXTS[0]), ("CLIPTextEncodeHiDream's llama for text 0", llama_text(TEXTS[1])),
                   ("CLIPTextEncodeHiDream's llama for text 1", llama_text(TEXTS[2]))]:
    tok = llama.tokenize(text)["llama"][0]
    print(f"ComfyUI's Llama tokens for {what}: {len(tok)}, first {[t for t, w in tok[:7]]}")
if not (Path(comfy.sd.__file__).parent / "text_encoders/llama_tokenizer/tokenizer.json").exists():
    print("  (this checkout lacks llama_tokenizer/tokenizer.json, a file of 9 MB: transformers builds a tokenizer of "
          "the special tokens alone, so words reach the Llama as nothing and only the special tokens differ)")
for family in families:
    ctype = getattr(comfy.sd.CLIPType, family.upper())
    file = FILES.get(family, "t5_v11.safetensors")
    cases = {"": (P(file), None)}  # ComfyUI's own: CLIPLoader(file, type) / Dual / TripleCLIPLoader
    # CLIP inputs from any loader type: the family's own options (layer, pooling) run on their weights
    if family == "flux":
        cases = {"+clip_l": (P("clip_l.safetensors", file), clip_l),
                 "+clip_l of an sdxl DualCLIPLoader": (P("clip_l.safetensors", file), clip_lg_sdxl)}
    elif family == "sd3":
        cases["+clip_l+clip_g"] = (P("clip_l.safetensors", "clip_g.safetensors", file), clip_lg)
        cases["+clip_l of a CLIPLoader"] = (P("clip_l.safetensors", file), clip_l)
    elif family == "hidream":  # ComfyUI's own: QuadrupleCLIPLoader / DualCLIPLoader(t5xxl, llama, hidream)
        cases["+clip_l+clip_g+llama"] = (quad, clip_lgtl)
        cases["+llama"] = (P(file, "llama.safetensors"), llama)
    for label, (paths, parts) in cases.items():
        try:
            ref_clip = comfy.sd.load_clip(paths, clip_type=ctype, model_options=small)
        except (OSError, ValueError) as e:  # e.g. a checkout without a tokenizer file (files of 4 MB and more)
            print(f"FAIL {family}{label}: ComfyUI's own encoder cannot be built here: {type(e).__name__}: {e}")
            results.append(False)  # a family not compared is not a pass
            continue
        parts = parts() if callable(parts) else parts
        if family == "hidream" and parts:
            print(f"{family}{label}: the CLIP input holds",
                  [n for n in ("clip_l", "clip_g", "t5xxl", "llama") if getattr(parts.cond_stage_model, n)])
        mine_clip = our_clip(family, parts)
        t5 = getattr(mine_clip.cond_stage_model, "umt5xxl" if family == "wan" else "t5xxl")
        own = [n for n, p in t5.named_parameters() if not p.is_meta and n != "logit_scale"]  # SDClipModel's scalar
        assert not own, f"{family}: ComfyUI allocated T5 weights: {own[:3]}"
        for i, text in enumerate(TEXTS):
            results.append(compare(f"{family}{label} text {i}", text_encode(mine_clip, text, family),
                                   text_encode(ref_clip, text, family)))
            if family == "hidream":
                results.append(compare(f"{family}{label} HiDream node text {i}",
                                       text_encode(mine_clip, text, family, "CLIPTextEncodeHiDream"),
                                       text_encode(ref_clip, text, family, "CLIPTextEncodeHiDream")))
        del ref_clip, mine_clip, parts
        mm.unload_all_models()  # ComfyUI's list of loaded models holds the CLIPs encoded so far
        gc.collect()

# Encode Prompt now runs the same ComfyUI code: Flux with guidance 3.5, and a Flux CLIP clone (CLIPSetLastLayer)
ref_clip = comfy.sd.load_clip(P("clip_l.safetensors", "t5_v11.safetensors"), clip_type=comfy.sd.CLIPType.FLUX,
                              model_options=small)
out = ours["T5CoreEncodePrompt"].execute(t5_encoder=our_encoder("t5_v11.safetensors"), text=TEXTS[0],
                                         family="Flux", guidance=3.5, clip=clip_l)
print("Encode Prompt ui:", out.ui)
results.append(compare("Encode Prompt Flux", out.args[0], text_encode(ref_clip, TEXTS[0], "flux")))
set_last = comfy_nodes.CLIPSetLastLayer()
for layer in (-1, -2):
    mine = text_encode(set_last.set_last_layer(our_clip("flux", clip_l), layer)[0], TEXTS[0], "flux")
    results.append(compare(f"flux CLIPSetLastLayer {layer}", mine,
                           text_encode(set_last.set_last_layer(ref_clip, layer)[0], TEXTS[0], "flux")))

# memory: the CLIP's patcher is the T5Encoder's; unloading moves the weights off (to the CPU under --cpu) and the
# next encode loads them again
enc = our_encoder("t5_v11.safetensors")
c = our_clip("flux", clip_l)
print("CLIP patcher is the T5Encoder's:", c.patcher is enc.patcher(), "| part patchers:", len(c.part_patchers),
      "| loaded:", [type(m.model.model).__name__ for m in mm.current_loaded_models])
mm.unload_all_models()
print("after unload_all_models: loaded", [type(m.model.model).__name__ for m in mm.current_loaded_models])
text_encode(c, "again", "flux")
print("after encoding again: loaded", [type(m.model.model).__name__ for m in mm.current_loaded_models])

# partial loading, by ComfyUI's own ModelPatcher: load with a budget smaller than the model (what load_models_gpu
# computes under --lowvram / --novram or on a full GPU; on the CPU it always loads whole, so the budget is passed here),
# partially unload, load the rest. Modules left behind get comfy_cast_weights and stream their weights; ComfyUI's
# flux conditioning (its encode_token_weights, which does not load) must equal the whole model's within 1e-6.
def flux_conditioning(clip, text):
    return clip.cond_stage_model.encode_token_weights(clip.tokenize(text))[0]


def streamed_modules(model):
    return sum(1 for m in model.modules() if getattr(m, "comfy_cast_weights", False))


def streamed_matches(tag, clip, whole, budget) -> bool:
    """ComfyUI's partial load of the CLIP's patcher with `budget` bytes: the modules left behind stream (patching
    their weights per call, ComfyUI's LowVramPatch); the Flux conditioning must be `whole`'s within 1e-6."""
    clip.patcher.detach()
    clip.patcher.load(torch.device("cpu"), lowvram_model_memory=budget)
    streamed = streamed_modules(clip.patcher.model)
    diff = (flux_conditioning(clip, TEXTS[0]).double() - whole.double()).abs().max().item()
    ok = diff <= 1e-6 and streamed > 0
    print(f"{'OK  ' if ok else 'FAIL'} {tag}, partially loaded ({streamed} modules streamed): max |diff| {diff:.1e} "
          f"from the whole model")
    return ok


def partial_load_check(tag, encoder):
    clip = ours["T5CoreEncoderToCLIP"].execute(t5_encoder=encoder, family="flux", clip=clip_l).args[0]
    patcher, runtime = encoder.patcher(), encoder.runtime()
    mm.load_models_gpu([patcher])  # whole
    whole = flux_conditioning(clip, TEXTS[0])
    size, cpu = patcher.model_size(), torch.device("cpu")
    ok = patcher.model.model_lowvram is False and streamed_modules(patcher.model) == 0
    steps = [("partially_unload 60%", lambda: patcher.partially_unload(cpu, int(0.6 * size))),
             ("detach, load 30%", lambda: (patcher.detach(), patcher.load(cpu, lowvram_model_memory=int(0.3 * size)))),
             ("detach, load 0.1 B (--novram)", lambda: (patcher.detach(), patcher.load(cpu, lowvram_model_memory=0.1))),
             ("partially_load the rest", lambda: patcher.partially_load(cpu, extra_memory=1e32))]
    worst_step = 0.0
    for what, step in steps:
        step()
        lowvram = patcher.model.model_lowvram
        streamed = streamed_modules(patcher.model)
        cond = flux_conditioning(clip, TEXTS[0])
        diff = (cond.double() - whole.double()).abs().max().item()
        worst_step = max(worst_step, diff)
        eager = runtime.stream_to is not None
        ok &= diff <= 1e-6 and (lowvram == (streamed > 0) == eager) and (lowvram != (what == steps[-1][0]))
        print(f"  {tag:22s} {what:30s} lowvram {lowvram!s:5s} streamed modules {streamed:3d} loaded "
              f"{patcher.loaded_size() / 2**20:7.1f} of {size / 2**20:7.1f} MiB, eager {eager!s:5s} "
              f"max |diff| {diff:.1e}")
    mm.unload_all_models()
    ok &= patcher.loaded_size() == 0 and streamed_modules(patcher.model) == 0
    print(f"{'OK  ' if ok else 'FAIL'} partial loading {tag}: max |diff| {worst_step:.1e}")
    return ok


# LoRAs, in the key names of kohya (CLIP-L) and OneTrainer (Flux's T5: lora_te2_), rank 4: one for CLIP-L's q, one
# for every T5 projection (q, k, v and wi_0 / wi_1 are rows of t5core's fused qkv and ff_in weights)
torch.manual_seed(0)
lora_l = {f"lora_te1_text_model_encoder_layers_{i}_self_attn_q_proj.lora_{ud}.weight": torch.randn(*shape) * 0.5
          for i in range(12) for ud, shape in (("up", (768, 4)), ("down", (4, 768)))}
INNER, FF = SMALL["num_heads"] * SMALL["d_kv"], SMALL["d_ff"]
T5_PROJ = {**{f"0_SelfAttention_{p}": (INNER, 4096) for p in "qkv"}, "0_SelfAttention_o": (4096, INNER),
           **{f"1_DenseReluDense_{p}": (FF, 4096) for p in ("wi_0", "wi_1")}, "1_DenseReluDense_wo": (4096, FF)}
lora_t5 = {f"lora_te2_encoder_block_{i}_layer_{p}.lora_{ud}.weight": torch.randn(*shape) * 0.02
           for i in range(24) for p, (out_f, in_f) in T5_PROJ.items()
           for ud, shape in (("up", (out_f, 4)), ("down", (4, in_f)))}


def with_lora(clip, lora, strength=1.0):
    """ComfyUI's LoraLoader on a CLIP (no diffusion model): a patched clone."""
    return comfy.sd.load_lora_for_models(None, clip, lora, 0, strength)[1]


# a float16 file on the CPU: weight_dtype auto keeps the projections' float16 weights and casts them to float32 in
# each layer, as ComfyUI's CLIPLoader does on the CPU (its own dtype choice: no "dtype" option): the same conditioning
save_file({k: v.half() for k, v in load_file(te / "t5_v11.safetensors").items()}, te / "t5_v11_fp16.safetensors")
auto16 = ours["T5CoreLoadEncoder"].execute(model_name="t5_v11_fp16.safetensors", weight_dtype="auto", attention="auto",
                                           compile=False, device="default").args[0]
print("Load node, float16 file, auto:", auto16.describe())
results.append(auto16.plan.weight_dtype == "float16")
own_dtype = {k: v for k, v in small.items() if k != "dtype"}  # CLIP-L too in ComfyUI's CPU dtype, for both
ref16 = comfy.sd.load_clip(P("clip_l.safetensors", "t5_v11_fp16.safetensors"), clip_type=comfy.sd.CLIPType.FLUX,
                           model_options=own_dtype)
clip_l16 = comfy.sd.load_clip(P("clip_l.safetensors"), clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                              model_options=own_dtype)
mine16 = ours["T5CoreEncoderToCLIP"].execute(t5_encoder=auto16, family="flux", clip=clip_l16).args[0]
results.append(compare("flux, float16 file, auto", text_encode(mine16, TEXTS[0], "flux"),
                       text_encode(ref16, TEXTS[0], "flux")))
# a T5 LoRA on float16 weights: ComfyUI rounds the patched weights to float16; so does t5core's set_weight. An OFT
# (a rotation of each weight's rows, computed from the weight) too, and partially loaded the streamed modules patch
# their copies in float32 (as ComfyUI's cast_bias_weight does; in float16 ComfyUI's OFT code fails and patches nothing)
oft_t5 = {f"lora_te2_encoder_block_{i}_layer_0_SelfAttention_q.oft_blocks":
          torch.randn(4, INNER // 4, INNER // 4) * 0.05 for i in range(24)}
for tag, lora in [("T5 LoRA", lora_t5), ("T5 OFT", oft_t5)]:
    patched, ref_patched = with_lora(mine16, lora), text_encode(with_lora(ref16, lora), TEXTS[0], "flux")
    results.append(compare(f"flux, float16 file, auto, + {tag}", text_encode(patched, TEXTS[0], "flux"), ref_patched))
    change = (ref_patched[0][0] - text_encode(ref16, TEXTS[0], "flux")[0][0]).abs().max().item()
    print(f"  (the {tag} moves ComfyUI's conditioning by {change:.2f})")
    results.append(change > 0.01)
    results.append(streamed_matches(f"  {tag}", patched, flux_conditioning(patched, TEXTS[0]), 0.1))  # --novram
    mm.unload_all_models()
del ref16, mine16, clip_l16
mm.unload_all_models()

plain = our_encoder("t5_v11.safetensors")
fp8 = ours["T5CoreLoadEncoder"].execute(model_name="t5_v11.safetensors", weight_dtype="fp8_e4m3fn",
                                        attention="auto", compile=False, device="default").args[0]
gguf_q8 = ours["T5CoreLoadEncoder"].execute(model_name="t5_v11-Q8_0.gguf", weight_dtype="fp32", attention="auto",
                                            compile=False, device="default").args[0]
fused = ours["T5CoreFuseNorms"].execute(t5_encoder=plain).args[0]
half = ours["T5CoreFP16Scale"].execute(t5_encoder=fused, mode="custom", custom_scales="1,1,1,1,1,1,1/2" + ",1" * 17)
for tag, encoder in [("fp32", plain), ("fp8 weights", fp8), ("GGUF Q8_0 blocks", gguf_q8), ("fused norms", fused),
                     ("fp16, scales", half.args[0]), ("float16 weights, float32", auto16)]:
    results.append(partial_load_check(tag, encoder))

# LoRA loaders: a LoRA for CLIP-L changes ours as it changes ComfyUI's own encoder (its patches go to the CLIP
# input's patcher, cloned), and so does one for the T5 (ComfyUI's patcher applies it to t5core's weights, taken as
# ComfyUI's own T5 holds them); weight hooks, merging from ours and saving ours are errors
def moved(a, b):
    """How far a LoRA moved the conditioning: max |diff| of the conditioning tensors."""
    return (a[0][0].double() - b[0][0].double()).abs().max().item()


base, ref_base = text_encode(our_clip("flux", clip_l), TEXTS[0], "flux"), text_encode(ref_clip, TEXTS[0], "flux")
for tag, lora in [("CLIP-L LoRA", lora_l), ("T5 LoRA", lora_t5), ("CLIP-L + T5 LoRA", {**lora_l, **lora_t5})]:
    mine, ref = (text_encode(with_lora(c, lora), TEXTS[0], "flux") for c in (our_clip("flux", clip_l), ref_clip))
    results.append(compare(f"flux + {tag}", mine, ref))
    pooled = (ref[0][1]["pooled_output"] - ref_base[0][1]["pooled_output"]).abs().max().item()
    change = max(moved(ref, ref_base), pooled)
    print(f"  (the {tag} moves ComfyUI's conditioning by {change:.2f})")
    results.append(change > 0.1)
t5_ref = text_encode(with_lora(ref_clip, lora_t5), TEXTS[0], "flux")
mm.unload_all_models()  # unpatched: the weights are the file's again
results.append(compare("flux after the LoRA is unloaded", text_encode(our_clip("flux", clip_l), TEXTS[0], "flux"),
                       ref_base))
# partially loaded, the modules left behind apply the LoRA as they stream (ComfyUI's LowVramPatch per call)
patched = with_lora(our_clip("flux", clip_l), lora_t5)
mm.load_models_gpu([patched.patcher])
whole_lora = flux_conditioning(patched, TEXTS[0])
for budget in (int(0.3 * patched.patcher.model_size()), 0.1):  # 30% of the model; nothing (--novram)
    results.append(streamed_matches("T5 LoRA", patched, whole_lora, budget))
mm.unload_all_models()
# fp8 weights: a file in ComfyUI's scaled fp8 convention (e4m3, one scale per tensor), as t5core's convert writes
# it, loaded by ComfyUI's CLIPLoader and by ours (its rows' scales are the tensor's): the same conditioning; with the
# T5 LoRA both round the patched weights to fp8 again (stochastically, their scales kept), and ours must be as close
# to ComfyUI's float32 CLIP with the LoRA as ComfyUI's own fp8 CLIP is
t5core_cli(["convert", str(te / "t5_v11.safetensors"), str(te / "t5_v11_fp8_scaled.safetensors"),
            "--weight-dtype", "fp8_e4m3fn"])
comfy_fp8 = comfy.sd.load_clip(P("clip_l.safetensors", "t5_v11_fp8_scaled.safetensors"),
                               clip_type=comfy.sd.CLIPType.FLUX, model_options=small)
ours_fp8 = ours["T5CoreEncoderToCLIP"].execute(t5_encoder=ours["T5CoreLoadEncoder"].execute(
    model_name="t5_v11_fp8_scaled.safetensors", weight_dtype="auto", attention="auto", compile=False,
    device="default").args[0], family="flux", clip=clip_l).args[0]
results.append(compare("flux, scaled fp8 file", text_encode(ours_fp8, TEXTS[0], "flux"),
                       text_encode(comfy_fp8, TEXTS[0], "flux")))
comfy_err = moved(text_encode(with_lora(comfy_fp8, lora_t5), TEXTS[0], "flux"), t5_ref)
mm.unload_all_models()
ours_err = moved(text_encode(with_lora(ours_fp8, lora_t5), TEXTS[0], "flux"), t5_ref)
ok = ours_err <= 1.25 * comfy_err < moved(t5_ref, ref_base)
print(f"{'OK  ' if ok else 'FAIL'} scaled fp8 file + T5 LoRA: max |diff| from ComfyUI's float32 CLIP with the LoRA "
      f"{ours_err:.3f}, ComfyUI's own fp8 CLIP's {comfy_err:.3f} (the LoRA moves the float32 one by "
      f"{moved(t5_ref, ref_base):.3f})")
results.append(ok)
del comfy_fp8, ours_fp8
mm.unload_all_models()
# a LoRA loader given a diffusion model hands the CLIP every patch, the model's too: the CLIP applies its own only
# strength_clip 0 (how a LoRA loader says "not the text encoder") with T5 weights in the LoRA: no error, no change,
# even where the T5 could take no patches (GGUF blocks, fused norms)
for tag, encoder in [("fp32", plain), ("GGUF Q8_0 blocks", gguf_q8), ("fused norms", fused)]:
    clip = ours["T5CoreEncoderToCLIP"].execute(t5_encoder=encoder, family="flux", clip=clip_l).args[0]
    results.append(compare(f"flux + LoRA with T5 weights, strength 0, {tag}",
                           text_encode(with_lora(clip, {**lora_l, **lora_t5}, 0.0), TEXTS[0], "flux"),
                           text_encode(clip, TEXTS[0], "flux") if tag != "fp32" else ref_base))
with_model = {"diffusion_model.input_blocks.0.weight": ("diff", (torch.zeros(1),)),
              **comfy.lora.load_lora(lora_l, comfy.lora.model_lora_keys_clip(ref_clip.cond_stage_model, {}))}
applied = our_clip("flux", clip_l).add_patches(with_model)
print(f"  a CLIP-L LoRA beside a diffusion model's patches: {len(applied)} of {len(with_model)} applied")
results.append(len(applied) == len(with_model) - 1)
mm.unload_all_models()


def expect_error(what, call) -> bool:
    """call() must raise a ValueError (printed: what it says)."""
    try:
        call()
    except ValueError as e:
        print(f"OK   error ({what}): {e}")
        return True
    print("FAIL no error for", what)
    return False


def clip_save(clip):
    from comfy_extras.nodes_model_merging import CLIPSave

    return CLIPSave().save(clip, "clip/t5core_check")


def clip_hooks(clip):
    from comfy_extras.nodes_hooks import SetClipHooks

    return SetClipHooks().apply_hooks(clip, False, True, comfy.hooks.create_hook_lora(lora_l, 1.0, 1.0))


def clip_merge(clip1, clip2):
    from comfy_extras.nodes_model_merging import CLIPMergeSimple

    return CLIPMergeSimple().merge(clip1, clip2, 0.5)


folder_paths.set_output_directory(tempfile.mkdtemp(prefix="t5core_check_out_"))
norm_lora = {**lora_t5, "lora_te2_encoder_block_0_layer_1_layer_norm.diff": torch.randn(4096) * 0.01}
for what, call in [("a LoRA with a T5 norm weight", lambda: with_lora(our_clip("flux", clip_l), norm_lora)),
                   ("a T5 LoRA on GGUF blocks", lambda: with_lora(ours["T5CoreEncoderToCLIP"].execute(
                        t5_encoder=gguf_q8, family="flux", clip=clip_l).args[0], lora_t5)),
                   ("a T5 LoRA on fused norms", lambda: with_lora(ours["T5CoreEncoderToCLIP"].execute(
                        t5_encoder=fused, family="flux", clip=clip_l).args[0], lora_t5)),
                   ("a hook LoRA (SetClipHooks)", lambda: clip_hooks(our_clip("flux", clip_l))),
                   ("CLIPSave", lambda: clip_save(our_clip("flux", clip_l))),
                   ("CLIPMergeSimple from ours", lambda: clip_merge(ref_clip, our_clip("flux", clip_l))),
                   ("CLIPMergeSimple into ours", lambda: clip_merge(our_clip("flux", clip_l), ref_clip))]:
    results.append(expect_error(what, call))

# bad input: each error names both sides
clip_g = comfy.sd.load_clip(P("clip_g.safetensors"), clip_type=comfy.sd.CLIPType.SD3, model_options=small)
for what, call in [("wan with a T5 v1.1 file", lambda: ours["T5CoreEncoderToCLIP"].execute(
                        t5_encoder=our_encoder("t5_v11.safetensors"), family="wan")),
                   ("sd3 with a UMT5 file", lambda: ours["T5CoreEncoderToCLIP"].execute(
                        t5_encoder=our_encoder("umt5.safetensors"), family="sd3")),
                   ("flux with a CLIP-G only CLIP", lambda: our_clip("flux", clip_g))]:
    results.append(expect_error(what, call))

print(f"{sum(results)}/{len(results)} checks passed (largest conditioning difference {worst:.2e})")
sys.exit(0 if all(results) else 1)
