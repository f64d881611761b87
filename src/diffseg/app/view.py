"""What the demo shows for one segmentation: the interactive viewer's data, the segment table and the label PNG.

The viewer (`web/viewer.js`) composes the overlay in the browser from the image and a map of segment ids, so the
opacity, the boundaries, hovering and isolating a segment cost no server round trip. This module makes its data:
the image once per bundle, the ids, colour, area, name, score and name anchor of every segment per segmentation.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.outputs import label_image, legend, save_image, save_json
from ..io.visualisation import label_anchors, palette

SMALL_SEGMENT = 0.005  # segments under 0.5 % of the image: collapsed in the table, named on the viewer on hover only
VIEWER_SIDE = 1024  # longest side of the viewer's image and id map; areas and the label PNG are at full size
_ANCHOR_SIDE = 256  # name anchors are searched on every s-th pixel, at most this many per side: ~10 ms


@dataclass(frozen=True)
class SegmentRow:
    """One segment as the viewer and the table show it."""

    id: int
    colour: str  # "#rrggbb", the palette colour of the label map
    area: float  # fraction of the image
    name: str | None = None  # its word, when the bundle was encoded with words
    score: float | None = None
    x: float = 0.5  # where its name goes: the pixel nearest its centroid, as a fraction of width and height
    y: float = 0.5

    @property
    def small(self) -> bool:
        return self.area < SMALL_SEGMENT


def segment_rows(labels: np.ndarray, names=None) -> list[SegmentRow]:
    """Every segment of a label map, largest first (ties by id), with its name and score when `names` are given."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel())
    colours = palette(len(counts))
    anchors = label_anchors(labels, max_side=_ANCHOR_SIDE)
    named = {n.id: n for n in names or []}
    rows = []
    height, width = labels.shape
    for i in np.argsort(-counts, kind="stable"):
        x, y = anchors[i]
        name = named.get(int(i))
        rows.append(
            SegmentRow(
                id=int(i),
                colour="#{:02x}{:02x}{:02x}".format(*colours[i]),
                area=float(counts[i] / labels.size),
                name=None if name is None else (name.label or "unlabelled"),
                score=None if name is None else float(name.score),
                x=float((x + 0.5) / width),  # the pixel's centre
                y=float((y + 0.5) / height),
            )
        )
    return rows


def segment_table(rows: list[SegmentRow], named: bool = False) -> str:
    """HTML table of segments, largest first: colour, id, area % (and name and score when segments are named).
    Segments under `SMALL_SEGMENT` are collapsed into a second table under a disclosure. Rows carry their segment
    id (`data-segment`) so that the viewer can link a row and its segment both ways."""
    head = ["segment", "area %"] + (["name", "score"] if named else [])

    def table(part: list[SegmentRow], caption: str) -> str:
        body = []
        for row in part:
            cells = [
                f"<span class='swatch' style='background:{row.colour}'></span> {row.id}",
                f"{100 * row.area:.1f}",
            ]
            if named:
                cells += [html.escape(row.name or ""), "" if row.score is None else f"{row.score:.2f}"]
            body.append(
                f"<tr data-segment='{row.id}' tabindex='0' aria-selected='false'>"
                + "".join(f"<td>{cell}</td>" for cell in cells)
                + "</tr>"
            )
        return (
            f"<table><caption class='sr-only'>{caption}</caption><thead><tr>"
            + "".join(f"<th scope='col'>{h}</th>" for h in head)
            + f"</tr></thead><tbody>{''.join(body)}</tbody></table>"
        )

    large = [r for r in rows if not r.small]
    small = [r for r in rows if r.small]
    parts = [table(large, "Segments, largest first; select a row to isolate its segment")]
    if small:
        noun = "segment" if len(small) == 1 else "segments"
        parts.append(
            f"<details class='small-segments'><summary>{len(small)} small {noun} "
            f"(under {100 * SMALL_SEGMENT:g} % of the image each)</summary>"
            + table(small, "Small segments")
            + "</details>"
        )
    return "<div class='segment-table'>" + "".join(parts) + "</div>"


def _data_uri(image: Image.Image, format: str, **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    mime = "jpeg" if format == "JPEG" else format.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def viewer_size(size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) the viewer draws at for an image of `size`: at most `VIEWER_SIDE` on the longest side."""
    height, width = size
    scale = min(1.0, VIEWER_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def image_uri(image: np.ndarray) -> str:
    """The image at the viewer's size as a JPEG data URI (made once per bundle)."""
    height, width = viewer_size(image.shape[:2])
    picture = Image.fromarray(image)
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.BILINEAR)
    return _data_uri(picture, "JPEG", quality=90)


