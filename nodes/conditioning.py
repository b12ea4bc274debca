"""CONDITIONING built the way ComfyUI's own text encoders build it, with the T5 part computed by t5core.

Prompt weights use ComfyUI's syntax: "(text)" multiplies the weight by 1.1, "(text:1.3)" sets it, groups nest, and
"\\(" "\\)" are literal brackets. As in ComfyUI, each weighted piece is tokenized on its own; if any weight is not
1, an empty prompt of the same length (EOS then padding) is encoded alongside, and every weighted token's vector is
moved away from the empty prompt's: z = (z - z_empty) * w + z_empty. T5 runs without an attention mask, on the
tokens padded with 0 to the family's minimum length. Unlike ComfyUI, "embedding:name" is plain text (there are no
T5 textual inversions to load).

Shapes: L tokens (after padding), D the T5 width (4096 for XXL), N CLIP tokens (77 per chunk).
"""
import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger("t5core.nodes")

CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280
_LEFT, _RIGHT = "\0\2", "\0\1"  # escaped "(" and ")" while the brackets are parsed


@dataclass(frozen=True)
class Family:
    min_length: int  # ComfyUI pads the T5 tokens to at least this many
    trained_length: int  # prompts longer than this are not cut (as in ComfyUI), but the UI warns
    clip_parts: tuple[str, ...]  # CLIP encoders the family uses: "l" (CLIP-L), "g" (CLIP-G)


FAMILIES = {
    "Flux": Family(min_length=256, trained_length=512, clip_parts=("l",)),
    "SD3": Family(min_length=77, trained_length=256, clip_parts=("l", "g")),
    "plain T5": Family(min_length=0, trained_length=512, clip_parts=()),
}


# -- prompt weights -------------------------------------------------------------------------------------------------
def _top_level_pieces(text: str) -> list[str]:
    """Split into plain runs and "(...)" groups at depth 0. A ")" with no "(" drives the depth below 0; until it
    is back at 0 everything is plain text, so unbalanced prompts split exactly as in ComfyUI."""
    pieces, current, depth = [], "", 0
    for ch in text:
        if ch == "(" and depth == 0 and current:
            pieces.append(current)
            current = ""
        current += ch
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current)
                current = ""
    if current:
        pieces.append(current)
    return pieces


MAX_NESTING = 64  # "(" groups inside each other; 1.1**64 is already a weight of 445


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth -= 1
    return deepest


def parse_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """'a (b:1.5) ((c))' -> [('a ', 1.0), ('b', 1.5), ('c', 1.21)]; text must have its escapes hidden.
    Weights must be finite numbers (no nan, inf or 1e400) and groups nest at most MAX_NESTING deep: a ValueError
    says which, never a non-finite conditioning or a RecursionError."""
    if weight == 1.0 and _nesting(text) > MAX_NESTING:
        raise ValueError(f"prompt weights: brackets nest {_nesting(text)} deep, at most {MAX_NESTING} are supported "
                         f"(write \\( for a literal bracket)")
    out = []
    for piece in _top_level_pieces(text):
        if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
            out.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * 1.1
        head, colon, value = inner.rpartition(":")
        if colon and head:  # a ":" at position 0 is text, not a weight
            try:
                inner_weight, inner = float(value), head
            except ValueError:
                pass  # "(a:b)": the colon is text and the group gets the 1.1 factor
        if not math.isfinite(inner_weight):
            shown = piece if len(piece) <= 60 else piece[:28] + "..." + piece[-28:]
            raise ValueError(f"prompt weights: the weight of {shown!r} is {inner_weight}; weights must be finite "
                             f"numbers, e.g. (cat:1.2)")
        out += parse_weights(inner, inner_weight)
    return out


def tokenize_weighted(tokenizer, text: str, min_length: int = 0) -> tuple[list[int], list[float], int]:
    """-> (token ids, weight per token, tokens before padding): pieces tokenized one by one, EOS, pad to min_length."""
    hidden = text.replace("\\)", _RIGHT).replace("\\(", _LEFT)
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_weights(hidden):
        piece = piece.replace(_RIGHT, ")").replace(_LEFT, "(")
        if piece:
            piece_ids = tokenizer.encode_ids(piece, add_eos=False)
            ids += piece_ids
            weights += [weight] * len(piece_ids)
    ids.append(tokenizer.eos_id())
    weights.append(1.0)
    count = len(ids)
    padding = max(0, min_length - count)
    return ids + [tokenizer.pad_id()] * padding, weights + [1.0] * padding, count


def encode_weighted(encoder, ids: list[int], weights: list[float]) -> torch.Tensor:
    """-> float32 [1, L, D]: the T5 encoding with prompt weights applied against the empty prompt."""
    batch = [ids]
    weighted = any(w != 1.0 for w in weights)
    if weighted:  # ComfyUI's empty prompt: EOS, then padding to the same length
        batch.append([encoder.tokenizer.eos_id()] + [encoder.tokenizer.pad_id()] * (len(ids) - 1))
    z = encoder.encode(torch.tensor(batch, dtype=torch.long))  # [1 or 2, L, D]
    if not weighted:
        return z
    w = torch.tensor(weights, dtype=z.dtype, device=z.device).unsqueeze(-1)  # [L, 1]
    z_prompt, z_empty = z[0], z[1]
    out = torch.where(w != 1.0, (z_prompt - z_empty) * w + z_empty, z_prompt).unsqueeze(0)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"prompt weights: weighting overflows float32 (largest weight {max(map(abs, weights)):g}); "
                         f"use smaller weights")
    return out


