"""The benchmark datasets, laid out and preprocessed exactly as the reference's data loaders.

Reference: `data/coco/coco_data.py` and `data/cityscapes/cityscapes_data.py` of google/diffseg. Both: central
square crop (side = the shorter side, offset `(side_len - c) // 2`), image resized to 512×512 bilinear, label
resized nearest-neighbour; 27 classes, unlabelled pixels ignored (-1 here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import SegmentConfig
from ..io.images import center_crop

NUM_CLASSES = 27
RESOLUTION = 512  # reference `RESOLUTION = 512`
IGNORE = -1


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark: its id (used to name results and predictions), image and label paths."""

    id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Benchmark:
    """A dataset's layout, label mapping and the paper's setting and numbers for it."""

    name: str
    kl_threshold: float  # paper §4.1
    paper_pixel_accuracy: float  # paper Table 1, unsupervised, 27 classes
    paper_miou: float
    layout: str  # how ROOT must look, for error messages
    diffcut_miou: float | None = None  # DiffCut paper (Couairon et al. 2024), Table 1, SSD-1B, no PAMR

    def samples(self, root: str | Path) -> list[Sample]:
        raise NotImplementedError

    def class_map(self) -> np.ndarray:
        """Lookup table: raw label id -> class in [0, 27) or -1."""
        raise NotImplementedError

    def read_label(self, path: Path) -> np.ndarray:
        """(H, W) int64 classes, -1 where unlabelled, at the file's own size."""
        with Image.open(path) as image:
            raw = np.asarray(image)
        raw = raw[..., 0] if raw.ndim == 3 else raw  # reference `decode_png(label, 3)[..., 0]`
        return self.class_map()[raw.astype(np.int64)]


def _require_folder(root: Path, sub: str, layout: str, example: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"Dataset root `{root}` does not exist. Expected layout: {layout}")
    folder = root / sub
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Expected folder `{folder}` (for files such as `{folder / example}`) was not found. "
            f"Expected layout: {layout}"
        )
    return folder


class CocoStuff27(Benchmark):
    """COCO-Stuff-27: the 2,175 validation images of the reference's list, fine classes mapped to 27 coarse."""

    def samples(self, root: str | Path) -> list[Sample]:
        root = Path(root)
        ids = coco_image_ids()
        _require_folder(root, "val2017", self.layout, f"{ids[0]}.jpg")
        _require_folder(root, "annotation_val2017", self.layout, f"{ids[0]}.png")
        samples = [Sample(i, root / "val2017" / f"{i}.jpg", root / "annotation_val2017" / f"{i}.png") for i in ids]
        if not any(s.image.is_file() for s in samples):
            raise FileNotFoundError(
                f"None of the {len(samples)} listed images is in `{root / 'val2017'}` (first expected: "
                f"`{samples[0].image}`). Expected layout: {self.layout}"
            )
        return samples

    def class_map(self) -> np.ndarray:
        return coco_class_map()


class Cityscapes(Benchmark):
    """Cityscapes val: label ids 7–33 -> classes 0–26, everything else ignored."""

    def samples(self, root: str | Path) -> list[Sample]:
        root = Path(root)
        images = _require_folder(
            root, "leftImg8bit/val", self.layout, "frankfurt/frankfurt_000000_000294_leftImg8bit.png"
        )
        _require_folder(root, "gtFine/val", self.layout, "frankfurt/frankfurt_000000_000294_gtFine_labelIds.png")
        paths = sorted(images.glob("*/*.png"))
        if not paths:
            raise FileNotFoundError(f"No images matched `{images}/*/*.png`. Expected layout: {self.layout}")
        samples = []
        for path in paths:
            # Reference: path.replace("leftImg8bit", "gtFine").replace(".png", "_labelIds.png").
            label = (
                root
                / "gtFine"
                / "val"
                / path.parent.name
                / path.name.replace("leftImg8bit", "gtFine").replace(".png", "_labelIds.png")
            )
            samples.append(Sample(f"{path.parent.name}/{path.stem}", path, label))
        return samples

    def class_map(self) -> np.ndarray:
        table = np.full(256, IGNORE, np.int64)
        table[7:34] = np.arange(NUM_CLASSES)
        return table


BENCHMARKS: dict[str, Benchmark] = {
    "cocostuff27": CocoStuff27(
        name="cocostuff27",
        kl_threshold=SegmentConfig().kl_threshold,  # the paper's COCO-Stuff setting is the default
        paper_pixel_accuracy=72.5,
        paper_miou=43.6,
        layout="ROOT/val2017/ID.jpg (COCO val2017 images) and ROOT/annotation_val2017/ID.png (COCO-Stuff "
        "stuffthingmaps_trainval2017 val2017 PNGs, fine ids 0-181, 255 unlabelled)",
        diffcut_miou=49.1,
    ),
    "cityscapes": Cityscapes(
        name="cityscapes",
        kl_threshold=0.9,
        paper_pixel_accuracy=76.0,
        paper_miou=21.2,
        layout="ROOT/leftImg8bit/val/CITY/*_leftImg8bit.png and ROOT/gtFine/val/CITY/*_gtFine_labelIds.png",
        diffcut_miou=30.6,
    ),
}


@cache
def coco_image_ids() -> tuple[str, ...]:
    """The 2,175 COCO-Stuff-27 validation image ids of the reference (`Coco164kFull_Stuff_Coarse_7.txt`)."""
    text = resources.files("diffseg").joinpath("data/cocostuff27_val_imagelist.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@cache
def coco_class_map() -> np.ndarray:
    """Lookup table: COCO-Stuff fine id (0–181) -> coarse class (0–26); 255 and anything unmapped -> -1."""
    data = json.loads(resources.files("diffseg").joinpath("data/cocostuff_fine_to_coarse27.json").read_text())
    table = np.full(256, IGNORE, np.int64)
    for fine, coarse in data["fine_index_to_coarse_index"].items():
        table[int(fine)] = coarse
    return table


def protocol_label(labels: np.ndarray) -> np.ndarray:
    """Central square crop, then nearest-neighbour resize to 512×512 (reference: `tf.image.resize(...,
    NEAREST_NEIGHBOR)`, half-pixel centres, i.e. torch's "nearest-exact")."""
    square = center_crop(labels)
    t = torch.from_numpy(np.ascontiguousarray(square)).float()[None, None]
    return F.interpolate(t, size=(RESOLUTION, RESOLUTION), mode="nearest-exact")[0, 0].long().numpy()
