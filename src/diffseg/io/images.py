"""Reading images and turning them into the UNet's input, as the reference does.

Reference data loaders (`data/coco/coco_data.py`): decode to 3-channel RGB, optional central square crop
(side = shorter side, offset `(side_len - c) // 2`), `tf.image.resize` to 512×512 (bilinear, half-pixel centres, no
antialiasing, float result), then `Rescaling(1 / 127.5, offset=-1)` to [-1, 1].
"""

from __future__ import annotations

import glob
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..config import CROPS

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


def load_image(path: str | os.PathLike, *, exif_transpose: bool = True) -> Image.Image:
    """Open an image file as RGB.

    Alpha is composited over white; grayscale and palette images become RGB. With `exif_transpose`, the camera's
    orientation tag is applied (benchmarks turn it off: their labels follow the stored pixels).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is empty or not an image Pillow can decode; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image `{path}` does not exist (or is not a file).")
    with open(path, "rb") as f:
        return decode_image(f, str(path), exif_transpose=exif_transpose)


def decode_image(data: bytes | BinaryIO, name: str, *, exif_transpose: bool = True) -> Image.Image:
    """Decode image bytes (or a binary file) as RGB, as `load_image` does; `name` is used in error messages."""
    if isinstance(data, bytes):
        data = io.BytesIO(data)
    if data.seek(0, io.SEEK_END) == 0:
        raise ValueError(f"Image `{name}` is empty (0 bytes); re-download or remove it.")
    data.seek(0)
    try:
        with Image.open(data) as image:
            image.load()
            if exif_transpose:
                image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except UnidentifiedImageError as error:
        raise ValueError(f"Image `{name}` is not in an image format Pillow can read; check the file.") from error
    except Image.DecompressionBombError as error:  # a real photo this large, or a crafted file: either way, refused
        raise ValueError(
            f"Image `{name}` has more than the {2 * Image.MAX_IMAGE_PIXELS:,} pixels Pillow decodes (its guard against "
            f"decompression bombs: {error}); downscale it first."
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"Image `{name}` could not be decoded ({error}); check that it is a valid image file."
        ) from error


def _to_8bit(image: Image.Image) -> Image.Image:
    """An "L" image from a 16-bit, 32-bit integer or float grayscale one, keeping its content.

    Pillow's own conversion clips these to [0, 255], which turns a 16-bit scan almost entirely white. 16-bit modes
    scale by 255/65535; 32-bit integers the same when they fit 16 bits (Pillow reads 16-bit PNGs as "I"), else by
    their range; floats by 255 when in [0, 1], else by their range.
    """
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535 and high > 255):
        array = array * (255 / 65535)
    elif image.mode == "F" and low >= 0 and high <= 1:
        array = array * 255
    elif high > 255 or low < 0:
        array = (array - low) * (255 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a Pillow image, compositing any transparency over white; 16-bit, 32-bit and float grayscale
    keep their content (see `_to_8bit`)."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _to_8bit(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def as_array(image: Image.Image | np.ndarray | str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a Pillow image, an array (H×W, H×W×1/3/4; uint8, or float in [0, 1]) or a path."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(
            f"An image array must be shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) but is {array.shape}."
        )
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"An image array must be uint8 in [0, 255] or float in [0, 1] but is {array.dtype}.")
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return np.asarray(to_rgb(Image.fromarray(array[:, :, 0] if mode == "L" else array, mode)))


def center_crop(array: np.ndarray) -> np.ndarray:
    """Central square of an (H, W, ...) array: side = min(H, W), offsets `(H - side) // 2`, `(W - side) // 2`."""
    side = min(array.shape[:2])
    top, left = (array.shape[0] - side) // 2, (array.shape[1] - side) // 2
    return array[top : top + side, left : left + side]


def crop(array: np.ndarray, mode: str | None) -> np.ndarray:
    """Apply a crop mode: None (whole image) or "center"."""
    if mode not in CROPS:
        raise ValueError(f"`crop` must be one of {CROPS} but is {mode!r}.")
    return center_crop(array) if mode == "center" else array


def to_model_input(
    arrays: list[np.ndarray], size: int | tuple[int, int], pad_multiple: int | None = None
) -> torch.Tensor:
    """Stack (H, W, 3) uint8 images into a (B, 3, height, width) float32 batch in [-1, 1]; `size` is (height, width)
    or one side for a square. With `pad_multiple`, each image is first padded with black at the bottom and right to
    multiples of it (detectron2's `ImageList.from_tensors(images, size_divisibility)`, Seg4Diff's square path).

    Resizing is TensorFlow's `tf.image.resize` (bilinear, half-pixel centres, no antialiasing, float result), i.e.
    torch's `align_corners=False, antialias=False`, as in the reference's data loaders. One image at a time, so a
    12-megapixel photo costs one full-size float copy.
    """
    height, width = (size, size) if isinstance(size, int) else size
    batch = []
    for array in arrays:
        x = torch.tensor(array).permute(2, 0, 1)[None].float()  # (1, 3, H, W), a uint8 copy then one float copy
        if pad_multiple:
            h, w = x.shape[-2:]
            x = F.pad(x, (0, -w % pad_multiple, 0, -h % pad_multiple))  # zeros: black, bottom and right
        batch.append(F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=False))
        del x
    return torch.cat(batch) / 127.5 - 1.0  # reference `Rescaling(scale=1 / 127.5, offset=-1)`


def _walk_images(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files below `folder` (sorted; symbolic links to folders not followed), and the sub-folders that could
    not be read, with the reason (a silent skip would pass for an empty folder)."""
    files, unreadable = [], []

    def report(error: OSError) -> None:
        unreadable.append((error.filename or str(folder), error.strerror or str(error)))

    for root, _, names in os.walk(folder, onerror=report, followlinks=False):
        files += [Path(root) / n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in files if p.is_file()), unreadable


