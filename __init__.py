"""ComfyUI entry point of t5core: this folder, cloned into ComfyUI/custom_nodes/, is the custom-node package.

ComfyUI imports this file as a package named after the folder. Where ComfyUI has the V3 node API
(comfy_api.latest) the nodes register through comfy_entrypoint(); older ComfyUI gets the same nodes as classic
NODE_CLASS_MAPPINGS. Only one of the two is exported, because ComfyUI ignores the V3 entry point when V1 mappings
exist. Without ComfyUI the package still imports (V1 classes exposed; they run only inside ComfyUI), and the t5core
library in this folder works on its own.
"""
import logging
import sys

from .nodes import NODE_CLASS_MAPPINGS as _V1_NODES, NODE_DISPLAY_NAME_MAPPINGS as _V1_NAMES
from .nodes.comfy_model import t5core as _import_t5core

WEB_DIRECTORY = "./web"
_log = logging.getLogger("t5core.nodes")

try:
    _import_t5core()
except ImportError as _e:
    _log.warning("t5core: %s. The T5 (fast) nodes are registered but fail until it is installed.", _e)

try:
    # ComfyExtension arrived in the same ComfyUI commit as the loader's comfy_entrypoint support
    from comfy_api.latest import ComfyExtension as _ComfyExtension  # noqa: F401
except ImportError:
    NODE_CLASS_MAPPINGS = _V1_NODES
    NODE_DISPLAY_NAME_MAPPINGS = _V1_NAMES
    if "comfy" not in sys.modules:  # ComfyUI imports comfy before it loads custom nodes
        _log.info("t5core: ComfyUI not found; the T5 (fast) node classes are exposed but run only inside ComfyUI")
else:
    from .nodes.v3 import comfy_entrypoint  # noqa: F401  (what ComfyUI looks for)
