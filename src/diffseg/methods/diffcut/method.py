"""DiffCut's row of the method table: what it asks of the denoiser (one layer's tokens), its segment step and its
controls."""

from __future__ import annotations

import numpy as np
import torch

from ...backbones.types import FEATURES
from ...bundle import FeatureBundle
from ...config import ENCODE_DEFAULTS, DiffCutConfig, EncodeConfig
from ..spec import Control, Method, per_image
from .segment import segment_features

PAMR_HELP = "Snaps segment edges to the image's colour edges (PAMR and a 3×3 median filter, the reference's option)"


def _encode(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[FeatureBundle]:
    """One layer's tokens."""
    tokens = pipe.kind.features(pixels, **settings.step, blocks=settings.blocks)
    return per_image(FeatureBundle, tokens, images, settings, pipe)


def _segment(bundle: FeatureBundle, config: DiffCutConfig, size, image) -> np.ndarray:
    pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 255 if config.pamr else None  # (1, 3, H, W)
    return segment_features(
        bundle.features, tau=config.tau, alpha=config.alpha, output_size=size, image=pixels, pamr=config.pamr
    )


def pamr_note(labels: np.ndarray) -> str:
    """The PAMR control's note on a result: about how long refining it takes on this machine."""
    from .pamr import estimated_seconds, reach

    height, width = labels.shape
    segments = int(labels.max()) + 1
    seconds = estimated_seconds((height, width), segments, reach(torch.from_numpy(np.asarray(labels, np.int64))))
    about = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    counted = f"{segments} segment{'s' if segments != 1 else ''}"
    return f"{PAMR_HELP}: on this result it takes about {about} here ({counted} at {width}×{height})"


CONTROLS = (
    Control(
        "tau",
        "Cut threshold τ",
        "A region is cut while the cut costs less than τ: higher gives more segments (0.9: hundreds, seconds)",
        (0.05, 1.5, 0.01),
        float,
    ),
    Control("alpha", "Affinity exponent α", "Sharpens feature similarity: higher separates more", (1, 20, 0.5), float),
    Control("pamr", "PAMR refinement", PAMR_HELP + "; its time grows with segments × pixels", note=pamr_note),
)

METHOD = Method(
    "diffcut",
    "DiffCut",
    "one layer's features cut by a recursive normalised cut",
    "Couairon et al., NeurIPS 2024",
    DiffCutConfig,
    FeatureBundle,
    ENCODE_DEFAULTS["diffcut"],
    _encode,
    _segment,
    CONTROLS,
    needs=frozenset({FEATURES}),
)
