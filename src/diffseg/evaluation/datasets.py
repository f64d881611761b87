"""The six benchmarks, each read from the layout its users already have, with its classes and published numbers.

A benchmark says where its images and labels are (`samples`) and which class each raw label value is
(`class_map`); how the labels are cropped, resized and matched is the protocol's (`protocols.py`).

- `cocostuff27`, `cityscapes`: google/diffseg's `data/coco/coco_data.py` and `data/cityscapes/cityscapes_data.py`
  (27 classes; unlabelled pixels ignored) and DiffCut's `dataloader/iterator.py`, which reads them the same way.
- `voc20`, `context59`, `cocoobject`: DiffCut's `eval_diffcut.py` (20, 59 and 80 classes plus a background class
  that every unlabelled pixel joins); `ade20k`: its 150 classes, read as DiffCut reads them under its protocol.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import SegmentConfig

IGNORE = -1
DIFFSEG_KL = SegmentConfig().kl_threshold  # the paper's COCO-Stuff setting, the default where it gives none
# Method -> its settings whose default is the benchmark's own (`Benchmark.settings`): DiffSeg's τ per dataset.
BENCHMARK_SETTINGS = {"diffseg": ("kl_threshold",)}


@dataclass(frozen=True)
class Sample:
    """One image of a benchmark: its id (used to name results and predictions), image and label paths."""

    id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Published:
    """A method's published numbers on one benchmark (percent), and where they are published."""

    method: str
    miou: float
    pixel_accuracy: float | None = None
    source: str = ""


@dataclass(frozen=True)
class Benchmark:
    """A dataset's layout, its classes and the numbers published on it."""

    name: str
    title: str
    num_classes: int  # classes scored, the background class included where there is one
    layout: str  # how ROOT must look, for error messages and the README
    folders: tuple[str, ...]  # where `evaluate all` finds it under a datasets root, first match wins
    kl_threshold: float = DIFFSEG_KL  # DiffSeg's τ for it (paper §4.1 where it gives one)
    background: bool = False  # unlabelled pixels form the last class (DiffCut's many-to-one matching)
    published: tuple[Published, ...] = field(default=())

    def settings(self, method: str) -> dict:
        """The method's settings the paper fixes for this benchmark (`BENCHMARK_SETTINGS`), field -> value."""
        return {name: getattr(self, name) for name in BENCHMARK_SETTINGS.get(method, ())}

    def samples(self, root: str | Path) -> list[Sample]:
        raise NotImplementedError

    def class_map(self, protocol: str = "diffseg") -> np.ndarray:
        """Lookup table of 256 entries: raw label value -> class in [0, num_classes) or -1 (unlabelled)."""
        raise NotImplementedError

    def read_label(self, path: Path, protocol: str = "diffseg") -> np.ndarray:
        """(H, W) int64 classes, -1 where unlabelled, at the file's own size."""
        return self.class_map(protocol)[_read_raw(path)]

    def class_names(self, protocol: str = "diffseg") -> list[str]:
        return list(_class_names()[self.name])

    def find(self, datasets: str | Path) -> Path | None:
        """This benchmark's folder under a datasets root, or None: each of `folders` under it, or its tail where the
        root is a folder on the way (`VOCdevkit` holding `VOC2012`). Every command looks the same way (`root`)."""
        for folder in self.folders:
            parts = Path(folder).parts
            for start in range(len(parts)):
                candidate = Path(datasets, *parts[start:])
                if candidate.is_dir():
                    return candidate
        return None

    def root(self, given: str | Path) -> Path:
        """The folder to read this benchmark from: the benchmark's own folder as given, or the one `find` finds
        under it (a datasets root; VOC as its archive unpacks, `DATASETS/VOCdevkit/VOC2012`)."""
        return self.find(given) or Path(given)


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


