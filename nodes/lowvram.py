"""ComfyUI's partial loading for a t5core model: its modules that hold tensors get ComfyUI's cast-weights contract
(comfy.ops.CastWeightBiasOp: comfy_cast_weights, weight_function, bias_function, forward_comfy_cast_weights), so
ComfyUI's ModelPatcher loads those that fit onto the GPU, leaves the rest on the offload device and sets their
comfy_cast_weights (--lowvram, --novram, a GPU short of room), as it does with the layers of its own T5.

A module left behind copies its tensors to its input's device for each call, through ComfyUI's cast_to, and runs
t5core's own forward on the copies: only the module's class changes (a subclass adding the contract), never its
tensors or its math, so fp8 weights stream as fp8 bytes and GGUF weights as their blocks, and fused norm scales and
float16 residual scales are whatever the module holds. ComfyUI modules are imported inside functions.
"""
import contextlib
import functools

from torch import nn

from t5core.fp8 import Fp8Linear
from t5core.gguf import PackedEmbedding, PackedLinear
from t5core.t5_common import RMSNorm

# What holds t5core's tensors: projections (plain, float32-out, 16-bit cast to float32, fp8, GGUF blocks), the token
# embedding and bias tables (nn.Embedding, or GGUF blocks), norms. (Layers and the stack hold only 0-dim scales, which
# any device reads.)
STREAMED = (nn.Linear, nn.Embedding, RMSNorm, Fp8Linear, PackedLinear, PackedEmbedding)


def make_streamable(model: nn.Module) -> None:
    """Give each module of `model` that holds tensors ComfyUI's cast-weights contract, in place."""
    for module in model.modules():
        if isinstance(module, STREAMED):
            module.__class__ = streamed_class(type(module))


@functools.cache
def streamed_class(cls: type) -> type:
    """cls with the forward of ComfyUI's ops (comfy.ops.disable_weight_init.Linear and the others): its own forward
    while ComfyUI has loaded it, else forward_comfy_cast_weights."""
    import comfy.ops

    class Streamed(cls, comfy.ops.CastWeightBiasOp):
        def forward(self, *args, **kwargs):
            if self.comfy_cast_weights or self.weight_function or self.bias_function:
                return self.forward_comfy_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)

        def forward_comfy_cast_weights(self, x, *args, **kwargs):
            if self.weight_function or self.bias_function:  # ComfyUI's LoRA key names never name t5core's tensors
                raise NotImplementedError(f"t5core: ComfyUI weight patches on {type(self).__name__} are not supported")
            with tensors_on(self, x.device):
                return super().forward(x, *args, **kwargs)

    Streamed.__name__ = Streamed.__qualname__ = f"Comfy{cls.__name__}"
    return Streamed


@contextlib.contextmanager
def tensors_on(module: nn.Module, device):
    """Inside the block every parameter and buffer of `module` (its submodules' too: a GGUF weight's blocks) is a copy
    on `device`, made by ComfyUI's cast_to."""
    import comfy.model_management as mm

    non_blocking = mm.device_supports_non_blocking(device)
    saved = []  # (dict, name, original tensor)
    try:
        for owner in module.modules():
            for slots in (owner._parameters, owner._buffers):
                for name, tensor in list(slots.items()):
                    if tensor is not None:
                        saved.append((slots, name, tensor))
                        slots[name] = mm.cast_to(tensor, device=device, non_blocking=non_blocking)
        yield
    finally:
        for slots, name, tensor in reversed(saved):
            slots[name] = tensor
