"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as DiffCut's evaluation applies it.

Reference: DiffCut `tools/pamr.py` (from visinf/1-stage-wseg) and `eval_diffcut.py` (`Benchmark_Segmentation.pamr`):
10 iterations over dilations 1, 2, 4, 8, then a 3×3 median filter. Each pixel's labels are repeatedly replaced by a
weighted mean of its 8 neighbours' at every dilation, weighted by colour similarity relative to the local spread.
The reference's shift convolutions are written here as slices of a replicate-padded image, in the same order.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from ...cancel import checkpoint

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


def _affinity(image: torch.Tensor) -> torch.Tensor:
    """(B, 1, 32, H, W) weights of each pixel's neighbours (reference `PAMR.forward`, before its iterations)."""
    deviation = _shifted(image, _WINDOW).std(dim=2, keepdim=True)  # (B, 3, 1, H, W), over all 36 positions
    centre = image[:, :, None]  # (B, 3, 1, H, W)
    difference = (centre - _shifted(image, _NEIGHBOURS)).abs()  # (B, 3, 32, H, W)
    return (-difference / (1e-8 + 0.1 * deviation)).mean(dim=1, keepdim=True).softmax(dim=2)


def _propagate(masks: torch.Tensor, weights: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    for _ in range(iterations):
        masks = (_shifted(masks, _NEIGHBOURS) * weights).sum(dim=2)  # (B, K, H, W)
    return masks


@torch.inference_mode()
def pamr(image: torch.Tensor, masks: torch.Tensor, iterations: int = ITERATIONS) -> torch.Tensor:
    """Refine soft masks with the image's local colour affinities (reference `PAMR.forward`).

    Args:
        image: (B, 3, H, W) float, the image at the masks' size (the reference's is in [0, 1]).
        masks: (B, K, H, W) float, one channel per label.

    Returns:
        (B, K, H, W) refined masks.
    """
    return _propagate(masks.float(), _affinity(image.float()), iterations)


# Memory a refinement may hold at once (float32 working tensors), whatever the image size and label count: the
# shifted copies PAMR reads (32 per label, 108 for the colour statistics) are made per tile of rows and chunk of
# labels. A tile is computed with enough rows around it that its own rows come out exactly as on the whole image:
# the colour weights read `REACH` rows away (the largest dilation), each of the iterations `REACH` more.
MEMORY_BUDGET = 1 << 30
REACH = max(DILATIONS)
HALO = REACH * ITERATIONS
_SHIFTS = len(_NEIGHBOURS) * len(DILATIONS)  # 32 neighbours per pixel
_WEIGHTS = _SHIFTS  # floats per pixel kept for a tile: its neighbours' weights
_PER_LABEL = 2 * _SHIFTS + 2  # floats per pixel and label: shifted copies and their product, masks in and out
_STATISTICS = 3 * len(_WINDOW) * len(DILATIONS) + 3 * 3 * _SHIFTS  # floats per pixel while weights are computed


def refinement_plan(size: tuple[int, int], labels: int, budget: int = MEMORY_BUDGET) -> tuple[int, int]:
    """(rows per tile, labels per chunk) that keep PAMR within `budget` bytes on an image of `size`: whole-height
    tiles (no halo recomputed) with as many labels as fit, else tiles of one label with as many rows as fit."""
    height, width = size
    floats = budget // 4

    def chunk(rows: int) -> int:  # labels a tile of `rows` rows (with its halo) leaves room for
        return (floats // (min(height, rows + 2 * HALO) * width) - _WEIGHTS) // _PER_LABEL

    if chunk(height) >= 1:
        return height, min(labels, chunk(height))
    return max(1, floats // (width * (_WEIGHTS + _PER_LABEL)) - 2 * HALO), 1


def _affinity_in_blocks(image: torch.Tensor, budget: int) -> torch.Tensor:
    """`_affinity` of a (1, 3, H, W) image computed a block of rows at a time (each with `REACH` rows of context,
    so every row is exact), within `budget` bytes: (1, 1, 32, H, W)."""
    height, width = image.shape[-2:]
    rows = max(1, budget // 4 // (width * _STATISTICS) - 2 * REACH)
    if rows >= height:
        return _affinity(image)
    blocks = []
    for top in range(0, height, rows):
        first, bottom = max(0, top - REACH), min(height, top + rows)
        block = _affinity(image[:, :, first : min(height, bottom + REACH)])
        blocks.append(block[..., top - first : bottom - first, :])
    return torch.cat(blocks, dim=-2)


def refine_labels(labels: torch.Tensor, image: torch.Tensor, budget: int = MEMORY_BUDGET) -> torch.Tensor:
    """DiffCut's optional refinement of a label map (reference `Benchmark_Segmentation.pamr`): PAMR on the one-hot
    masks of the labels present, argmax, then a 3×3 median filter.

    The result is the reference's whatever `budget` (bytes of working memory): tiles of rows (`refinement_plan`)
    give every pixel the same arithmetic, and each label is propagated only over the pixels it can reach
    (`label_boxes`): no step couples the labels, and outside that box its mask is exactly zero. The argmax runs
    over the labels in order keeping the first maximum (a pixel no label reaches with a positive value takes the
    first label, as the reference's argmax over zeros does), so the cost follows the local label count.

    Args:
        labels: (H, W) integer ids.
        image: (1, 3, H, W) float in [0, 1] at the labels' size.

    Returns:
        (H, W) int64: the index of each pixel's label among the labels present (ascending), filtered.
    """
    from scipy.ndimage import median_filter

    present = torch.unique(labels)  # ascending, as the reference's `torch.unique(labels)`
    height, width = labels.shape
    image = image.float().to(labels.device)
    rows, _ = refinement_plan((height, width), 1, budget)
    refined = torch.empty(height, width, dtype=torch.int64, device=labels.device)
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        first, last = max(0, top - HALO), min(height, bottom + HALO)  # the tile with its halo
        context = max(0, first - REACH)  # the colour weights of the tile's edge rows read REACH rows further
        weights = _affinity_in_blocks(image[:, :, context : min(height, last + REACH)], budget)
        weights = weights[..., first - context : first - context + (last - first), :]  # (1, 1, 32, h, W)
        refined[top:bottom] = _argmax_in_boxes(labels[first:last], present, weights, top - first, bottom - first)
    # scipy's median filter, 3×3 with its default reflecting border, on the float ids as the reference.
    filtered = median_filter(refined.float().cpu().numpy(), size=3)
    return torch.from_numpy(filtered.astype("int64"))


def _argmax_in_boxes(window, present, weights, start: int, stop: int) -> torch.Tensor:
    """The index among `present` of each pixel's largest propagated mask, rows `start:stop` of the tile `window`
    (h, W), each label propagated over its `label_boxes` box alone. Masks are non-negative: a label's zero outside
    its box never beats an earlier label, so the best starts at zero with the first label."""
    best = torch.zeros(stop - start, window.shape[1], device=window.device)
    index = torch.zeros(stop - start, window.shape[1], dtype=torch.int64, device=window.device)
    for k, box in enumerate(label_boxes(window, present)):
        checkpoint()  # a caller's Stop ends the refinement between labels (`cancel.cancellable`)
        if box is None or box[0].stop <= start or box[0].start >= stop:
            continue
        rows, cols = box
        onehot = (window[rows, cols] == present[k]).float()[None, None]  # (1, 1, h, w)
        masks = _propagate(onehot, weights[..., rows, cols])[0, 0]  # (h, w)
        kept = slice(max(rows.start, start) - rows.start, min(rows.stop, stop) - rows.start)
        value = masks[kept]
        out = (slice(max(rows.start, start) - start, min(rows.stop, stop) - start), cols)
        better = value > best[out]  # strict: an earlier label keeps a tie
        best[out] = torch.where(better, value, best[out])
        index[out] = torch.where(better, k, index[out])
    return index


def label_boxes(window: torch.Tensor, present: torch.Tensor) -> list:
    """Per label of `present` (ascending ids), the rows and columns of `window` (h, W) it can reach in PAMR's
    iterations: its pixels' bounding box grown by `HALO` (clipped), or None where it has no pixel there. Outside that
    box its propagated mask is exactly zero (each iteration spreads a mask by at most `REACH` pixels, and weights are
    non-negative), so it is computed there alone."""
    from scipy.ndimage import find_objects

    index = torch.searchsorted(present, window).numpy() + 1  # 1..K: `find_objects`' labels
    height, width = window.shape
    boxes = []
    for found in find_objects(index, max_label=len(present)):
        if found is None:
            boxes.append(None)
            continue
        rows, cols = found
        boxes.append(
            (
                slice(max(0, rows.start - HALO), min(height, rows.stop + HALO)),
                slice(max(0, cols.start - HALO), min(width, cols.stop + HALO)),
            )
        )
    return boxes


def reach(labels: torch.Tensor) -> int:
    """Pixels PAMR propagates a mask over on the label map `labels` (H, W), summed over its labels: each label's
    `label_boxes` box (on one whole-map tile; tiles add their halos)."""
    boxes = label_boxes(labels, torch.unique(labels))
    return sum((b[0].stop - b[0].start) * (b[1].stop - b[1].start) for b in boxes if b is not None)


def estimated_seconds(size: tuple[int, int], labels: int, reached: int | None = None) -> float:
    """About how long `refine_labels` takes here on a label map of `size` (H, W) with `labels` labels, whose masks
    are propagated over `reached` pixels in all (`reach`; default: every label over the whole map, the most).

    Its work is the colour weights (per pixel) and the propagation (per pixel a label reaches): the two rates are
    measured once per process on a small map (under a second), so the estimate is this machine's.
    """
    per_pixel, per_label_pixel = _rates()
    pixels = size[0] * size[1]
    return pixels * per_pixel + (labels * pixels if reached is None else reached) * per_label_pixel


@functools.cache
def _rates(side: int = 256) -> tuple[float, float]:
    """(seconds per pixel, seconds per pixel and label) of `refine_labels`, from one and nine labels on a map large
    enough that nine labels' working tensors leave the CPU's caches, as real maps' do (below that, the time per label
    is several times lower and the estimate would be too)."""
    generator = torch.Generator().manual_seed(0)

    def seconds(labels: int, side: int = side) -> float:
        ids = torch.randint(0, labels, (side, side), generator=generator)
        start = time.perf_counter()
        refine_labels(ids, torch.rand(1, 3, side, side, generator=generator))
        return time.perf_counter() - start

    seconds(1, 32)  # the first call pays for one-off set-up
    one, nine = seconds(1), seconds(9)
    # A busy machine can slow the one-label run past the nine-label one: each rate keeps at least a tenth of what its
    # run alone gives, so an estimate always grows with pixels and labels.
    per_label = max((nine - one) / 8, 0.1 * nine / 9) / side**2
    return max(one / side**2 - per_label, 0.1 * one / side**2), per_label
