"""DiffSeg's row of the method table: what it asks of the denoiser (self-attention at every grid), its checks before
the model loads, its segment step and its controls."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ...backbones.capture import check_attention_memory
from ...backbones.types import SELF_ATTENTION, Backbone
from ...bundle import AttentionBundle
from ...config import (
    ENCODE_DEFAULTS,
    NUM_POINTS,
    NUM_POINTS_SINGLE_GRID,
    RESOLUTION_PRESETS,
    EncodeConfig,
    SegmentConfig,
    anchor_points,
)
from ...grids import by_size, grid_key
from ...parsing import grid_weights, thresholds
from ..spec import GRID_WEIGHTS, Control, Method
from .segment import segment_attention


def _encode(pipe, pixels, images, settings: EncodeConfig, vocabulary, segment_from) -> list[AttentionBundle]:
    """Self-attention at every grid (and the words' cross-attention, with a vocabulary)."""
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


def _preflight(backbone: Backbone, encode: EncodeConfig, segment, *, device=None, num_points=None) -> None:
    """Before the model loads: the attention fits the device's memory (an input of about resolution² pixels,
    alone), the anchor grid fits the finest grid, the resolution weights name grids the model has."""
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


def _segment(bundle: AttentionBundle, config: SegmentConfig, size, image) -> np.ndarray:
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


def _anchor_limit(bundle: AttentionBundle) -> int:
    """The most anchors per axis the bundle's finest grid holds (its longer side; `merging.anchor_grid`)."""
    return max(by_size(bundle.attention)[0])


CONTROLS = (
    Control(
        "kl_threshold",
        "KL threshold τ",
        "Attention maps closer than τ merge: higher gives fewer, larger segments (one value, or one per iteration)",
        (0.05, 3.0, 0.05),
        thresholds,
    ),
    Control("iterations", "Merge iterations", "Rounds of merging the proposals with each other", (1, 6, 1), int),
    Control(
        "num_points",
        "Anchor grid (M×M)",
        "Anchors per axis M of the first merge, its starting points: more can find smaller segments",
        (2, 32, 1),
        int,
        default_for=lambda backbone: anchor_points(len(backbone.grid_sides)),
        limit=lambda backbone: backbone.geometry.finest_side(),
        bound=_anchor_limit,
        default_text=f"{NUM_POINTS}, the paper's; {NUM_POINTS_SINGLE_GRID} on an SD3 / Flux model's single grid; an "
        "axis of the finest grid shorter than M gets one anchor per position",
    ),
    Control(
        "refine",
        "K-means refinement",
        "Re-assigns every attention map to its nearest proposal (slower; needs scikit-learn: diffseg[refine])",
        requires=("sklearn.cluster", "--refine needs scikit-learn: pip install 'diffseg[refine]' (or scikit-learn)."),
    ),
    Control(
        "reference_float16",
        "float32 merge",
        "Merge maps that underflow float16 too (default: as the reference, "
        "whose float16 first iteration leaves them out)",
        option="--float32-merge",
        demo=False,
    ),
    Control(
        "resolution_weights",
        "Resolution weights",
        "Weight per attention grid, e.g. 64:1,32:0 (a side names the grid "
        "of that size on any aspect ratio) or 48x88:1 (default: proportional to the grid's side)",
        parse=grid_weights,
        exclusive="weights",
        demo=False,
    ),
    Control(
        "resolution_weights",
        "Resolution preset",
        "A named weighting of the attention grids by rank, finest first (fits any model)",
        parse=str,
        option="--resolution-preset",
        choices=tuple(RESOLUTION_PRESETS),
        exclusive="weights",
        demo=False,
    ),
    Control(
        "resolution_weights",
        "Resolution preset",
        "How much each attention grid counts; proportional is the paper's",
        name="preset",
        widget=GRID_WEIGHTS,
        cli=False,
    ),
)

METHOD = Method(
    "diffseg",
    "DiffSeg",
    "self-attention merged by KL",
    "Tian et al., CVPR 2024",
    SegmentConfig,
    AttentionBundle,
    ENCODE_DEFAULTS["diffseg"],
    _encode,
    _segment,
    CONTROLS,
    needs=frozenset({SELF_ATTENTION}),
    names_segments=True,
    preflight=_preflight,
)
