"""DiffSeg on one attention grid (SD3 / Flux: one 64×64 token grid at 1024²): which anchor grid and KL threshold.

    python benchmarks/single_grid.py [--seeds 6]

Synthetic attention with a known segmentation (`testing.synthetic`: random shapes, attention local within each
shape, plus noise; both the Gaussian and the peaked softmax kind) at one 64×64 grid, as a diffusion transformer
gives, against the same segmentations at a UNet's four grids (64, 32, 16, 8) aggregated as the paper does. For each
anchor grid M and threshold τ: mean IoU with the truth after one-to-one (Hungarian) matching, and the mean number
of segments found against the true one. The defaults for a single-grid model are read off this table (README).
"""

from __future__ import annotations

import numpy as np

from common import arguments, report
from diffseg import segment_attention
from diffseg.testing.synthetic import attention_from_segmentation, peaked_attention, shapes_segmentation

THRESHOLDS = (0.5, 0.7, 0.9, 1.1, 1.3, 1.5)
POINTS = (8, 16, 32)


def miou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the true segments after matching predicted segments to them one-to-one (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    k, t = int(pred.max()) + 1, int(truth.max()) + 1
    hist = np.bincount(pred.ravel() * t + truth.ravel(), minlength=k * t).reshape(k, t).astype(float)
    union = hist.sum(1, keepdims=True) + hist.sum(0, keepdims=True) - hist
    iou = np.divide(hist, union, out=np.zeros_like(hist), where=union > 0)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    matched = np.zeros(t)
    matched[cols] = iou[rows, cols]
    return float(matched.mean())


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    cases = []
    for seed in range(args.seeds):
        truth = shapes_segmentation(64, seed, num_shapes=5)
        for kind, make in (("gaussian", attention_from_segmentation), ("peaked", peaked_attention)):
            for grids in ((64,), (64, 32, 16, 8)):
                attention = {r: a.mean(0) for r, a in make(truth, resolutions=grids, seed=seed).items()}
                cases.append((kind, grids, truth, attention))
    rows = []
    for grids in ((64,), (64, 32, 16, 8)):
        for points in POINTS:
            for tau in THRESHOLDS:
                scores, found, true = [], [], []
                for _, case_grids, truth, attention in cases:
                    if case_grids != grids:
                        continue
                    labels = segment_attention(attention, kl_threshold=tau, num_points=points, output_size=(64, 64))
                    scores.append(miou(labels.astype(np.int64), truth))
                    found.append(int(labels.max()) + 1)
                    true.append(int(truth.max()) + 1)
                rows.append(
                    {
                        "grids": "one 64x64" if len(grids) == 1 else "UNet 64,32,16,8",
                        "anchors": f"{points}x{points}",
                        "tau": tau,
                        "miou": float(np.mean(scores)),
                        "segments": float(np.mean(found)),
                        "true_segments": float(np.mean(true)),
                    }
                )
    report("single-grid", rows, ["grids", "anchors", "tau", "miou", "segments", "true_segments"])
    for grids in ("one 64x64", "UNet 64,32,16,8"):
        best = max((r for r in rows if r["grids"] == grids), key=lambda r: r["miou"])
        print(f"best for {grids}: anchors {best['anchors']}, τ {best['tau']} (mIoU {best['miou']:.3f})")


if __name__ == "__main__":
    main()
