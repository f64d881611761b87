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

from .config import (
    DEFAULT_MODEL,
    ENCODE_DEFAULTS,
    METHOD_DEFAULT,
    METHODS,
    RESOLUTION_PRESETS,
    AppConfig,
    DiffCutConfig,
    EncodeConfig,
    VOTING,
    NamingConfig,
    SegmentConfig,
)

_ENCODE = EncodeConfig()
_SEGMENT = SegmentConfig()
_DIFFCUT = DiffCutConfig()
_NAMING = NamingConfig()
_APP = AppConfig()
MAX_OUTPUT_PIXELS = 400_000_000  # --output-size: a label map larger than this (20000×20000) is refused


# ---------------------------------------------------------------------------------------------- shared options


def _thresholds(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _weights(text: str) -> dict[str, float]:
    """`R:W,...` or `HxW:W,...`: grids as the library names them (`aggregation.grid_key`), finite weights ≥ 0."""
    import math

    from .aggregation import grid_key

    weights = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition(":"))
        try:
            grid_key(key)
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected GRID:WEIGHT pairs such as '64:0.5,32:0.5' or '48x88:1', got {text!r}"
            ) from None
        if not (math.isfinite(weight) and weight >= 0):
            raise argparse.ArgumentTypeError(f"weights must be finite and at least 0, got {value!r} in {text!r}")
        weights[key.lower()] = weight
    if not any(w > 0 for w in weights.values()):
        raise argparse.ArgumentTypeError(f"at least one weight must be above 0, got {text!r}")
    return weights


def _seed(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed or 'none', got {text!r}") from None


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
    diffseg, diffcut = ENCODE_DEFAULTS["diffseg"], ENCODE_DEFAULTS["diffcut"]
    group = parser.add_argument_group("encoding (the UNet step)")
    group.add_argument(
        "--method",
        choices=METHODS,
        default="diffseg",
        help="diffseg: self-attention merged by KL (Tian et al.); diffcut: one layer's features cut by recursive "
        "normalised cut (Couairon et al.) (default: %(default)s)",
    )
    group.add_argument(
        "--timestep",
        type=int,
        default=METHOD_DEFAULT,
        help=f"UNet timestep (default: the method's paper: DiffSeg {diffseg.timestep}, DiffCut {diffcut.timestep})",
    )
    if crop:  # benchmarks fix the crop, the size and the noise: the protocol's
        group.add_argument(
            "--crop",
            choices=["none", "center"],
            default=_ENCODE.crop or "none",
            help="center: take the central square first, as the benchmarks do (default: %(default)s)",
        )
        group.add_argument(
            "--resize",
            choices=["native", "square"],
            default=_ENCODE.resize,
            help="native: keep the aspect ratio at about RESOLUTION² pixels; square: the paper's RESOLUTION×RESOLUTION "
            "(default: %(default)s)",
        )
        group.add_argument(
            "--resolution",
            type=int,
            default=METHOD_DEFAULT,
            help="about RESOLUTION² pixels reach the UNet, each side a multiple of 64 (SDXL family: 32) (default: "
            f"DiffSeg the model's native size, 512 for SD 1.x; DiffCut {diffcut.resolution})",
        )
        group.add_argument(
            "--noise-seed",
            type=_seed,
            default=METHOD_DEFAULT,
            help="seed of the noise added for the timestep, or 'none' for the clean latent (default: DiffSeg none, "
            f"as its paper; DiffCut {diffcut.noise_seed}, as its reference)",
        )
    group.add_argument("--batch-size", type=int, default=1, help="images per UNet batch (default: %(default)s)")


def encode_kwargs(args: argparse.Namespace) -> dict:
    """The `DiffSegPipeline.encode` keyword arguments given on the command line, checked (before any model loads)."""
    from .config import encode_settings

    given = {name: getattr(args, name, METHOD_DEFAULT) for name in ("timestep", "resolution", "noise_seed")}
    settings = encode_settings(args.method, **given)
    if not 0 <= settings.timestep <= 999:
        raise ValueError(f"`--timestep` must be in [0, 999] but is {settings.timestep}.")
    if settings.resolution is not None and not 32 <= settings.resolution <= 4096:
        raise ValueError(
            f"`--resolution` must be from 32 to 4096 (a multiple of 64, or 32 for SDXL) but is {settings.resolution}."
        )
    kwargs = {"method": args.method, **{k: getattr(settings, k) for k in given}}
    if hasattr(args, "crop"):
        kwargs.update(crop=None if args.crop == "none" else args.crop, resize=args.resize)
    return kwargs


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
        "--num-points",
        type=int,
        default=None,
        help=f"anchors per axis M of the first merge (default: {_SEGMENT.num_points}; an axis of the finest grid "
        "shorter than M gets one anchor per position)",
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
        help="weight per attention grid, e.g. 64:1,32:0 (a side names the grid of that size on any aspect ratio) or "
        "48x88:1 (default: proportional to the grid's side)",
    )
    weights.add_argument(
        "--resolution-preset",
        choices=list(RESOLUTION_PRESETS),
        default=None,
        help="a named weighting of the attention grids by rank, finest first (fits any model)",
    )
    cut = parser.add_argument_group("DiffCut segmentation (recursive normalised cut), with --method diffcut")
    cut.add_argument(
        "--tau",
        type=float,
        default=_DIFFCUT.tau,
        help="accept a cut while its normalised-cut cost is below τ; lower gives fewer segments (default: %(default)s)",
    )
    cut.add_argument("--alpha", type=float, default=_DIFFCUT.alpha, help="affinity exponent α (default: %(default)s)")
    cut.add_argument("--pamr", action="store_true", help="refine with PAMR and a 3×3 median filter (reference option)")


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
        choices=list(VOTING),
        default=_NAMING.voting,
        help="majority vote of per-pixel best words, or highest mean score (default: %(default)s)",
    )
    group.add_argument(
        "--min-confidence",
        type=float,
        default=_NAMING.min_confidence,
        help="leave segments scoring below this unlabelled (default: %(default)s)",
    )
    if captions:
        group.add_argument(
            "--segment-from",
            choices=["unconditional", "conditional"],
            default=_NAMING.segment_from,
            help="which pass the segments come from when labelling (default: %(default)s, as without labels)",
        )


