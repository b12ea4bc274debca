"""Known float16 residual scales for the public T5 v1.1 encoders, picked by detected size.

They were found on one short prompt with no headroom (nai-t5); `python -m t5core calibrate` finds scales with
headroom for your prompts and model, and saved scales always win over these presets."""
from typing import Optional

from .t5_common import T5Config

# (hidden_dim, num_layers, ff_dim) -> FFN-out scales; attention-out scales are all 1
V1_1_FFN_OUT_SCALES: dict[str, tuple[tuple[int, int, int], list[float]]] = {
    "small": ((512, 8, 1024), [1, 1, 1 / 2, 1, 1, 1, 1, 1 / 2]),
    "xl": ((2048, 24, 5120), [1, 1 / 2, 1, 1, 1, 1 / 4] + [1] * 18),
    "xxl": ((4096, 24, 10240), [1] * 7 + [1 / 4] + [1] * 16),
}


def detect_size(config: T5Config) -> Optional[str]:
    shape = (config.hidden_dim, config.num_layers, config.ff_dim)
    return next((name for name, (s, _) in V1_1_FFN_OUT_SCALES.items() if s == shape), None)


def suggested_scales(config: T5Config) -> tuple[Optional[list[float]], Optional[list[float]]]:
    """(attn_out_scales, ffn_out_scales) for a known size, else (None, None)."""
    size = detect_size(config)
    return (None, list(V1_1_FFN_OUT_SCALES[size][1])) if size else (None, None)
