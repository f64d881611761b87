"""What the demo's page sends, read and checked: the uploaded image, the block-range box, numbers typed outside their
control's range, the weight sliders; and the named copies its downloads are."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..bundle import Bundle
from ..config import AppConfig
from ..grids import by_size
from ..io.images import load_image

MAX_PIXELS = AppConfig().max_pixels  # module-level so tests can lower it


def slider_weights(bundle: Bundle, values: list[float]) -> dict[tuple[int, int], float]:
    """Map slider values (finest first) onto the bundle's grids by rank, normalised to sum 1 so that the KL
    threshold keeps its meaning whatever the mix."""
    grids = by_size(bundle.attention)
    weights = {g: float(v) for g, v in zip(grids, values)}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("All resolution weights are 0: give at least one resolution a positive weight.")
    return {r: w / total for r, w in weights.items()}


def named_copy(file: Path, target: Path) -> Path:
    """`file` under the name `target` for a download (a hard link where the file system allows, else a copy)."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copyfile(file, target)
    return target


def parse_blocks(text: str | None, depth: int) -> tuple[int, int] | None:
    """The demo's block-range box: "FIRST:LAST" or one block "K"; empty for the defaults."""
    text = (text or "").strip()
    if not text:
        return None
    first, _, last = text.partition(":")
    try:
        blocks = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"Transformer blocks must be FIRST:LAST or one block number, not “{text}”.") from None
    if not 0 <= blocks[0] <= blocks[1] < depth:
        raise ValueError(f"Transformer blocks must lie from 0 to {depth - 1}, first ≤ last; “{text}” does not.")
    return blocks


def read_upload(path: str | None) -> np.ndarray:
    """The uploaded image as (H, W, 3) uint8, or a readable error for the page."""
    if not path:
        raise ValueError("No image: upload one or pick an example.")
    name = Path(path).name
    limit = f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels. Resize it first."
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as error:  # Pillow refuses to open it at all: only its pixel count is known
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{int(pixels.group(1)) / 1e6:.0f} megapixels" if pixels else "too large to open"
        raise ValueError(f"“{name}” is {size}; {limit}") from error
    except Exception as error:  # noqa: BLE001 - any decoding failure is the upload's fault
        raise ValueError(
            f"“{name}” could not be read as an image: upload a PNG, JPEG, WebP, TIFF, BMP or GIF file."
        ) from error
    if width * height > MAX_PIXELS:
        raise ValueError(f"“{name}” is {width}×{height} pixels ({width * height / 1e6:.0f} megapixels); {limit}")
    return np.asarray(load_image(path))


def upload_path(value) -> str | None:
    """The file path in the image input's raw value. The page's events skip Gradio's preprocessing
    (`preprocess=False`), which fails on an undecodable upload with an internal error naming server paths; the file
    is then read once, by `read_upload`, which says what is wrong in the app's words."""
    if value is None or isinstance(value, str):
        return value
    return value.get("path") if isinstance(value, dict) else getattr(value, "path", None)


class Refused(ValueError):
    """A control's value the demo cannot take: the control goes back to the value of the result the page shows."""

    def __init__(self, control, message: str) -> None:
        super().__init__(message)
        self.control = control


class OutOfRange(Refused):
    """A typed number outside its control's range (Gradio's number boxes accept any number)."""

    def __init__(self, control, value) -> None:
        super().__init__(
            control,
            f"{control.label} goes from {control.minimum:g} to {control.maximum:g}: {value} is outside that range.",
        )


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (an example's copy is known by its content, wherever Gradio put it)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
