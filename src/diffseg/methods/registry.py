"""The method table: each method declares, in one row, its settings type, its bundle type, its encode step and its
segment step. The pipeline, the runner and every front end (CLI choices, the demo's radio, the evaluation) read it.

A new method is a sub-package of `methods/` (its pure function on tensors), its settings in `diffseg.config`, and
one `Method` row here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..bundle import AttentionBundle, Bundle, FeatureBundle
from ..config import ENCODE_DEFAULTS, DiffCutConfig, EncodeConfig, SegmentConfig
from .diffcut.segment import segment_features
from .diffseg.segment import segment_attention


@dataclass(frozen=True)
class Method:
    """One segmentation method as the rest of the library sees it.

    Attributes:
        name: its key ("diffseg"), as the CLI and the bundle's file name it.
        summary: one line for help texts and the demo.
        config: the frozen dataclass of its segment settings (validated where it is made).
        bundle: the type its encode step returns, one per image.
        encode_defaults: its paper's or reference's encode settings (`config.ENCODE_DEFAULTS`).
        encode: (pipeline, pixels, images, settings, vocabulary, segment_from) -> one bundle per image.
        segment: (bundle, config, output_size, image at output_size) -> (H, W) int32 ids 0..K-1.
        names_segments: whether naming words can ride along its encode (cross-attention of the same UNet pass).
    """

    name: str
    summary: str
    config: type
    bundle: type
    encode_defaults: EncodeConfig
    encode: Callable[..., list]
    segment: Callable[..., np.ndarray]
    names_segments: bool = False


def _encode_attention(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[AttentionBundle]:
    """DiffSeg's encode: self-attention at every grid (and the words' cross-attention, with a vocabulary)."""
    maps, layers, cross = pipe.attend(
        pixels,
        timestep=settings.timestep,
        noise_seed=settings.noise_seed,
        vocabulary=vocabulary,
        segment_from=segment_from,
        blocks=settings.blocks,
    )
    return [
        AttentionBundle(
            attention={g: m[k].cpu() for g, m in maps.items()},
            image=image,
            timestep=settings.timestep,
            model=pipe.model,
            layers=layers,
            cross_attention=None if cross is None else {g: m[k].cpu() for g, m in cross.items()},
            vocabulary=vocabulary,
            family=pipe.backbone.family,
        )
        for k, image in enumerate(images)
    ]


def _encode_features(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[FeatureBundle]:
    """DiffCut's encode: one layer's tokens."""
    tokens = pipe.features(pixels, timestep=settings.timestep, noise_seed=settings.noise_seed, blocks=settings.blocks)
    family = pipe.backbone.family
    return [
        FeatureBundle(t.float().cpu(), image, settings.timestep, pipe.model, family) for t, image in zip(tokens, images)
    ]


def _segment_attention(bundle: AttentionBundle, config: SegmentConfig, size, image) -> np.ndarray:
    return segment_attention(
        bundle.attention,
        kl_threshold=config.kl_threshold,
        iterations=config.iterations,
        num_points=config.num_points,
        refine=config.refine,
        resolution_weights=config.resolution_weights,
        output_size=size,
        reference_float16=config.reference_float16,
    )


def _segment_features(bundle: FeatureBundle, config: DiffCutConfig, size, image) -> np.ndarray:
    pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 255 if config.pamr else None  # (1, 3, H, W)
    return segment_features(
        bundle.features, tau=config.tau, alpha=config.alpha, output_size=size, image=pixels, pamr=config.pamr
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "diffseg",
            "self-attention merged by KL (Tian et al., CVPR 2024)",
            SegmentConfig,
            AttentionBundle,
            ENCODE_DEFAULTS["diffseg"],
            _encode_attention,
            _segment_attention,
            names_segments=True,
        ),
        Method(
            "diffcut",
            "one layer's features cut by a recursive normalised cut (Couairon et al., NeurIPS 2024)",
            DiffCutConfig,
            FeatureBundle,
            ENCODE_DEFAULTS["diffcut"],
            _encode_features,
            _segment_features,
        ),
    )
}


def method_named(name: str) -> Method:
    """The method called `name`; a ValueError listing the others if there is none."""
    if name not in METHODS:
        raise ValueError(f"`method` must be one of {tuple(METHODS)} but is {name!r}.")
    return METHODS[name]


def method_of(thing: Bundle | SegmentConfig | DiffCutConfig | Sequence) -> Method:
    """The method a bundle or a settings object belongs to."""
    for method in METHODS.values():
        if isinstance(thing, (method.bundle, method.config)):
            return method
    raise ValueError(f"{type(thing).__name__} belongs to no method; expected a bundle or a method's settings.")
