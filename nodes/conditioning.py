"""CONDITIONING of the plain-T5 family, which ComfyUI has no encoder for (the other families go through ComfyUI's own
encoders: nodes/clip.py), built the way ComfyUI's T5 encoders build theirs, with the T5 computed by t5core.

Prompt weights use ComfyUI's syntax: "(text)" multiplies the weight by 1.1, "(text:1.3)" sets it, groups nest, and
"\\(" "\\)" are literal brackets. As in ComfyUI, each weighted piece is tokenized on its own; if any weight is not
1, an empty prompt of the same length (EOS then padding) is encoded alongside, and every weighted token's vector is
moved away from the empty prompt's: z = (z - z_empty) * w + z_empty. T5 runs without an attention mask and without
padding (plain T5 has no minimum length). Unlike ComfyUI, "embedding:name" is plain text (there are no
T5 textual inversions to load).

Shapes: L the prompt's tokens plus EOS (the empty prompt's row is padded to L), D the T5 width (4096 for XXL).
"""
import logging
import math

import torch

log = logging.getLogger("t5core.nodes")

_LEFT, _RIGHT = "\0\2", "\0\1"  # escaped "(" and ")" while the brackets are parsed


TRAINED_LENGTH = 512  # T5's training length: longer prompts are not cut (as in ComfyUI), but the UI warns


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


def tokenize_weighted(tokenizer, text: str) -> tuple[list[int], list[float]]:
    """-> (token ids, weight per token): pieces tokenized one by one, then EOS."""
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
    return ids, weights


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


# -- the node's work ------------------------------------------------------------------------------------------------
def build(encoder, text: str) -> tuple[list, str]:
    """-> (CONDITIONING: the plain T5 states [1, L, D] and no extras, a one-line summary for the UI)."""
    ids, weights = tokenize_weighted(encoder.tokenizer, text)
    cond = [[encode_weighted(encoder, ids, weights), {}]]
    summary = f"{len(ids)} tokens"
    if len(ids) > TRAINED_LENGTH:
        summary += f" ⚠ longer than the {TRAINED_LENGTH} plain T5 was trained with (nothing is cut)"
        log.warning("t5core: %s", summary)
    return cond, summary
