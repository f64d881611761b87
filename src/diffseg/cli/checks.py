"""Checks run before any model loads (sizes, output folder, the checkpoint's family and vocabulary), and the loaders the
commands share."""

from __future__ import annotations

import argparse

from ..config import DEFAULT_METHOD

MAX_OUTPUT_PIXELS = 400_000_000  # --output-size: a label map larger than this (20000×20000) is refused


def check_output_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is not None and size[0] * size[1] > MAX_OUTPUT_PIXELS:
        raise ValueError(f"`--output-size` {size[0]}x{size[1]} is larger than {MAX_OUTPUT_PIXELS:,} pixels.")
    return size


def check_writable(folder) -> None:
    """Create the output folder and make sure files can be written there, before any model loads; remove the stale
    temporary files a killed run left there (`outputs.sweep_stale`: never a live writer's)."""
    import tempfile
    from pathlib import Path

    from ..io.outputs import sweep_stale

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


def check_model(args: argparse.Namespace, encode=None, segment=None):
    """The device, and the checkpoint's facts from its configs (no weights loaded yet) with the run's settings
    checked against them (`diffseg.preflight`): a missing GPU or a size the model cannot take fails here, before the
    model loads. Returns the `Backbone`, read once for the run."""
    from ..backbones.devices import resolve_device
    from ..backbones.families import read_backbone
    from ..preflight import preflight

    local = getattr(args, "ray_address", "local") == "local"  # the model runs here (a cluster's workers check theirs)
    device = resolve_device(args.device) if local else None  # a device this machine lacks, named
    backbone = read_backbone(args.model)
    method = getattr(args, "method", DEFAULT_METHOD)
    preflight(backbone, method, encode, segment, device=device, num_points=getattr(args, "num_points", None))
    return backbone


def check_naming(args: argparse.Namespace, backbone) -> None:
    """Naming words (or concepts) checked with the checkpoint's tokenizer alone, and a caption model that cannot be
    had refused, before the model loads. `backbone`: as `check_model` read it."""
    if getattr(args, "words", None) is not None:
        from ..backbones.concepts import parse_concepts
        from ..backbones.families import load_tokenizer
        from ..backbones.types import CROSS_ATTENTION_NAMING
        from ..methods.registry import METHODS
        from ..naming.vocabulary import build_vocabulary

        if CROSS_ATTENTION_NAMING not in backbone.capabilities:  # concept maps: their encoders load with the model
            parse_concepts(args.words)
        elif METHODS[getattr(args, "method", DEFAULT_METHOD)].names_segments:  # its own pass: one prompt of them all
            build_vocabulary(args.words, load_tokenizer(args.model))
        else:  # concept maps: each word its own prompt, checked with the checkpoint's tokenizer
            tokenizer = load_tokenizer(args.model)
            for word in parse_concepts(args.words):
                build_vocabulary([word], tokenizer)
    if getattr(args, "caption", False):
        from ..naming.captioning import DEFAULT_CAPTION_MODEL, check_caption_model, default_tagger

        check_caption_model(args.caption_model or DEFAULT_CAPTION_MODEL)
        default_tagger()  # its data installed


def load_pipeline(args: argparse.Namespace):
    from ..pipeline import DiffSegPipeline

    return DiffSegPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype, offload=args.offload)


def load_captioner(args: argparse.Namespace, device):
    from ..naming.captioning import DEFAULT_CAPTION_MODEL, Captioner, default_tagger

    return Captioner(args.caption_model or DEFAULT_CAPTION_MODEL, device=device, tagger=default_tagger())
