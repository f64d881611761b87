"""Images per second: `diffseg segment` vs `diffseg segment-dataset` (Ray Data, local) on the same images.

    python benchmarks/dataset.py [--images 32] [--batch-size 4]

Both use the tiny random-weight pipeline the tests build, so the model is cheap and the table shows the Ray path's
overhead (startup, scheduling, object transfer) rather than UNet time. Each command runs in a fresh process, timed
end to end (model load and, for Ray, cluster start included), and the rate the command itself reports is shown too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from common import report
from diffseg.testing.models import save_random_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        checkpoint = save_random_checkpoint(folder / "tiny", "tiny")
        rng = np.random.default_rng(0)
        (folder / "images").mkdir()
        for k in range(args.images):
            Image.fromarray(rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)).save(
                folder / "images" / f"{k:03d}.jpg"
            )
        common = ["--model", str(checkpoint), "--device", "cpu", "--batch-size", str(args.batch_size)]
        commands = {
            "diffseg segment": ["segment", str(folder / "images"), "-o", str(folder / "a"), "--no-overlay", *common],
            "diffseg segment-dataset (Ray local)": [
                "segment-dataset",
                str(folder / "images"),
                "-o",
                str(folder / "b"),
                *common,
            ],
        }
        rows = []
        for name, argv in commands.items():
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "diffseg.cli", *argv], capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
            rate = re.search(r"\(([\d.]+) img/s\)", done.stderr)
            rows.append(
                {
                    "command": name,
                    "images": args.images,
                    "wall_s": wall,
                    "images_per_s_wall": args.images / wall,
                    "images_per_s_reported": float(rate.group(1)) if rate else None,
                }
            )
    print(f"{args.images} images 512×384, tiny random pipeline, batch {args.batch_size}, CPU\n")
    report("dataset", rows, ["command", "images", "wall_s", "images_per_s_wall", "images_per_s_reported"])


if __name__ == "__main__":
    main()
