"""ComfyUI's contracts for a t5core model's modules, so that its ModelPatcher loads, streams and patches them as it
does the layers of its own T5.

Partial loading: the modules that hold tensors get comfy.ops.CastWeightBiasOp's contract (comfy_cast_weights,
weight_function, bias_function, forward_comfy_cast_weights), so ComfyUI's ModelPatcher loads those that fit onto the
GPU, leaves the rest on the offload device and sets their comfy_cast_weights (--lowvram, --novram, a GPU short of
room). A module left behind copies its tensors to its input's device for each call, through ComfyUI's cast_to, and
runs t5core's own forward on the copies (after its weight_function: LoRA patches, ComfyUI's LowVramPatch): only the
module's class changes (a subclass adding the contract), never its tensors or its math, so fp8 weights stream as
fp8 bytes and GGUF weights as their blocks, and fused norm scales and float16 residual scales are whatever the
module holds.

Weight patches (LoRA): the projections also get the scaled-weight contract of ComfyUI's fp8 layers (convert_weight,
set_weight), so that ComfyUI's patcher sees each weight as ComfyUI's own T5 holds it: fp8 row scales and the float16
residual factor (t5core.fp16_scales) are taken out before a patch and put back after it, in the weight's own dtype.
ComfyUI modules are imported inside functions.
"""
import contextlib
import functools

import torch
from torch import Tensor, nn

from t5core.fp16_scales import Scales
from t5core.fp8 import Fp8Linear
from t5core.gguf import PackedEmbedding, PackedLinear
from t5core.t5_common import RMSNorm

# What holds t5core's tensors: projections (plain, float32-out, 16-bit cast to float32, fp8, GGUF blocks), the token
# embedding and bias tables (nn.Embedding, or GGUF blocks), norms. (Layers and the stack hold only 0-dim scales, which
# any device reads.)
STREAMED = (nn.Linear, nn.Embedding, RMSNorm, Fp8Linear, PackedLinear, PackedEmbedding)
PROJECTIONS = (nn.Linear, Fp8Linear)  # those with a weight parameter that ComfyUI's patches reach (clip.t5_weight_patches)


def make_streamable(model: nn.Module) -> None:
    """Give each module of `model` that holds tensors ComfyUI's cast-weights contract, and its projections the
    scaled-weight one, in place."""
    factors = Scales.from_config(model.config).weight_factors()  # float16 residual factors: o_proj, ff_out
    for name, module in model.named_modules():
        if isinstance(module, STREAMED):
            module.__class__ = streamed_class(type(module))
            if isinstance(module, PROJECTIONS):
                module.residual_factor = factors.get(f"{name}.weight", 1.0)


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
            if self.bias_function:  # t5core's modules have no biases
                raise NotImplementedError(f"t5core: bias patches on {type(self).__name__}")
            with tensors_on(self, x.device):
                if self.weight_function:  # the weight as patched, for this call (ComfyUI's LowVramPatch)
                    weight = self._parameters["weight"]
                    if weight.dtype.itemsize > 1 and weight.dtype != x.dtype:  # 16-bit weights, float32 compute:
                        weight = weight.to(x.dtype)  # patched in x's dtype, as ComfyUI's cast_bias_weight does
                    for patch in self.weight_function:
                        weight = patch(weight)
                    self._parameters["weight"] = weight
                return super().forward(x, *args, **kwargs)

        if issubclass(cls, PROJECTIONS):
            residual_factor = 1.0  # what make_streamable finds in the model's float16 scales

            def comfy_scale(self, weight: Tensor) -> Tensor:
                """ComfyUI's weight = the stored one (as float32) times this: [N, 1] fp8 row scales or a scalar,
                over the float16 residual factor (a power of two)."""
                fp8 = isinstance(self, Fp8Linear)
                rows = self.scale[:, None].to(weight.device) if fp8 else torch.ones((), device=weight.device)
                return rows / self.residual_factor

            def convert_weight(self, weight: Tensor, inplace: bool = False, **kwargs) -> Tensor:
                return weight.mul_(self.comfy_scale(weight)) if inplace else weight * self.comfy_scale(weight)

            def set_weight(self, weight: Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                           **kwargs):
                """ComfyUI's float32 weight -> stored again in the weight's dtype (fp8: its row scales kept,
                ComfyUI's stochastic rounding, as ComfyUI's own fp8 layers)."""
                import comfy.float

                stored = comfy.float.stochastic_rounding(weight / self.comfy_scale(weight), self.weight.dtype,
                                                         seed=seed)
                if return_weight:
                    return stored
                if inplace_update:
                    self.weight.data.copy_(stored)
                else:
                    self.weight = nn.Parameter(stored, requires_grad=False)

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