def label_kwargs(args: argparse.Namespace) -> dict:
    return {"voting": args.voting, "min_confidence": args.min_confidence}


def segment_kwargs(args: argparse.Namespace) -> dict:
    """The segmenter's keyword arguments given on the command line (`segment_attention` for DiffSeg,
    `segment_features` for DiffCut), checked before any model loads."""
    import math

    if args.method == "diffcut":
        for name in ("tau", "alpha"):
            value = getattr(args, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`--{name}` must be a positive number but is {value}.")
        return {"tau": args.tau, "alpha": args.alpha, "pamr": args.pamr}
    if args.refine:
        try:
            import sklearn.cluster  # noqa: F401
        except ImportError as error:
            raise ImportError(
                "--refine needs scikit-learn: pip install 'diffseg[refine]' (or scikit-learn)."
            ) from error
    weights = args.resolution_weights
    if args.resolution_preset is not None:
        weights = args.resolution_preset  # weights by rank: resolved on each bundle's grids
    num_points = _SEGMENT.num_points if args.num_points is None else args.num_points
    if num_points < 2:
        raise ValueError(f"`--num-points` must be at least 2 but is {num_points}.")
    kwargs = {
        "kl_threshold": args.kl_threshold,
        "iterations": args.iterations,
        "num_points": num_points,
        "refine": args.refine,
        "resolution_weights": weights,
        "reference_float16": not args.float32_merge,
    }
    thresholds = SegmentConfig(**kwargs).thresholds()  # a threshold list of the wrong length fails here
    if not all(math.isfinite(t) for t in thresholds):
        raise ValueError(f"`--kl-threshold` must be finite but is {args.kl_threshold}.")
    return kwargs


def check_output_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is not None and size[0] * size[1] > MAX_OUTPUT_PIXELS:
        raise ValueError(f"`--output-size` {size[0]}x{size[1]} is larger than {MAX_OUTPUT_PIXELS:,} pixels.")
    return size


def check_writable(folder) -> None:
    """Create the output folder and make sure files can be written there, before any model loads; remove the stale
    temporary files a killed run left there (`outputs.sweep_stale`: never a live writer's)."""
    import tempfile
    from pathlib import Path

    from .outputs import sweep_stale

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".diffseg-write-check-"):
            pass
    except OSError as error:
        raise OSError(
            f"Output folder `{folder}` is not writable ({error.strerror or error}); choose another."
        ) from None
    sweep_stale(folder)


def check_batch_size(value: int) -> int:
    if value < 1:
        raise ValueError(f"`--batch-size` must be at least 1 but is {value}.")
    return value


def check_model(args: argparse.Namespace, encode: dict | None = None):
    """The checkpoint's family from its configs (no weights loaded yet), with the encode settings checked against it:
    a bad resolution fails here, before the model loads."""
    from .backbones import inspect, target_size

    backbone = inspect(args.model)
    if encode is not None:
        target_size((1, 1), backbone, encode.get("resolution"), encode.get("resize", "square"))
    explicit = getattr(args, "num_points", None)
    if explicit is not None and args.method == "diffseg" and backbone.grid_sides:
        resolution = (encode or {}).get("resolution") or backbone.native_size
        finest = backbone.grid_sides[0] * resolution // backbone.native_size
        if explicit > finest:
            raise ValueError(
                f"`--num-points {explicit}` does not fit: the finest attention grid of this {backbone.name} checkpoint "
                f"at {resolution} px is {finest}×{finest}; pass at most {finest} (or leave it out)."
            )
    return backbone


