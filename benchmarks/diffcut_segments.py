"""DiffCut's cheap step against the number of segments: the recursive cut and the label assignment, timed apart.

    python benchmarks/diffcut_segments.py [--repeat 3] [--side 32] [--channels 1280]

Each case is a (side², C) token map (`diffcut_reference.token_map`: a smooth random field plus noise) segmented at
128×128 with a τ that gives from about ten to about a thousand segments (1,024 tokens is the most there can be). The
cut's time depends on the shape of its tree: a balanced tree solves a few large eigenproblems, a tree that peels off
a few tokens at a time solves many. Goal on 2 CPU cores: 1,000 segments in under 1 s.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from common import arguments, report, timeit
from diffcut_reference import token_map
from diffseg import segment_features
from diffseg.methods.diffcut.ncut import assemble_clusters, recursive_ncut
from diffseg.methods.diffcut.segment import _assign

CASES = [  # (low-resolution side of the field, noise, τ)
    (3, 0.1, 0.5),
    (3, 0.3, 0.9),
    (3, 0.3, 0.95),
    (3, 0.5, 0.95),
    (3, 1.0, 0.99),
]


def main() -> None:
    parser = arguments(__doc__, repeat=3)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1280)
    args = parser.parse_args()
    size, rows = (128, 128), []
    for case, (low, noise, tau) in enumerate(CASES):
        features = token_map(case, args.side, args.channels, low, noise)
        feats = F.normalize(features.T.reshape(1, args.channels, args.side, args.side), dim=1)
        tokens = feats.reshape(args.channels, -1)
        start = time.perf_counter()
        masks = recursive_ncut(tokens, tau=tau, alpha=10)
        clusters = assemble_clusters(masks, tokens.shape[1])
        cut = time.perf_counter() - start
        start = time.perf_counter()
        labels = _assign(feats, clusters, size)
        assign = time.perf_counter() - start
        whole = timeit(lambda: segment_features(features, tau=tau, alpha=10, output_size=size), repeat=args.repeat)
        rows.append(
            {
                "noise": noise,
                "tau": tau,
                "segments": int(labels.max()) + 1,
                "cut_s": cut,
                "assign_s": assign,
                "segment_s": whole["median_s"],
                "under_1s": "yes" if whole["median_s"] < 1 else "no",
            }
        )
    columns = ["noise", "tau", "segments", "cut_s", "assign_s", "segment_s", "under_1s"]
    report("diffcut_segments", rows, columns, {"settings": vars(args), "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
