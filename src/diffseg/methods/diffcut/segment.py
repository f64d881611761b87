"""DiffCut's steps 2-3 as one function on a layer's tokens: recursive normalised cut, then label assignment.

Couairon et al., NeurIPS 2024; reference `DiffCut.generate_masks` (`diffcut/recursive_normalized_cut.py`) and, for
the optional refinement, `eval_diffcut.py`. Everything that segments with DiffCut (the pipeline, the CLI, the demo,
the evaluation) goes through `segment_features`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...config import DiffCutConfig
from ..diffseg.labelling import label_map
from .ncut import assemble_clusters, recursive_ncut

_DEFAULTS = DiffCutConfig()


def as_token_grid(features, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(h, w, C) float32 tensor from (h·w, C) row-major tokens or an (h, w, C) grid (array or tensor).

    (h·w, C) tokens are read as a square grid unless `grid` = (h, w) says otherwise; (1, h·w, C), one image of the
    reference's batch, is read as tokens.
    """
    t = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    if t.dim() == 3 and t.shape[0] == 1 and t.shape[1] > 1 and math.isqrt(t.shape[1]) ** 2 == t.shape[1]:
        t = t[0]  # (1, h·w, C): the reference's per-image `features[j:j+1]`
    if t.dim() == 2:
        n = t.shape[0]
        h, w = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
        if h * w != n:
            raise ValueError(
                f"`features` has {n} tokens, which is not a square grid; pass them shaped (h, w, C) or give `grid`."
            )
        t = t.reshape(h, w, -1)
    if t.dim() != 3 or 0 in t.shape:
        raise ValueError(f"`features` must be shaped (h·w, C) or (h, w, C) but is {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError("`features` hold NaN or infinite values; check the model's precision (try float32).")
    return t.float()


# Steps 2-3 are one linear map of the tokens: each cluster's mean token (the reference's `MaskPooling`), its
# similarity with every token, bilinear upsampling. The reference upsamples the C feature maps and then takes one
# product; we take the product on the token grid and upsample the K score maps instead (K/C of the cost and memory, a
# 12-megapixel label map fits). The two orders round differently by ~1e-6, which decides a pixel only where its two
# best clusters lie that close (a cut through a uniform region scores within 1e-7). While the upsampled features fit
# in this many floats (1,280 channels at the reference's 128² is 21 M), those pixels are scored again in the
# reference's own order of operations.
REFERENCE_ORDER_FLOATS = 1 << 26
CLOSE = 1e-3  # relative gap under which two clusters' scores take the reference's own product (500× its rounding)


def _assign(feats: torch.Tensor, clusters: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Reference `generate_masks` steps 2-3: each cluster's masked mean token (`MaskPooling`), bilinear upsampling,
    similarities, argmax (first maximum).

    Args:
        feats: (1, C, h, w) L2-normalised features.
        clusters: (h·w,) int64 cluster ids 0..K-1.
        size: (H, W) of the label map.
    """
    _, c, h, w = feats.shape
    tokens = feats.reshape(c, h * w)  # (C, N)
    counts = torch.bincount(clusters)  # (K,)
    k = len(counts)
    # Each cluster's mean token, one pass over the tokens (a (K, N) mask product costs K times more); the reference's
    # own pooling is taken below wherever a pixel's decision could turn on its rounding.
    pooled = torch.zeros(k, c, dtype=tokens.dtype, device=tokens.device).index_add_(0, clusters, tokens.T)
    pooled /= counts[:, None] + 1e-8  # (K, C)
    maps = (pooled @ tokens).reshape(k, h, w)  # (K, h, w) each cluster's similarity on the token grid
    if k == 1 or c * size[0] * size[1] > REFERENCE_ORDER_FLOATS:
        return label_map(maps, size)  # (H, W) int32, memory bounded by chunks
    # Upsampled channels-last, so each pixel's K scores are contiguous for `topk` (a reduction across K rows of
    # H·W costs twice as much with hundreds of clusters); the kernel rounds differently, far inside `CLOSE`.
    scores = F.interpolate(maps[None].contiguous(memory_format=torch.channels_last), size=size, mode="bilinear")
    top = scores.permute(0, 2, 3, 1).reshape(size[0] * size[1], k).topk(2, dim=1)  # values, indices: (H·W, 2)
    ids = top.indices[:, 0]  # the maximum; an exact tie is close, and scored again below
    gap = top.values[:, 0] - top.values[:, 1]
    close = torch.nonzero(gap <= CLOSE * top.values[:, 0].abs().clamp_min(1)).reshape(-1)  # (M,) pixels
    if len(close):
        ids[close] = _reference_scores(feats, clusters, pooled, close, size).argmax(dim=1)
    ids = ids.reshape(size)
    return np.unique(ids.cpu().numpy(), return_inverse=True)[1].reshape(size).astype(np.int32)


def _reference_scores(feats, clusters, pooled, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M, K) scores of the given pixels in the reference's order of operations: each cluster's pooling as its own
    `einsum("bchw,bqhw->bqc")`, the (1, C, h, w) features upsampled by `nn.Upsample(mode="bilinear")`, then
    `torch.t(upsampled) @ torch.t(pooled)`, on the rows of these pixels.

    Only the clusters that can win at these pixels (within `CLOSE` of the best there) are pooled the reference's
    way; the others keep the fast means (an entry's value depends on its own row and column only). A BLAS may pick
    another kernel for fewer rows than the whole product, so the ties are broken as the reference's in the tests'
    cases, not by construction.
    """
    _, c, h, w = feats.shape
    upsampled = F.interpolate(feats, size=size, mode="bilinear").reshape(c, -1)  # (C, H·W)
    rows = torch.t(upsampled[:, pixels])  # (M, C)
    fast = rows @ torch.t(pooled)  # (M, K)
    best = fast.max(dim=1, keepdim=True).values
    candidates = torch.nonzero((fast >= best - 2 * CLOSE * best.abs().clamp_min(1)).any(dim=0)).reshape(-1)
    exact = pooled.clone()
    for j in candidates.tolist():
        mask = (clusters == j).reshape(1, 1, h, w)
        weights = mask / (mask.sum(dim=(-1, -2), keepdim=True) + 1e-8)  # the bool mask over its count + 1e-8, float32
        exact[j] = torch.einsum("bchw,bqhw->bqc", feats, weights)[0, 0]
    return rows @ torch.t(exact)


@torch.inference_mode()
def segment_features(
    features,
    *,
    tau: float = _DEFAULTS.tau,
    alpha: float = _DEFAULTS.alpha,
    output_size: tuple[int, int] = _DEFAULTS.output_size,
    image: torch.Tensor | None = None,
    pamr: bool = _DEFAULTS.pamr,
) -> np.ndarray:
    """Segment one image from one UNet layer's tokens (reference `DiffCut.generate_masks`, for one image).

    Args:
        features: (h·w, C) row-major tokens (read as a square grid) or (h, w, C), array or tensor; computed on the
            tensor's device (numpy: CPU).
        tau: a cut is accepted while its normalised-cut cost is below `tau` (paper: 0.5; lower gives fewer segments).
        alpha: exponent of the min-max normalised cosine affinity (paper: 10).
        output_size: (height, width) of the label map; the reference evaluates at (128, 128).
        image: (1, 3, H, W) float in [0, 1], needed with `pamr`; resized bilinearly to `output_size` if needed.
        pamr: refine with PAMR and a 3×3 median filter, as the reference's evaluation does with `--refinement`.

    Returns:
        (height, width) int32 label map, ids 0..K-1, each present.
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"`tau` must be a positive number but is {tau!r}.")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"`alpha` must be a positive number but is {alpha!r}.")
    height, width = (output_size, output_size) if isinstance(output_size, int) else (int(v) for v in output_size)
    if height < 1 or width < 1:
        raise ValueError(f"`output_size` must be positive but is {output_size!r}.")
    if pamr and image is None:
        raise ValueError("`pamr=True` needs the `image`: a (1, 3, H, W) float tensor in [0, 1].")
    grid = as_token_grid(features)  # (h, w, C)
    h, w, c = grid.shape
    # Reference: the (1, C, h, w) float32 features are L2-normalised over channels (`feats_norm`).
    feats = F.normalize(grid.permute(2, 0, 1)[None], dim=1)  # (1, C, h, w)
    tokens = feats.reshape(c, h * w)  # (C, N)

    # 1. Recursive normalised cut; clusters numbered as the reference's `assemble_clusters`.
    clusters = assemble_clusters(recursive_ncut(tokens, tau=tau, alpha=alpha), h * w).to(tokens.device)  # (N,)
    labels = _assign(feats, clusters, (height, width))
    if pamr:
        from .pamr import refine_labels

        image = image.float()
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"`image` must be shaped (1, 3, H, W) but is {tuple(image.shape)}.")
        if image.shape[-2:] != (height, width):  # reference: `F.interpolate(image, size=(128, 128), mode="bilinear")`
            image = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
        refined = refine_labels(torch.from_numpy(labels), image)
        labels = np.unique(refined.numpy(), return_inverse=True)[1].reshape(height, width).astype(np.int32)
    return labels
