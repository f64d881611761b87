"""The cheap step for either method: a bundle in, a `Segmentation` out. Needs no model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .bundle import Bundle
from .config import DiffCutConfig, NamingConfig, SegmentConfig
from .io.visualisation import overlay, with_legend
from .methods.registry import Method, method_of
from .naming.vocabulary import SegmentLabel, assign_labels, word_scores

_NAMING = NamingConfig()


@dataclass
class Segmentation:
    """One image's segmentation.

    Attributes:
        labels: (H, W) int32 ids 0..K-1, every id present (concept maps: ids are the words' indices; a word no
            pixel prefers has none).
        num_segments: K.
        image: (H, W, 3) uint8 RGB the labels belong to.
        names: per segment, its word and score, when the bundle was encoded with labels; else None.
        words: the words `names` were chosen from (the vocabulary, or the concepts), in the order given; else ().
        probabilities: concept maps only: (K, H, W) float32, each concept's probability at each pixel (summing to 1
            over concepts); `labels` is their argmax, ids the concepts' indices, `names` the concepts.
    """

    labels: np.ndarray
    num_segments: int
    image: np.ndarray
    names: list[SegmentLabel] | None = None
    words: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None

    @property
    def overlay(self) -> Image.Image:
        """Segment colours over the image, with boundaries drawn (and segment names, when there are any; concept maps:
        a legend of the concepts' colours below the image)."""
        if self.probabilities is not None:
            return Image.fromarray(with_legend(overlay(self.image, self.labels), list(self.words)))
        names = None if self.names is None else {n.id: n.label or "unlabelled" for n in self.names}
        return Image.fromarray(overlay(self.image, self.labels, names=names))


def settings_for(method: Method, config=None, **overrides):
    """The method's settings object: `config` (default: the method's defaults) with `overrides` replacing fields,
    validated by the config's own `__post_init__`.

    Raises:
        ValueError: `config` belongs to another method, or an override is not one of its settings.
    """
    if config is None:
        config = method.config()
    elif not isinstance(config, method.config):
        raise ValueError(f"A {method.name} bundle takes a {method.config.__name__}, not a {type(config).__name__}.")
    if not overrides:
        return config
    known = {f.name for f in dataclasses.fields(method.config)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not settings of {method.name}; it takes {sorted(known)}.")
    return dataclasses.replace(config, **overrides)


def segment_bundle(
    bundle: Bundle,
    config: SegmentConfig | DiffCutConfig | None = None,
    *,
    output_size: tuple[int, int] | None = None,
    naming: NamingConfig | None = None,
    **overrides,
) -> Segmentation:
    """Segment a bundle with its method (`methods.registry`): DiffSeg's `segment_attention` or DiffCut's
    `segment_features`, with the settings of `config` (the method's `SegmentConfig` or `DiffCutConfig`; default: its
    defaults) and any keyword `overrides` of its fields. Labels at the image's size unless `output_size` is given.

    A bundle encoded with words also gets its segments named (`vocabulary.assign_labels`, by `naming`'s voting and
    minimum confidence), from its cross-attention or from the words' concept maps (`named_by`); naming never changes
    the label map.
    """
    method = method_of(bundle)
    config = settings_for(method, config, **overrides)
    naming = naming or _NAMING
    size = tuple(int(v) for v in output_size) if output_size is not None else bundle.image_size
    if len(size) != 2 or min(size) < 1 or size[0] * size[1] > 2**31 - 1:
        raise ValueError(f"`output_size` must be two positive integers with fewer than 2³¹ pixels but is {size}.")
    image = bundle.image
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    if method.probabilities is not None:  # the probabilities are a result too: made once, their argmax the labels
        return _probability_segmentation(*method.probabilities(bundle, size), image)
    labels = method.segment(bundle, config, size, image)
    names, words = None, ()
    votes = {"voting": naming.voting, "min_confidence": naming.min_confidence}
    if getattr(bundle, "cross_attention", None) is not None and bundle.vocabulary is not None:
        words = bundle.vocabulary.words
        names = assign_labels(labels, word_scores(bundle.cross_attention, bundle.vocabulary), words, **votes)
    elif bundle.named_by is not None:  # the words' concept maps: each pixel's share of each word
        maps, words = bundle.named_by.concept_maps, bundle.named_by.words
        scores = maps.reshape(len(maps), -1).float().cpu()
        names = assign_labels(labels, scores, words, score_size=tuple(maps.shape[-2:]), **votes)
    return Segmentation(labels=labels, num_segments=int(labels.max()) + 1, image=image, names=names, words=words)


def _probability_segmentation(shares: np.ndarray, words: tuple[str, ...], image: np.ndarray) -> Segmentation:
    """The segmentation of a method whose result is each word's probability at each pixel (`Method.probabilities`:
    concept maps): their argmax, and one named segment per word (its score: its mean probability over the pixels it
    takes)."""
    labels = shares.argmax(axis=0).astype(np.int32)
    k = len(words)
    flat = labels.reshape(-1)
    counts = np.bincount(flat, minlength=k)
    won = np.bincount(flat, weights=shares.max(axis=0).ravel(), minlength=k)  # each pixel's winning probability
    names = [
        SegmentLabel(i, word, round(float(won[i] / max(counts[i], 1)), 4), round(float(counts[i] / flat.size), 6))
        for i, word in enumerate(words)
    ]
    return Segmentation(labels, k, image, names=names, words=tuple(words), probabilities=shares)