# -- CLIP parts -----------------------------------------------------------------------------------------------------
def clip_outputs(clip, text: str, family_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the CLIP-L / CLIP-G held by a ComfyUI CLIP on the text -> {"l"/"g": (hidden [1, N, C], pooled [1, C])}.

    The sub-encoders run as the CLIP's loader configured them (penultimate layer for DualCLIPLoader sd3), after the
    same option reset as CLIP.encode_from_tokens; CLIP-L's pooled vector is the unprojected one both families use."""
    family = FAMILIES[family_name]
    container = getattr(clip, "cond_stage_model", None)
    parts = {k: getattr(container, f"clip_{k}", None) for k in family.clip_parts}
    parts = {k: v for k, v in parts.items() if v is not None}
    if family_name == "Flux" and "l" not in parts:
        raise ValueError("the CLIP input has no CLIP-L, which Flux needs for its pooled vector: load clip_l with "
                         "CLIPLoader (or DualCLIPLoader type flux)")
    if not parts:
        raise ValueError("the CLIP input has neither CLIP-L nor CLIP-G, which SD3 needs: load clip_l and clip_g "
                         "with DualCLIPLoader type sd3")
    if getattr(container, "t5xxl", None) is not None:
        log.warning("t5core: the CLIP input also holds ComfyUI's own T5; it is loaded but not used here "
                    "(load only the CLIP files to save memory)")
    tokens = clip.tokenize(text)
    missing = [k for k in parts if k not in tokens]
    if missing:
        raise ValueError(f"the CLIP input's tokenizer gives no tokens for clip_{missing[0]}: an unsupported CLIP type")
    container.reset_clip_options()
    if clip.layer_idx is not None:  # CLIPSetLastLayer
        container.set_clip_options({"layer": clip.layer_idx})
    if "l" in parts:
        parts["l"].set_clip_options({"projected_pooled": False})
    clip.load_model()
    try:
        return {k: tuple(sub.encode_token_weights(tokens[k])[:2]) for k, sub in parts.items()}
    finally:
        container.reset_clip_options()


def sd3_layout(t5: torch.Tensor, parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (cond [1, N + L, D], pooled [1, 2048]): [CLIP-L | CLIP-G] hidden states, zero-padded to the T5 width,
    before the T5 tokens; pooled [L | G]. A missing CLIP is zeros, as in ComfyUI; no CLIP at all: T5 tokens only."""
    zeros = lambda width: torch.zeros((1, width), device=t5.device)  # noqa: E731
    l_out, l_pooled = parts.get("l", (None, zeros(CLIP_L_WIDTH)))
    g_out, g_pooled = parts.get("g", (None, zeros(CLIP_G_WIDTH)))
    pooled = torch.cat([l_pooled, g_pooled], dim=-1)
    if l_out is None and g_out is None:
        return t5, pooled
    if l_out is not None and g_out is not None:
        n = min(l_out.shape[1], g_out.shape[1])
        lg = torch.cat([l_out[:, :n], g_out[:, :n]], dim=-1)  # [1, N, 768 + 1280]
    elif l_out is not None:
        lg = l_out
    else:
        lg = torch.nn.functional.pad(g_out, (CLIP_L_WIDTH, 0))  # CLIP-G sits after CLIP-L's (empty) columns
    width = t5.shape[-1]
    if lg.shape[-1] > width:
        raise ValueError(f"SD3 puts the CLIP states ({lg.shape[-1]} wide) into the T5 width, but this T5 is only "
                         f"{width} wide: SD3 uses T5 XXL (4096)")
    lg = torch.nn.functional.pad(lg, (0, width - lg.shape[-1]))  # [1, N, D]
    return torch.cat([lg.to(t5.device), t5], dim=-2), pooled


# -- the node's work ------------------------------------------------------------------------------------------------
def build(encoder, text: str, family_name: str, guidance: float, clip=None) -> tuple[list, str]:
    """-> (CONDITIONING as ComfyUI's own encoder for the family, a one-line summary for the UI)."""
    if family_name not in FAMILIES:
        raise ValueError(f"family: unknown family {family_name!r}; choose one of {list(FAMILIES)}")
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance: must be a finite number, got {guidance!r}")
    family = FAMILIES[family_name]
    ids, weights, count = tokenize_weighted(encoder.tokenizer, text, family.min_length)
    t5 = encode_weighted(encoder, ids, weights)  # [1, L, D]
    if not bool(torch.isfinite(t5).all()):  # never hand the sampler NaN or inf conditioning
        raise ValueError("the T5 output is not finite (NaN or inf): try bf16 or fp32, or check the model file")
    parts = clip_outputs(clip, text, family_name) if clip is not None and family.clip_parts else {}
    if family_name == "Flux":
        if "l" not in parts:
            log.warning("t5core: Flux without a CLIP input: the pooled vector is zeros (connect a CLIP-L)")
        pooled = parts["l"][1] if "l" in parts else torch.zeros((1, CLIP_L_WIDTH), device=t5.device)
        cond = [[t5, {"pooled_output": pooled, "guidance": guidance}]]
    elif family_name == "SD3":
        tokens, pooled = sd3_layout(t5, parts)
        cond = [[tokens, {"pooled_output": pooled}]]
    else:
        cond = [[t5, {}]]
    summary = f"{count} tokens" + (f", padded to {len(ids)}" if len(ids) > count else "")
    if count > family.trained_length:
        summary += f" ⚠ longer than the {family.trained_length} {family_name} was trained with (nothing is cut)"
        log.warning("t5core: %s", summary)
    return cond, summary
