"""Encode + segment for each Stable Diffusion family at its native size, random weights, real configs.

    python benchmarks/families.py [--device cpu] [--dtype float32] [--only sd15-square,sdxl-1024] [--skip-big]

Each row runs in its own process, so its peak memory is its own: building the pipeline (random weights of the
published architecture: same shapes and cost as the real ones, no download), one untimed warm-up encode where it is
cheap (SD 1.5; the larger ones are timed cold, said in the row), then `encode` and `segment` of one image, timed.
A second table times the segment step alone on bundles of growing grids (the tiny model: the cost of this step
depends only on the grids and the number of proposals).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import torch

from common import arguments, peak_rss_gib, report

# name -> (architecture, image (H, W), encode keywords)
CONFIGS = {
    "sd15-square": ("sd15", (512, 512), {"resize": "square"}),
    "sd15-16:9": ("sd15", (720, 1280), {}),
    "sd21-768": ("sd21", (768, 768), {}),
    "sdxl-1024": ("sdxl", (1024, 1024), {}),
    "sdxl-16:9-diffcut": ("sdxl", (720, 1280), {"method": "diffcut"}),
}
GRIDS = [(256, 256), (288, 512), (512, 512), (720, 1280), (768, 768), (1024, 1024)]  # tiny SD 1.x inputs


def one(name: str, device: str, dtype: str) -> dict:
    from diffseg.testing.models import random_pipeline

    architecture, (h, w), kwargs = CONFIGS[name]
    start = time.perf_counter()
    pipe = random_pipeline(architecture, device=device, dtype=dtype)
    build = time.perf_counter() - start
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    warm = architecture == "sd15" or pipe.device.type == "cuda"
    if warm:
        pipe.encode(image, **kwargs)
    start = time.perf_counter()
    bundle = pipe.encode(image, **kwargs)
    sync()
    encode = time.perf_counter() - start
    start = time.perf_counter()
    result = pipe.segment(bundle)
    sync()
    segment = time.perf_counter() - start
    grids = [f"{g[0]}x{g[1]}" for g in bundle.attention] or [f"features {tuple(bundle.features.shape)}"]
    row = {
        "config": name,
        "family": pipe.backbone.name,
        "input": "x".join(map(str, pipe.input_size((h, w), kwargs.get("resolution"), kwargs.get("resize", "native")))),
        "grids": " ".join(grids),
        "encode_s": encode,
        "segment_s": segment,
        "segments": result.num_segments,
        "timed": "warm" if warm else "cold",
        "build_s": build,
        "peak_rss_gib": peak_rss_gib(),
    }
    if pipe.device.type == "cuda":
        row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def grid_costs() -> list[dict]:
    from common import timeit
    from diffseg.testing.models import random_pipeline

    pipe = random_pipeline("tiny", dtype="float32")
    rows = []
    for h, w in GRIDS:
        bundle = pipe.encode(np.zeros((h, w, 3), np.uint8) + 128, resolution=int((h * w) ** 0.5) // 64 * 64)
        finest = next(iter(bundle.attention))
        timing = timeit(lambda: pipe.segment(bundle), repeat=3)
        rows.append(
            {
                "finest grid": f"{finest[0]}x{finest[1]}",
                "tokens": finest[0] * finest[1],
                "segment_s": timing["median_s"],
            }
        )
    return rows


def main() -> None:
    parser = arguments(__doc__, model=True, dtype="float32")
    parser.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configs")
    parser.add_argument("--skip-big", action="store_true", help="leave out SDXL (10 GiB of float32 weights)")
    parser.add_argument("--one", help="internal: run one config, print its row as JSON")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.dtype)))
        return
    rows = []
    for name in args.only.split(","):
        if args.skip_big and CONFIGS[name][0] == "sdxl":
            continue
        command = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            rows.append({"config": name, "family": f"failed: {done.stderr.strip().splitlines()[-1]}"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    columns = ["config", "family", "input", "grids", "encode_s", "segment_s", "segments", "timed", "peak_rss_gib"]
    if args.device.startswith("cuda"):
        columns.append("peak_cuda_gib")
    print(f"encode + segment, random weights, {args.device} {args.dtype}, {torch.get_num_threads()} threads\n")
    report(f"families-{args.device.split(':')[0]}-{args.dtype}", rows, columns)
    print()
    report("segment-grids", grid_costs(), ["finest grid", "tokens", "segment_s"])


if __name__ == "__main__":
    main()
