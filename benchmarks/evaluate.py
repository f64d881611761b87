"""Time the full COCO-Stuff-27 protocol per image with the Stable Diffusion 1.5 architecture at random weights.

    python benchmarks/evaluate.py [--images 4] [--batch-size 1] [--device cpu]

Builds a COCO-Stuff-shaped folder (640×480 JPEGs, stuffthingmaps-style label PNGs) and runs `diffseg.evaluation.harness`
on it: decode, crop, resize, VAE, one UNet pass with capture, segmentation at 512², Hungarian scoring. Accuracy is
meaningless with random weights; the time per image is the real pipeline's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from common import arguments, report
from diffseg.evaluation.datasets import coco_image_ids
from diffseg.evaluation.harness import evaluate
from diffseg.testing.models import random_pipeline


def make_coco_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    (root / "val2017").mkdir(parents=True)
    (root / "annotation_val2017").mkdir(parents=True)
    for i in coco_image_ids()[:n]:
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(root / "val2017" / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 182, (480, 640), dtype=np.uint8)).save(root / "annotation_val2017" / f"{i}.png")


def main() -> None:
    parser = arguments(__doc__, model=True)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()

    pipe = random_pipeline("sd15", device=args.device, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        make_coco_folder(folder / "coco", args.images + 1)
        # One image first, untimed: warm-up (allocations, kernels).
        evaluate("cocostuff27", folder / "coco", folder / "warmup", pipeline=pipe, limit=1, progress=False)
        runs = folder / "run"
        summary = evaluate(
            "cocostuff27",
            folder / "coco",
            runs,
            pipeline=pipe,
            limit=args.images + 1,
            batch_size=args.batch_size,
            progress=False,
        )
    rows = [
        {
            "device": str(pipe.device),
            "dtype": str(pipe.dtype).replace("torch.", ""),
            "batch": args.batch_size,
            "images": summary.images,
            "seconds_per_image": summary.seconds_per_image,
            "images_per_hour": 3600 / summary.seconds_per_image,
            "full_coco_hours": 2175 * summary.seconds_per_image / 3600,
        }
    ]
    print("COCO-Stuff-27 protocol, SD 1.5 architecture at random weights\n")
    report(f"evaluate-{pipe.device.type}", rows, list(rows[0]))


if __name__ == "__main__":
    main()
