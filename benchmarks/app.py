"""Time the demo's slider path: cached attention bundle -> segmentation -> overlay, label PNG and segment table.

    python benchmarks/app.py [--repeat 5]

This is what runs when a user moves any control but the timestep. The bundle has Stable Diffusion 1.x's shapes
at 512² (64², 32², 16², 8² attention) with synthetic attention. Target: <= 0.5 s on 2 CPU cores at default settings.
"""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from common import arguments, report, timeit
from diffseg import AttentionBundle
from diffseg.app import _Entry, preset_weights, render
from diffseg.synthetic import attention_from_segmentation, shapes_segmentation


def main() -> None:
    args = arguments(__doc__, repeat=5).parse_args()

    with resources.as_file(resources.files("diffseg").joinpath("examples/street.jpg")) as path:
        image = np.asarray(Image.open(path).convert("RGB").resize((512, 512)))
    attention = {r: a.mean(0) for r, a in attention_from_segmentation(shapes_segmentation(64, 0, 6)).items()}
    bundle = AttentionBundle(attention=attention, image=image, timestep=300, layers={64: 5, 32: 5, 16: 5, 8: 1})
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        entry = _Entry(bundle, Path(folder) / "bundle.safetensors")
        settings = [
            ("default (τ=1.1, 3 it, 16×16, proportional)", (1.1, 3, 16, False, preset_weights("proportional"))),
            ("τ=0.6", (0.6, 3, 16, False, preset_weights("proportional"))),
            ("preset two finest", (1.1, 3, 16, False, preset_weights("two finest"))),
            ("anchors 24×24", (1.1, 3, 24, False, preset_weights("proportional"))),
        ]
        for name, (kl, iterations, points, refine, weights) in settings:
            timing = timeit(
                lambda: render(entry, Path(folder), kl, iterations, points, refine, weights), repeat=args.repeat
            )
            view = render(entry, Path(folder), kl, iterations, points, refine, weights)
            rows.append(
                {
                    "setting": name,
                    "median_s": timing["median_s"],
                    "min_s": timing["min_s"],
                    "segments": view.num_segments,
                }
            )
    print("Demo slider path (cached bundle -> overlay, label PNG, table), 512×512 image\n")
    report("app-slider", rows, ["setting", "median_s", "min_s", "segments"])


if __name__ == "__main__":
    main()
