"""Concept maps at the image's size, and their label map."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def probabilities(maps: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) maps summing to 1 over the K concepts -> (K, H, W) at `output_size`, bilinear (as the references
    upsample their heatmaps); a convex mix of neighbours, so every pixel still sums to 1."""
    maps = maps.float()
    if tuple(maps.shape[-2:]) == tuple(output_size):
        return maps
    return F.interpolate(maps[None], size=tuple(output_size), mode="bilinear", align_corners=False)[0]


def segment_concepts(maps: torch.Tensor, output_size: tuple[int, int]) -> np.ndarray:
    """(H, W) int32: each pixel's most probable concept, ids being the concepts' indices in the order given (a
    concept no pixel prefers has no pixel)."""
    return probabilities(maps, output_size).argmax(dim=0).to(torch.int32).cpu().numpy()
