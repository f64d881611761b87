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
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colourise(labels).astype(np.float32)
    out = blended.round().astype(np.uint8)
    out[boundaries(labels)] = edge_colour
    if names:
        out = _write_names(out, np.asarray(labels), names)
    return out


def label_anchor(labels: np.ndarray, segment: int) -> tuple[int, int] | None:
    """(x, y) of the segment's pixel nearest its centroid (inside the segment, unlike the centroid itself)."""
    ys, xs = np.nonzero(labels == segment)
    if len(ys) == 0:
        return None
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return int(xs[k]), int(ys[k])


def _write_names(image: np.ndarray, labels: np.ndarray, names: Mapping[int, str]) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, min(image.shape[:2]) // 32))
    areas = np.bincount(labels.ravel(), minlength=max(names, default=0) + 1)
    for segment, text in names.items():
        if areas[segment] < 0.005 * labels.size:  # too small to hold its name legibly; the JSON still has it
            continue
        anchor = label_anchor(labels, segment)
        if anchor is not None:
            draw.text(anchor, text, font=font, fill=(255, 255, 255), anchor="mm", stroke_width=2, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)
