"""The options the commands share, each parsed and checked before any model loads: model, encoding, segmentation,
naming and outputs. Defaults are read from `diffseg.config`, never restated."""

from __future__ import annotations

import argparse
import sys

from ..config import (
    NUM_POINTS,
    NUM_POINTS_SINGLE_GRID,
    DEFAULT_MODEL,
    METHOD_DEFAULT,
    RESIZE,
    RESOLUTION_PRESETS,
    SEGMENT_FROM,
    VOTING,
    ConceptConfig,
    DiffCutConfig,
    EncodeConfig,
    NamingConfig,
    Seg4DiffConfig,
    SegmentConfig,
    encode_settings,
)
from ..methods.registry import METHODS

_ENCODE = EncodeConfig()
_SEGMENT = SegmentConfig()
_DIFFCUT = DiffCutConfig()
_SEG4DIFF = Seg4DiffConfig()
_NAMING = NamingConfig()


def _thresholds(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _weights(text: str) -> dict[str, float]:
    """`R:W,...` or `HxW:W,...`: grids as the library names them (`aggregation.grid_key`), finite weights ≥ 0."""
    import math

    from ..grids import grid_key

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


def _blocks(text: str) -> tuple[int, int]:
    try:
        first, _, last = text.partition(":")
        return int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST or one block index, got {text!r}") from None


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
    group.add_argument(
        "--offload",
        action="store_true",
        help="keep the UNet or transformer in CPU memory and run it on the GPU a block at a time (for checkpoints "
        "larger than the GPU, e.g. Flux.1-dev on 24 GB; slower)",
    )


def add_encode_arguments(parser: argparse.ArgumentParser, crop: bool = True) -> None:
    diffseg, diffcut = METHODS["diffseg"].encode_defaults, METHODS["diffcut"].encode_defaults
    group = parser.add_argument_group("encoding (the UNet step)")
    group.add_argument(
        "--method",
        choices=list(METHODS),
        default="diffseg",
        help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + " (default: %(default)s)",
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
            choices=list(RESIZE),
            default=_ENCODE.resize,
            help="native: keep the aspect ratio at about RESOLUTION² pixels; square: the paper's RESOLUTION×RESOLUTION "
            "(default: %(default)s)",
        )
        group.add_argument(
            "--resolution",
            type=int,
            default=METHOD_DEFAULT,
            help="about RESOLUTION² pixels reach the model, each side a multiple of 64 (SDXL family: 32; SD3, Flux: "
            f"16) (default: DiffSeg the model's native size, 512 for SD 1.x; DiffCut {diffcut.resolution})",
        )
        group.add_argument(
            "--noise-seed",
            type=_seed,
            default=METHOD_DEFAULT,
            help="seed of the noise added for the timestep, or 'none' for the clean latent (default: DiffSeg none, "
            f"as its paper; DiffCut {diffcut.noise_seed}, as its reference)",
        )
    group.add_argument(
        "--blocks",
        type=_blocks,
        default=None,
        help="SD3 / Flux only: transformer blocks FIRST:LAST (or one, K), counted from 0 in the order the image passes "
        "them (Flux: double-, then single-stream); DiffSeg averages their attention (default: every block), DiffCut "
        "reads the image tokens after LAST (default: the family's block; see the README)",
    )
    group.add_argument("--batch-size", type=int, default=1, help="images per UNet batch (default: %(default)s)")


def encode_config(args: argparse.Namespace) -> EncodeConfig:
    """The encode settings given on the command line over the method's defaults, checked before any model loads."""
    given = {name: getattr(args, name, METHOD_DEFAULT) for name in ("timestep", "resolution", "noise_seed", "blocks")}
    given["blocks"] = given["blocks"] or METHOD_DEFAULT
    if hasattr(args, "crop"):
        given.update(crop=None if args.crop == "none" else args.crop, resize=args.resize)
    return _checked(lambda **fields: encode_settings(args.method, **fields), given)


def add_segment_arguments(parser: argparse.ArgumentParser, per_dataset: bool = False) -> None:
    group = parser.add_argument_group("segmentation (aggregation, merging, labelling)")
    group.add_argument(
        "--kl-threshold",
        type=_thresholds,
        default=None,
        help="merge threshold τ, one value or one per iteration (DiffSeg); Seg4Diff's one threshold (default: "
        + ("DiffSeg the paper's for the dataset" if per_dataset else f"DiffSeg {_SEGMENT.kl_threshold}")
        + f", Seg4Diff {_SEG4DIFF.kl_threshold})",
    )
    group.add_argument(
        "--iterations", type=int, default=_SEGMENT.iterations, help="merge iterations (default: %(default)s)"
    )
    group.add_argument(
        "--num-points",
        type=int,
        default=None,
        help=f"anchors per axis M of the first merge (default: {NUM_POINTS}, the paper's; {NUM_POINTS_SINGLE_GRID} on "
        "an SD3 / Flux model's single grid; an axis of the finest grid shorter than M gets one anchor per position)",
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
    seg4diff = parser.add_argument_group("Seg4Diff segmentation, with --method seg4diff (and --kl-threshold)")
    seg4diff.add_argument(
        "--power",
        type=float,
        default=_SEG4DIFF.power,
        help="exponent of the min-max normalised maps before merging (default: %(default)s, the reference's)",
    )


def add_concept_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--concepts",
        default=None,
        metavar="WORDS",
        help="comma-separated words to find, e.g. 'cat, dog, grass, sky': writes concepts/NAME.png (each pixel's most "
        "probable word, ids in the order given), concept-overlays/NAME.png (with a legend), concepts/NAME.json and, "
        "with --npy, concept-maps/NAME.npy (K×H×W probabilities). ConceptAttention on SD3 / Flux, cross-attention on "
        "SD 1.x/2.x/SDXL (the same as --method concepts --words WORDS)",
    )


def resolve_concepts(args: argparse.Namespace) -> None:
    """`--concepts WORDS` is `--method concepts --words WORDS`; refused with another method or other words."""
    concepts = getattr(args, "concepts", None)
    if concepts is None:
        return
    if args.method not in ("diffseg", "concepts") or args.words is not None or getattr(args, "caption", False):
        raise ValueError("--concepts is a method of its own: pass it without --method, --words or --caption.")
    args.method, args.words = "concepts", concepts


def add_label_arguments(parser: argparse.ArgumentParser, captions: bool = True) -> None:
    group = parser.add_argument_group("naming segments with words")
    group.add_argument(
        "--words",
        "--labels",
        dest="words",
        default=None,
        metavar="WORDS",
        help="comma-separated words to name segments with, e.g. 'road,car,person,sky' (offline; --labels is the same): "
        "DiffSeg on SD 1.x/2.x/SDXL by its own pass's cross-attention, every other method and family by the words' "
        "concept maps (see --concepts)",
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
            choices=list(SEGMENT_FROM),
            default=_NAMING.segment_from,
            help="which pass the segments come from when labelling (default: %(default)s, as without labels)",
        )


def naming_config(args: argparse.Namespace) -> NamingConfig:
    fields = {"voting": args.voting, "min_confidence": args.min_confidence}
    if hasattr(args, "segment_from"):
        fields["segment_from"] = args.segment_from
    return _checked(NamingConfig, fields)


# Options only some methods read, with their command-line defaults: given with another method they change nothing.
_READ_BY = {
    "kl_threshold": (("diffseg", "seg4diff"), None),
    "iterations": (("diffseg",), _SEGMENT.iterations),
    "num_points": (("diffseg",), None),
    "refine": (("diffseg",), False),
    "float32_merge": (("diffseg",), False),
    "resolution_weights": (("diffseg",), None),
    "resolution_preset": (("diffseg",), None),
    "tau": (("diffcut",), _DIFFCUT.tau),
    "alpha": (("diffcut",), _DIFFCUT.alpha),
    "pamr": (("diffcut",), False),
    "power": (("seg4diff",), _SEG4DIFF.power),
}


_NAMING_DEFAULTS = {name: getattr(_NAMING, name) for name in ("voting", "min_confidence", "segment_from")}


def _option(name: str) -> str:
    """The command-line option of a config field: `num_points` -> `--num-points`."""
    return "--" + name.replace("_", "-")


def warn_unread_options(args: argparse.Namespace) -> list[str]:
    """Say which method-specific options were given (set off their defaults) with a method that does not read them,
    e.g. `--pamr` without `--method diffcut`, and which naming options came without words to name with: the run goes
    on, and the user learns why the option had no effect. Returns the options named."""
    unread = [
        name
        for name, (methods, default) in _READ_BY.items()
        if args.method not in methods and getattr(args, name, default) != default
    ]
    if unread:
        readers = " / ".join(sorted({method for name in unread for method in _READ_BY[name][0]}))
        options = ", ".join(map(_option, unread))
        print(f"diffseg: note: --method {args.method} does not read {options} (--method {readers} does); ignored.",
              file=sys.stderr)  # fmt: skip
    if getattr(args, "words", None) is None and not getattr(args, "caption", False):
        naming = [name for name, default in _NAMING_DEFAULTS.items() if getattr(args, name, default) != default]
        if naming:
            options = ", ".join(map(_option, naming))
            print(f"diffseg: note: nothing is named without --words or --caption; {options} ignored.", file=sys.stderr)
            unread += naming
    return [_option(name) for name in unread]


def method_config(args: argparse.Namespace) -> SegmentConfig | DiffCutConfig:
    """The method's settings given on the command line (`SegmentConfig` for DiffSeg, `DiffCutConfig` for DiffCut),
    checked before any model loads by the config itself."""
    if args.method == "diffcut":
        return _checked(DiffCutConfig, {"tau": args.tau, "alpha": args.alpha, "pamr": args.pamr})
    if args.method == "concepts":
        return ConceptConfig()
    if args.method == "seg4diff":
        kl = _SEG4DIFF.kl_threshold if args.kl_threshold is None else args.kl_threshold
        if isinstance(kl, tuple):
            if len(kl) != 1:
                raise ValueError(f"`--kl-threshold` of Seg4Diff is one value, not {len(kl)}.")
            kl = kl[0]
        return _checked(Seg4DiffConfig, {"kl_threshold": kl, "power": args.power})
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
    fields = {
        "kl_threshold": _SEGMENT.kl_threshold if args.kl_threshold is None else args.kl_threshold,
        "iterations": args.iterations,
        "refine": args.refine,
        "resolution_weights": weights,
        "reference_float16": not args.float32_merge,
    }
    if args.num_points is not None:
        fields["num_points"] = args.num_points
    return _checked(SegmentConfig, fields)


def job_config(args: argparse.Namespace, output_size: tuple[int, int] | None = None):
    """Every setting of a job, made once from the command line: what `segment` and `segment-dataset` hand the runner."""
    from ..jobs.runner import JobConfig

    words = getattr(args, "words", None)
    if words is not None and getattr(args, "caption", False):
        raise ValueError("Pass either --words or --caption, not both.")
    if METHODS[args.method].concepts and (words is None or getattr(args, "caption", False)):
        raise ValueError("--method concepts maps words: pass them with --concepts 'cat, dog, sky' (not --caption).")
    warn_unread_options(args)
    return JobConfig(
        method=args.method,
        encode=encode_config(args),
        segment=method_config(args),
        naming=naming_config(args),
        words=words,
        output_size=output_size,
    )


def _checked(make, fields: dict):
    """`make(**fields)` (a config, which validates its fields); its message names the command-line option
    (`--num-points`) instead of the field."""
    try:
        return make(**fields)
    except ValueError as error:
        message = str(error)
        for name in fields:
            message = message.replace(f"`{name}`", f"`{_option(name)}`")
        raise ValueError(message) from None


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("outputs (each written atomically: whole or not at all)")
    group.add_argument("--no-overlay", action="store_true", help="do not write colour overlays (overlays/NAME.png)")
    group.add_argument("--npy", action="store_true", help="also write the label map as arrays/NAME.npy")
    group.add_argument(
        "--coco",
        action="store_true",
        help="also write coco/NAME.json: one COCO RLE mask per segment, for detectron2/mmdetection (pycocotools)",
    )


def output_writers(args: argparse.Namespace, naming: bool = False) -> list:
    """The output formats asked for on the command line (the same options for `segment` and `segment-dataset`)."""
    from ..io.outputs import writers_for

    if args.coco:
        try:
            import pycocotools  # noqa: F401
        except ImportError as error:
            raise ImportError("--coco needs pycocotools: pip install 'diffseg[coco]' (or pycocotools).") from error
    concepts = METHODS[args.method].concepts
    return writers_for(overlay=not args.no_overlay, npy=args.npy, names=naming, coco=args.coco, concepts=concepts)
