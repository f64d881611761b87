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

from ..bundle import AttentionBundle, Bundle, ConceptBundle, FeatureBundle, TextAttentionBundle
from ..config import ENCODE_DEFAULTS, ConceptConfig, DiffCutConfig, EncodeConfig, Seg4DiffConfig, SegmentConfig
from .concepts.segment import segment_concepts
from .diffcut.segment import segment_features
from .diffseg.segment import segment_attention
from .seg4diff.segment import segment_text_attention


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
        families: the backbone families it runs on (`Backbone.family`); None: every one.
        concepts: whether its words are what it maps (required), not names for its segments.
    """

    name: str
    summary: str
    config: type
    bundle: type
    encode_defaults: EncodeConfig
    encode: Callable[..., list]
    segment: Callable[..., np.ndarray]
    names_segments: bool = False
    families: tuple[str, ...] | None = None
    concepts: bool = False

    def runs_on(self, family: str) -> bool:
        return self.families is None or family in self.families


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


def _per_image(bundle: type, tensors, images, settings: EncodeConfig, pipe, **fields) -> list:
    """One bundle of a one-tensor type per image: its slice of the batch's tensor, in float32 on the CPU."""
    family = pipe.backbone.family
    return [
        bundle(t.float().cpu(), image, settings.timestep, pipe.model, family, **fields)
        for t, image in zip(tensors, images)
    ]


def _encode_features(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[FeatureBundle]:
    """DiffCut's encode: one layer's tokens."""
    tokens = pipe.features(pixels, timestep=settings.timestep, noise_seed=settings.noise_seed, blocks=settings.blocks)
    return _per_image(FeatureBundle, tokens, images, settings, pipe)


def _encode_text_attention(
    pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from
) -> list[TextAttentionBundle]:
    """Seg4Diff's encode: one SD3 block's image-to-text attention."""
    maps = pipe.text_attention(
        pixels,
        timestep=settings.timestep,
        noise_seed=settings.noise_seed,
        blocks=settings.blocks,
        schedule=settings.schedule,
    )
    return _per_image(TextAttentionBundle, maps, images, settings, pipe)


def _encode_concepts(pipe, pixels, images, settings: EncodeConfig, words, segment_from) -> list[ConceptBundle]:
    """Concept maps' encode: each word's map over the image (`pipeline.concept_maps`)."""
    maps = pipe.concept_maps(
        pixels,
        words,
        timestep=settings.timestep,
        noise_seed=settings.noise_seed,
        blocks=settings.blocks,
        schedule=settings.schedule,
    )
    return _per_image(ConceptBundle, maps, images, settings, pipe, words=tuple(words))


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


def _segment_concepts(bundle: ConceptBundle, config: ConceptConfig, size, image) -> np.ndarray:
    return segment_concepts(bundle.concept_maps, size)


def _segment_text_attention(bundle: TextAttentionBundle, config: Seg4DiffConfig, size, image) -> np.ndarray:
    return segment_text_attention(
        bundle.text_attention, kl_threshold=config.kl_threshold, power=config.power, output_size=size
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
        Method(
            "seg4diff",
            "an SD3 block's image-to-text attention merged by KL (Kim et al., NeurIPS 2025; SD3 and SD3.5 only)",
            Seg4DiffConfig,
            TextAttentionBundle,
            ENCODE_DEFAULTS["seg4diff"],
            _encode_text_attention,
            _segment_text_attention,
            families=("sd3",),
        ),
        Method(
            "concepts",
            "each word's map: ConceptAttention (Helbling et al., ICML 2025) on SD3 / Flux, cross-attention on UNets",
            ConceptConfig,
            ConceptBundle,
            ENCODE_DEFAULTS["concepts"],
            _encode_concepts,
            _segment_concepts,
            concepts=True,
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
