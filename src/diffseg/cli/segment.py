"""`diffseg segment`: images, folders or globs into label maps, overlays and the other formats asked for."""

from __future__ import annotations

import argparse
import sys
import time

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
    add_encode_arguments,
    add_label_arguments,
    add_model_arguments,
    add_output_arguments,
    add_segment_arguments,
    encode_kwargs,
    label_kwargs,
    output_writers,
    segment_kwargs,
)


def run_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..io.images import find_images
    from ..io.outputs import outputs_done, write_outputs
    from ..jobs.runner import Job

    # 1. Check inputs and arguments, before anything loads.
    batch_size = check_batch_size(args.batch_size)
    settings = {**segment_kwargs(args), **label_kwargs(args), "output_size": check_output_size(args.output_size)}
    encode = encode_kwargs(args)
    naming = args.words is not None or args.caption
    if args.method != "diffseg" and naming:
        raise ValueError("Naming segments (--words, --caption) works with --method diffseg only.")
    if args.words is not None and args.caption:
        raise ValueError("Pass either --words or --caption, not both.")
    writers = output_writers(args, naming)
    check_model(args, encode)  # the checkpoint's configs only: a resolution it cannot take fails here
    check_naming(args)
    found, missing = find_images(args.paths)
    failures = list(missing)
    for item, reason in missing:
        print(f"diffseg: skipped {item}: {reason}", file=sys.stderr)
    todo = [(str(p), n) for p, n in found if not (args.resume and outputs_done(args.output, n, writers, str(p)))]
    check_writable(args.output)
    skipped = len(found) - len(todo)
    if not todo:
        print(f"Nothing to do: {len(found)} images found, {skipped} already done.", file=sys.stderr)
        return 1 if failures else 0

    # 2. Load the model.
    pipe = load_pipeline(args)
    if args.words is not None:
        pipe.vocabulary(args.words)  # fail before any image: empty, too long
    captioner = load_captioner(args, pipe.device) if args.caption else None
    if args.method == "diffseg":
        encode["segment_from"] = args.segment_from
    job = Job(pipe, encode=encode, segment=settings, labels=args.words, captioner=captioner, batch_size=batch_size)

    # 3. Decode, encode in batches, segment, write.
    start = time.perf_counter()
    done = 0
    with tqdm(total=len(todo), unit="img", desc="segment", dynamic_ncols=True) as progress:
        for outcome in job.run(todo):
            if outcome.ok:
                try:
                    write_outputs(outcome, args.output, writers)
                    done += 1
                    progress.set_postfix(segments=outcome.result.num_segments)
                except (OSError, ValueError, ImportError) as error:  # e.g. disk full: report the image, carry on
                    outcome.error = f"writing failed: {error}"
            if not outcome.ok:
                failures.append((outcome.source, outcome.error))
                progress.write(f"diffseg: failed {outcome.source}: {outcome.error}", file=sys.stderr)
            progress.update(1)

    seconds = time.perf_counter() - start
    print(
        f"Segmented {done} images in {seconds:.1f} s ({done / max(seconds, 1e-9):.2f} img/s); "
        f"{skipped} already done, {len(failures)} failed. Outputs in {args.output}",
        file=sys.stderr,
    )
    if failures:
        print("Failed:", file=sys.stderr)
        for item, reason in failures:
            print(f"  {item}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def add_segment_command(commands) -> None:
    p = commands.add_parser(
        "segment",
        help="segment images, folders or globs into label maps and overlays",
        description="Segment images with DiffSeg (default) or DiffCut (--method diffcut). Writes "
        "OUTPUT/labels/NAME.png (integer ids), OUTPUT/overlays/NAME.png and, with --npy, OUTPUT/arrays/NAME.npy; with "
        "--coco, OUTPUT/coco/NAME.json (COCO RLE masks).",
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
    add_label_arguments(p)
    p.set_defaults(run=run_segment)
