"""Self-attention with a known answer: built from a segmentation, for tests, benchmarks and offline demos.

Each query attends to nearby keys of its own segment (a Gaussian in distance), plus a little noise everywhere, so
`segment_attention` should recover the segmentation it was built from.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def blocks_segmentation(side: int = 64, rows: int = 2, cols: int = 2) -> np.ndarray:
    """(side, side) int64 labels: a rows × cols grid of rectangles, ids row-major."""
    y = np.minimum(np.arange(side) * rows // side, rows - 1)
    x = np.minimum(np.arange(side) * cols // side, cols - 1)
    return (y[:, None] * cols + x[None, :]).astype(np.int64)


def shapes_segmentation(side: int = 64, seed: int = 0, num_shapes: int = 4) -> np.ndarray:
    """(side, side) int64 labels: a background with `num_shapes` random discs and rectangles drawn over it."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((side, side), dtype=np.int64)
    yy, xx = np.mgrid[0:side, 0:side]
    for k in range(1, num_shapes + 1):
        cy, cx = rng.uniform(0.2, 0.8, size=2) * side
        size = rng.uniform(0.12, 0.25) * side
        if k % 2:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < size**2
        else:
            mask = (np.abs(yy - cy) < size) & (np.abs(xx - cx) < size * 0.7)
        labels[mask & (labels == 0)] = k  # never over another shape: every segment stays connected
    _, labels = np.unique(labels, return_inverse=True)
    return labels.reshape(side, side)


def attention_from_segmentation(
    labels: np.ndarray,
    resolutions: tuple[int, ...] = (64, 32, 16, 8),
    heads: int = 8,
    sigma: float = 0.5,
    noise: float = 0.05,
    seed: int = 0,
) -> dict[int, torch.Tensor]:
    """Self-attention whose segments are `labels`.

    Args:
        labels: (S, S) integer segmentation at the finest resolution.
        resolutions: side lengths to build; each must divide S.
        heads: attention heads per resolution (each with its own noise).
        sigma: width of the attention within a segment, as a fraction of the image side.
        noise: relative strength of the uniform-random part spread over all keys.

    Returns:
        r -> (heads, r², r²) float32 query × key probabilities, rows summing to 1.
    """
    generator = torch.Generator().manual_seed(seed)
    side = labels.shape[0]
    out = {}
    for r in resolutions:
        lab = torch.from_numpy(np.asarray(labels)[side // r // 2 :: side // r, side // r // 2 :: side // r]).reshape(-1)
        yx = torch.stack(torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij"), -1).reshape(-1, 2).float()
        dist2 = torch.cdist(yx, yx).square() / (r * r)  # (r², r²) squared distance in image fractions
        same = (lab[:, None] == lab[None, :]).float()  # (r², r²)
        affinity = same * torch.exp(-dist2 / (2 * sigma**2))  # (r², r²)
        affinity = affinity / affinity.sum(1, keepdim=True)
        rand = torch.rand(heads, r * r, r * r, generator=generator)
        rand = rand / rand.sum(-1, keepdim=True)
        probs = (1 - noise) * affinity + noise * rand  # (heads, r², r²)
        out[r] = probs / probs.sum(-1, keepdim=True)
    return out


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to (height, width)."""
    t = torch.from_numpy(np.asarray(labels)).float()[None, None]
    return F.interpolate(t, size=size, mode="nearest-exact")[0, 0].long().numpy()


def peaked_attention(
    labels: np.ndarray, resolutions: tuple[int, ...] = (64, 32, 16, 8), heads: int = 8, seed: int = 0
) -> dict[int, torch.Tensor]:
    """Softmax attention over logits that favour the same segment and nearby keys, with noise: peaked like a trained
    model's, so that distant keys get probabilities far below float16's smallest value (the reference's float16
    merge then behaves differently from float32).

    Returns:
        r -> (heads, r², r²) float32 query × key probabilities.
    """
    generator = torch.Generator().manual_seed(seed)
    side = labels.shape[0]
    out = {}
    for r in resolutions:
        step = side // r
        lab = torch.from_numpy(np.asarray(labels)[step // 2 :: step, step // 2 :: step]).reshape(-1)
        yx = torch.stack(torch.meshgrid(torch.arange(r), torch.arange(r), indexing="ij"), -1).reshape(-1, 2).float() / r
        logits = 6 * (lab[:, None] == lab[None, :]).float() - 8 * torch.cdist(yx, yx)  # (r², r²)
        out[r] = (logits + 1.5 * torch.randn(heads, r * r, r * r, generator=generator)).softmax(-1)
    return out
