"""Check the nodes against REAL ComfyUI code (CPU): loading, ModelPatcher/load_models_gpu, and CONDITIONING equal to
ComfyUI's own Flux / SD3 encoders on the same random weights.

Not part of the test run (ComfyUI is not on PyPI). Usage, with a ComfyUI checkout and its requirements installed:
    COMFYUI_DIR=/path/to/ComfyUI python tools/check_against_comfyui.py
(COMFYUI_EXTRA_SITE may name a folder of extra packages ComfyUI needs.)"""
import sys, types, os, asyncio, importlib.util, tempfile, logging
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ["COMFYUI_DIR"])
if os.environ.get("COMFYUI_EXTRA_SITE"):
    sys.path.append(os.environ["COMFYUI_EXTRA_SITE"])
import transformers, transformers.models.clip, transformers.models.t5  # before the torchvision stub
tv = types.ModuleType("torchvision"); tv.transforms = types.ModuleType("torchvision.transforms")
sys.modules["torchvision"] = tv; sys.modules["torchvision.transforms"] = tv.transforms
sys.argv = ["main.py", "--cpu"] + sys.argv[1:]
import comfy.options; comfy.options.enable_args_parsing()
logging.basicConfig(level=logging.INFO)
import torch
import folder_paths, comfy.sd, comfy.model_management as mm
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

tmp = Path(tempfile.mkdtemp())
te = tmp / "text_encoders"; te.mkdir()
folder_paths.folder_names_and_paths["text_encoders"] = ([str(te)], folder_paths.supported_pt_extensions)
torch.manual_seed(0)
# T5 4096 wide (so SD3's layout holds), 2 layers; ComfyUI's T5-XXL config told num_layers=2
t5cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240 // 8, num_layers=2, feed_forward_proj="gated-gelu")
t5 = T5EncoderModel(t5cfg).eval()
with torch.no_grad():
    for n, p in t5.named_parameters():
        if "layer_norm" in n: p.copy_(1 + 0.2 * torch.randn_like(p))
        elif "shared" in n or "embed" in n or "relative" in n: p.normal_(0, 1)
        else: p.normal_(0, 0.5 / p.shape[1] ** 0.5)
save_file({k: v.clone().contiguous() for k, v in t5.state_dict().items()}, te / "t5_test.safetensors")

def clip_file(name, hidden, layers, heads, proj):
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers, num_attention_heads=heads, projection_dim=proj, hidden_act="gelu" if hidden == 1280 else "quick_gelu")
    m = CLIPTextModelWithProjection(cfg).eval()
    sd = {k: v.clone().contiguous() for k, v in m.state_dict().items()}
    save_file(sd, te / name)
clip_file("clip_l.safetensors", 768, 12, 12, 768)
clip_file("clip_g.safetensors", 1280, 32, 20, 1280)
print("files written")

# load our package the way ComfyUI does
name = str(REPO).replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, str(REPO / "__init__.py"))
pkg = importlib.util.module_from_spec(spec); sys.modules[name] = pkg; spec.loader.exec_module(pkg)
print("V1 mappings:", getattr(pkg, "NODE_CLASS_MAPPINGS", None) is not None, "V3:", hasattr(pkg, "comfy_entrypoint"))
ext = asyncio.run(pkg.comfy_entrypoint()); nodes = {n.GET_SCHEMA().node_id: n for n in asyncio.run(ext.get_node_list())}
for n in nodes.values():
    info = n.GET_NODE_INFO_V1()  # what /object_info sends
    print(info["name"], info["display_name"], info["category"], info["output"], list(info["input"]["required"]))
opts = {"t5xxl_model_config": {"num_layers": 2, "d_ff": 10240 // 8}, "dtype": torch.float32}
P = lambda *f: [str(te / x) for x in f]
text = "a (red:1.3) fox in the snow, ((detailed))"

def ours(family, clip):
    enc = nodes["T5CoreLoadEncoder"].execute(model_name="t5_test.safetensors", weight_dtype="fp32", attention="auto", compile=False, device="default")
    out = nodes["T5CoreEncodePrompt"].execute(t5_encoder=enc.args[0], text=text, family=family, guidance=3.5, **({"clip": clip} if clip else {}))
    print("ui:", enc.ui, out.ui)
    return out.args[0], enc.args[0]

def rel(a, b): return ((a.double() - b.double()).norm() / b.double().norm()).item()
def compare(tag, mine, ref):
    (a, da), (b, db) = mine[0], ref[0]
    print(tag, "keys", list(da), list(db), "shapes", tuple(a.shape), tuple(b.shape), "rel", rel(a, b) if a.shape == b.shape else None)
    for k in db:
        if torch.is_tensor(db[k]): print("  ", k, tuple(da[k].shape), tuple(db[k].shape), rel(da[k], db[k]) if db[k].abs().sum() else float(da[k].abs().sum()))
        else: print("  ", k, da.get(k), db[k])

# Flux: ComfyUI's own = DualCLIPLoader(clip_l, t5, flux) + CLIPTextEncodeFlux; ours = CLIPLoader(clip_l) + our nodes
ref_clip = comfy.sd.load_clip(P("clip_l.safetensors", "t5_test.safetensors"), clip_type=comfy.sd.CLIPType.FLUX, model_options=opts)
tokens = ref_clip.tokenize(text)
ref = ref_clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": 3.5})
clip_l = comfy.sd.load_clip(P("clip_l.safetensors"), clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION, model_options={"dtype": torch.float32})
mine, enc = ours("Flux", clip_l)
compare("FLUX", mine, ref)
print("loaded models:", [type(m.model).__name__ for m in mm.current_loaded_models])
# SD3: ComfyUI = TripleCLIP(l, g, t5) sd3; ours = DualCLIPLoader(l, g, sd3)
ref_clip = comfy.sd.load_clip(P("clip_l.safetensors", "clip_g.safetensors", "t5_test.safetensors"), clip_type=comfy.sd.CLIPType.SD3, model_options=opts)
ref = ref_clip.encode_from_tokens_scheduled(ref_clip.tokenize(text))
lg = comfy.sd.load_clip(P("clip_l.safetensors", "clip_g.safetensors"), clip_type=comfy.sd.CLIPType.SD3, model_options={"dtype": torch.float32})
mine, _ = ours("SD3", lg)
compare("SD3", mine, ref)
# SD3 with T5 only (CLIPLoader t5 sd3) vs ours without CLIP
import comfy.text_encoders.sd3_clip as sd3c, comfy.supported_models_base as smb, comfy.utils
target = smb.ClipTarget(sd3c.SD3Tokenizer, sd3c.sd3_clip(clip_l=False, clip_g=False, t5=True))
ref_clip = comfy.sd.CLIP(target, model_options=opts)
ref_clip.load_sd(comfy.utils.load_torch_file(P("t5_test.safetensors")[0]))
ref = ref_clip.encode_from_tokens_scheduled(ref_clip.tokenize(text))
mine, _ = ours("SD3", None)
compare("SD3-T5only", mine, ref)
# empty prompt, Flux
text = ""
ref_clip = comfy.sd.load_clip(P("clip_l.safetensors", "t5_test.safetensors"), clip_type=comfy.sd.CLIPType.FLUX, model_options=opts)
ref = ref_clip.encode_from_tokens_scheduled(ref_clip.tokenize(text), add_dict={"guidance": 3.5})
mine, _ = ours("Flux", clip_l)
compare("FLUX-empty", mine, ref)
# memory manager: unload everything, encode again
mm.unload_all_models()
print("after unload, device:", next(enc.patcher().model.parameters()).device)
