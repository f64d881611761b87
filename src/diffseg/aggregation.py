"""Step 3 of the method: aggregate self-attention of every resolution into one 4-D tensor.

Paper §3.1 "Attention Aggregation"; reference `DiffSeg.aggregate_weights`. For each resolution r the key axis of
every r×r map is bilinearly upsampled to the target side S, renormalised to sum 1, and the query axis is tiled
(each low-resolution query's map repeated over its (S/r)² high-resolution cells). The result is a weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def as_attention_maps(
    attn: Mapping[int, object] | Sequence[object], device: torch.device | str | None = None
) -> dict[int, torch.Tensor]:
    """Validate per-resolution attention and average it over heads.

    Args:
        attn: side length r -> array or tensor shaped (heads, r², r²) or (r², r²), query × key, rows summing to 1
            (what the reference's `DiffSeg.segment` takes per image). A list such as the reference's
            `[weight_64, weight_32, weight_16, weight_8]` is accepted too: each side is read from the shape.
        device: where the result lives; by default where the inputs are (numpy -> CPU).

    Returns:
        r -> float32 tensor (r², r²), query × key.
    """
    if isinstance(attn, Sequence) and not isinstance(attn, (str, bytes)):
        attn = {math.isqrt(np.shape(value)[-1]): value for value in attn}
    if not isinstance(attn, Mapping) or not attn:
        raise ValueError(
            "`attn` must be a non-empty mapping from side length r to attention shaped (heads, r², r²) or (r², r²), "
            f"but is {type(attn).__name__}."
        )
    maps = {}
    for r, value in attn.items():
        t = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        if device is not None:
            t = t.to(device)
        if t.dim() == 3:
            t = t.float().mean(0)  # reference: `weights.mean(0)`, the mean over heads
        r = int(r)
        if t.dim() != 2 or t.shape != (r * r, r * r):
            raise ValueError(
                f"`attn[{r}]` must be shaped (heads, {r * r}, {r * r}) or ({r * r}, {r * r}) but is "
                f"{tuple(np.shape(value))}."
            )
        maps[r] = t.float()
    return maps


def resolution_weights(resolutions: list[int], weights: Mapping[int, float] | None = None) -> dict[int, float]:
    """Weight of each resolution in the aggregate.

    Default: proportional to the side length r and normalised over the resolutions present (reference
    `get_weight_rato`: `sqrt(N) / sum(sqrt(N))`, i.e. 64:32:16:8 for SD 1.x at 512²). Weights a user gives are used
    as given, as the reference uses its `weight_ratio`; a resolution they leave out or weigh 0 is dropped.
    """
    if weights is None:
        total = float(sum(resolutions))
        return {r: r / total for r in resolutions}
    unknown = sorted(set(int(r) for r in weights) - set(resolutions))
    if unknown:
        raise ValueError(
            f"`resolution_weights` names resolutions {unknown} that the attention does not have "
            f"(it has {sorted(resolutions)})."
        )
    chosen = {r: float(weights.get(r, 0.0)) for r in resolutions}
    if any(w < 0 or not math.isfinite(w) for w in chosen.values()) or not any(w > 0 for w in chosen.values()):
        raise ValueError(f"`resolution_weights` must be finite, non-negative and not all zero but are {dict(weights)}.")
    return chosen


@torch.inference_mode()
def aggregate(attn: Mapping[int, torch.Tensor], weights: Mapping[int, float] | None = None) -> torch.Tensor:
    """Aggregate attention of all resolutions at the largest one.

    Args:
        attn: r -> (r², r²) float32 query × key maps (see `as_attention_maps`).
        weights: r -> weight; None for the paper's proportional default (see `resolution_weights`).

    Returns:
        (S², S²) float32, S the largest side: row q is query q's attention over the S×S keys, each row summing to
        the sum of the weights (1 by default). Rows and keys are in row-major (y, x) order.
    """
    side = max(attn)
    w = resolution_weights(sorted(attn), weights)
    sides = sorted(attn)
    if any(b % a for a, b in zip(sides, sides[1:])):
        raise ValueError(f"Attention sides {sides} must each divide the next to tile queries.")
    out, prev = None, None  # running aggregate over the queries of resolution `prev`: (prev², S²)
    for r in sides:  # coarse to fine, so only the finest step touches all S² × S² entries
        if w[r] == 0:
            continue
        keys = attn[r].reshape(r * r, 1, r, r)  # (r², 1, r, r): each query's map over its r×r keys
        if r < side:
            # Paper §3.1 / reference `UpSampling2D(interpolation="bilinear")`: TensorFlow's bilinear resize uses
            # half-pixel centres, which is torch's `align_corners=False` (no antialiasing when upsampling).
            keys = F.interpolate(keys, size=(side, side), mode="bilinear", align_corners=False)
        keys = keys.reshape(r * r, side * side)  # (r², S²)
        # Reference: renormalise each upsampled map to sum 1, then weigh it.
        term = keys * (w[r] / keys.sum(dim=1, keepdim=True))  # (r², S²)
        if out is not None:
            term += _tile_queries(out, prev, r)
        out, prev = term, r
    return out if prev == side else _tile_queries(out, prev, side).contiguous()  # (S², S²)


def _tile_queries(maps: torch.Tensor, side: int, new_side: int) -> torch.Tensor:
    """Repeat each of side² queries' maps over its (new_side/side)² cells: (side², D) -> (new_side², D) view.

    Reference `tf.repeat(weights, ratio, axis=0)` then `axis=1`; tiling coarse to fine in steps composes to the same
    result as tiling each resolution straight to S.
    """
    ratio = new_side // side
    d = maps.shape[1]
    return maps.view(side, 1, side, 1, d).expand(side, ratio, side, ratio, d).reshape(new_side * new_side, d)
