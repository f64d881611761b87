"""Time `segment_attention` (aggregation, merging, labelling) on SD-shaped attention: 64², 32², 16², 8², 8 heads.

    python benchmarks/segment.py [--repeat 5]

The attention is synthetic (built from a known segmentation, `diffseg.testing.synthetic`): the cost of this step depends
on the shapes and on the number of proposals, not on where the attention came from. Target: <= 0.5 s on 2 CPU
cores at the default settings.
"""

from __future__ import annotations


import torch

from common import arguments, report, timeit
from diffseg import segment_attention
from diffseg.methods.diffseg.aggregation import aggregate, as_attention_maps
from diffseg.methods.diffseg.labelling import label_map
from diffseg.methods.diffseg.merging import anchor_grid, merge
from diffseg.testing.synthetic import attention_from_segmentation, shapes_segmentation


def main() -> None:
    args = arguments(__doc__, repeat=5).parse_args()

    attn = attention_from_segmentation(shapes_segmentation(64, seed=0, num_shapes=6), heads=8, noise=0.1)
    rows = []
    settings = [
        ("default (τ=1.1, 3 it, 16×16)", {}),
        ("τ=0.9 (Cityscapes)", {"kl_threshold": 0.9}),
        ("anchors 8×8", {"num_points": 8}),
        ("64 only", {"resolution_weights": {64: 1.0}}),
        ("output 1024×768", {"output_size": (1024, 768)}),
    ]
    for name, kwargs in settings:
        timing = timeit(lambda: segment_attention(attn, **kwargs), repeat=args.repeat)
        segments = int(segment_attention(attn, **kwargs).max()) + 1
        rows.append({"setting": name, "median_s": timing["median_s"], "min_s": timing["min_s"], "segments": segments})

    # Where the default's time goes.
    maps = as_attention_maps(attn)
    aggregated = aggregate(maps)
    grid = anchor_grid(16)
    anchors = grid[:, 0] * 64 + grid[:, 1]
    proposals = merge(aggregated, anchors, (1.1, 1.1, 1.1))
    stages = {
        "  head mean": lambda: as_attention_maps(attn),
        "  aggregate": lambda: aggregate(maps),
        "  merge (3 it)": lambda: merge(aggregated, anchors, (1.1, 1.1, 1.1)),
        "  label 512²": lambda: label_map(proposals.reshape(-1, 64, 64), (512, 512)),
    }
    for name, fn in stages.items():
        timing = timeit(fn, repeat=args.repeat)
        rows.append({"setting": name, "median_s": timing["median_s"], "min_s": timing["min_s"]})
    print(f"segment_attention on 64/32/16/8 attention, 8 heads, {torch.get_num_threads()} threads\n")
    report("segment", rows, ["setting", "median_s", "min_s", "segments"])


if __name__ == "__main__":
    main()
