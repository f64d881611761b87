"""The cheap step for either method: a bundle in, a `Segmentation` out. Needs no model."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .bundle import AttentionBundle
from .config import DiffCutConfig, NamingConfig, SegmentConfig
from .io.visualisation import overlay
from .methods.diffcut.segment import segment_features
from .methods.diffseg.segment import segment_attention
from .naming.vocabulary import SegmentLabel, assign_labels, word_scores

_NAMING = NamingConfig()
SEGMENTERS = {"diffseg": segment_attention, "diffcut": segment_features}


@dataclass
class Segmentation:
    """One image's segmentation.

    Attributes:
        labels: (H, W) int32 ids 0..K-1, every id present.
        num_segments: K.
        image: (H, W, 3) uint8 RGB the labels belong to.
        names: per segment, its word and score, when the bundle was encoded with labels; else None.
    """

    labels: np.ndarray
    num_segments: int
    image: np.ndarray
    names: list[SegmentLabel] | None = None

    @property
    def overlay(self) -> Image.Image:
        """Segment colours over the image, with boundaries drawn (and segment names, when there are any)."""
        names = None if self.names is None else {n.id: n.label or "unlabelled" for n in self.names}
        return Image.fromarray(overlay(self.image, self.labels, names=names))


def method_settings(method: str) -> set[str]:
    """The keyword settings a method's segmenter takes (besides its input and `output_size`)."""
    parameters = inspect.signature(SEGMENTERS[method]).parameters
    return {name for name, p in parameters.items() if p.kind == p.KEYWORD_ONLY} - {"output_size", "image"}


def segment_bundle(
    bundle: AttentionBundle,
    config: SegmentConfig | DiffCutConfig | None = None,
    *,
    output_size: tuple[int, int] | None = None,
    voting: str = _NAMING.voting,
    min_confidence: float = _NAMING.min_confidence,
    **settings,
) -> Segmentation:
    """Segment a bundle with its method: `segment_attention` (DiffSeg) or `segment_features` (DiffCut), with the
    settings of `config` (a `SegmentConfig` or `DiffCutConfig`, the method's) and any keyword `settings` over them.
    Labels at the image's size unless `output_size` is given.

    A bundle encoded with labels also gets its segments named (`semantic.assign_labels`, with `voting` and
    `min_confidence`); naming never changes the label map.
    """
    if config is not None:
        expected = DiffCutConfig if bundle.method == "diffcut" else SegmentConfig
        if not isinstance(config, expected):
            raise ValueError(f"A {bundle.method} bundle takes a {expected.__name__}, not a {type(config).__name__}.")
        given = {k: v for k, v in dataclasses.asdict(config).items() if k in method_settings(bundle.method)}
        settings = {**given, **settings}
    size = tuple(int(v) for v in output_size) if output_size is not None else bundle.image_size
    if len(size) != 2 or min(size) < 1 or size[0] * size[1] > 2**31 - 1:
        raise ValueError(f"`output_size` must be two positive integers with fewer than 2³¹ pixels but is {size}.")
    unknown = set(settings) - method_settings(bundle.method)
    if unknown:
        raise ValueError(
            f"{sorted(unknown)} are not settings of {bundle.method}; it takes {sorted(method_settings(bundle.method))}."
        )
    image = bundle.image
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    if bundle.method == "diffcut":
        pixels = torch.tensor(image).permute(2, 0, 1)[None].float() / 255 if settings.get("pamr") else None
        labels = segment_features(bundle.features, output_size=size, image=pixels, **settings)
    else:
        labels = segment_attention(bundle.attention, output_size=size, **settings)
    names = None
    if bundle.cross_attention is not None and bundle.vocabulary is not None:
        scores = word_scores(bundle.cross_attention, bundle.vocabulary)
        names = assign_labels(labels, scores, bundle.vocabulary.words, voting=voting, min_confidence=min_confidence)
    return Segmentation(labels=labels, num_segments=int(labels.max()) + 1, image=image, names=names)
