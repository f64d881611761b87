"""A second, deliberately literal implementation of DiffSeg's steps 3-5, written from the method's description.

Loops and broadcasts instead of matrix products, numpy float64 throughout, TensorFlow's bilinear resize formula
written out. Slow; used only to check `segment_attention` on small inputs.
"""

from __future__ import annotations

import numpy as np


def tf_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """TensorFlow 2 `tf.image.resize(method="bilinear")` of an (h, w) array: half-pixel centres, no antialias."""
    h, w = image.shape

    def weights(size_in, size_out):
        src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
        floor = np.floor(src)
        lower = np.maximum(floor, 0).astype(int)
        upper = np.minimum(np.ceil(src), size_in - 1).astype(int)
        return lower, upper, src - floor

    y0, y1, fy = weights(h, height)
    x0, x1, fx = weights(w, width)
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """0.5 * Σ (p − q)(log p − log q) over the last axis, broadcasting."""
    return 0.5 * ((p - q) * (np.log(p) - np.log(q))).sum(-1)


def naive_segment(attn, kl_threshold=1.1, iterations=3, num_points=16, output_size=(512, 512), float16=False):
    """With `float16`, the first iteration's KL is computed in numpy float16, as the reference computes it in
    TensorFlow float16: NaN comparisons are False, so maps with underflowed values join nothing, and the NaN
    proposals of such anchors are dropped by the next iteration."""
    side = max(attn)
    total = sum(attn)
    aggregated = np.zeros((side, side, side, side))
    for r, a in attn.items():
        a = np.asarray(a, np.float64)
        a = a.mean(0) if a.ndim == 3 else a
        up = np.stack([tf_bilinear(row.reshape(r, r), side, side) for row in a])  # (r², S, S)
        up /= up.sum(axis=(1, 2), keepdims=True)
        up = up.reshape(r, r, side, side).repeat(side // r, axis=0).repeat(side // r, axis=1)
        aggregated += (r / total) * up
    maps = aggregated.reshape(side * side, side * side)

    step = (side - 1) // (num_points - 1)
    start = (side - 1 - step * (num_points - 1)) // 2
    coords = [start + k * step for k in range(num_points)]
    proposals = []
    for y in coords:
        for x in coords:
            anchor = aggregated[y, x].reshape(-1)
            if float16:
                with np.errstate(all="ignore"):
                    members = kl(anchor[None, :].astype(np.float16), maps.astype(np.float16)) < kl_threshold
            else:
                members = kl(anchor[None, :], maps) < kl_threshold
            with np.errstate(all="ignore"):
                proposals.append(maps[members].mean(0) if members.any() else np.full(maps.shape[1], np.nan))
    proposals = np.stack(proposals)

    for _ in range(iterations - 1):
        merged, marked = [], set()
        for i in range(len(proposals)):
            if i in marked:
                continue
            marked.add(i)
            with np.errstate(all="ignore"):
                close = kl(proposals[i][None, :], proposals) < kl_threshold
            if not close.any():  # a NaN proposal: the reference's `if kl_bin.sum() > 0` drops it
                continue
            marked.update(np.flatnonzero(close).tolist())
            merged.append(proposals[close].mean(0))
        proposals = np.stack(merged)

    up = np.stack([tf_bilinear(p.reshape(side, side), *output_size) for p in proposals])
    ids = up.argmax(0)
    _, labels = np.unique(ids, return_inverse=True)
    return labels.reshape(output_size)
