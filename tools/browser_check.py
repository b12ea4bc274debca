"""The web/ extension in ComfyUI's real frontend, in headless Chromium: a screenshot of the T5 (fast) nodes.

What it does: a temporary ComfyUI base directory (--base-directory: the ComfyUI checkout itself is never written)
with this repository symlinked as custom_nodes/t5core and a tiny random T5 (tests/tiny_models.py, ComfyUI-style
keys) as models/text_encoders/t5_tiny.safetensors; a ComfyUI server on the CPU; headless Chromium driven by
playwright-core (npm, installed into --node-dir at run time) opens the frontend, builds
Load T5 Encoder (fast) -> T5 Encode Prompt (fast) with a prompt longer than Flux's 512 trained tokens, and a
T5 Encoder to CLIP (fast) node, waits until the Encode node's drawn line has the extension's token count and
warning, checks the family choice, and saves a screenshot. The server is stopped at the end.

Needs: a ComfyUI checkout; a Python with torch and transformers; ComfyUI's other requirements (requirements.txt,
without torch/torchvision/numpy) installed with `pip install --target SITE`; Debian's chromium
(`apt-get install chromium`); node and npm. Where torchvision does not import with that torch (a CPU torch
and no CPU torchvision wheel), a stand-in torchvision package is put first on the server's PYTHONPATH: ComfyUI
imports it in a few model modules at start-up, and nothing this check runs uses it.

Run (from the repository root):
    /work/main/.venv/bin/python tools/browser_check.py --comfyui /tmp/comfyui --site /tmp/comfy_site \
        --out benchmarks/2026-12-04_comfyui_frontend.png
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LONG_PROMPT = ", ".join(
    ["a red fox sitting in a snowy birch forest at dawn with soft golden light falling through the trees"] * 40
)

DRIVER = r"""
import { chromium } from "playwright-core";
const [url, out, prompt] = process.argv.slice(2);
// a new, empty profile (--user-data-dir) each run
const browser = await chromium.launchPersistentContext(process.env.CHROME_PROFILE, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1100, height: 500 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = browser.pages()[0] || await browser.newPage();
page.on("console", (m) => { if (/t5core|error/i.test(m.text())) console.log("console:", m.text()); });
await page.goto(url, { waitUntil: "domcontentloaded", timeout: 120000 });
await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.T5CoreEncodePrompt,
                           null, { timeout: 120000 });
await page.waitForTimeout(3000); // dialogs, templates, the default workflow
await page.keyboard.press("Escape");
const result = await page.evaluate(async (prompt) => {
  const app = window.app, LG = window.LiteGraph;
  app.graph.clear();
  const add = (type, pos, size) => {
    const node = LG.createNode(type);
    node.pos = pos;
    app.graph.add(node);
    if (size) node.setSize(size);
    return node;
  };
  try { await app.extensionManager?.setting?.set("Comfy.Minimap.Visible", false); } catch (e) { /* older frontend */ }
  const load = add("T5CoreLoadEncoder", [20, 60]);
  const enc = add("T5CoreEncodePrompt", [350, 60], [660, 330]);
  const clip = add("T5CoreEncoderToCLIP", [20, 320]);
  load.connect(0, enc, 0);
  load.connect(0, clip, 0);
  const text = enc.widgets.find((w) => w.name === "text");
  text.value = prompt;
  text.callback?.(prompt);
  const family = clip.widgets.find((w) => w.name === "family");
  family.value = "flux";
  family.callback?.("flux");
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  app.graph.setDirtyCanvas(true, true);
  return { info: enc.t5coreInfo?.value, warn: enc.t5coreInfo?.warn, familyValues: family.options?.values,
           clipWidgets: clip.widgets.map((w) => w.name), encodeWidgets: enc.widgets.map((w) => w.name) };
}, prompt);
console.log("RESULT " + JSON.stringify(result));
await page.waitForTimeout(1500);
await page.screenshot({ path: out });
await browser.close();
if (!result.info || !result.info.includes("⚠") || !result.familyValues?.includes("flux")) process.exit(3);
"""


def make_base(base: Path) -> None:
    """custom_nodes/t5core -> this repository; models/text_encoders/t5_tiny.safetensors (random, ComfyUI keys)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from safetensors.torch import save_file
    from tiny_models import make_hf_encoder

    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "t5core").symlink_to(ROOT)
    te = base / "models" / "text_encoders"
    te.mkdir(parents=True)
    model = make_hf_encoder(d_model=64, num_heads=4, d_kv=16, d_ff=96, num_layers=3)
    prefix = "text_encoders.t5xxl.transformer."
    save_file({prefix + k: v.clone().contiguous() for k, v in model.state_dict().items()}, te / "t5_tiny.safetensors")


