"""`diffseg evaluate`: score a benchmark under the paper's protocol (or DiffCut's), resumable."""

from __future__ import annotations

import argparse

from .checks import check_batch_size, check_model, check_writable, load_pipeline
from .options import add_encode_arguments, add_model_arguments, add_segment_arguments, encode_config, method_config


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from ..evaluation.datasets import BENCHMARKS
    from ..evaluation.harness import evaluate, format_summary

    bench = BENCHMARKS[args.dataset]
    if args.kl_threshold is None:
        args.kl_threshold = bench.kl_threshold  # the paper's setting for this dataset
    config = method_config(args)
    encode = encode_config(args)
    batch_size = check_batch_size(args.batch_size)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"`--limit` must be at least 1 but is {args.limit}.")
    output = args.output or f"eval-{args.dataset}"
    check_writable(output)
    if not args.predictions:
        check_model(args, encode)
    summary = evaluate(
        bench,
        args.root,
        output,
        pipeline=None if args.predictions else load_pipeline(args),
        predictions=args.predictions,
        config=config,
        timestep=encode.timestep,
        blocks=encode.blocks,
        protocol=args.protocol,
        batch_size=batch_size,
        limit=args.limit,
    )
    print(format_summary(summary))
    print(f"\nPer-image results: {output}/results.jsonl; summary: {output}/summary.json")
    if args.json:
        print(json.dumps({"pixel_accuracy": summary.pixel_accuracy, "miou": summary.miou, "images": summary.images}))
    return 1 if summary.skipped else 0


def add_evaluate_command(commands) -> None:
    p = commands.add_parser(
        "evaluate",
        help="score on COCO-Stuff-27 or Cityscapes under the paper's protocol",
        description="Evaluate unsupervised segmentation (Hungarian matching, 27 classes) with the "
        "reference protocol. Defaults are the paper's per dataset. Re-running with the same "
        "--output resumes.",
    )
    p.add_argument("dataset", choices=["cocostuff27", "cityscapes"])
    p.add_argument("--root", required=True, help="dataset folder (see README: Reproducing the paper)")
    p.add_argument("-o", "--output", default=None, help="run folder (default: eval-DATASET); re-use it to resume")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument(
        "--predictions",
        default=None,
        metavar="DIR",
        help="score precomputed label PNGs DIR/ID.png (any method) instead of running DiffSeg",
    )
    p.add_argument("--json", action="store_true", help="also print the headline numbers as JSON")
    p.add_argument(
        "--protocol",
        choices=["diffseg", "diffcut"],
        default="diffseg",
        help="diffseg: score at 512² (DiffSeg's paper); diffcut: at 128² with nearest-downsampled labels (DiffCut's "
        "eval_diffcut.py) (default: %(default)s)",
    )
    add_model_arguments(p)
    add_encode_arguments(p, crop=False)
    add_segment_arguments(p, kl_threshold=None)
    p.set_defaults(run=run_evaluate)
