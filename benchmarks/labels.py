"""Extra cost of naming segments over plain segmentation, SD 1.5 architecture at random weights, 512².

    python benchmarks/labels.py [--repeat 2] [--device cpu]

Rows: a plain encode; an encode with a four-word vocabulary (the UNet batch doubles: unconditional + conditional,
with cross-attention captured); segmentation alone; segmentation plus naming; naming alone (cross-attention
aggregation at 512² and voting). Segmentation time varies with the number of proposals, so compare "name only".
"""

from __future__ import annotations


import numpy as np

from common import arguments, report, timeit
from diffseg.testing.models import random_pipeline
from diffseg.naming.vocabulary import assign_labels, word_scores

WORDS = "road, car, person, sky"


def main() -> None:
    args = arguments(__doc__, repeat=2, model=True).parse_args()

    pipe = random_pipeline("sd15", device=args.device, dtype=args.dtype)
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    plain = pipe.encode(image)
    named = pipe.encode(image, labels=WORDS)
    labels = pipe.segment(named).labels
    steps = {
        "encode": lambda: pipe.encode(image),
        f"encode with labels ({WORDS})": lambda: pipe.encode(image, labels=WORDS),
        "segment": lambda: pipe.segment(plain),
        "segment + name": lambda: pipe.segment(named),
        "  name only (aggregate + vote)": lambda: assign_labels(
            labels, word_scores(named.cross_attention, named.vocabulary), named.vocabulary.words
        ),
    }
    rows = []
    for name, fn in steps.items():
        timing = timeit(fn, repeat=args.repeat)
        rows.append({"step": name, "median_s": timing["median_s"], "min_s": timing["min_s"]})
    rows[1]["extra_vs_plain"] = rows[1]["median_s"] / rows[0]["median_s"] - 1
    rows[3]["extra_vs_plain"] = rows[3]["median_s"] / rows[2]["median_s"] - 1
    print(f"Naming segments, SD 1.5 architecture at random weights, 512², {pipe.device} {pipe.dtype}\n")
    report(f"labels-{pipe.device.type}", rows, ["step", "median_s", "min_s", "extra_vs_plain"])


if __name__ == "__main__":
    main()
