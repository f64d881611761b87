"""Agreement with the original TensorFlow implementation on the same attention tensors.

    pip install tensorflow-cpu scikit-learn
    git clone https://github.com/google/diffseg /tmp/google-diffseg
    python benchmarks/reference_agreement.py --reference /tmp/google-diffseg [--cases 6]

Nothing of the reference is shipped here: it is imported from the folder given. Each case is attention built with
`diffseg.testing.synthetic` (smooth attention from a segmentation, and peaked softmax attention whose small values
underflow float16, as trained models' do), run through the reference's `DiffSeg.segment` and through
`segment_attention` with the same settings; the table gives the share of pixels on which the label maps agree after
matching their ids one-to-one. The target is >= 99.5 %.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from common import report
from diffseg import segment_attention
from diffseg.evaluation.metrics import hungarian_scores
from diffseg.testing.synthetic import attention_from_segmentation, peaked_attention, shapes_segmentation

SETTINGS = [(1.1, 16, False), (0.9, 16, False), (0.6, 8, False), (1.1, 16, True)]  # (τ, anchors per side, refine)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    _, b = np.unique(b, return_inverse=True)
    n = int(max(a.max(), b.max())) + 1
    return float(hungarian_scores(b.reshape(a.shape), a, n).tp.sum() / a.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="a checkout of google/diffseg")
    parser.add_argument("--cases", type=int, default=6)
    args = parser.parse_args()
    # The reference's package is also called `diffseg`: load its module from the file, under another name.
    path = Path(args.reference).resolve() / "diffseg" / "segmentor.py"
    if not path.is_file():
        sys.exit(f"{path} not found: --reference must be a checkout of google/diffseg")
    spec = importlib.util.spec_from_file_location("reference_segmentor", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ReferenceDiffSeg = module.DiffSeg

    rows = []
    for k in range(args.cases):
        truth = shapes_segmentation(64, seed=k, num_shapes=5)
        if k % 2:
            kind, attn = "peaked", peaked_attention(truth, heads=8, seed=k)
        else:
            kind, attn = "smooth", attention_from_segmentation(truth, heads=8, noise=0.05 + 0.1 * k, seed=k)
        weights = [attn[r].numpy()[None] for r in (64, 32, 16, 8)]  # batch of one, as the reference takes
        for tau, points, refine in SETTINGS:
            theirs = ReferenceDiffSeg([tau] * 3, refine, points).segment(*weights)[0]
            ours = segment_attention(attn, kl_threshold=tau, num_points=points, refine=refine)
            rows.append(
                {
                    "case": k,
                    "attention": kind,
                    "tau": tau,
                    "anchors": points,
                    "refine": refine,
                    "segments_reference": len(np.unique(theirs)),
                    "segments_ours": int(ours.max()) + 1,
                    "agreement_pct": 100 * agreement(ours, theirs),
                }
            )
            print(rows[-1], flush=True)
    print()
    report("reference-agreement", rows, list(rows[0]))
    print(f"minimum agreement: {min(r['agreement_pct'] for r in rows):.3f} %")


if __name__ == "__main__":
    main()
