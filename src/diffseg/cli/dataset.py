"""`diffseg segment-dataset`: a large collection on a Ray cluster, resumable."""

from __future__ import annotations

import argparse
import sys

from .checks import check_batch_size, check_model, check_naming, check_writable
from .options import (
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


def run_segment_dataset(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "`diffseg segment-dataset` needs Ray Data: pip install 'diffseg[ray]' (or 'ray[data]')."
        ) from error
    from ..jobs.dataset import segment_dataset

    resolve_concepts(args)
    config = job_config(args)
    backbone = check_model(args, config.encode, config.segment)
    check_naming(args, backbone)
    if "://" not in str(args.output):
        check_writable(args.output)
    formats = [w.key for w in output_writers(args, naming=args.words is not None)]
    summary = segment_dataset(
        args.input,
        args.output,
        config,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        offload=args.offload,
        ray_address=args.ray_address,
        batch_size=check_batch_size(args.batch_size),
        num_gpus_per_worker=args.num_gpus_per_worker,
        concurrency=args.concurrency,
        formats=tuple(formats),
    )
    print(
        f"Done {summary.done}, skipped {summary.skipped} (already done), failed {len(summary.failed)} in "
        f"{summary.seconds:.1f} s ({summary.images_per_second:.2f} img/s). Manifest: {args.output}/manifest.parquet",
        file=sys.stderr,
    )
    for failure in summary.failed:
        print(f"  failed {failure['path']}: {failure['error']}", file=sys.stderr)
    return 1 if summary.failed else 0


def add_segment_dataset_command(commands) -> None:
    p = commands.add_parser(
        "segment-dataset",
        help="segment a large image collection on a Ray cluster (resumable)",
        description="Segment a folder, glob, or .txt/.parquet list of image paths or URIs with Ray "
        "Data. Writes OUTPUT/labels/NAME.png (and the formats asked for, as `segment`) and OUTPUT/manifest.parquet; "
        "re-running resumes. "
        "Needs the ray extra: pip install 'diffseg[ray]'.",
    )
    p.add_argument("input", help="folder, glob, or .txt/.lst/.parquet file listing image paths or URIs")
    p.add_argument("-o", "--output", required=True, help="output folder (re-use it to resume)")
    p.add_argument(
        "--ray-address",
        default="local",
        help="local (start Ray here), auto (join this machine's cluster) or ray://HOST:PORT (default: %(default)s)",
    )
    p.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per model worker (default: 1 if the cluster has GPUs, else 0)",
    )
    p.add_argument("--concurrency", type=int, default=1, help="number of model workers (default: %(default)s)")
    add_output_arguments(p)
    add_model_arguments(p)
    add_encode_arguments(p)
    p.set_defaults(batch_size=4)
    add_segment_arguments(p)
    add_concept_arguments(p)
    add_label_arguments(p, captions=False)
    p.set_defaults(run=run_segment_dataset)
