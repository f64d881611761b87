"""Peak memory and time of every step whose memory grows with pixels × segments, each in a fresh process.

    python benchmarks/memory.py [--quick]

Rows: label upsampling (`labelling.label_map`, K proposals at 64² to the output size), the colour overlay
(`visualisation.overlay`), COCO RLE masks (`outputs.coco_record`), and PAMR (`pamr.refine_labels`, the DiffCut
refinement, within its `MEMORY_BUDGET`) against output size and segment count; and DiffSeg's aggregation and merge
(`segment_attention`) on the four grids of SD 1.x whose finest is SIZE (the maps are made before the baseline: the
row shows what the step adds to them, about one aggregate, N² floats). Each row runs in its own Python
process, so "peak RSS" is that step's own high-water mark (interpreter, torch and the inputs included); "baseline"
is the same process's RSS before the step. `--quick` leaves out the 12-megapixel PAMR rows (minutes each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import arguments, report

STEP = r"""
import json, resource, sys, time
import numpy as np, torch
step, height, width, segments = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
side = max(1, int(np.ceil(np.sqrt(segments))))
blocks = np.arange(side * side).reshape(side, side) % segments  # `segments` regions of about equal area
labels = np.kron(blocks, np.ones((height // side + 1, width // side + 1), np.int64))[:height, :width]
image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
start = time.perf_counter()
if step == "label upsampling":
    from diffseg.methods.diffseg.labelling import label_map
    proposals = torch.rand(segments, 64, 64, generator=torch.Generator().manual_seed(0))
    label_map(proposals, (height, width))
elif step == "overlay":
    from diffseg.io.visualisation import overlay
    overlay(image, labels)
elif step == "coco rle":
    from diffseg.io.outputs import coco_record
    coco_record("x.jpg", labels)
elif step == "diffseg segment":  # grids height×width and its halvings, as SD 1.x
    from diffseg import segment_attention
    del labels, image
    g = torch.Generator().manual_seed(0)
    attn = {}
    for k in range(4):
        n = (height >> k) * (width >> k)
        attn[(height >> k, width >> k)] = torch.rand(n, n, generator=g)  # (N, N): one image, heads averaged
        attn[(height >> k, width >> k)] /= attn[(height >> k, width >> k)].sum(-1, keepdim=True)  # rows sum to 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    segment_attention(attn, output_size=(height * 8, width * 8))
elif step == "pamr":
    from diffseg.methods.diffcut.pamr import refine_labels
    refine_labels(torch.from_numpy(labels), torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"seconds": seconds, "baseline_gib": before, "peak_gib": peak}))
"""

CASES = [
    ("label upsampling", 3000, 4000, 1000),
    ("overlay", 3000, 4000, 1000),
    ("coco rle", 3000, 4000, 1000),
    ("pamr", 128, 128, 30),
    ("pamr", 1024, 1024, 2),
    ("pamr", 1024, 1024, 30),
    ("pamr", 1500, 2000, 2),
    ("pamr", 3000, 4000, 2),
    ("diffseg segment", 64, 64, 1),
    ("diffseg segment", 128, 128, 1),
]
SLOW = {("pamr", 3000, 4000, 2)}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--quick", action="store_true", help="leave out the 12-megapixel PAMR row")
    args = parser.parse_args()
    rows = []
    for step, height, width, segments in CASES:
        if args.quick and (step, height, width, segments) in SLOW:
            continue
        command = [sys.executable, "-c", STEP, step, str(height), str(width), str(segments)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
        if done.returncode != 0:
            rows.append({"step": step, "size": f"{height}x{width}", "segments": segments, "error": done.stderr[-300:]})
            continue
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"step": step, "size": f"{height}x{width}", "segments": segments, **measured})
        print(rows[-1], file=sys.stderr)
    report("memory", rows, ["step", "size", "segments", "seconds", "baseline_gib", "peak_gib", "error"])


if __name__ == "__main__":
    main()
