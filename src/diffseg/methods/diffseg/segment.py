"""The method's steps 3-5 as one function on attention tensors: aggregate, merge, label.

Everything that segments (the pipeline, the CLI, the demo, the evaluation) goes through `segment_attention`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ...config import SegmentConfig, anchor_points, merge_thresholds
from .aggregation import aggregate, as_attention_maps
from .labelling import label_map
from .merging import anchor_grid, merge, refine_kmeans

_DEFAULTS = SegmentConfig()


@torch.inference_mode()
def segment_attention(
    attn: Mapping[int, object],
    *,
    kl_threshold: float | Sequence[float] = _DEFAULTS.kl_threshold,
    iterations: int = _DEFAULTS.iterations,
    num_points: int | None = _DEFAULTS.num_points,
    refine: bool = _DEFAULTS.refine,
    resolution_weights: Mapping[int, float] | None = _DEFAULTS.resolution_weights,
    output_size: tuple[int, int] = _DEFAULTS.output_size,
    reference_float16: bool = _DEFAULTS.reference_float16,
) -> np.ndarray:
    """Segment one image from its self-attention (reference `DiffSeg.segment`, for one image).

    Args:
        attn: grid -> array or tensor shaped (heads, h·w, h·w) or (h·w, h·w), query × key, rows summing to 1; a
            grid is (h, w), "HxW" or a side r for r×r (see `aggregation.as_attention_maps`). SD 1.x at 512² gives
            64, 32, 16 and 8; a 16:9 image at native size gives 48x88 ... 6x11. Computed on the tensors' device.
        kl_threshold: merge threshold τ, one float or one per iteration (paper: 1.1 COCO-Stuff, 0.9 Cityscapes).
        iterations: number of merge iterations.
        num_points: anchors per side of the first iteration's M×M grid (None: 16 on several grids, the paper's; 8 on
            one, a diffusion transformer's: `config.anchor_points`).
        refine: K-means refinement of the proposals (needs scikit-learn).
        resolution_weights: grid -> weight; None for the paper's weights proportional to the side.
        output_size: (height, width) of the label map; the reference's is (512, 512).
        reference_float16: reproduce the reference's float16 first merge iteration, where maps with values that
            underflow float16 join no proposal (see `merging.merge_from_anchors`); False merges them in float32.

    Returns:
        (height, width) int32 label map, ids 0..K-1, each present.
    """
    thresholds = merge_thresholds(kl_threshold, iterations)
    maps = as_attention_maps(attn)
    height, width = next(iter(maps))  # the finest grid
    # 1. Aggregate all grids at the finest: (H·W, H·W) query × key.
    aggregated = aggregate(maps, resolution_weights)
    # 2. Merge: anchors on the reference's grid, then greedy iterations.
    grid = anchor_grid(num_points or anchor_points(len(maps)), (height, width))
    anchors = (grid[:, 0] * width + grid[:, 1]).to(aggregated.device)  # (M²,) row-major query indices
    proposals = merge(aggregated, anchors, thresholds, reference_float16)  # (K, H·W)
    if refine:
        proposals = refine_kmeans(aggregated, proposals)
    # 3. Label: upsample, argmax, relabel.
    return label_map(proposals.reshape(-1, height, width), output_size)
