"""Writing results: every file appears whole or not at all (written to a temporary file, then renamed)."""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# A temporary file names its writer: `.NAME.HOST-PID.RANDOM.tmp`. Two runs may write one output folder at once, so
# a temporary file is removed only when it is provably stale: its writer (on this host) is gone, or it is older than
# this process (a writer on another host, or a file of an older version, which records no writer).
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
_STARTED = time.time()
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.)?[A-Za-z0-9_]+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale(temp: Path, started: float = _STARTED) -> bool:
    """Whether a temporary output file was left by a writer that can no longer finish it (see `_TEMP`): one
    recording a writer on this host that is gone, or one recording none (or another host) last modified before
    `started` (default: when this process started)."""
    match = _TEMP.match(temp.name)
    if match is None:
        return False
    if match["pid"] is not None and match["host"] == _HOST:
        return not _alive(int(match["pid"]))
    try:
        return temp.stat().st_mtime < started
    except FileNotFoundError:  # its writer just renamed or removed it
        return False


def sweep_stale(folder: str | os.PathLike) -> int:
    """Remove the stale temporary files below `folder` at the start of a run (a killed run's half-written outputs,
    including those beside outputs a resumed run skips); returns how many. Live writers' files are left alone."""
    removed, started = 0, time.time()
    for temp in Path(folder).rglob(".*.tmp"):
        if temp.is_file() and is_stale(temp, started):
            temp.unlink(missing_ok=True)
            removed += 1
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a run killed while writing it
        match = _TEMP.match(temp.name)
        if match is not None and match["name"] == path.name and is_stale(temp):
            temp.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


# ------------------------------------------------------------------------------------------------ writers


@dataclass(frozen=True)
class Writer:
    """One output format: where it goes (`FOLDER/NAME.SUFFIX` under the output folder, NAME being the image's path
    relative to the folder it was found in, without its suffix) and how it is written from a job's `Outcome`."""

    key: str
    folder: str
    suffix: str
    write: Callable  # (outcome, path) -> None; writes atomically

    def path(self, output: str | os.PathLike, name: str) -> Path:
        return Path(output) / self.folder / f"{name}{self.suffix}"


def _write_labels(outcome, path: Path) -> None:
    save_image(label_image(outcome.result.labels), path, source=source_id(outcome.source))


def _write_overlay(outcome, path: Path) -> None:
    save_image(outcome.result.overlay, path)


def _write_array(outcome, path: Path) -> None:
    save_array(outcome.result.labels, path)


def _write_probabilities(outcome, path: Path) -> None:
    save_array(outcome.result.probabilities.astype(np.float32), path)  # (K, H, W): its argmax is the label map


def _write_names(outcome, path: Path) -> None:
    names = outcome.result.names or []
    save_json(
        {
            "image": str(outcome.source),
            "caption": outcome.caption,
            "vocabulary": list(outcome.result.words),
            "voting": outcome.voting,
            "segments": {str(n.id): {"label": n.label, "score": n.score, "area": n.area} for n in names},
        },
        path,
    )


def legend(labels: np.ndarray, names=None) -> list[dict]:
    """Per segment id (ascending): its name (None without words), its area (share of the pixels) and its colour in
    the overlays and the demo's viewer (`visualisation.palette`, "#rrggbb")."""
    from .visualisation import palette

    counts = np.bincount(np.asarray(labels).ravel())
    colours = palette(len(counts))
    named = {n.id: n.label or "unlabelled" for n in names or []}
    return [
        {"id": k, "name": named.get(k), "area": round(float(counts[k] / counts.sum()), 6),
         "colour": "#{:02x}{:02x}{:02x}".format(*colours[k])}
        for k in range(len(counts))
    ]  # fmt: skip


def _write_legend(outcome, path: Path) -> None:
    result = outcome.result
    save_json({"image": str(outcome.source), "segments": legend(result.labels, result.names)}, path)


def _write_coco(outcome, path: Path) -> None:
    save_json(coco_record(outcome.source, outcome.result.labels, outcome.result.names), path)


