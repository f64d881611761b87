"""Step 3 of the method: aggregate self-attention of every resolution into one 4-D tensor.

Paper §3.1 "Attention Aggregation"; reference `DiffSeg.aggregate_weights`. For each resolution r the key axis of
every h×w map is bilinearly upsampled to the finest grid H×W, renormalised to sum 1, and the query axis is tiled
(each coarse query's map repeated over its (H/h)×(W/w) fine cells). The result is a weighted sum. Grids are keyed
by (h, w), so rectangular latents (native aspect ratio) go through the same code; a square grid is the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...grids import Grid, GridDict, by_size, grid_key, grid_name  # noqa: F401  (the grid vocabulary)


def as_attention_maps(
    attn: Mapping[object, object] | Sequence[object], device: torch.device | str | None = None
) -> dict[Grid, torch.Tensor]:
    """Validate per-resolution attention and average it over heads.

    Args:
        attn: grid -> array or tensor shaped (heads, h·w, h·w) or (h·w, h·w), query × key in row-major order, rows
            summing to 1 (what the reference's `DiffSeg.segment` takes per image). A grid is (h, w), "HxW", or an int
            r for r×r. A list such as the reference's `[weight_64, weight_32, weight_16, weight_8]` is read as square
            grids, each side from the shape.
        device: where the result lives; by default where the inputs are (numpy -> CPU).

    Returns:
        (h, w) -> float32 tensor (h·w, h·w), query × key, finest first.
    """
    if isinstance(attn, Sequence) and not isinstance(attn, (str, bytes)):
        attn = {math.isqrt(np.shape(value)[-1]): value for value in attn}
    if not isinstance(attn, Mapping) or not attn:
        raise ValueError(
            "`attn` must be a non-empty mapping from grid (h, w) or side r to attention shaped (heads, h·w, h·w) or "
            f"(h·w, h·w), but is {type(attn).__name__}."
        )
    maps = {}
    for key, value in attn.items():
        grid = grid_key(key)
        t = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        if device is not None:
            t = t.to(device)
        if t.dim() == 3:
            t = t.float().mean(0)  # reference: `weights.mean(0)`, the mean over heads
        n = grid[0] * grid[1]
        if t.dim() != 2 or t.shape != (n, n):
            raise ValueError(
                f"`attn[{grid_name(grid)}]` must be shaped (heads, {n}, {n}) or ({n}, {n}) but is "
                f"{tuple(np.shape(value))}."
            )
        maps[grid] = t.float()
    return GridDict((g, maps[g]) for g in by_size(maps))


def _is_side(key) -> bool:
    return (isinstance(key, (int, np.integer)) and not isinstance(key, bool)) or (
        isinstance(key, str) and key.isdigit()
    )


def side_grid(side, grids: Sequence[Grid]) -> Grid:
    """The grid a side key r names among `grids`: r×r where present, else the grid nearest r×r in size (within a
    factor √2 of area per side, i.e. the same rank: SD 1.x's `32` is 24×44 on a 16:9 image, whose grids keep the
    square's pixel count). A side no grid is near is returned as (r, r), for the caller's "not present" error."""
    r = int(side)
    if (r, r) in grids:
        return (r, r)
    nearest = min(grids, key=lambda g: abs(math.log(math.sqrt(g[0] * g[1]) / r)), default=None)
    if nearest is not None and abs(math.log(math.sqrt(nearest[0] * nearest[1]) / r)) < math.log(math.sqrt(2)):
        return nearest
    return (r, r)


def resolution_weights(
    grids: Sequence[object], weights: Mapping[object, float] | str | None = None
) -> dict[Grid, float]:
    """Weight of each grid in the aggregate.

    `weights` may name a preset of `config.RESOLUTION_PRESETS` (weights by rank, finest first), which fits any
    model's grids.

    Default: proportional to the grid's side and normalised over the grids present (reference `get_weight_rato`:
    `sqrt(N) / sum(sqrt(N))`, i.e. 64:32:16:8 for SD 1.x at 512²; √(h·w) on a rectangular grid, which keeps the
    same 8:4:2:1 ratios). Weights a user gives are used as given, as the reference uses its `weight_ratio`; a grid
    they leave out or weigh 0 is dropped. Keys are grids as `grid_key` reads them; a side r names the grid of that
    size on any aspect ratio (`side_grid`).
    """
    grids = [grid_key(g) for g in grids]
    if isinstance(weights, str):
        from ...config import preset_weights

        weights = preset_weights(weights, by_size(grids))
    if weights is None:
        sides = {g: math.sqrt(g[0] * g[1]) for g in grids}
        total = sum(sides.values())
        return {g: sides[g] / total for g in grids}
    given: dict[Grid, float] = {}
    for key, weight in weights.items():
        grid = side_grid(key, grids) if _is_side(key) else grid_key(key)
        if grid in given:
            raise ValueError(f"`resolution_weights` names grid {grid_name(grid)} twice ({key!r} is one of them).")
        given[grid] = float(weight)
    unknown = [grid_name(g) for g in given if g not in grids]
    if unknown:
        raise ValueError(
            f"`resolution_weights` names grids {unknown} that the attention does not have "
            f"(it has {[grid_name(g) for g in grids]})."
        )
    chosen = {g: given.get(g, 0.0) for g in grids}
    if any(w < 0 or not math.isfinite(w) for w in chosen.values()) or not any(w > 0 for w in chosen.values()):
        raise ValueError(f"`resolution_weights` must be finite, non-negative and not all zero but are {dict(weights)}.")
    return chosen


@torch.inference_mode()
def aggregate(attn: Mapping[Grid, torch.Tensor], weights: Mapping[object, float] | None = None) -> torch.Tensor:
    """Aggregate attention of all grids at the finest one.

    Args:
        attn: (h, w) -> (h·w, h·w) float32 query × key maps (see `as_attention_maps`).
        weights: grid -> weight; None for the paper's proportional default (see `resolution_weights`).

    Returns:
        (H·W, H·W) float32, (H, W) the finest grid: row q is query q's attention over the H×W keys, each row summing
        to the sum of the weights (1 by default). Rows and keys are in row-major (y, x) order.
    """
    attn = {grid_key(g): t for g, t in attn.items()}
    grids = by_size(attn)[::-1]  # coarse to fine, so only the finest step touches all (H·W)² entries
    finest = grids[-1]
    w = resolution_weights(grids, weights)
    for a, b in zip(grids, grids[1:]):
        if b[0] % a[0] or b[1] % a[1]:
            raise ValueError(
                f"Attention grids {grid_name(a)} and {grid_name(b)} do not tile: each axis of a grid must divide the "
                "next finer one's."
            )
    out, prev = None, None  # running aggregate over the queries of grid `prev`: (prev h·w, H·W)
    for grid in grids:
        if w[grid] == 0:
            continue
        h, wd = grid
        keys = attn[grid].reshape(h * wd, 1, h, wd)  # (h·w, 1, h, w): each query's map over its keys
        if grid != finest:
            # Paper §3.1 / reference `UpSampling2D(interpolation="bilinear")`: TensorFlow's bilinear resize uses
            # half-pixel centres, which is torch's `align_corners=False` (no antialiasing when upsampling).
            keys = F.interpolate(keys, size=finest, mode="bilinear", align_corners=False)
        keys = keys.reshape(h * wd, -1)  # (h·w, H·W)
        # Reference: renormalise each upsampled map to sum 1, then weigh it.
        term = keys * (w[grid] / keys.sum(dim=1, keepdim=True))  # (h·w, H·W)
        if out is not None:
            _add_tiled(term, out, prev, grid)
        out, prev = term, grid
    if prev != finest:  # the finest grid weighs 0: tile the running aggregate onto it
        tiled = out.new_zeros(finest[0] * finest[1], out.shape[1])
        _add_tiled(tiled, out, prev, finest)
        out = tiled
    return out  # (H·W, H·W)


def _add_tiled(out: torch.Tensor, maps: torch.Tensor, grid: Grid, new_grid: Grid) -> None:
    """Add each of the grid's queries' maps (h·w, D) to its cells of the finer grid's queries in `out` (H·W, D), in
    place: broadcast, no tiled copy is made.

    Reference `tf.repeat(weights, ratio, axis=0)` then `axis=1`, per axis by that axis's integer ratio; tiling coarse
    to fine in steps composes to the same result as tiling each grid straight to the finest.
    """
    (h, w), (nh, nw) = grid, new_grid
    d = maps.shape[1]
    out.view(h, nh // h, w, nw // w, d).add_(maps.view(h, 1, w, 1, d))