def ids_uri(labels: np.ndarray) -> str:
    """Segment ids at the viewer's size as a lossless PNG data URI: id = red + 256 · green (up to 65,536 ids)."""
    height, width = viewer_size(labels.shape)
    if labels.shape != (height, width):  # nearest: every id stays an id
        rows = (np.arange(height) * labels.shape[0] // height)[:, None]
        cols = (np.arange(width) * labels.shape[1] // width)[None, :]
        labels = labels[rows, cols]
    if labels.max(initial=0) >= 1 << 16:
        raise ValueError(f"The viewer shows at most 65,536 segments; this segmentation has {labels.max() + 1}.")
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1] = labels & 0xFF, labels >> 8
    return _data_uri(Image.fromarray(rgb), "PNG", compress_level=1)


SHARES_SIDE = 256  # longest side of the concept maps the viewer reads each word's share from


def shares_uri(probabilities: np.ndarray) -> str:
    """Concept maps (K, H, W) for the viewer: the K maps at most `SHARES_SIDE` on a side, stacked top to bottom in one
    8-bit grey PNG (255 = all of the pixel), as a data URI."""
    k, height, width = probabilities.shape
    step = max(1, -(-max(height, width) // SHARES_SIDE))
    small = probabilities[:, step // 2 :: step, step // 2 :: step]
    grey = np.clip(np.rint(255 * small), 0, 255).astype(np.uint8).reshape(-1, small.shape[2])
    return _data_uri(Image.fromarray(grey, mode="L"), "PNG", compress_level=1)


def viewer_html(
    image: str,
    labels: np.ndarray,
    rows: list[SegmentRow],
    title: str,
    probabilities: np.ndarray | None = None,
    words: tuple[str, ...] = (),
) -> str:
    """The viewer's markup: data attributes that `web/viewer.js` draws from, a canvas with an accessible name, a
    layer for segment names and a tooltip. With concept maps' `probabilities` (K, H, W) and their K `words`, each
    word's share at the pointer (every word, also one that wins no pixel and so has no segment)."""
    segments = [
        {"id": r.id, "colour": r.colour, "area": r.area, "name": r.name, "score": r.score, "x": r.x, "y": r.y}
        for r in rows
    ]
    count = f"{len(rows)} segment" + ("" if len(rows) == 1 else "s")
    attribute = lambda value: html.escape(value, quote=True)  # noqa: E731
    shares = ""
    if probabilities is not None:
        shares = f" data-shares='{attribute(shares_uri(probabilities))}' data-words='{attribute(json.dumps(words))}'"
    return (
        f"<div class='diffseg-viewer' data-image='{attribute(image)}' data-ids='{attribute(ids_uri(labels))}'"
        f" data-segments='{attribute(json.dumps(segments))}'{shares}>"
        f"<div class='stage'><canvas role='img' tabindex='0' aria-label='{attribute(title)}: {count}. Point at a "
        "segment for its name and area; select it to isolate it.'></canvas>"
        "<div class='names' aria-hidden='true'></div><div class='tip' hidden></div></div></div>"
    )


@dataclass
class View:
    """What the page shows for one setting of the sliders."""

    viewer: str  # viewer_html
    label_file: Path  # PNG of ids at the image's size, for download
    overlay_file: Path  # the colours over the image (PNG), as an image viewer shows it
    legend_file: Path  # id, name, area and colour of every segment (JSON): the ids' key
    table: str
    rows: list[SegmentRow]
    seconds: float


def render(result, image: str, out_dir: Path, name: str, start: float | None = None) -> View:
    """A `Segmentation` -> viewer markup, table and its downloads (written under `out_dir`: `<name>-labels.png`,
    `<name>-overlay.png`, `<name>-legend.json`).
    `image` is the viewer's image (`image_uri`); `start` the `time.perf_counter()` the segmentation began."""
    start = time.perf_counter() if start is None else start
    label_file, overlay_file = Path(out_dir) / f"{name}-labels.png", Path(out_dir) / f"{name}-overlay.png"
    legend_file = Path(out_dir) / f"{name}-legend.json"
    save_image(label_image(result.labels), label_file)
    save_image(result.overlay, overlay_file)  # the CLI's overlay: the viewer's colours at its default opacity
    save_json({"image": name, "segments": legend(result.labels, result.names)}, legend_file)
    rows = segment_rows(result.labels, result.names)
    viewer = viewer_html(image, result.labels, rows, name, result.probabilities, result.words)
    table = segment_table(rows, named=result.names is not None)
    return View(viewer, label_file, overlay_file, legend_file, table, rows, time.perf_counter() - start)
