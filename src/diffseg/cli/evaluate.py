"""`diffseg evaluate`: score benchmarks under DiffSeg's protocol or DiffCut's, resumable; several at once write one
results table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checks import check_batch_size, check_model, check_writable, load_pipeline
from .options import (
    add_encode_arguments,
    add_model_arguments,
    add_segment_arguments,
    encode_config,
    method_config,
    warn_unread_options,
)


# The open-vocabulary names of the benchmarks with a background class, counted with it (the literature's VOC-21 and
# Context-60): the same data.
ALIASES = {"voc21": "voc20", "context60": "context59"}


def _benchmarks(names: list[str], concepts: bool = False) -> list[str]:
    from ..evaluation.datasets import BENCHMARKS

    if "all" in names and len(names) > 1:
        raise ValueError(f"`all` names every benchmark: give it alone, or list benchmarks ({', '.join(BENCHMARKS)}).")
    if concepts:  # open-vocabulary: the benchmarks with a background class
        names = [b for b, bench in BENCHMARKS.items() if bench.background] if names == ["all"] else names
        chosen = list(dict.fromkeys(ALIASES.get(n, n) for n in names))
        plain = [n for n in chosen if n in BENCHMARKS and not BENCHMARKS[n].background]
        if plain:
            raise ValueError(
                f"--concepts-from-classes scores benchmarks with a background class (voc21, context60, cocoobject); "
                f"not {', '.join(plain)}."
            )
    else:
        chosen = list(BENCHMARKS) if names == ["all"] else list(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        raise ValueError(
            f"Unknown benchmark {', '.join(unknown)}: name one or more of {', '.join(BENCHMARKS)}, or `all`."
        )
    return chosen


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from ..evaluation.datasets import BENCHMARKS
    from ..evaluation.harness import evaluate, format_summary

    concepts = _class_concepts(args) if args.concepts_from_classes else None
    names = _benchmarks(args.dataset, args.concepts_from_classes)
    several = len(names) > 1 or args.dataset == ["all"]
    encode = encode_config(args)
    batch_size = check_batch_size(args.batch_size)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"`--limit` must be at least 1 but is {args.limit}.")
    if args.predictions and args.predictions_root:
        raise ValueError("Pass `--predictions DIR` (one benchmark) or `--predictions-root DIR` (DIR/NAME for each).")
    if args.predictions and several:
        raise ValueError("`--predictions DIR` scores one benchmark; for several use `--predictions-root DIR`.")
    warn_unread_options(args)
    configs = {name: _config(args, BENCHMARKS[name]) for name in names}  # checked before anything runs
    output = Path(args.output or ("eval-all" if several else f"eval-{names[0]}"))
    check_writable(output)
    scored_by_model = not (args.predictions or args.predictions_root)
    if scored_by_model:
        check_model(args, encode)

    # Each benchmark from its own folder: ROOT itself for one, ROOT/<its usual folder> for several.
    runs, missing = [], []
    for name in names:
        bench = BENCHMARKS[name]
        root = bench.find(args.root) if several else bench.root(args.root)
        predictions = args.predictions or (Path(args.predictions_root) / name if args.predictions_root else None)
        if root is None:
            missing.append(f"{name}: no {' or '.join(bench.folders)} under {args.root}")
        elif predictions is not None and not Path(predictions).is_dir():
            missing.append(f"{name}: predictions folder `{predictions}` does not exist")
        else:
            runs.append((bench, root, predictions))
    if not runs:
        raise FileNotFoundError(f"No benchmark to score under `{args.root}`: {'; '.join(missing)}.")
    for reason in missing:
        print(f"diffseg: skipped benchmark {reason}", file=sys.stderr)

    pipeline = load_pipeline(args) if scored_by_model else None
    summaries, skipped_images = [], 0
    for bench, root, predictions in runs:
        summary = evaluate(
            bench,
            root,
            output / bench.name if several else output,
            pipeline=pipeline,
            predictions=predictions,
            config=configs[bench.name],
            timestep=encode.timestep,
            blocks=encode.blocks,
            protocol=args.protocol,
            batch_size=batch_size,
            limit=args.limit,
            concepts=concepts,
        )
        summaries.append(summary)
        skipped_images += len(summary.skipped)
        print(format_summary(summary) + "\n")
    _report(summaries, output, args, several)
    if args.json:
        print(
            json.dumps(
                {s.dataset: {"pixel_accuracy": s.pixel_accuracy, "miou": s.miou, "images": s.images} for s in summaries}
                if several
                else {
                    "pixel_accuracy": summaries[0].pixel_accuracy,
                    "miou": summaries[0].miou,
                    "images": summaries[0].images,
                }
            )
        )
    return 1 if skipped_images or missing else 0


def _class_concepts(args: argparse.Namespace):
    """`--concepts-from-classes`: concept maps of the class names, scored open-vocabulary (the "concepts" protocol)."""
    from ..backbones.concepts import parse_concepts
    from ..config import DEFAULT_METHOD
    from ..evaluation.harness import ClassConcepts
    from ..methods.registry import concept_method

    concepts = concept_method().name
    if args.method not in (DEFAULT_METHOD, concepts) or args.protocol != "diffseg":
        raise ValueError("--concepts-from-classes runs concept maps under their own protocol: leave out --method and "
                         "--protocol.")  # fmt: skip
    args.method, args.protocol = concepts, "concepts"  # the open-vocabulary protocol
    if args.predictions or args.predictions_root:  # class-id maps made elsewhere, scored the same way
        return None
    return ClassConcepts(parse_concepts(args.background_concepts), all_classes=args.all_classes)


def _config(args: argparse.Namespace, bench):
    """The method's settings for one benchmark: those its paper fixes for it (DiffSeg's τ) unless given."""
    return method_config(args, bench.settings(args.method))


def _report(summaries, output: Path, args: argparse.Namespace, several: bool) -> None:
    """Where the results are; for several benchmarks the table, and a per-class chart for each."""
    from ..evaluation.report import CHART, write_chart, write_table

    if not several:
        print(f"Per-image results: {output}/results.jsonl; summary: {output}/summary.json")
    label = f"this run ({'predictions' if args.predictions_root else args.method}, {args.protocol} protocol)"
    if several:
        markdown, table = write_table(summaries, output, label)
        print(f"Results table: {markdown} and {table}; each benchmark's run in {output}/NAME/")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('diffseg: per-class charts need matplotlib: pip install "diffseg[eval]"', file=sys.stderr)
        return
    for summary in summaries:
        if summary.images:
            path = write_chart(summary, (output / summary.dataset if several else output) / CHART)
            print(f"Per-class IoU chart: {path}")


def add_evaluate_command(commands) -> None:
    from ..evaluation.datasets import BENCHMARKS

    p = commands.add_parser(
        "evaluate",
        help="score on the six benchmarks under DiffSeg's protocol or DiffCut's",
        description="Evaluate unsupervised segmentation (per-image Hungarian matching) on "
        f"{', '.join(BENCHMARKS)}, or `all` of them found under a datasets root. Defaults are the papers' per "
        "dataset. Re-running with the same --output resumes.",
    )
    p.add_argument(
        "dataset",
        nargs="+",
        metavar="BENCHMARK",
        help=f"one or more of {', '.join(BENCHMARKS)}, or `all` (with --concepts-from-classes: voc21, context60, "
        "cocoobject)",
    )
    p.add_argument(
        "--root",
        required=True,
        help="the benchmark's folder; with several benchmarks (or `all`) the datasets root holding each under its "
        "usual name (coco, cityscapes, VOCdevkit/VOC2012 or pascal_voc_d2, pascal_ctx_d2, ADEChallengeData2016)",
    )
    p.add_argument(
        "-o", "--output", default=None, help="run folder (default: eval-BENCHMARK, or eval-all); re-use it to resume"
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N images of each benchmark")
    p.add_argument(
        "--predictions",
        default=None,
        metavar="DIR",
        help="score precomputed label PNGs DIR/ID.png (any method) instead of running a method",
    )
    p.add_argument(
        "--predictions-root",
        default=None,
        metavar="DIR",
        help="with several benchmarks: precomputed label PNGs DIR/BENCHMARK/ID.png",
    )
    p.add_argument("--json", action="store_true", help="also print the headline numbers as JSON")
    p.add_argument(
        "--protocol",
        choices=["diffseg", "diffcut"],
        default="diffseg",
        help="diffseg: score at 512² (DiffSeg's paper); diffcut: DiffCut's eval_diffcut.py exactly (crop of side "
        "min(H, W) - 1, labels to 1024² then 128², background step on VOC, Context and COCO-Object, PAMR after it "
        "with --pamr) (default: %(default)s)",
    )
    from ..evaluation.harness import BACKGROUND_CONCEPTS

    group = p.add_argument_group("open-vocabulary (concept maps of the class names)")
    group.add_argument(
        "--concepts-from-classes",
        action="store_true",
        help="score concept maps whose words are the benchmark's class names, each pixel the class of its word, with "
        "no matching (ConceptAttention's VOC multi-class protocol: whole image at 1024², 64×64 score grid): voc21, "
        "context60, cocoobject; with --predictions, PNGs of class ids (the benchmark's classes, background last) "
        "scored the same way",
    )
    group.add_argument(
        "--background-concepts",
        default=", ".join(BACKGROUND_CONCEPTS),
        metavar="WORDS",
        help="words that all stand for background, before the classes (default: the reference's, %(default)s)",
    )
    group.add_argument(
        "--all-classes",
        action="store_true",
        help="every class name for every image (default: the classes present in its label, as the reference)",
    )
    add_model_arguments(p)
    add_encode_arguments(p, crop=False)
    from ..evaluation.datasets import BENCHMARK_SETTINGS

    add_segment_arguments(p, per_dataset=BENCHMARK_SETTINGS)
    p.set_defaults(run=run_evaluate)
