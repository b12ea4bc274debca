"""ComfyUI nodes for t5core. The package folder's __init__.py registers them (V3 where available, else V1)."""
from .nodes import NODE_CLASSES, NODE_DISPLAY_NAME_MAPPINGS

NODE_CLASS_MAPPINGS = dict(NODE_CLASSES)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
