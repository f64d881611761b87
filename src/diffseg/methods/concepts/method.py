"""Concept maps' row of the method table: what they ask of the denoiser (each word's map over the image) and their
segment step (each pixel's most probable word). Nothing to set: the words are the job's."""

from __future__ import annotations

import numpy as np

from ...backbones.types import CONCEPT_MAPS
from ...bundle import ConceptBundle
from ...config import ENCODE_DEFAULTS, ConceptConfig, EncodeConfig
from ..spec import Method, per_image
from .segment import probabilities, segment_concepts


def _encode(pipe, pixels, images, settings: EncodeConfig, words, segment_from) -> list[ConceptBundle]:
    """Each word's map over the image (`kind.concept_maps`)."""
    maps = pipe.kind.concept_maps(pixels, words, **settings.step, blocks=settings.blocks)
    return per_image(ConceptBundle, maps, images, settings, pipe, words=tuple(words))


def _segment(bundle: ConceptBundle, config: ConceptConfig, size, image) -> np.ndarray:
    return segment_concepts(bundle.concept_maps, size)


def _probabilities(bundle: ConceptBundle, size) -> tuple[np.ndarray, tuple[str, ...]]:
    """Each word's probability at each pixel of `size`, and the words: the result the label map is the argmax of."""
    return probabilities(bundle.concept_maps, size).cpu().numpy(), bundle.words


METHOD = Method(
    "concepts",
    "Concepts",
    "where each of the Words is: ConceptAttention on SD3 / Flux, cross-attention on UNets",
    "Helbling et al., ICML 2025",
    ConceptConfig,
    ConceptBundle,
    ENCODE_DEFAULTS["concepts"],
    _encode,
    _segment,
    probabilities=_probabilities,
    needs=frozenset({CONCEPT_MAPS}),
    concepts=True,
    joint_blocks=True,
)
