"""The method table: each method declares, in one row, its settings type, its bundle type, its encode step and its
segment step. The pipeline, the runner and every front end (CLI choices, the demo's radio, the evaluation) read it.

A new method is a sub-package of `methods/` (its pure function on tensors), its settings in `diffseg.config`, and
one `Method` row here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones.capture import check_attention_memory
from ..backbones.types import CLIP_TEXT_ATTENTION, CONCEPT_MAPS, FEATURES, SELF_ATTENTION, Backbone
from ..bundle import AttentionBundle, Bundle, ConceptBundle, FeatureBundle, TextAttentionBundle
from ..grids import grid_key
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
        needs: what it asks of a backbone (`backbones.types` capabilities, which each backbone declares).
        names_segments: whether naming words can ride along its encode (cross-attention of the same UNet pass).
        concepts: whether its words are what it maps (required), not names for its segments.
        joint_blocks: whether `--blocks` counts a transformer's joint (double-stream) blocks alone.
        preflight: (backbone, encode settings, segment settings, device=, num_points=) -> None, raising a
            ValueError for what the checkpoint cannot take, before it loads (`diffseg.preflight`).
    """

    name: str
    summary: str
    config: type
    bundle: type
    encode_defaults: EncodeConfig
    encode: Callable[..., list]
    segment: Callable[..., np.ndarray]
    needs: frozenset[str] = frozenset()
    names_segments: bool = False
    concepts: bool = False
    joint_blocks: bool = False
    preflight: Callable[..., None] | None = None

    def runs_on(self, backbone: Backbone) -> bool:
        return self.needs <= backbone.capabilities

    def check_runs_on(self, backbone: Backbone) -> None:
        """A ValueError naming the methods that do run on `backbone`, where this one does not."""
        if not self.runs_on(backbone):
            others = ", ".join(f"--method {m.name}" for m in METHODS.values() if m.runs_on(backbone))
            lacking = ", ".join(sorted(self.needs - backbone.capabilities))
            raise ValueError(
                f"`--method {self.name}` reads {lacking}, which {backbone.name} does not have. Use {others} with it, "
                "or another checkpoint."
            )


def _encode_attention(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[AttentionBundle]:
    """DiffSeg's encode: self-attention at every grid (and the words' cross-attention, with a vocabulary)."""
    doubled = 2 if vocabulary is not None else 1  # the words' copies run in the same batch
    check_attention_memory(pipe.backbone, tuple(pixels.shape[-2:]), len(pixels) * doubled, pipe.device)
    maps, layers, cross = pipe.kind.attend(
        pixels, **settings.step, vocabulary=vocabulary, segment_from=segment_from, blocks=settings.blocks
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


def _preflight_attention(backbone: Backbone, encode: EncodeConfig, segment, *, device=None, num_points=None) -> None:
    """DiffSeg's own checks before the model loads: its attention fits the device's memory (an input of about
    resolution² pixels, alone), the anchor grid fits the finest grid, the resolution weights name grids it has."""
    geometry = backbone.geometry
    side = geometry.check_resolution(encode.resolution)
    if device is not None:
        check_attention_memory(backbone, (side, side), 1, device)
    finest = geometry.finest_side(side)
    if num_points is not None and num_points > finest:
        raise ValueError(
            f"`--num-points {num_points}` does not fit: the finest attention grid of this {backbone.name} checkpoint "
            f"at {side} px is {finest}×{finest}; pass at most {finest} (or leave it out)."
        )
    weights = getattr(segment, "resolution_weights", None)
    if isinstance(weights, Mapping):
        grids = geometry.grids((side, side))
        for key in weights:  # a grid no image has on this model: no area near any of its grids' (`side_grid`)
            h, w = grid_key(key)
            if all(abs(math.log(h * w / (g[0] * g[1]))) >= math.log(2) for g in grids):
                names = ", ".join(f"{g[0]}" for g in grids)
                raise ValueError(
                    f"`--resolution-weights` names grid {key}, which {backbone.name} does not have at {side} px: its "
                    f"grids are {names} (a side r names the grid of about r×r cells). Name those, or use a preset."
                )


def _per_image(bundle: type, tensors, images, settings: EncodeConfig, pipe, **fields) -> list:
    """One bundle of a one-tensor type per image: its slice of the batch's tensor, in float32 on the CPU."""
    family = pipe.backbone.family
    return [
        bundle(t.float().cpu(), image, settings.timestep, pipe.model, family, **fields)
        for t, image in zip(tensors, images)
    ]


def _encode_features(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[FeatureBundle]:
    """DiffCut's encode: one layer's tokens."""
    tokens = pipe.kind.features(pixels, **settings.step, blocks=settings.blocks)
    return _per_image(FeatureBundle, tokens, images, settings, pipe)


def _encode_text_attention(
    pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from
) -> list[TextAttentionBundle]:
    """Seg4Diff's encode: one SD3 block's image-to-text attention."""
    maps = pipe.kind.text_attention(pixels, **settings.step, blocks=settings.blocks)
    return _per_image(TextAttentionBundle, maps, images, settings, pipe)


def _encode_concepts(pipe, pixels, images, settings: EncodeConfig, words, segment_from) -> list[ConceptBundle]:
    """Concept maps' encode: each word's map over the image (`pipeline.concept_maps`)."""
    maps = pipe.kind.concept_maps(pixels, words, **settings.step, blocks=settings.blocks)
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
            needs=frozenset({SELF_ATTENTION}),
            names_segments=True,
            preflight=_preflight_attention,
        ),
        Method(
            "diffcut",
            "one layer's features cut by a recursive normalised cut (Couairon et al., NeurIPS 2024)",
            DiffCutConfig,
            FeatureBundle,
            ENCODE_DEFAULTS["diffcut"],
            _encode_features,
            _segment_features,
            needs=frozenset({FEATURES}),
        ),
        Method(
            "seg4diff",
            "an SD3 block's image-to-text attention merged by KL (Kim et al., NeurIPS 2025; SD3 and SD3.5 only)",
            Seg4DiffConfig,
            TextAttentionBundle,
            ENCODE_DEFAULTS["seg4diff"],
            _encode_text_attention,
            _segment_text_attention,
            needs=frozenset({CLIP_TEXT_ATTENTION}),
        ),
        Method(
            "concepts",
            "each word's map: ConceptAttention (Helbling et al., ICML 2025) on SD3 / Flux, cross-attention on UNets",
            ConceptConfig,
            ConceptBundle,
            ENCODE_DEFAULTS["concepts"],
            _encode_concepts,
            _segment_concepts,
            needs=frozenset({CONCEPT_MAPS}),
            concepts=True,
            joint_blocks=True,
        ),
    )
}


def method_named(name: str) -> Method:
    """The method called `name`; a ValueError listing the others if there is none."""
    if name not in METHODS:
        raise ValueError(f"`method` must be one of {tuple(METHODS)} but is {name!r}.")
    return METHODS[name]


def concept_method() -> Method:
    """The method whose words are what it maps: it also names other methods' segments (`bundle.named_by`)."""
    return next(method for method in METHODS.values() if method.concepts)


def method_of(thing: Bundle | SegmentConfig | DiffCutConfig | Sequence) -> Method:
    """The method a bundle or a settings object belongs to."""
    for method in METHODS.values():
        if isinstance(thing, (method.bundle, method.config)):
            return method
    raise ValueError(f"{type(thing).__name__} belongs to no method; expected a bundle or a method's settings.")