TORCHVISION_STUB = """# Stand-in for torchvision, which some ComfyUI model modules import at load time; none is used here.
def __getattr__(name):
    raise AttributeError(f"torchvision stub (tools/browser_check.py): {name} is not available")
"""


def torchvision_stub(folder: Path) -> str:
    """A folder with a stand-in torchvision package (and torchvision.transforms), for a Python whose torch has
    no matching torchvision (a CPU torch with no CPU torchvision wheel at hand)."""
    for sub in ("torchvision", "torchvision/transforms"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "__init__.py").write_text(TORCHVISION_STUB)
    (folder / "torchvision" / "__init__.py").write_text(TORCHVISION_STUB.replace("def __getattr__",
                                                        "from . import transforms  # noqa: F401\n\n\ndef __getattr__"))
    return str(folder)


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ComfyUI exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"ComfyUI did not answer {url} in {seconds}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfyui", default="/tmp/comfyui", help="ComfyUI checkout (only read)")
    ap.add_argument("--site", default="/tmp/comfy_site", help="pip --target folder with ComfyUI's requirements")
    ap.add_argument("--node-dir", default="/tmp/t5core_playwright", help="where playwright-core is npm-installed")
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "2026-12-04_comfyui_frontend.png"))
    args = ap.parse_args()

    node_dir = Path(args.node_dir)
    if not (node_dir / "node_modules" / "playwright-core").exists():
        node_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "i", "--silent", "--no-audit", "--no-fund", "playwright-core"], cwd=node_dir, check=True)
    (node_dir / "driver.mjs").write_text(DRIVER)

    tmp = Path(tempfile.mkdtemp(prefix="t5core_browser_"))
    base = tmp / "base"
    make_base(base)
    paths = [args.site, os.environ.get("PYTHONPATH", "")]
    probe = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True, check=False,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)))
    if probe.returncode != 0:
        print("torchvision does not import with this torch: using a stand-in package (no ComfyUI node here needs it)")
        paths.insert(0, torchvision_stub(tmp / "stub"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    log = open(tmp / "comfyui.log", "w")  # noqa: SIM115  (closed in the finally below)
    server = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(args.port),
         "--base-directory", str(base), "--disable-auto-launch"],
        cwd=args.comfyui, env=env, stdout=log, stderr=subprocess.STDOUT)
    rc = 1
    try:
        url = f"http://127.0.0.1:{args.port}/"
        wait_for(url + "object_info/T5CoreEncodePrompt", server, 300)
        info = json.load(urllib.request.urlopen(url + "object_info/T5CoreEncoderToCLIP"))
        print("T5CoreEncoderToCLIP inputs:", list(info["T5CoreEncoderToCLIP"]["input"]["required"]))
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        denv = dict(os.environ, CHROME_PROFILE=str(tmp / "profile"))
        rc = subprocess.run(["node", "driver.mjs", url, str(out), LONG_PROMPT], cwd=node_dir, env=denv,
                            timeout=400, check=False).returncode
        print("screenshot:", out, "driver rc", rc)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        print("ComfyUI log:", tmp / "comfyui.log")
        if rc == 0:
            shutil.rmtree(tmp / "profile", ignore_errors=True)
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
