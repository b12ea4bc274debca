"""The same nodes for ComfyUI's V3 API (comfy_api.latest): each V1 class becomes an io.ComfyNode whose schema is
read from the V1 INPUT_TYPES / RETURN_TYPES, and whose execute calls the V1 method. One definition, two APIs."""
from .nodes import NODE_CLASSES, NODE_DISPLAY_NAME_MAPPINGS


def _input(io, name: str, spec: tuple, optional: bool):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    common = {"optional": optional, "tooltip": opts.get("tooltip")}
    if isinstance(kind, list):
        return io.Combo.Input(name, options=kind, default=opts.get("default"), **common)
    if kind == "STRING":
        return io.String.Input(name, multiline=opts.get("multiline", False), default=opts.get("default"),
                               dynamic_prompts=opts.get("dynamicPrompts"), **common)
    if kind == "FLOAT":
        return io.Float.Input(name, default=opts.get("default"), min=opts.get("min"), max=opts.get("max"),
                              step=opts.get("step"), **common)
    if kind == "BOOLEAN":
        return io.Boolean.Input(name, default=opts.get("default"), **common)
    return io.Custom(kind).Input(name, **common)  # sockets: T5_ENCODER, CLIP


def make_node(io, node_id: str, v1_cls):
    def define_schema(cls):
        spec = v1_cls.INPUT_TYPES()
        inputs = [_input(io, name, s, optional=(group == "optional"))
                  for group in ("required", "optional") for name, s in spec.get(group, {}).items()]
        outputs = [io.Custom(kind).Output(display_name=name)
                   for kind, name in zip(v1_cls.RETURN_TYPES, v1_cls.RETURN_NAMES)]
        return io.Schema(node_id=node_id, display_name=NODE_DISPLAY_NAME_MAPPINGS[node_id], category=v1_cls.CATEGORY,
                         description=v1_cls.DESCRIPTION, inputs=inputs, outputs=outputs)

    def execute(cls, **kwargs):
        out = getattr(v1_cls(), v1_cls.FUNCTION)(**kwargs)
        return io.NodeOutput(*out["result"], ui=out.get("ui"))

    return type(v1_cls.__name__, (io.ComfyNode,),
                {"define_schema": classmethod(define_schema), "execute": classmethod(execute),
                 "__doc__": v1_cls.DESCRIPTION, "__module__": __name__})


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension, io

    nodes = [make_node(io, node_id, cls) for node_id, cls in NODE_CLASSES.items()]

    class T5CoreExtension(ComfyExtension):
        async def get_node_list(self):
            return nodes

    return T5CoreExtension()
