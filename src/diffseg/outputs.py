"""Writing results: every file appears whole or not at all (written to a temporary file, then renamed)."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a run killed while writing it
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the mode any new file would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: once, at import, before any thread writes
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def label_image(labels: np.ndarray) -> Image.Image:
    """A PNG-ready image of integer ids: 8-bit when ids fit, else 16-bit."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError(
            f"Label ids must lie in [0, 65535] to be stored as PNG but span [{labels.min()}, {labels.max()}]."
        )
    if labels.max(initial=0) < 256:
        return Image.fromarray(labels.astype(np.uint8), mode="L")
    return Image.fromarray(labels.astype(np.uint16))


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """(H, W) int64 ids from a label PNG (8- or 16-bit; for RGB files, the first channel)."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return (array[..., 0] if array.ndim == 3 else array).astype(np.int64)


SOURCE_KEY = "diffseg-source"  # PNG text chunk of a label map: the input it was made from


def save_image(image: Image.Image, path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Write a PNG; with `source`, record the input it was made from in the PNG (see `label_source`)."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if source is not None:
        info = PngInfo()
        info.add_text(SOURCE_KEY, str(source))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def source_id(path: str | os.PathLike) -> str:
    """How a label map records its input: a URI as given, a local path made absolute (so that a resumed run from
    another working folder still recognises it)."""
    text = str(path)
    return text if "://" in text else os.path.abspath(text)


def label_source(path: str | os.PathLike) -> str | None:
    """The input a label PNG records it was made from (None: not recorded, or not readable)."""
    try:
        with Image.open(path) as image:
            return image.text.get(SOURCE_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def save_json(data, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")


def save_array(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@dataclass(frozen=True)
class OutputPaths:
    """Where one image's results go: `labels/NAME.png`, `overlays/NAME.png`, `arrays/NAME.npy` and
    `semantics/NAME.json` under the output folder, NAME being the image's path relative to the folder it was found
    in, without its suffix."""

    labels: Path
    overlay: Path
    array: Path
    semantics: Path

    @classmethod
    def for_name(cls, out_dir: str | os.PathLike, name: str) -> OutputPaths:
        out_dir = Path(out_dir)
        return cls(
            out_dir / "labels" / f"{name}.png",
            out_dir / "overlays" / f"{name}.png",
            out_dir / "arrays" / f"{name}.npy",
            out_dir / "semantics" / f"{name}.json",
        )

    def done(
        self, *, overlay: bool = True, array: bool = False, semantics: bool = False, source: str | None = None
    ) -> bool:
        """Whether every requested output already exists (for `--resume`) and, given `source`, the label map was
        made from that input (a map recording another input is not this one's; one recording none is trusted)."""
        wanted = [self.labels] + ([self.overlay] if overlay else []) + ([self.array] if array else [])
        wanted += [self.semantics] if semantics else []
        if not all(p.is_file() for p in wanted):
            return False
        recorded = label_source(self.labels) if source is not None else None
        return recorded is None or recorded == source
