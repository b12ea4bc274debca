"""Stand-in packages for what ComfyUI imports at start-up for video and image models, never for a text encoder:
`av`, and `torchvision` where it does not import (a machine without them, or a torchvision built for another
torch). Each is a folder of empty modules whose every attribute is an empty class (what `from av.container import
InputContainer` at ComfyUI's module level needs). Used by tools/check_against_comfyui.py, tools/comfyui_gpu_check.py
and benchmarks/gguf_gpu.py.
"""
import os
import subprocess
import sys
from pathlib import Path

STUB = '''# a stand-in written by tools/comfy_standins.py: ComfyUI imports this at start-up; no text encoder uses it
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})
'''
PACKAGES = {"av": ("av", "av/container", "av/subtitles", "av/subtitles/stream"),
            "torchvision": ("torchvision", "torchvision/transforms")}


def write_standins(folder: Path, pythonpath: list[str]) -> list[str]:
    """For each package of PACKAGES that does not import in this Python with `pythonpath`, write a stand-in under
    folder (which then goes first on the path). -> the packages written."""
    written = []
    for package, modules in PACKAGES.items():
        probe = subprocess.run([sys.executable, "-c", f"import {modules[-1].replace('/', '.')}"], capture_output=True,
                               check=False, env=dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath)))
        if probe.returncode == 0:
            continue
        for module in modules:
            (folder / module).mkdir(parents=True, exist_ok=True)
            (folder / module / "__init__.py").write_text(STUB)
        written.append(package)
    return written
