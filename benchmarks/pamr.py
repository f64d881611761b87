"""PAMR's refinement time against pixels × segments: each label propagated only over the pixels it can reach.

    python benchmarks/pamr.py [--repeat 1] [--quick]

Label maps of many small segments (the held-out hard case: DiffCut at τ 1 on a noise image gives about a thousand,
one token each) and of a few large ones, on a noise image, at up to 1500×2000. Not covered: a segment whose pixels
are scattered over the whole map (its box is the map), which costs what every label cost before. A label's work is
its bounding box grown by PAMR's reach (80 pixels over 10 iterations at dilation 8), so the time follows the sum of
those boxes' areas (the "reach" column), not segments × pixels. Before this, every label was propagated over the
whole map: the 1500×2000, ~1,000-segment case ran past 25 minutes on 2 cores. Goal there: under 2 minutes.
"""

from __future__ import annotations

import torch

from common import arguments, report, timeit
from diffseg.methods.diffcut.pamr import reach, refine_labels

CASES = [  # (height, width, segments per axis)
    (128, 128, 3),
    (512, 512, 10),
    (768, 1024, 25),
    (1500, 2000, 4),
    (1500, 2000, 32),
]


def label_map(height: int, width: int, per_axis: int) -> torch.Tensor:
    """(H, W) ids of per_axis² blocks upsampled from a token grid, as DiffCut's clusters of one token each are."""
    small = torch.arange(per_axis * per_axis).reshape(1, 1, per_axis, per_axis).float()
    return torch.nn.functional.interpolate(small, size=(height, width), mode="nearest")[0, 0].long()


def main() -> None:
    parser = arguments(__doc__, repeat=1)
    parser.add_argument("--quick", action="store_true", help="the cases up to 768×1024 only")
    args = parser.parse_args()
    rows = []
    for height, width, per_axis in CASES[:3] if args.quick else CASES:
        labels = label_map(height, width, per_axis)
        image = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(1))
        present = torch.unique(labels)
        reached = reach(labels)
        timing = timeit(lambda: refine_labels(labels, image), repeat=args.repeat, warmup=0)
        rows.append(
            {
                "size": f"{height}x{width}",
                "segments": len(present),
                "segments x pixels (M)": round(len(present) * height * width / 1e6, 1),
                "reach (M)": round(reached / 1e6, 1),
                "seconds": round(timing["median_s"], 2),
            }
        )
    report("pamr", rows, ["size", "segments", "segments x pixels (M)", "reach (M)", "seconds"])


if __name__ == "__main__":
    main()