def check_naming(args: argparse.Namespace) -> None:
    """Naming words checked with the checkpoint's tokenizer alone, and a caption model that cannot be had refused,
    before the model loads."""
    if getattr(args, "labels", None) is not None:
        from .backbones import load_tokenizer
        from .semantic import build_vocabulary

        build_vocabulary(args.labels, load_tokenizer(args.model))
    if getattr(args, "caption", False):
        from .captioning import DEFAULT_CAPTION_MODEL, check_caption_model, default_tagger

        check_caption_model(args.caption_model or DEFAULT_CAPTION_MODEL)
        default_tagger()  # its data installed


def load_pipeline(args: argparse.Namespace):
    from .pipeline import DiffSegPipeline

    return DiffSegPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype)


# ---------------------------------------------------------------------------------------------- diffseg segment


def run_segment(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .images import find_images
    from .jobs import Job
    from .outputs import outputs_done, write_outputs

    # 1. Check inputs and arguments, before anything loads.
    batch_size = check_batch_size(args.batch_size)
    settings = {**segment_kwargs(args), **label_kwargs(args), "output_size": check_output_size(args.output_size)}
    encode = encode_kwargs(args)
    naming = args.labels is not None or args.caption
    if args.method != "diffseg" and naming:
        raise ValueError("Naming segments (--labels, --caption) works with --method diffseg only.")
    if args.labels is not None and args.caption:
        raise ValueError("Pass either --labels or --caption, not both.")
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
    if args.labels is not None:
        pipe.vocabulary(args.labels)  # fail before any image: empty, too long
    captioner = load_captioner(args, pipe.device) if args.caption else None
    if args.method == "diffseg":
        encode["segment_from"] = args.segment_from
    job = Job(pipe, encode=encode, segment=settings, labels=args.labels, captioner=captioner, batch_size=batch_size)

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


def output_writers(args: argparse.Namespace, naming: bool = False) -> list:
    """The output formats asked for on the command line (the same options for `segment` and `segment-dataset`)."""
    from .outputs import writers_for

    if args.coco:
        try:
            import pycocotools  # noqa: F401
        except ImportError as error:
            raise ImportError("--coco needs pycocotools: pip install 'diffseg[coco]' (or pycocotools).") from error
    return writers_for(overlay=not args.no_overlay, npy=args.npy, names=naming, coco=args.coco)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("outputs (each written atomically: whole or not at all)")
    group.add_argument("--no-overlay", action="store_true", help="do not write colour overlays (overlays/NAME.png)")
    group.add_argument("--npy", action="store_true", help="also write the label map as arrays/NAME.npy")
    group.add_argument(
        "--coco",
        action="store_true",
        help="also write coco/NAME.json: one COCO RLE mask per segment, for detectron2/mmdetection (pycocotools)",
    )


def load_captioner(args: argparse.Namespace, device):
    from .captioning import DEFAULT_CAPTION_MODEL, Captioner, default_tagger

    return Captioner(args.caption_model or DEFAULT_CAPTION_MODEL, device=device, tagger=default_tagger())


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


# ---------------------------------------------------------------------------------------------- diffseg evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    from .datasets import BENCHMARKS
    from .evaluate import evaluate, format_summary

    bench = BENCHMARKS[args.dataset]
    if args.kl_threshold is None:
        args.kl_threshold = bench.kl_threshold  # the paper's setting for this dataset
    kwargs = segment_kwargs(args)
    encode = encode_kwargs(args)
    batch_size = check_batch_size(args.batch_size)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"`--limit` must be at least 1 but is {args.limit}.")
    output = args.output or f"eval-{args.dataset}"
    check_writable(output)
    if not args.predictions:
        check_model(args)
    pipeline = None if args.predictions else load_pipeline(args)
    summary = evaluate(
        bench,
        args.root,
        output,
        pipeline=pipeline,
        predictions=args.predictions,
        segment_kwargs=None if args.predictions else kwargs,
        method=args.method,
        timestep=encode["timestep"],
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
    encode = encode_kwargs(args)
    if args.method != "diffseg" and args.labels is not None:
        raise ValueError("Naming segments (--labels) works with --method diffseg only.")
    check_model(args, encode)
    check_naming(args)
    if "://" not in str(args.output):
        check_writable(args.output)
    formats = [w.key for w in output_writers(args, naming=args.labels is not None)]
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
        segment_kwargs=kwargs,
        **encode,
        labels=args.labels,
        label_kwargs=label_kwargs(args),
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
