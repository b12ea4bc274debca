"""ComfyUI entry point of t5core: this folder, cloned into ComfyUI/custom_nodes/, is the custom-node package.

ComfyUI imports this file as a package named after the folder. The t5core library beside it becomes importable as
plain `t5core` (the folder is appended to sys.path: ComfyUI's own modules, its `nodes` among them, stay first; an
installed t5core, if any, is used instead). Where ComfyUI has the V3 node API (comfy_api.latest) the nodes register
through comfy_entrypoint(); older ComfyUI gets the same nodes as classic NODE_CLASS_MAPPINGS. Only one of the two
is exported, because ComfyUI ignores the V3 entry point when V1 mappings exist.
"""
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from .nodes import NODE_CLASS_MAPPINGS as _V1_NODES, NODE_DISPLAY_NAME_MAPPINGS as _V1_NAMES  # noqa: E402

WEB_DIRECTORY = "./web"

try:
    # ComfyExtension arrived in the same ComfyUI commit as the loader's comfy_entrypoint support
    from comfy_api.latest import ComfyExtension as _ComfyExtension  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS = _V1_NODES
    NODE_DISPLAY_NAME_MAPPINGS = _V1_NAMES
else:
    from .nodes.v3 import comfy_entrypoint  # noqa: F401  (what ComfyUI looks for)