def coco_record(source, labels: np.ndarray, names=None) -> dict:
    """COCO-style annotations of one label map: one compressed-RLE mask per segment (pycocotools), with its area
    and box, for detectron2 / mmdetection pseudo-label training. Segment names, when there are any, go in `label`."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError as error:
        raise ImportError("COCO RLE output needs pycocotools: pip install 'diffseg[coco]' (or pycocotools).") from error
    labels = np.asarray(labels)
    height, width = labels.shape
    named = {n.id: n.label for n in names or []}
    # COCO RLE counts runs down the columns. One pass finds every run of the label map (column-major), grouped by
    # segment; each segment's counts are then its gaps and run lengths (the same RLE as pycocotools' `encode` of its
    # mask, without K full-size masks).
    flat = labels.ravel(order="F")
    size = flat.size
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, ends = np.concatenate(([0], change)), np.concatenate((change, [size]))
    order = np.argsort(flat[starts], kind="stable")  # runs of each segment together, in order
    count = int(labels.max(initial=0)) + 1
    bounds = np.searchsorted(flat[starts][order], np.arange(count + 1))
    annotations = []
    for k in range(count):
        runs = order[bounds[k] : bounds[k + 1]]
        first, last = starts[runs], ends[runs]
        counts = np.empty(2 * len(runs), np.int64)
        counts[0::2] = first - np.concatenate(([0], last[:-1]))  # zeros before each run
        counts[1::2] = last - first
        if not len(runs):  # an id the map does not hold: all zeros
            counts = np.array([size])
        elif last[-1] < size:  # zeros after the last run
            counts = np.append(counts, size - last[-1])
        rle = coco_mask.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
        area, box = int(coco_mask.area([rle])[0]), [float(v) for v in coco_mask.toBbox([rle])[0]]
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append({"id": k, "segmentation": rle, "area": area, "bbox": box, "label": named.get(k)})
    return {"image": {"file_name": str(source), "height": height, "width": width}, "annotations": annotations}


WRITERS = {
    "labels": Writer("labels", "labels", ".png", _write_labels),  # always written: what resume checks
    "overlay": Writer("overlay", "overlays", ".png", _write_overlay),
    "npy": Writer("npy", "arrays", ".npy", _write_array),
    "names": Writer("names", "semantics", ".json", _write_names),  # with --labels / --caption
    "coco": Writer("coco", "coco", ".json", _write_coco),
    "legend": Writer("legend", "legends", ".json", _write_legend),  # id, name, area, overlay colour per segment
}


# Concept maps: the label map of concept indices, the overlay with its legend, the words and each one's share (JSON),
# and with --npy the (K, H, W) probabilities.
CONCEPT_WRITERS = {
    "labels": Writer("labels", "concepts", ".png", _write_labels),
    "overlay": Writer("overlay", "concept-overlays", ".png", _write_overlay),
    "npy": Writer("npy", "concept-maps", ".npy", _write_probabilities),
    "names": Writer("names", "concepts", ".json", _write_names),
    "coco": WRITERS["coco"],
    "legend": Writer("legend", "concept-legends", ".json", _write_legend),
}


def writers_for(*, overlay=True, npy=False, names=False, coco=False, concepts=False, legend=False) -> list[Writer]:
    """The writers of the formats asked for (`concepts`: those of concept maps, their words always written); the
    label PNG always comes first."""
    table = CONCEPT_WRITERS if concepts else WRITERS
    chosen = {"overlay": overlay, "npy": npy, "names": names or concepts, "coco": coco, "legend": legend}
    return [table["labels"]] + [table[key] for key, on in chosen.items() if on]


def outputs_done(output: str | os.PathLike, name: str, writers: list[Writer], source: str | None = None) -> bool:
    """Whether every writer's file exists (for `--resume`) and, given `source`, the label map (the first writer's) was
    made from that input (a map recording another input is not this one's; one recording none is trusted)."""
    if not all(w.path(output, name).is_file() for w in writers):
        return False
    recorded = label_source(writers[0].path(output, name)) if source is not None else None
    return recorded is None or recorded == source_id(source)


def write_outputs(outcome, output: str | os.PathLike, writers: list[Writer]) -> None:
    """Write one outcome in every format, each file atomically (raises OSError or ValueError on failure)."""
    for writer in writers:
        writer.write(outcome, writer.path(output, outcome.name))


@dataclass(frozen=True)
class OutputFolder:
    """The job runner's sink for files (`jobs.runner.Sink`): each outcome in every format asked for; an input is done
    when every file exists and its label map was made from that input (`outputs_done`)."""

    folder: Path
    writers: tuple[Writer, ...]

    def done(self, name: str, source: str) -> bool:
        return outputs_done(self.folder, name, list(self.writers), source)

    def write(self, outcome) -> None:
        write_outputs(outcome, self.folder, list(self.writers))
