"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as DiffCut's evaluation applies it.

Reference: DiffCut `tools/pamr.py` (from visinf/1-stage-wseg) and `eval_diffcut.py` (`Benchmark_Segmentation.pamr`):
10 iterations over dilations 1, 2, 4, 8, then a 3×3 median filter. Each pixel's labels are repeatedly replaced by a
weighted mean of its 8 neighbours' at every dilation, weighted by colour similarity relative to the local spread.
The reference's shift convolutions are written here as slices of a replicate-padded image, in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DILATIONS = (1, 2, 4, 8)  # reference `PAMR(num_iter=10, dilations=[1, 2, 4, 8])`
ITERATIONS = 10

# The 3×3 kernel positions the reference's shift kernels read, row-major; the centre is left out of the
# neighbours (`LocalAffinity`, `LocalAffinityCopy`) and kept for the local deviation (`LocalStDev`).
_NEIGHBOURS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))
_WINDOW = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2))


def _shifted(x: torch.Tensor, positions, dilations=DILATIONS) -> torch.Tensor:
    """(B, K, H, W) -> (B, K, P, H, W): x at each kernel position and dilation (replicate padding), dilations outer."""
    height, width = x.shape[-2:]
    out = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")  # (B, K, H + 2d, W + 2d)
        out += [padded[..., i * d : i * d + height, j * d : j * d + width] for i, j in positions]
    return torch.stack(out, dim=2)


@torch.inference_mode()
def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """Refine soft masks with the image's local colour affinities (reference `PAMR.forward`).

    Args:
        image: (B, 3, H, W) float, the image at the masks' size (the reference's is in [0, 1]).
        masks: (B, K, H, W) float, one channel per label.

    Returns:
        (B, K, H, W) refined masks.
    """
    image, masks = image.float(), masks.float()
    deviation = _shifted(image, _WINDOW).std(dim=2, keepdim=True)  # (B, 3, 1, H, W), over all 36 positions
    centre = image[:, :, None]  # (B, 3, 1, H, W)
    difference = (centre - _shifted(image, _NEIGHBOURS)).abs()  # (B, 3, 32, H, W)
    weights = (-difference / (1e-8 + 0.1 * deviation)).mean(dim=1, keepdim=True).softmax(dim=2)  # (B, 1, 32, H, W)
    for _ in range(iterations):
        masks = (_shifted(masks, _NEIGHBOURS) * weights).sum(dim=2)  # (B, K, H, W)
    return masks


def refine_labels(labels: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """DiffCut's optional refinement of a label map (reference `Benchmark_Segmentation.pamr`): PAMR on the one-hot
    masks of the labels present, argmax, then a 3×3 median filter.

    Args:
        labels: (H, W) integer ids.
        image: (1, 3, H, W) float in [0, 1] at the labels' size.

    Returns:
        (H, W) int64: the index of each pixel's label among the labels present (ascending), filtered.
    """
    from scipy.ndimage import median_filter

    present = torch.unique(labels)  # ascending, as the reference's `torch.unique(labels)`
    onehot = (labels[None] == present[:, None, None]).float()[None]  # (1, K, H, W)
    refined = pamr(image.to(onehot.device), onehot).argmax(dim=1)[0]  # (H, W)
    # scipy's median filter, 3×3 with its default reflecting border, on the float ids as the reference.
    filtered = median_filter(refined.float().cpu().numpy(), size=3)
    return torch.from_numpy(filtered.astype("int64"))
