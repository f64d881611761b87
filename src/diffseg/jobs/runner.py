"""One job runner for every front end: decode → encode → segment, in batches, with one error policy.

`diffseg segment` writes each outcome with the writers of `outputs`, `diffseg evaluate` scores it, the Ray worker
(whose decoding runs as Ray tasks) segments what its batch encoded with `segment_encoded`. The front ends differ in
where inputs come from and where outcomes go, not in how an image is processed or how a failure is reported:

- an image that cannot be read or decoded fails alone, with the reader's message;
- a batch whose encode fails (out of memory, a bad input size) fails each of its images with "encoding failed: ...";
- an image whose segmentation fails fails alone with "segmenting failed: ...";
and the job carries on. Every outcome names its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..bundle import AttentionBundle
from ..io.images import crop as crop_array
from ..io.images import load_image
from ..segmentation import Segmentation

# What a failure in each stage may raise and still be the input's fault, not the program's.
READ_ERRORS = (OSError, ValueError)
MODEL_ERRORS = (RuntimeError, ValueError, OSError)


@dataclass
class Outcome:
    """One input's result: a segmentation (and the bundle it came from), or the reason it failed."""

    source: str  # the path or URI as given
    name: str  # the output name
    result: Segmentation | None = None
    bundle: AttentionBundle | None = None
    caption: str | None = None
    error: str | None = None
    voting: str | None = None  # how its segments were named, when they were

    @property
    def ok(self) -> bool:
        return self.error is None


class Job:
    """Segment inputs with a pipeline: the same encode and segment settings for every image.

    Args:
        pipe: a `DiffSegPipeline`.
        encode: `DiffSegPipeline.encode` keywords (method, timestep, crop, resize, resolution, noise_seed, ...).
        segment: the method's segmenter settings, plus `output_size`, `voting`, `min_confidence` if wanted.
        labels: words to name segments with (DiffSeg), or None.
        captioner: a `captioning.Captioner` giving each image its own words, or None.
        batch_size: images per UNet call.
    """

    def __init__(self, pipe, *, encode: dict, segment: dict, labels=None, captioner=None, batch_size: int = 1):
        self.pipe, self.encode, self.segment = pipe, dict(encode), dict(segment)
        self.labels, self.captioner, self.batch_size = labels, captioner, batch_size

    def run(self, items: Sequence[tuple[str, str]], load: Callable[[str], object] = load_image) -> Iterator[Outcome]:
        """Outcomes of (source, name) items, in order, as each batch finishes. `load` reads a source into an image
        (a path by default); its OSError or ValueError fails that input alone."""
        for first in range(0, len(items), self.batch_size):
            loaded = []
            for source, name in items[first : first + self.batch_size]:
                try:
                    loaded.append((source, name, load(source)))
                except READ_ERRORS as error:
                    yield Outcome(str(source), name, error=str(error))
            if loaded:
                yield from self.segment_images(loaded)

    def segment_images(self, loaded: Sequence[tuple[str, str, object]]) -> Iterator[Outcome]:
        """Outcomes of (source, name, image) items already decoded (the evaluation harness enters here, having read
        each image beside its label): encode as one batch, then segment each."""
        captions = [None] * len(loaded)
        try:
            if self.captioner is None:
                named = {"labels": self.labels} if self.labels is not None else {}
                bundles = self.pipe.encode([image for _, _, image in loaded], **named, **self.encode)
            else:  # each image has its own words: one encode each
                bundles = []
                for k, (_, _, image) in enumerate(loaded):
                    captions[k], words = self.captioner.vocabulary(
                        crop_array(np.asarray(image), self.encode.get("crop"))
                    )
                    bundles.append(self.pipe.encode(image, labels=words or None, **self.encode))
        except MODEL_ERRORS as error:
            yield from encoding_failed([(source, name) for source, name, _ in loaded], error)
            return
        yield from self.finish([(source, name) for source, name, _ in loaded], bundles, captions)

    def finish(
        self, items: Sequence[tuple[str, str]], bundles: Sequence[AttentionBundle], captions: Sequence | None = None
    ) -> Iterator[Outcome]:
        """The segment stage on encoded bundles (the Ray worker enters here): one outcome per item."""
        for (source, name), bundle, caption in zip(items, bundles, captions or [None] * len(items)):
            try:
                result = self.pipe.segment(bundle, **self.segment)
            except MODEL_ERRORS as error:
                yield Outcome(str(source), name, bundle=bundle, error=f"segmenting failed: {error}")
                continue
            yield Outcome(str(source), name, result, bundle, caption, voting=self.segment.get("voting"))


def encoding_failed(items: Sequence[tuple[str, str]], error: Exception) -> Iterator[Outcome]:
    """Every item of a batch whose encode failed, with the reason."""
    for source, name in items:
        yield Outcome(str(source), name, error=f"encoding failed: {error}")
