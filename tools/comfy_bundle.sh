#!/usr/bin/env bash
# Build .comfy/ (git-ignored, carried to the device machine by `run`'s carry): ComfyUI's source at the fetched
# snapshot, without tests, CI, docs or example scripts, plus wheels of what ComfyUI imports at server start that the
# device's Python lacks. The device has torch, transformers, safetensors, aiohttp, yarl, einops, pyyaml, pillow,
# scipy, psutil, tqdm, numpy, sentencepiece and tokenizers, and no network.
#
#   tools/comfy_bundle.sh      # .comfy/ComfyUI + .comfy/ComfyUI-GGUF + .comfy/wheels (cp312, the device's Python)
# (the snapshots from the `fetch` tool: github:Comfy-Org/ComfyUI and github:city96/ComfyUI-GGUF)
#
# Not bundled: comfyui-frontend-package (large; tools/comfyui_gpu_check.py passes --front-end-root with a
# one-page folder), workflow templates and embedded docs (optional at start); comfy_api_nodes/ (the check passes
# --disable-api-nodes); av (a 36 MB wheel: comfy_api imports it at start, but only video nodes use it, so the check
# puts a stand-in package on the path); alembic / SQLAlchemy (app.database logs a warning and runs without them);
# kornia / spandrel / pydantic-settings (only some comfy_extras nodes, which ComfyUI logs and skips, and the
# pyproject version check, which logs a warning).
set -euo pipefail
cd "$(dirname "$0")/.."
GIT_DIR=${COMFY_GIT_DIR:-$(find /work/.mirror/Comfy-Org+ComfyUI -maxdepth 2 -name HEAD -printf '%h\n' | head -1)}
PYVER=${PYVER:-3.12}
WHEELS=${WHEELS:-.comfy/wheels}
PY=${PY:-python3}
# What ComfyUI's start-up imports and the device lacks (found by starting the server on a Python with only the
# device's packages): torchsde and its dependency trampoline (comfy.k_diffusion.sampling). Both pure Python.
PACKAGES=${PACKAGES:-"torchsde==0.2.6 trampoline==0.1.2"}

if [ ! -d .comfy/ComfyUI ]; then
  mkdir -p .comfy/ComfyUI
  # a tree without what is not needed and without files whose blobs the snapshot lacks (its largest files may be
  # absent: the Llama tokenizer), built in a temporary index (write-tree needs no blob contents)
  index=$(mktemp); export GIT_INDEX_FILE=$index
  git --git-dir="$GIT_DIR" read-tree HEAD
  git --git-dir="$GIT_DIR" rm -r -q --cached --ignore-unmatch -- tests tests-unit .ci .github script_examples \
      comfy_api_nodes '*.md'
  git --git-dir="$GIT_DIR" ls-files -s | while read -r _ sha _ path; do
    git --git-dir="$GIT_DIR" cat-file -e "$sha" 2>/dev/null || git --git-dir="$GIT_DIR" rm -q --cached -- "$path"
  done
  git --git-dir="$GIT_DIR" archive --format=tar "$(git --git-dir="$GIT_DIR" write-tree)" | tar -x -C .comfy/ComfyUI
  rm -f "$index"; unset GIT_INDEX_FILE
  git --git-dir="$GIT_DIR" rev-parse HEAD > .comfy/ComfyUI/.commit
fi
# city96's ComfyUI-GGUF (benchmarks/gguf_gpu.py --comfyui-gguf: its own forward on the same GGUF file)
GGUF_GIT_DIR=${GGUF_GIT_DIR:-$(find /work/.mirror/city96+ComfyUI-GGUF -maxdepth 2 -name HEAD -printf '%h\n' | head -1)}
if [ ! -d .comfy/ComfyUI-GGUF ] && [ -n "$GGUF_GIT_DIR" ]; then
  mkdir -p .comfy/ComfyUI-GGUF
  git --git-dir="$GGUF_GIT_DIR" archive HEAD | tar -x -C .comfy/ComfyUI-GGUF
  git --git-dir="$GGUF_GIT_DIR" rev-parse HEAD > .comfy/ComfyUI-GGUF/.commit
fi
mkdir -p "$WHEELS"
for p in $PACKAGES; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$p"
done
du -sh .comfy/ComfyUI "$WHEELS"