def _glob(pattern: str) -> list[Path]:
    """Paths matching a glob pattern; `**` does not follow symbolic links to folders (pathlib's rule), so a link
    loop such as `dir/loop -> dir` cannot make `dir/**/*.jpg` endless."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    rest = str(Path(*parts[fixed:])) if fixed < len(parts) else ""
    return list(root.glob(rest)) if rest else [root]


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """Expand files, folders (searched recursively) and glob patterns into images to process.

    Returns:
        (found, missing): found is (path, name) pairs in input order, name being the path relative to the folder it
        was found in (or the file's stem) without suffix, used to name outputs; missing is (input, reason) pairs for
        inputs that matched nothing.

    Raises:
        ValueError: two inputs would share a name (and so overwrite each other's outputs).
    """
    found, missing = [], []
    for item in inputs:
        item = str(item)
        path = Path(item).expanduser()
        if path.is_dir():
            files, unreadable = _walk_images(path)
            found += [(p, p.relative_to(path).with_suffix("").as_posix()) for p in files]
            missing += [
                (folder, f"folder could not be read ({reason}); check its permissions") for folder, reason in unreadable
            ]
            if not files and not unreadable:
                missing.append((item, f"folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})"))
        elif path.exists():
            found.append((path, path.stem))
        elif glob.has_magic(item):
            files = sorted(p for p in _glob(os.path.expanduser(item)) if p.is_file())
            found += [(p, p.stem) for p in files]
            if not files:
                missing.append((item, "pattern matched no files"))
        else:
            missing.append((item, "no such file or folder"))
    owners: dict[str, Path] = {}
    for path, name in found:
        if name in owners and owners[name] != path:
            raise ValueError(
                f"Inputs `{owners[name]}` and `{path}` would both be written as `{name}`; pass them in separate runs "
                "or as one folder."
            )
        owners[name] = path
    unique = list(dict.fromkeys(found))  # the same file named twice is processed once
    return unique, missing
