"""Colours for label maps: a fixed palette, colourised labels, and overlays with segment boundaries."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping

import numpy as np


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours, the same for a given id in every image.

    Hues step by the golden ratio so neighbouring ids differ strongly; saturation and value cycle for variety.
    """
    colours = []
    for i in range(n):
        hue = (i * 0.618033988749895) % 1.0
        saturation = (0.85, 0.6, 1.0)[i % 3]
        value = (0.95, 0.75, 0.85)[(i // 3) % 3]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(colours, dtype=np.uint8).reshape(n, 3)


def colourise(labels: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 palette colours."""
    labels = np.asarray(labels)
    return palette(int(labels.max(initial=0)) + 1)[labels]


def boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose right or lower neighbour has another id."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    alpha: float = 0.5,
    edge_colour=(255, 255, 255),
    names: Mapping[int, str] | None = None,
) -> np.ndarray:
    """Segment colours blended over `image`, with boundaries drawn, and each segment's name if `names` are given.

    Args:
        image: (H, W, 3) uint8 RGB, the same size as `labels`.
        labels: (H, W) integer ids.
        alpha: weight of the segment colours.
        names: segment id -> text written at a point inside the segment.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    image = np.asarray(image)
    if image.shape[:2] != np.shape(labels):
        raise ValueError(f"`image` is {image.shape[:2]} but `labels` is {np.shape(labels)}; they must match.")
    if alpha == 0.5:  # the default: the same numbers in integers, a third of the time on a 12-megapixel image
        total = image.astype(np.uint16) + colourise(labels)
        half = total >> 1
        out = (half + (total & half & 1)).astype(np.uint8)  # x.5 rounds to even, as `round` does
    else:
        blended = (1 - alpha) * image.astype(np.float32) + alpha * colourise(labels).astype(np.float32)
        out = blended.round().astype(np.uint8)
    out[boundaries(labels)] = edge_colour
    if names:
        out = _write_names(out, np.asarray(labels), names)
    return out


def label_anchors(labels: np.ndarray, max_side: int | None = None) -> np.ndarray:
    """(K, 2) (x, y) per id 0..K-1: where a segment's name goes, the segment's pixel farthest from its boundary (the
    image border counts as one), nearest the segment's centroid among equals, first in raster order after that. An
    id with no pixel gets (-1, -1). One distance transform and one sort, no loop over segments.

    With `max_side`, the search runs on every s-th pixel (s the smallest step that brings the longest side to at most
    `max_side`), and the anchors are those pixels' full-size coordinates: placement for text, at a fixed cost. A
    sliver the sampling misses gets its first pixel in raster order.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    step = 1 if max_side is None else max(1, -(-max(labels.shape) // max_side))
    sampled = labels[step // 2 :: step, step // 2 :: step]
    ids = sampled.ravel().astype(np.int64)
    k = int(labels.max(initial=-1)) + 1
    padded = np.pad(sampled, 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    boundary = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    depth = ndimage.distance_transform_edt(~boundary).ravel()
    ys, xs = np.divmod(np.arange(ids.size), sampled.shape[1])
    count = np.bincount(ids, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy, cx = np.bincount(ids, ys, k) / count, np.bincount(ids, xs, k) / count
    off_centre = (ys - cy[ids]) ** 2 + (xs - cx[ids]) ** 2
    order = np.lexsort((off_centre, -depth, ids))  # by id, deepest first, then nearest the centroid; stable
    first = np.searchsorted(ids[order], np.arange(k))
    anchors = np.full((k, 2), -1, dtype=np.int64)
    present = count > 0
    best = order[first[present]]
    anchors[present] = np.stack([xs[best], ys[best]], axis=1) * step + step // 2
    missed = np.flatnonzero(~present)
    if step > 1 and len(missed):  # slivers between the sampled pixels: their first pixel, in one pass
        where = np.flatnonzero(np.isin(labels.ravel(), missed))
        found, at = np.unique(labels.ravel()[where], return_index=True)
        anchors[found] = np.stack([where[at] % labels.shape[1], where[at] // labels.shape[1]], axis=1)
    return anchors


def placed_first(areas: np.ndarray, boxes: list[tuple[float, float, float, float] | None]) -> list[int]:
    """Which names to write so that none overlaps another: largest segment first, each name kept unless its box
    (left, top, right, bottom) overlaps one already kept. `boxes[i]` is segment i's (None: no name). The demo's
    viewer (web/viewer.js) places its names by the same rule."""
    kept: list[int] = []
    for i in np.argsort(-np.asarray(areas), kind="stable"):
        box = boxes[i]
        if box is None:
            continue
        if all(
            box[2] <= boxes[j][0] or boxes[j][2] <= box[0] or box[3] <= boxes[j][1] or boxes[j][3] <= box[1]
            for j in kept
        ):
            kept.append(int(i))
    return kept


def _write_names(image: np.ndarray, labels: np.ndarray, names: Mapping[int, str]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(image.shape[:2]) // 32))
    areas = np.bincount(labels.ravel(), minlength=max(names, default=0) + 1)
    anchors = label_anchors(labels, max_side=512)
    boxes: list[tuple[float, float, float, float] | None] = [None] * len(areas)
    for segment, text in names.items():
        # Too small to hold its name legibly (the JSON still has it), or absent.
        if segment < len(anchors) and areas[segment] >= 0.005 * labels.size and anchors[segment, 0] >= 0:
            boxes[segment] = draw.textbbox(tuple(anchors[segment]), text, font=font, anchor="mm", stroke_width=2)
    for segment in placed_first(areas, boxes):
        draw.text(
            tuple(anchors[segment]),
            names[segment],
            font=font,
            fill=(255, 255, 255),
            anchor="mm",
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )
    return np.asarray(canvas)


def with_legend(image: np.ndarray, words: list[str]) -> np.ndarray:
    """`image` with a legend below it: each word after a swatch of its id's palette colour (id = the word's index),
    in rows as wide as the image. (H + legend, W, 3) uint8."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = image.shape[:2]
    size = max(12, min(28, width // 40))
    font = ImageFont.load_default(size=size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, swatch = size // 2, size
    entries = [(k, word, swatch + pad // 2 + measure.textlength(word, font=font)) for k, word in enumerate(words)]
    rows, x = [[]], pad
    for entry in entries:  # wrap to the image's width
        if rows[-1] and x + entry[2] > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((x, *entry))
        x += entry[2] + 2 * pad
    line = size + pad
    canvas = Image.new("RGB", (width, height + len(rows) * line + pad), (255, 255, 255))
    canvas.paste(Image.fromarray(np.asarray(image, dtype=np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    colours = palette(len(words))
    for r, row in enumerate(rows):
        y = height + pad + r * line
        for x, k, word, _ in row:
            draw.rectangle((x, y, x + swatch, y + swatch), fill=tuple(int(c) for c in colours[k]), outline=(0, 0, 0))
            draw.text((x + swatch + pad // 2, y + swatch // 2), word, font=font, fill=(0, 0, 0), anchor="lm")
    return np.asarray(canvas)
