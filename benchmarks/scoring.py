"""The scoring rate of `diffseg evaluate --predictions`: images per second, per benchmark and protocol.

    python benchmarks/scoring.py [--images 40]

Builds each benchmark's layout at its usual image size (VOC 500×375, Context 500×375, COCO 640×480, Cityscapes
2048×1024, ADE20K 683×512) with blob labels and predictions at the image's size, then times `evaluate(...,
predictions=...)` end to end: reading the image, label and prediction PNGs, the class lookup, the protocol's crop and
resizes (DiffCut's goes through 1024² for labels and predictions alike), the background step and the Hungarian
matching, one results line per image. Its cost per image is what a `--predictions` run pays; a method's own run adds
its model time to it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import arguments, report
from diffseg.evaluation.datasets import BENCHMARKS, coco_image_ids
from diffseg.evaluation.harness import evaluate

SIZES = {
    "voc20": (375, 500),
    "context59": (375, 500),
    "cocostuff27": (480, 640),
    "cocoobject": (480, 640),
    "cityscapes": (1024, 2048),
    "ade20k": (512, 683),
}
LABEL_VALUES = {
    "voc20": [0, 1, 7, 15, 255],
    "context59": [0, 5, 20, 58, 255],
    "cocostuff27": [0, 2, 96, 149, 255],
    "cocoobject": [0, 2, 96, 149, 255],
    "cityscapes": [7, 8, 11, 21, 23, 26, 0],
    "ade20k": [0, 1, 3, 77, 150],
}


def blobs(rng, shape, values, cells=(6, 8)) -> np.ndarray:
    grid = rng.choice(np.asarray(values), size=cells)
    rows = np.arange(shape[0]) * cells[0] // shape[0]
    cols = np.arange(shape[1]) * cells[1] // shape[1]
    return grid[rows][:, cols].astype(np.uint8)


def build(name: str, root: Path, preds: Path, n: int, rng) -> tuple[Path, list[str]]:
    """The benchmark's own layout under `root` with n images; their ids."""
    shape = SIZES[name]
    if name in ("cocostuff27", "cocoobject"):
        ids = list(coco_image_ids()[:n])
        image_dir, label_dir = root / "val2017", root / "annotation_val2017"
        paths = [(image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in ids]
    elif name == "cityscapes":
        ids = [f"aachen/aachen_{k:06d}_000019_leftImg8bit" for k in range(n)]
        paths = [
            (
                root / "leftImg8bit" / "val" / f"{i}.png",
                root / "gtFine" / "val" / f"{i.replace('leftImg8bit', 'gtFine')}_labelIds.png",
            )
            for i in ids
        ]
    else:
        images, labels = {
            "voc20": ("images/validation", "annotations_pascal20/validation"),
            "context59": ("images/validation", "annotations_ctx59/validation"),
            "ade20k": ("images/validation", "annotations/validation"),
        }[name]
        ids = [f"img_{k:06d}" for k in range(n)]
        paths = [(root / images / f"{i}.jpg", root / labels / f"{i}.png") for i in ids]
    picture = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    for sample_id, (image, label) in zip(ids, paths):
        for path in (image, label, preds / f"{sample_id}.png"):
            path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(image)
        Image.fromarray(blobs(rng, shape, LABEL_VALUES[name])).save(label)
        Image.fromarray(blobs(rng, shape, np.arange(0, 24, 2), (5, 7))).save(preds / f"{sample_id}.png")
    return root, ids


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--images", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, bench in BENCHMARKS.items():
            root, _ = build(name, Path(folder) / name, Path(folder) / f"{name}-preds", args.images, rng)
            for protocol in ("diffseg", "diffcut"):
                start = time.perf_counter()
                summary = evaluate(
                    name,
                    root,
                    Path(folder) / f"{name}-{protocol}",
                    predictions=Path(folder) / f"{name}-preds",
                    protocol=protocol,
                    limit=args.images,
                    progress=False,
                    log=lambda message: None,
                )
                seconds = time.perf_counter() - start
                assert summary.images == args.images, summary.skipped[:1]
                rows.append(
                    {
                        "benchmark": name,
                        "protocol": protocol,
                        "image": "×".join(map(str, SIZES[name][::-1])),
                        "classes": bench.num_classes,
                        "images": summary.images,
                        "images_per_s": summary.images / seconds,
                        "ms_per_image": 1000 * seconds / summary.images,
                    }
                )
    report("scoring", rows, ["benchmark", "protocol", "image", "classes", "images", "images_per_s", "ms_per_image"])


if __name__ == "__main__":
    main()
