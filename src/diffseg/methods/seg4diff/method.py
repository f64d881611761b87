"""Seg4Diff's row of the method table: what it asks of the denoiser (one SD3 block's image-to-text attention), its
segment step and its controls."""

from __future__ import annotations

import numpy as np

from ...backbones.types import CLIP_TEXT_ATTENTION
from ...bundle import TextAttentionBundle
from ...config import ENCODE_DEFAULTS, EncodeConfig, Seg4DiffConfig
from ...parsing import thresholds
from ..spec import Control, Method, per_image
from .segment import segment_text_attention


def _encode(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[TextAttentionBundle]:
    """One SD3 block's image-to-text attention."""
    maps = pipe.kind.text_attention(pixels, **settings.step, blocks=settings.blocks)
    return per_image(TextAttentionBundle, maps, images, settings, pipe)


def _segment(bundle: TextAttentionBundle, config: Seg4DiffConfig, size, image) -> np.ndarray:
    return segment_text_attention(
        bundle.text_attention, kl_threshold=config.kl_threshold, power=config.power, output_size=size
    )


CONTROLS = (
    # `--kl-threshold` is DiffSeg's option too (one parse for both): Seg4Diff takes one value.
    Control(
        "kl_threshold",
        "KL threshold τ",
        "Token maps closer than τ merge: higher gives fewer, larger segments (one value)",
        (0.01, 1.0, 0.01),
        thresholds,
        name="seg4diff-kl",
    ),
    Control(
        "power",
        "Map exponent",
        "Sharpens the min-max normalised maps before merging (the reference's: 1)",
        (0.25, 4.0, 0.25),
        float,
    ),
)

METHOD = Method(
    "seg4diff",
    "Seg4Diff",
    "an SD3 block's image-to-text attention merged by KL (SD3 and SD3.5 only)",
    "Kim et al., NeurIPS 2025",
    Seg4DiffConfig,
    TextAttentionBundle,
    ENCODE_DEFAULTS["seg4diff"],
    _encode,
    _segment,
    CONTROLS,
    needs=frozenset({CLIP_TEXT_ATTENTION}),
)
