"""The options the commands share, each parsed and checked before any model loads: model, encoding, segmentation,
naming and outputs. Defaults are read from `diffseg.config`, never restated."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from ..config import (
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    METHOD_DEFAULT,
    RESIZE,
    SEGMENT_FROM,
    VOTING,
    EncodeConfig,
    NamingConfig,
    encode_settings,
)
from ..methods.registry import METHODS, concept_method

_ENCODE = EncodeConfig()
_NAMING = NamingConfig()


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


def _per_method(value) -> str:
    """Each method's encode default, as help text: `DiffSeg 300, DiffCut 50, ...`."""
    return ", ".join(f"{m.title} {value(m.encode_defaults)}" for m in METHODS.values())


def add_encode_arguments(parser: argparse.ArgumentParser, crop: bool = True) -> None:
    group = parser.add_argument_group("encoding (the UNet step)")
    group.add_argument(
        "--method",
        choices=list(METHODS),
        default=DEFAULT_METHOD,
        help="; ".join(f"{m.name}: {m.summary} ({m.source})" for m in METHODS.values()) + " (default: %(default)s)",
    )
    group.add_argument(
        "--timestep",
        type=int,
        default=METHOD_DEFAULT,
        help=f"UNet timestep (default: the method's paper: {_per_method(lambda e: e.timestep)})",
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
            f"16) (default: {_per_method(lambda e: e.resolution or 'the model native size, 512 for SD 1.x')})",
        )
        group.add_argument(
            "--noise-seed",
            type=_seed,
            default=METHOD_DEFAULT,
            help="seed of the noise added for the timestep, or 'none' for the clean latent (default: the method's "
            f"reference: {_per_method(lambda e: 'none' if e.noise_seed is None else e.noise_seed)})",
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
    return _checked(lambda **fields: encode_settings(METHODS[args.method].encode_defaults, **fields), given)


def add_segment_arguments(parser: argparse.ArgumentParser, per_dataset: Mapping[str, tuple[str, ...]] = {}) -> None:
    """Each method's segment options, one group per method, made from its controls (`spec.Control`); an option two
    methods declare is one option, in the first one's group, with each method's help and default. `per_dataset`:
    method -> fields whose default is the benchmark's (the evaluation's)."""
    readers = _readers()
    for method in METHODS.values():
        mine = [c for c in method.controls if c.cli and readers[c.option][0][0] is method]
        if not mine:
            continue
        group = parser.add_argument_group(f"{method.title} segmentation, with --method {method.name}")
        exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for control in mine:
            target = group
            if control.exclusive:
                if control.exclusive not in exclusive:
                    exclusive[control.exclusive] = group.add_mutually_exclusive_group()
                target = exclusive[control.exclusive]
            _add_option(target, readers[control.option], per_dataset)


def _add_option(group, pairs: list, per_dataset: Mapping[str, tuple[str, ...]]) -> None:
    """One option for the (method, control) pairs that read it: a flag or a valued option, unset by default (None:
    each method's config keeps its own), its help each reader's."""
    control = pairs[0][1]
    helps = [_help(method, c, per_dataset) for method, c in pairs]
    if len(helps) > 1:
        helps = [f"{method.title}: {text}" for (method, _), text in zip(pairs, helps)]
    kind = {"action": "store_true"} if control.flag else {"type": control.parse}
    if control.choices:  # named in the help: the usage line stays short
        kind.update(choices=control.choices, metavar="NAME")
        helps[-1] += f" (one of: {', '.join(control.choices)})"
    group.add_argument(control.option, dest=control.dest, default=None, help="; ".join(helps), **kind)


def _readers() -> dict[str, list]:
    """Command-line option -> the (method, control) pairs that read it, in the table's order."""
    readers: dict[str, list] = {}
    for method in METHODS.values():
        for control in method.controls:
            if control.cli:
                readers.setdefault(control.option, []).append((method, control))
    return readers


def _help(method, control, per_dataset: Mapping[str, tuple[str, ...]]) -> str:
    """A control's help with its default as the config holds it (argparse's `%` escaped)."""
    text = control.help.replace("%", "%%")
    first = text.split(" ", 1)[0]
    if len(first) == 1 or not first.isupper():  # the page's sentence, as the CLI's other helps start (not "KL")
        text = text[0].lower() + text[1:]
    if control.field in per_dataset.get(method.name, ()):
        return f"{text} (default: the paper's for the dataset)"
    default = getattr(method.config(), control.field)
    if control.default_text:
        return f"{text} (default: {control.default_text})"
    if control.flag or default is None or isinstance(default, bool):
        return text
    return f"{text} (default: {default})"


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
    if (
        args.method not in (DEFAULT_METHOD, concept_method().name)
        or args.words is not None
        or getattr(args, "caption", False)
    ):
        raise ValueError("--concepts is a method of its own: pass it without --method, --words or --caption.")
    args.method, args.words = concept_method().name, concepts


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


_NAMING_DEFAULTS = {name: getattr(_NAMING, name) for name in ("voting", "min_confidence", "segment_from")}


def _option(name: str) -> str:
    """The command-line option of a config field: `num_points` -> `--num-points`."""
    return "--" + name.replace("_", "-")


def warn_unread_options(args: argparse.Namespace) -> list[str]:
    """Say which method options were given with a method that does not read them (its controls do not declare them),
    e.g. `--pamr` without `--method diffcut`, and which naming options came without words to name with: the run goes
    on, and the user learns why the option had no effect. Returns the options named."""
    own = {control.option for control in METHODS[args.method].controls}
    readers = _readers()
    given = [option for option, pairs in readers.items() if getattr(args, pairs[0][1].dest, None) is not None]
    unread = [option for option in given if option not in own]
    if unread:
        names = " / ".join(dict.fromkeys(m.name for option in unread for m, _ in readers[option]))
        print(f"diffseg: note: --method {args.method} does not read {', '.join(unread)} (--method {names} does); "
              "ignored.", file=sys.stderr)  # fmt: skip
    if getattr(args, "words", None) is None and not getattr(args, "caption", False):
        naming = [name for name, default in _NAMING_DEFAULTS.items() if getattr(args, name, default) != default]
        if naming:
            options = ", ".join(map(_option, naming))
            print(f"diffseg: note: nothing is named without --words or --caption; {options} ignored.", file=sys.stderr)
            unread += map(_option, naming)
    return unread


def method_config(args: argparse.Namespace, defaults: Mapping[str, object] = {}):
    """The method's settings given on the command line (its controls' options, over `defaults`, over its config's
    defaults), checked before any model loads by the config itself; its messages name the options."""
    method = METHODS[args.method]
    fields, options, plain = dict(defaults), {}, method.config()
    for control in method.controls:
        value = getattr(args, control.dest, None) if control.cli else None
        if value is None:
            continue
        if control.flag:  # given: the default flipped (`--pamr`, `--float32-merge`)
            value = not getattr(plain, control.field)
        if value != getattr(plain, control.field):
            control.check_requirement()
        fields[control.field], options[control.field] = value, control.option
    return _checked(method.config, fields, options)


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


def _checked(make, fields: dict, options: Mapping[str, str] = {}):
    """`make(**fields)` (a config, which validates its fields); its message names the command-line option
    (`--num-points`; `options`: field -> option where it is not the field's own name) instead of the field."""
    try:
        return make(**fields)
    except ValueError as error:
        message = str(error)
        for name in fields:
            message = message.replace(f"`{name}`", f"`{options.get(name, _option(name))}`")
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
    group.add_argument(
        "--legend",
        action="store_true",
        help="also write legends/NAME.json: each segment's id, name, area and colour in the overlay (the demo's too)",
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
    chosen = {"overlay": not args.no_overlay, "npy": args.npy, "coco": args.coco, "legend": args.legend}
    return writers_for(names=naming, concepts=concepts, **chosen)
