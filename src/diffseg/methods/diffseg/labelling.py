"""Step 5 of the method: turn merged proposals into a label map.

Paper §3.3 "Non-maximum suppression"; reference `generate_masks`: bilinear upsampling of every proposal to the
output size (`UpSampling2D(size=(8, 8), interpolation="bilinear")` for 64 -> 512), then argmax over proposals.
We then relabel the surviving proposals 0..K-1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Upsampled values held at once (float32): bounds memory for any output size and number of proposals.
_PIXELS_PER_CHUNK = 1 << 24


def relabel(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map the ids present to 0..K-1, keeping their order. Returns the new ids and K."""
    present, inverse = torch.unique(ids, return_inverse=True)
    return inverse.reshape(ids.shape), len(present)


@torch.inference_mode()
def label_map(proposals: torch.Tensor, output_size: tuple[int, int]) -> np.ndarray:
    """Upsample proposals to `output_size`, take the argmax per pixel, relabel 0..K-1.

    Args:
        proposals: (K, S, S) merged attention maps.
        output_size: (height, width) of the label map.

    Returns:
        (height, width) int32 label map, values 0..K-1 with every id present.
    """
    height, width = (int(v) for v in output_size)
    if height < 1 or width < 1:
        raise ValueError(f"`output_size` must be two positive integers but is {output_size!r}.")
    proposals = proposals.float().unsqueeze(1)  # (K, 1, S, S)
    best = torch.full((height, width), -torch.inf, device=proposals.device)
    ids = torch.zeros(height, width, dtype=torch.int32, device=proposals.device)
    chunk = max(1, _PIXELS_PER_CHUNK // (height * width))  # proposals upsampled at once: bounds memory
    for first in range(0, len(proposals), chunk):
        # Reference `UpSampling2D(interpolation="bilinear")`: half-pixel centres, torch's `align_corners=False`.
        up = F.interpolate(proposals[first : first + chunk], size=(height, width), mode="bilinear", align_corners=False)
        if chunk == 1:  # a large label map, one proposal at a time: update in place (no index map per proposal)
            better = up[0, 0] > best  # strict: an earlier proposal wins a tie
            torch.where(better, up[0, 0], best, out=best)
            ids.masked_fill_(better, first)
            continue
        value, index = up[:, 0].max(dim=0)  # (H, W); first maximum on ties, as tf.math.argmax
        better = value > best  # strict: an earlier proposal wins a tie across chunks too
        best = torch.where(better, value, best)
        ids = torch.where(better, index.to(torch.int32) + first, ids)
    labels, _ = relabel(ids)
    return labels.to(torch.int32).cpu().numpy()
