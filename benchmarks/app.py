"""Time the demo's slider path: cached attention bundle -> segmentation -> viewer data, label PNG and segment table.

    python benchmarks/app.py [--repeat 5]

This is what runs when a user moves any control but the timestep (opacity, boundaries and pointing at segments run
in the browser and cost the server nothing). The bundle has Stable Diffusion 1.x's shapes at 512² (64², 32², 16², 8²
attention) with synthetic attention. Target: <= 0.3 s on 2 CPU cores at default settings.
"""

from __future__ import annotations

import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from common import arguments, report, timeit
from diffseg import AttentionBundle
from diffseg.app.demo import preset_weights, slider_weights
from diffseg.app.view import image_uri, render
from diffseg.segmentation import segment_bundle
from diffseg.testing.synthetic import attention_from_segmentation, shapes_segmentation


def main() -> None:
    args = arguments(__doc__, repeat=5).parse_args()

    with resources.as_file(resources.files("diffseg.app").joinpath("examples/street.jpg")) as path:
        image = np.asarray(Image.open(path).convert("RGB").resize((512, 512)))
    attention = {r: a.mean(0) for r, a in attention_from_segmentation(shapes_segmentation(64, 0, 6)).items()}
    bundle = AttentionBundle(attention=attention, image=image, timestep=300, layers={64: 5, 32: 5, 16: 5, 8: 1})
    picture = image_uri(image)  # once per bundle, at encode time

    def slider_move(folder: Path, kl, iterations, points, weights):
        start = time.perf_counter()
        settings = {"kl_threshold": kl, "iterations": iterations, "num_points": points, "refine": False}
        result = segment_bundle(bundle, **settings, resolution_weights=slider_weights(bundle, weights))
        return render(result, picture, folder, "street", start)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        settings = [
            ("default (τ=1.1, 3 it, 16×16, proportional)", (1.1, 3, 16, preset_weights("proportional"))),
            ("τ=0.6", (0.6, 3, 16, preset_weights("proportional"))),
            ("preset two finest", (1.1, 3, 16, preset_weights("two finest"))),
            ("anchors 24×24", (1.1, 3, 24, preset_weights("proportional"))),
        ]
        for name, values in settings:
            timing = timeit(lambda: slider_move(Path(folder), *values), repeat=args.repeat)
            view = slider_move(Path(folder), *values)
            rows.append(
                {
                    "setting": name,
                    "median_s": timing["median_s"],
                    "min_s": timing["min_s"],
                    "segments": len(view.rows),
                    "viewer_kb": round(len(view.viewer) / 1024, 1),
                }
            )
    print("Demo slider path (cached bundle -> viewer data, label PNG, table), 512×512 image\n")
    report("app-slider", rows, ["setting", "median_s", "min_s", "segments", "viewer_kb"])


if __name__ == "__main__":
    main()
