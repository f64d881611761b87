"""`diffseg segment`: images, folders or globs into label maps, overlays and the other formats asked for."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from .checks import (
    check_batch_size,
    check_model,
    check_naming,
    check_output_size,
    check_writable,
    load_captioner,
    load_pipeline,
)
from .options import (
    _size,
    add_concept_arguments,
    add_encode_arguments,
    add_label_arguments,
    add_model_arguments,
    add_output_arguments,
    add_segment_arguments,
    job_config,
    output_writers,
    resolve_concepts,
)


def run_segment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..io.images import find_images
    from ..io.outputs import OutputFolder
    from ..jobs.runner import Job, pending
    from ..methods.registry import METHODS

    # 1. Check inputs and arguments, before anything loads: every setting made once.
    resolve_concepts(args)
    batch_size = check_batch_size(args.batch_size)
    config = job_config(args, output_size=check_output_size(args.output_size))
    sink = OutputFolder(Path(args.output), tuple(output_writers(args, naming=args.words is not None or args.caption)))
    backbone = check_model(args, config.encode, config.segment)  # its configs only: what it cannot take fails
    check_naming(args, backbone)
    found, missing = find_images(args.paths)
    for item, reason in missing:
        print(f"diffseg: skipped {item}: {reason}", file=sys.stderr)
    items = [(str(p), n) for p, n in found]
    todo = pending(items, [sink]) if args.resume else items
    check_writable(args.output)
    if not todo:
        print(f"Nothing to do: {len(found)} images found, {len(found)} already done.", file=sys.stderr)
        return 1 if missing else 0

    # 2. Load the model.
    pipe = load_pipeline(args)
    if args.words is not None:
        pipe.words_for(METHODS[args.method], args.words)  # fail before any image: empty, too long
    captioner = load_captioner(args, pipe.device) if args.caption else None
    job = Job(pipe, config, captioner=captioner, batch_size=batch_size)

    # 3. Decode, encode in batches, segment, write.
    start, done, failures = time.perf_counter(), 0, list(missing)
    with tqdm(total=len(todo), unit="img", desc="segment", dynamic_ncols=True) as progress:
        for outcome in job.run(todo, [sink]):
            if outcome.ok:
                done += 1
                progress.set_postfix(segments=outcome.result.num_segments)
            else:
                failures.append((outcome.source, outcome.error))
                progress.write(f"diffseg: failed {outcome.source}: {outcome.error}", file=sys.stderr)
            progress.update(1)
    report(done, len(found) - len(todo), failures, time.perf_counter() - start, args.output)
    return 1 if failures else 0


def report(done: int, skipped: int, failures: list, seconds: float, output) -> None:
    """The closing lines of a run: counts, speed, and every failure with its reason."""
    print(
        f"Segmented {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} img/s); "
        f"{skipped} already done, {len(failures)} failed. Outputs in {output}",
        file=sys.stderr,
    )
    if failures:
        print("Failed:", file=sys.stderr)
        for item, reason in failures:
            print(f"  {item}: {reason}", file=sys.stderr)


def add_segment_command(commands) -> None:
    p = commands.add_parser(
        "segment",
        help="segment images, folders or globs into label maps and overlays",
        description="Segment images with DiffSeg (default) or DiffCut (--method diffcut). Writes "
        "OUTPUT/labels/NAME.png (integer ids), OUTPUT/overlays/NAME.png and, with --npy, OUTPUT/arrays/NAME.npy; with "
        "--coco, OUTPUT/coco/NAME.json (COCO RLE masks). With --concepts WORDS: where each word is (see --concepts).",
    )
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_output_arguments(p)
    p.add_argument(
        "--output-size",
        type=_size,
        default=None,
        metavar="HxW",
        help="label map size (default: the image's own size, after any crop)",
    )
    p.add_argument("--resume", action="store_true", help="skip images whose outputs already exist")
    add_model_arguments(p)
    add_encode_arguments(p)
    add_segment_arguments(p)
    add_concept_arguments(p)
    add_label_arguments(p)
    p.set_defaults(run=run_segment)
