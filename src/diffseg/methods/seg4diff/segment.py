"""Seg4Diff's segmentation of image-to-text attention (reference: `seg4diff/seg4diff_model_unsup.py`).

The encode (`DiffSegPipeline.text_attention`) gives, per image token, its attention over the empty prompt's 77 CLIP
tokens in one SD3 block: a (h·w, 77) map, softmax over the whole joint sequence, mean over heads. Then:

1. `normalise_maps`: min-max over the 77 tokens at each pixel, raised to a power (`att2mask`; the class defines it
   twice and the second definition, over `dim=2` of (B, h·w, 77), is the one that runs).
2. `merge_maps`: each token's map softmaxed over the pixels; greedily, in token order, every map not yet taken
   gathers all maps (taken ones included) within the KL threshold of it, and their mean is one proposal
   (`mask_merge`, `KL`: (KL(x‖y) + KL(y‖x)) / 2).
3. The proposals upsampled bilinearly to the output size (`sem_seg_postprocess`), argmax per pixel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def normalise_maps(attention: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """(N, T) attention of N pixels over T tokens -> the same, min-max normalised over the tokens at each pixel
    (`att -= att.min(dim=2)`, `att /= att.max(dim=2) + 1e-6`), then `** power`."""
    attention = attention - attention.min(dim=-1, keepdim=True).values
    attention = attention / (attention.max(dim=-1, keepdim=True).values + 1e-6)
    return attention**power


def merge_maps(maps: torch.Tensor, kl_threshold: float) -> torch.Tensor:
    """(T, h, w) token maps -> (M, h, w) merged proposals, each a distribution over the pixels.

    The reference's arithmetic, in float32: per anchor, q = log(anchor) − log(maps) and KL = Σ anchor·q / 2 −
    Σ maps·q / 2 against every map at once; the threshold decisions then match its own. (It runs in float16 on the
    GPU, with `FP16: True`; float32 here.)
    """
    count = maps.shape[0]
    probs = maps.reshape(count, -1).float().softmax(dim=-1).view_as(maps)  # (T, h, w), each sums to 1
    logs = probs.log()
    taken = torch.zeros(count, dtype=torch.bool)
    proposals = []
    for i in range(count):
        if taken[i]:
            continue
        quotient = logs[i] - logs  # (T, h, w)
        kl = (probs[i] * quotient).sum(dim=(-2, -1)) / 2 - (probs * quotient).sum(dim=(-2, -1)) / 2
        group = kl < kl_threshold
        group[i] = True  # the anchor itself (KL 0) is always taken, as `matched.add(i)`
        taken |= group
        proposals.append(probs[group].mean(dim=0))
    return torch.stack(proposals)


def segment_text_attention(
    attention: torch.Tensor,
    *,
    kl_threshold: float = 0.1,
    power: float = 1.0,
    output_size: tuple[int, int] = (512, 512),
) -> np.ndarray:
    """Seg4Diff's label map from one image's image-to-text attention.

    Args:
        attention: (h, w, T) float: each image token's attention over T prompt tokens (`TextAttentionBundle`).
        kl_threshold: maps closer than this (symmetric KL) merge (reference 0.1).
        power: exponent after the min-max normalisation (reference 1.0).
        output_size: (height, width) of the label map.

    Returns:
        (height, width) int32 ids 0..K-1, each present.
    """
    if not (isinstance(kl_threshold, (int, float)) and math.isfinite(kl_threshold) and kl_threshold > 0):
        raise ValueError(f"`kl_threshold` must be a positive number but is {kl_threshold!r}.")
    if attention.dim() != 3 or 0 in attention.shape:
        raise ValueError(f"`attention` must be shaped (h, w, T) but is {tuple(attention.shape)}.")
    h, w, tokens = attention.shape
    maps = normalise_maps(attention.reshape(h * w, tokens).float(), power).T.reshape(tokens, h, w)
    proposals = merge_maps(maps, kl_threshold)  # (M, h, w)
    height, width = output_size
    # Upsampled one proposal at a time, keeping the first maximum: the argmax of the stacked upsampled maps
    # without holding M full-size maps.
    best = torch.full((height, width), -torch.inf)
    labels = torch.zeros((height, width), dtype=torch.int64)
    for k, proposal in enumerate(proposals):
        up = F.interpolate(proposal[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        better = up > best
        best = torch.where(better, up, best)
        labels = torch.where(better, k, labels)
    return np.unique(labels.numpy(), return_inverse=True)[1].reshape(height, width).astype(np.int32)