def _paired(root: Path, images: str, labels: str, layout: str, example: str) -> list[Sample]:
    """Images `root/images/*.jpg` and their labels `root/labels/STEM.png`, sorted by name (DiffCut pairs the two
    sorted listings; pairing by name gives the same pairs and names a missing label instead of shifting them)."""
    image_folder = _require_folder(root, images, layout, f"{example}.jpg")
    label_folder = _require_folder(root, labels, layout, f"{example}.png")
    paths = sorted(p for p in image_folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise FileNotFoundError(f"No images in `{image_folder}`. Expected layout: {layout}")
    return [Sample(p.stem, p, label_folder / f"{p.stem}.png") for p in paths]


def _table(pairs: dict[int, int] | None = None, identity: range | None = None) -> np.ndarray:
    table = np.full(256, IGNORE, np.int64)
    if identity is not None:
        table[identity] = np.arange(len(identity))
    for raw, cls in (pairs or {}).items():
        table[raw] = cls
    return table


class CocoStuff27(Benchmark):
    """COCO-Stuff-27: the 2,175 validation images of the reference's list, fine classes mapped to 27 coarse."""

    def samples(self, root: str | Path) -> list[Sample]:
        root = Path(root)
        ids = coco_image_ids()
        images, labels = "val2017", "annotation_val2017"  # google/diffseg's layout
        if (root / "images" / "val2017").is_dir():  # DiffCut's (`datasets/README.md`)
            images, labels = "images/val2017", "annotations/val2017"
        _require_folder(root, images, self.layout, f"{ids[0]}.jpg")
        _require_folder(root, labels, self.layout, f"{ids[0]}.png")
        samples = [Sample(i, root / images / f"{i}.jpg", root / labels / f"{i}.png") for i in ids]
        if not any(s.image.is_file() for s in samples):
            raise FileNotFoundError(
                f"None of the {len(samples)} listed images is in `{root / images}` (first expected: "
                f"`{samples[0].image}`). Expected layout: {self.layout}"
            )
        return samples

    def class_map(self, protocol: str = "diffseg") -> np.ndarray:
        return coco_class_map()


class CocoObject(CocoStuff27):
    """COCO-Object: COCO-Stuff's images and labels, the 80 thing classes kept, everything else background."""

    def class_map(self, protocol: str = "diffseg") -> np.ndarray:
        table = coco_object_map()
        if protocol == "concepts":  # open-vocabulary: every stuff class is the background class; 255 unlabelled
            table = table.copy()
            table[:182][table[:182] < 0] = self.num_classes - 1
        return table


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

    def class_map(self, protocol: str = "diffseg") -> np.ndarray:
        return _table(identity=range(7, 34))  # DiffCut's `cityscapes_27_mapping.pickle` is the same table


class Voc20(Benchmark):
    """PASCAL VOC 2012 val: 20 object classes and background.

    Read from the official `VOCdevkit/VOC2012` (palette PNGs: 0 background, 1–20 objects, 255 border), or from the
    `pascal_voc_d2` folder DiffCut's `prepare_pascal_voc_sem_seg.py` writes (`annotations_pascal20`: objects 0–19,
    background and border 255). Either way the classes are the `pascal20` ones: objects 0–19, and background and
    border unlabelled, which DiffCut's protocol then scores as the background class 20.
    """

    def samples(self, root: str | Path) -> list[Sample]:
        root = Path(root)
        if (root / "annotations_pascal20").is_dir():
            return _paired(root, "images/validation", "annotations_pascal20/validation", self.layout, "2007_000033")
        _require_folder(root, "JPEGImages", self.layout, "2007_000033.jpg")
        _require_folder(root, "SegmentationClass", self.layout, "2007_000033.png")
        listing = _require_folder(root, "ImageSets/Segmentation", self.layout, "val.txt") / "val.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"Image list `{listing}` was not found. Expected layout: {self.layout}")
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        return [Sample(i, root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]

    def read_label(self, path: Path, protocol: str = "diffseg") -> np.ndarray:
        if path.parent.parent.name == "annotations_pascal20":  # already converted
            labels = super().read_label(path, protocol)
            if protocol == "concepts":  # background and border are one value there: both background
                labels = np.where(labels < 0, self.num_classes - 1, labels)
            return labels
        if protocol == "concepts":  # open-vocabulary: 0 background (class 20), 1–20 objects, 255 border unlabelled
            table = _table(identity=range(1, 21))
            table[0] = self.num_classes - 1
            return table[_read_raw(path)]
        # DiffCut's `convert_pas20` of an official label: 0 -> 255, then minus 1 (1–20 -> 0–19, 255 -> 254 -> 255).
        return _table(identity=range(1, 21))[_read_raw(path)]

    def class_map(self, protocol: str = "diffseg") -> np.ndarray:
        return _table(identity=range(0, 20))  # `annotations_pascal20`: 0–19, 255 unlabelled


class Context59(Benchmark):
    """PASCAL Context val, 59 classes (`pascal_ctx_d2` from DiffCut's `prepare_pascal_ctx_sem_seg.py`: 0–58, 255
    unlabelled); unlabelled pixels are the background class 59 under DiffCut's protocol."""

    def samples(self, root: str | Path) -> list[Sample]:
        return _paired(Path(root), "images/validation", "annotations_ctx59/validation", self.layout, "2008_000002")

    def class_map(self, protocol: str = "diffseg") -> np.ndarray:
        table = _table(identity=range(0, 59))
        if protocol == "concepts":  # open-vocabulary: 255 is Context's 60th class, background
            table[255] = self.num_classes - 1
        return table


class Ade20k(Benchmark):
    """ADE20K (SceneParsing) val, 150 classes, from the raw `ADEChallengeData2016` PNGs (0 "other", 1–150).

    The DiffSeg protocol scores the standard classes: 1–150 -> 0–149, 0 ignored. DiffCut's protocol reads the raw
    values as classes and its `_fast_hist` keeps labels below 150: "other" (raw 0) is scored as a class and the
    150th class (raw 150, "flag") is dropped. We reproduce that under `--protocol diffcut`.
    """

    def samples(self, root: str | Path) -> list[Sample]:
        return _paired(Path(root), "images/validation", "annotations/validation", self.layout, "ADE_val_00000001")

    def class_map(self, protocol: str = "diffseg") -> np.ndarray:
        if protocol == "diffcut":
            return _table(identity=range(0, 150))  # raw 0–149 as they are; 150 and 255 outside
        return _table(identity=range(1, 151))

    def class_names(self, protocol: str = "diffseg") -> list[str]:
        names = super().class_names()
        return ["other", *names[:-1]] if protocol == "diffcut" else names


def _read_raw(path: Path) -> np.ndarray:
    """(H, W) uint8 raw values of a label PNG: a palette PNG reads as its indices, an RGB one as its first channel
    (google/diffseg `decode_png(label, 3)[..., 0]`)."""
    with Image.open(path) as image:
        raw = np.asarray(image)
    raw = raw[..., 0] if raw.ndim == 3 else raw
    if raw.dtype != np.uint8:
        raise ValueError(f"label `{path}` holds {raw.dtype} values; benchmark labels are 8-bit PNGs")
    return raw


DIFFCUT_TABLE = "DiffCut paper (Couairon et al., NeurIPS 2024), Table 1; SSD-1B, τ 0.5, DiffCut's protocol"
SEG4DIFF = "Seg4Diff paper (Kim et al., NeurIPS 2025), SD3, unsupervised, per-image Hungarian"


def _published(diffseg=None, maskcut=None, diffcut=None, diffcut_pamr=None, seg4diff=None, diffseg_paper=None):
    rows = []
    if diffseg_paper is not None:
        miou, acc = diffseg_paper
        rows.append(
            Published(
                "DiffSeg (Tian et al. 2024)", miou, acc, "DiffSeg paper (Tian et al., CVPR 2024), Table 1, its protocol"
            )
        )
    if diffseg is not None:
        rows.append(Published("DiffSeg, in DiffCut's table", diffseg, source=DIFFCUT_TABLE))
    if maskcut is not None:
        rows.append(Published("MaskCut, in DiffCut's table", maskcut, source=DIFFCUT_TABLE))
    rows.append(Published("DiffCut (Couairon et al. 2024)", diffcut, source=DIFFCUT_TABLE))
    rows.append(Published("DiffCut + PAMR", diffcut_pamr, source=DIFFCUT_TABLE))
    rows.append(Published("Seg4Diff (Kim et al. 2025), SD3", seg4diff, source=SEG4DIFF))
    return tuple(rows)


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        CocoStuff27(
            name="cocostuff27",
            title="COCO-Stuff-27",
            num_classes=27,
            layout="ROOT/val2017/ID.jpg and ROOT/annotation_val2017/ID.png (COCO val2017 images, COCO-Stuff "
            "stuffthingmaps_trainval2017 val2017 PNGs: fine ids 0-181, 255 unlabelled), or DiffCut's "
            "ROOT/images/val2017 and ROOT/annotations/val2017",
            folders=("coco", "cocostuff"),
            published=_published(44.2, 41.7, 46.1, 49.1, 49.7, diffseg_paper=(43.6, 72.5)),
        ),
        Cityscapes(
            name="cityscapes",
            title="Cityscapes",
            num_classes=27,
            layout="ROOT/leftImg8bit/val/CITY/*_leftImg8bit.png and ROOT/gtFine/val/CITY/*_gtFine_labelIds.png",
            folders=("cityscapes",),
            kl_threshold=0.9,
            published=_published(16.8, 18.7, 28.4, 30.6, 24.2, diffseg_paper=(21.2, 76.0)),
        ),
        Voc20(
            name="voc20",
            title="PASCAL VOC 2012",
            num_classes=21,
            layout="ROOT = VOCdevkit/VOC2012 (JPEGImages/ID.jpg, SegmentationClass/ID.png, "
            "ImageSets/Segmentation/val.txt), or DiffCut's pascal_voc_d2 (images/validation/ID.jpg, "
            "annotations_pascal20/validation/ID.png)",
            folders=("VOCdevkit/VOC2012", "pascal_voc_d2"),
            background=True,
            published=_published(49.8, 53.8, 62.0, 65.2, 54.9),
        ),
        Context59(
            name="context59",
            title="PASCAL Context 59",
            num_classes=60,
            layout="ROOT = pascal_ctx_d2 (images/validation/ID.jpg, annotations_ctx59/validation/ID.png: 0-58, "
            "255 unlabelled)",
            folders=("pascal_ctx_d2",),
            background=True,
            published=_published(48.8, 43.4, 54.1, 56.5, 52.6),
        ),
        CocoObject(
            name="cocoobject",
            title="COCO-Object",
            num_classes=81,
            layout="the COCO-Stuff-27 layout: ROOT/val2017/ID.jpg and ROOT/annotation_val2017/ID.png, or "
            "ROOT/images/val2017 and ROOT/annotations/val2017",
            folders=("coco", "cocostuff"),
            background=True,
            published=_published(23.2, 30.1, 32.0, 34.1, 38.5),
        ),
        Ade20k(
            name="ade20k",
            title="ADE20K",
            num_classes=150,
            layout="ROOT = ADEChallengeData2016 (images/validation/ID.jpg, annotations/validation/ID.png: 0 other, "
            "1-150)",
            folders=("ADEChallengeData2016",),
            published=_published(37.7, 35.7, 42.4, 44.3, 44.9),
        ),
    )
}


