"""`diffseg` command line: segment images, evaluate on benchmarks, serve the demo, process datasets on Ray.

Known errors become a one-line message and exit status 2; set DIFFSEG_TRACEBACK=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence

from .config import DEFAULT_MODEL, RESOLUTION_PRESETS, AppConfig, EncodeConfig, SegmentConfig

_ENCODE = EncodeConfig()
_SEGMENT = SegmentConfig()
_APP = AppConfig()


# ---------------------------------------------------------------------------------------------- shared options


def _thresholds(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _weights(text: str) -> dict[int, float]:
    try:
        pairs = (item.split(":") for item in text.split(","))
        return {int(r): float(w) for r, w in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R:W pairs such as '64:0.5,32:0.5', got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH or SIDE, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH or SIDE, got {text!r}")
    return (parts[0], parts[-1])


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"hub id or local diffusers folder (default: {DEFAULT_MODEL})"
    )
    group.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="UNet and text encoder precision; auto is float16 on GPU, float32 on CPU (VAE: float32)",
    )


def add_encode_arguments(parser: argparse.ArgumentParser, crop: bool = True) -> None:
    group = parser.add_argument_group("encoding (the UNet step)")
    group.add_argument(
        "--timestep", type=int, default=_ENCODE.timestep, help="UNet timestep (default: %(default)s, the paper's)"
    )
    if crop:  # benchmarks fix the crop, the resolution and the (absent) noise: the protocol's
        group.add_argument(
            "--crop",
            choices=["none", "center"],
            default=_ENCODE.crop or "none",
            help="center: take the central square first, as the benchmarks do (default: %(default)s)",
        )
        group.add_argument(
            "--resolution",
            type=int,
            default=_ENCODE.resolution,
            help="side the image is resized to, a multiple of 64 (default: %(default)s, the paper's)",
        )
        group.add_argument(
            "--noise-seed",
            type=int,
            default=_ENCODE.noise_seed,
            help="add seeded noise for the timestep (default: none, the clean latent, as the paper)",
        )
    group.add_argument("--batch-size", type=int, default=1, help="images per UNet batch (default: %(default)s)")


def add_segment_arguments(parser: argparse.ArgumentParser, kl_threshold=_SEGMENT.kl_threshold) -> None:
    group = parser.add_argument_group("segmentation (aggregation, merging, labelling)")
    group.add_argument(
        "--kl-threshold",
        type=_thresholds,
        default=kl_threshold,
        help="merge threshold τ, one value or one per iteration (default: "
        + ("the paper's for the dataset" if kl_threshold is None else "%(default)s")
        + ")",
    )
    group.add_argument(
        "--iterations", type=int, default=_SEGMENT.iterations, help="merge iterations (default: %(default)s)"
    )
    group.add_argument(
        "--num-points", type=int, default=_SEGMENT.num_points, help="anchor grid side M (default: %(default)s)"
    )
    group.add_argument("--refine", action="store_true", help="K-means refinement (needs scikit-learn: diffseg[refine])")
    group.add_argument(
        "--float32-merge",
        action="store_true",
        help="merge maps that underflow float16 too (default: as the reference, whose float16 first iteration "
        "leaves them out)",
    )
    weights = group.add_mutually_exclusive_group()
    weights.add_argument(
        "--resolution-weights",
        type=_weights,
        default=None,
        metavar="R:W,...",
        help="weight per attention resolution, e.g. 64:1,32:0 (default: proportional to R)",
    )
    weights.add_argument(
        "--resolution-preset",
        choices=sorted(RESOLUTION_PRESETS),
        default=None,
        help="a named weighting of the resolutions",
    )


def add_label_arguments(parser: argparse.ArgumentParser, captions: bool = True) -> None:
    group = parser.add_argument_group("semantic labels (name each segment)")
    group.add_argument(
        "--labels",
        default=None,
        metavar="WORDS",
        help="comma-separated words to name segments with, e.g. 'road,car,person,sky' (offline)",
    )
    if captions:
        group.add_argument(
            "--caption",
            action="store_true",
            help="name segments with the nouns of an automatic BLIP caption (needs diffseg[caption])",
        )
        group.add_argument("--caption-model", default=None, help="BLIP captioning checkpoint (hub id or folder)")
    group.add_argument(
        "--voting",
        choices=["majority", "mean"],
        default="majority",
        help="majority vote of per-pixel best words, or highest mean score (default: %(default)s)",
    )
    group.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="leave segments scoring below this unlabelled (default: %(default)s)",
    )
    if captions:
        group.add_argument(
            "--segment-from",
            choices=["unconditional", "conditional"],
            default="unconditional",
            help="which pass the segments come from when labelling (default: %(default)s, as without labels)",
        )


def label_kwargs(args: argparse.Namespace) -> dict:
    return {"voting": args.voting, "min_confidence": args.min_confidence}


def segment_kwargs(args: argparse.Namespace) -> dict:
    """The `segment_attention` keyword arguments given on the command line (checked before any model loads)."""
    if args.refine:
        try:
            import sklearn.cluster  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "--refine needs scikit-learn: pip install 'diffseg[refine]' (or scikit-learn)."
            ) from error
    weights = args.resolution_weights
    if args.resolution_preset is not None:
        weights = RESOLUTION_PRESETS[args.resolution_preset]
    kwargs = {
        "kl_threshold": args.kl_threshold,
        "iterations": args.iterations,
        "num_points": args.num_points,
        "refine": args.refine,
        "resolution_weights": weights,
        "reference_float16": not args.float32_merge,
    }
    SegmentConfig(**kwargs).thresholds()  # a threshold list of the wrong length fails here, not after loading
    return kwargs


def check_batch_size(value: int) -> int:
    if value < 1:
        raise ValueError(f"`--batch-size` must be at least 1 but is {value}.")
    return value


def load_pipeline(args: argparse.Namespace):
    from .pipeline import DiffSegPipeline

    return DiffSegPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)


# ---------------------------------------------------------------------------------------------- diffseg segment


def run_segment(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from .images import crop as crop_array, find_images, load_image
    from .outputs import OutputPaths, label_image, save_array, save_image, save_json

    # 1. Check inputs.
    batch_size = check_batch_size(args.batch_size)
    kwargs = segment_kwargs(args)
    found, missing = find_images(args.paths)
    failures = list(missing)
    for item, reason in missing:
        print(f"diffseg: skipped {item}: {reason}", file=sys.stderr)
    outputs = {name: OutputPaths.for_name(args.output, name) for _, name in found}
    naming = args.labels is not None or args.caption
    if args.labels is not None and args.caption:
        raise ValueError("Pass either --labels or --caption, not both.")
    wanted = {"overlay": not args.no_overlay, "array": args.npy, "semantics": naming}
    todo = [(p, n) for p, n in found if not (args.resume and outputs[n].done(**wanted))]
    skipped = len(found) - len(todo)
    if not todo:
        print(f"Nothing to do: {len(found)} images found, {skipped} already done.", file=sys.stderr)
        return 1 if failures else 0

    # 2. Load the model.
    pipe = load_pipeline(args)
    crop = None if args.crop == "none" else args.crop
    if args.labels is not None:
        pipe.vocabulary(args.labels)  # fail before any image: empty, too long
    captioner = load_captioner(args, pipe.device) if args.caption else None
    encode_kwargs = {
        "timestep": args.timestep,
        "crop": crop,
        "resolution": args.resolution,
        "noise_seed": args.noise_seed,
        "segment_from": args.segment_from,
    }

    # 3. Decode, encode in batches, segment, write.
    start = time.perf_counter()
    done = 0
    with tqdm(total=len(todo), unit="img", desc="segment", dynamic_ncols=True) as progress:
        for first in range(0, len(todo), batch_size):
            batch = []
            for path, name in todo[first : first + batch_size]:
                try:
                    batch.append((load_image(path), name, path))
                except (OSError, ValueError) as error:
                    failures.append((str(path), str(error)))
                    progress.write(f"diffseg: skipped {path}: {error}", file=sys.stderr)
                    progress.update(1)
            if not batch:
                continue
            captions = [None] * len(batch)
            try:
                if captioner is None:
                    bundles = pipe.encode([image for image, _, _ in batch], labels=args.labels, **encode_kwargs)
                else:  # each image has its own words: one encode each
                    bundles = []
                    for k, (image, _, _) in enumerate(batch):
                        captions[k], words = captioner.vocabulary(crop_array(np.asarray(image), crop))
                        bundles.append(pipe.encode(image, labels=words or None, **encode_kwargs))
            except (RuntimeError, ValueError) as error:  # e.g. out of memory: report the batch, carry on
                for _, _, path in batch:
                    failures.append((str(path), f"encoding failed: {error}"))
                    progress.write(f"diffseg: failed {path}: {error}", file=sys.stderr)
                progress.update(len(batch))
                continue
            for bundle, caption, (_, name, path) in zip(bundles, captions, batch):
                out = outputs[name]
                try:
                    result = pipe.segment(bundle, output_size=args.output_size, **kwargs, **label_kwargs(args))
                    save_image(label_image(result.labels), out.labels)
                    if not args.no_overlay:
                        save_image(result.overlay, out.overlay)
                    if args.npy:
                        save_array(result.labels, out.array)
                    if naming:
                        save_json(semantics_record(path, bundle, result, caption, args.voting), out.semantics)
                    done += 1
                    progress.set_postfix(segments=result.num_segments)
                except (OSError, ValueError) as error:  # e.g. disk full: report the image, carry on
                    failures.append((str(path), str(error)))
                    progress.write(f"diffseg: failed {path}: {error}", file=sys.stderr)
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


def semantics_record(path, bundle, result, caption: str | None, voting: str) -> dict:
    """The per-image JSON of segment names: id -> label (None: unlabelled), score, area (fraction of the image)."""
    names = result.names or []
    return {
        "image": str(path),
        "caption": caption,
        "vocabulary": list(bundle.vocabulary.words) if bundle.vocabulary else [],
        "voting": voting,
        "segments": {str(n.id): {"label": n.label, "score": n.score, "area": n.area} for n in names},
    }


def load_captioner(args: argparse.Namespace, device):
    from .captioning import DEFAULT_CAPTION_MODEL, Captioner, default_tagger

    return Captioner(args.caption_model or DEFAULT_CAPTION_MODEL, device=device, tagger=default_tagger())


def add_segment_command(commands) -> None:
    p = commands.add_parser(
        "segment",
        help="segment images, folders or globs into label maps and overlays",
        description="Segment images with DiffSeg. Writes OUTPUT/labels/NAME.png (integer ids), "
        "OUTPUT/overlays/NAME.png and, with --npy, OUTPUT/arrays/NAME.npy.",
    )
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--npy", action="store_true", help="also write the label map as a .npy array")
    p.add_argument("--no-overlay", action="store_true", help="do not write colour overlays")
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


# ---------------------------------------------------------------------------------------------- diffseg evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from .datasets import BENCHMARKS
    from .evaluate import evaluate, format_summary

    bench = BENCHMARKS[args.dataset]
    if args.kl_threshold is None:
        args.kl_threshold = bench.kl_threshold  # the paper's setting for this dataset
    kwargs = segment_kwargs(args)
    output = args.output or f"eval-{args.dataset}"
    pipeline = None if args.predictions else load_pipeline(args)
    summary = evaluate(
        bench,
        args.root,
        output,
        pipeline=pipeline,
        predictions=args.predictions,
        segment_kwargs=None if args.predictions else kwargs,
        timestep=args.timestep,
        batch_size=check_batch_size(args.batch_size),
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
    add_model_arguments(p)
    add_encode_arguments(p, crop=False)
    add_segment_arguments(p, kl_threshold=None)
    p.set_defaults(run=run_evaluate)


# ---------------------------------------------------------------------------------------------- diffseg app


def run_app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError as error:
        raise ImportError("`diffseg app` needs Gradio: pip install 'diffseg[app]' (or gradio).") from error
    from .app import launch

    launch(
        load_pipeline(args),
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        cache_size=args.cache_size,
    )
    return 0


def add_app_command(commands) -> None:
    p = commands.add_parser(
        "app",
        help="serve the interactive demo (Gradio)",
        description="Serve a Gradio page: upload an image, then move the sliders to re-segment "
        "the cached attention instantly. Needs the app extra: pip install 'diffseg[app]'.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument(
        "--max-upload-mb", type=float, default=_APP.max_upload_mb, help="refuse larger uploads (default: %(default)s)"
    )
    p.add_argument(
        "--cache-size",
        type=int,
        default=_APP.cache_size,
        help="bundles kept in memory (default: %(default)s)",
    )
    add_model_arguments(p)
    p.set_defaults(run=run_app)


# ---------------------------------------------------------------------------------------------- diffseg segment-dataset


def run_segment_dataset(args: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "`diffseg segment-dataset` needs Ray Data: pip install 'diffseg[ray]' (or 'ray[data]')."
        ) from error
    from .dataset_job import segment_dataset

    kwargs = segment_kwargs(args)
    summary = segment_dataset(
        args.input,
        args.output,
        ray_address=args.ray_address,
        batch_size=check_batch_size(args.batch_size),
        num_gpus_per_worker=args.num_gpus_per_worker,
        concurrency=args.concurrency,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        timestep=args.timestep,
        crop=None if args.crop == "none" else args.crop,
        resolution=args.resolution,
        noise_seed=args.noise_seed,
        segment_kwargs=kwargs,
        labels=args.labels,
        label_kwargs=label_kwargs(args),
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
        "Data. Writes OUTPUT/labels/NAME.png and OUTPUT/manifest.parquet; re-running resumes. "
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
    add_model_arguments(p)
    add_encode_arguments(p)
    p.set_defaults(batch_size=4)
    add_segment_arguments(p)
    add_label_arguments(p, captions=False)
    p.set_defaults(run=run_segment_dataset)


# ---------------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffseg", description="Unsupervised zero-shot segmentation with Stable Diffusion (DiffSeg)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_segment_command(commands)
    add_evaluate_command(commands)
    add_app_command(commands)
    add_segment_dataset_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # diffusers passes a deprecated argument to the hub client on every load; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("diffseg: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as error:  # FileNotFoundError is an OSError
        if os.environ.get("DIFFSEG_TRACEBACK"):
            raise
        print(f"diffseg: error: {error}", file=sys.stderr)
        print("(set DIFFSEG_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