# Open-vocabulary (concept maps of the class names, `--concepts-from-classes`): ConceptAttention's paper, Table 3,
# PASCAL VOC multi-class, Flux.1-schnell.
CONCEPT_ATTENTION = "ConceptAttention paper (Helbling et al., ICML 2025), PASCAL VOC multi-class, Flux"
OPEN_VOCABULARY: dict[str, tuple[Published, ...]] = {
    "voc20": (
        Published("ConceptAttention (Helbling et al. 2025), Flux", 51.39, 86.99, CONCEPT_ATTENTION),
        Published("Flux cross-attention, in ConceptAttention's table", 27.04, 79.52, CONCEPT_ATTENTION),
    ),
}


def published(bench: Benchmark, protocol: str) -> tuple[Published, ...]:
    """The numbers published on `bench` under the kind of scoring `protocol` does (open-vocabulary or not)."""
    return OPEN_VOCABULARY.get(bench.name, ()) if protocol == "concepts" else bench.published


def _data(name: str) -> str:
    return resources.files("diffseg").joinpath(f"data/{name}").read_text()


@cache
def coco_image_ids() -> tuple[str, ...]:
    """The 2,175 COCO-Stuff-27 validation image ids of the reference (`Coco164kFull_Stuff_Coarse_7.txt`)."""
    return tuple(line.strip() for line in _data("cocostuff27_val_imagelist.txt").splitlines() if line.strip())


@cache
def coco_class_map() -> np.ndarray:
    """Lookup table: COCO-Stuff fine id (0–181) -> coarse class (0–26); 255 and anything unmapped -> -1."""
    mapping = json.loads(_data("cocostuff_fine_to_coarse27.json"))["fine_index_to_coarse_index"]
    return _table({int(fine): coarse for fine, coarse in mapping.items()})


@cache
def coco_object_map() -> np.ndarray:
    """Lookup table: COCO-Stuff fine id -> object class (0–79); stuff ids and 255 -> -1 (DiffCut's
    `coco_object_mapping.pickle` with its rule: fine ids below 91 keep their index)."""
    mapping = json.loads(_data("cocoobject_fine_to_object80.json"))["fine_index_to_object_index"]
    return _table({int(fine): obj for fine, obj in mapping.items()})


@cache
def _class_names() -> dict[str, list[str]]:
    return json.loads(_data("class_names.json"))
