"""One job runner for every front end: decode → group by shape → encode → segment → sinks, with one error policy.

A front end makes a `JobConfig` once (its settings, validated where they are made) and hands the runner its items
(source, name) and its sinks: `diffseg segment` writes files (`io.outputs.OutputFolder`), `diffseg evaluate` scores
(`evaluation.harness.Scorer`), the Ray job writes files and its manifest (`jobs.dataset`). The front ends differ in
where inputs come from and where outcomes go, not in how an image is processed or how a failure is reported:

- an image that cannot be read or decoded fails alone, with the reader's message;
- a batch whose encode fails (out of memory, a bad input size) fails each of its images with "encoding failed: ...";
- an image whose segmentation fails fails alone with "segmenting failed: ...";
- an outcome a sink cannot take (a full disk) fails with "writing failed: ...";
and the job carries on. Every outcome names its input. Resume is one question asked of every sink: `done(name,
source)`; an item every sink has is not run again (`pending`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np
import torch

from ..bundle import Bundle
from ..config import DEFAULT_METHOD, DiffCutConfig, EncodeConfig, NamingConfig, SegmentConfig
from ..io.images import crop as crop_array
from ..io.images import load_image
from ..methods.registry import method_named
from ..segmentation import Segmentation

# What a failure in each stage may raise and still be the input's fault, not the program's.
READ_ERRORS = (OSError, ValueError)
MODEL_ERRORS = (RuntimeError, ValueError, OSError)
WRITE_ERRORS = (OSError, ValueError, ImportError)


@dataclass(frozen=True)
class JobConfig:
    """Everything a job applies to every image, made once by the front end and read by every stage below.

    Attributes:
        method: a name of `methods.registry.METHODS`.
        encode: the encode settings (default: the method's, `config.ENCODE_DEFAULTS`).
        segment: the method's settings object, a `SegmentConfig` (DiffSeg) or `DiffCutConfig` (DiffCut) (default:
            its defaults).
        naming: how segments are named from words (voting, minimum confidence, the pass segments come from).
        words: words to name segments with (a list or a comma-separated string), or None; for concept maps, the
            concepts.
        output_size: (height, width) of every label map; None: each image's own size (after any crop).
    """

    method: str = DEFAULT_METHOD
    encode: EncodeConfig | None = None
    segment: SegmentConfig | DiffCutConfig | None = None
    naming: NamingConfig = field(default_factory=NamingConfig)
    words: str | tuple[str, ...] | None = None
    output_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:  # validated once, where the settings are made
        spec = method_named(self.method)
        if self.encode is None:
            object.__setattr__(self, "encode", spec.encode_defaults)
        if self.segment is None:
            object.__setattr__(self, "segment", spec.config())
        if not isinstance(self.segment, spec.config):
            raise ValueError(f"{self.method} takes a {spec.config.__name__}, not a {type(self.segment).__name__}.")
        if self.words is None and spec.concepts:
            raise ValueError("Concept maps need words: pass the concepts, e.g. 'cat, dog, sky'.")


@dataclass
class Outcome:
    """One input's result: a segmentation (and the bundle it came from), or the reason it failed."""

    source: str  # the path or URI as given
    name: str  # the output name
    result: Segmentation | None = None
    bundle: Bundle | None = None
    caption: str | None = None
    error: str | None = None
    voting: str | None = None  # how its segments were named, when they were

    @property
    def ok(self) -> bool:
        return self.error is None


class Sink(Protocol):
    """Where outcomes go: files, a score, a manifest. `done` answers resume; `write` raises one of `WRITE_ERRORS`
    when the outcome cannot be kept."""

    def done(self, name: str, source: str) -> bool: ...

    def write(self, outcome: Outcome) -> None: ...


def pending(items: Iterable[tuple[str, str]], sinks: Sequence[Sink]) -> list[tuple[str, str]]:
    """The (source, name) items some sink does not have yet: what a resumed run still has to do."""
    return [(source, name) for source, name in items if not all(s.done(name, source) for s in sinks)]


def deliver(outcome: Outcome, sinks: Sequence[Sink]) -> Outcome:
    """Give a good outcome to every sink; one that cannot be kept becomes a failure ("writing failed: ...")."""
    if outcome.ok:
        try:
            for sink in sinks:
                sink.write(outcome)
        except WRITE_ERRORS as error:  # e.g. disk full: report the image, carry on
            outcome.error = f"writing failed: {error}"
    return outcome


class Job:
    """Segment inputs with a pipeline: the same settings (`JobConfig`) for every image.

    Args:
        pipe: a `DiffSegPipeline`.
        config: the job's settings.
        captioner: a `captioning.Captioner` giving each image its own words, or None.
        batch_size: images per UNet call.
    """

    def __init__(self, pipe, config: JobConfig, *, captioner=None, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1 but is {batch_size}.")
        self.pipe, self.config, self.captioner, self.batch_size = pipe, config, captioner, batch_size

    def run(
        self, items: Sequence[tuple[str, str]], sinks: Sequence[Sink] = (), load: Callable = load_image
    ) -> Iterator[Outcome]:
        """Outcomes of (source, name) items, in order, as each batch finishes, each delivered to `sinks`. `load` reads
        a source into an image (a path by default); its OSError or ValueError fails that input alone."""
        for first in range(0, len(items), self.batch_size):
            loaded = []
            for source, name in items[first : first + self.batch_size]:
                try:
                    loaded.append((source, name, load(source)))
                except READ_ERRORS as error:
                    yield Outcome(str(source), name, error=str(error))
            for outcome in self.segment_images(loaded):
                yield deliver(outcome, sinks)

    def segment_images(
        self, loaded: Sequence[tuple[str, str, object]], words: Sequence[Sequence[str]] | None = None
    ) -> Iterator[Outcome]:
        """Outcomes of (source, name, image) items already decoded (the evaluation harness enters here, having read
        each image beside its label): encode as one batch, then segment each. `words` gives each image its own words
        (the open-vocabulary evaluation's classes), as the captioner does: one encode each."""
        if not loaded:
            return
        items = [(source, name) for source, name, _ in loaded]
        images = [image for _, _, image in loaded]
        captions = [None] * len(loaded)
        try:
            if self.captioner is not None:
                words = []
                for k, image in enumerate(images):
                    captions[k], found = self.captioner.vocabulary(
                        crop_array(np.asarray(image), self.config.encode.crop)
                    )
                    words.append(found)
            if words is None:
                bundles = self._encode(images, self.config.words)
            else:  # each image has its own words: one encode each
                bundles = [b for image, own in zip(images, words) for b in self._encode([image], own or None)]
        except MODEL_ERRORS as error:
            yield from encoding_failed(items, error)
            return
        yield from self.finish(items, bundles, captions)

    @cached_property
    def vocabulary(self):
        """The job's words as its method takes them, made once: a tokenised vocabulary, the concepts, or None."""
        return self.pipe.words_for(method_named(self.config.method), self.config.words)

    def _encode(self, images: list, words) -> list[Bundle]:
        config = self.config
        return self.pipe.encode(
            images, method=config.method, config=config.encode, labels=words, segment_from=config.naming.segment_from
        )

    def segment_prepared(
        self, items: Sequence[tuple[str, str]], pixels: Sequence[np.ndarray], images: Sequence[np.ndarray]
    ) -> Iterator[Outcome]:
        """Outcomes of items decoded and resized elsewhere (the Ray job's decode tasks): (3, H, W) float32 model
        inputs and the (H, W, 3) uint8 images their labels cover. Inputs of one shape share a UNet call; outcomes
        come in the items' order."""
        shapes = [tuple(np.shape(p)) for p in pixels]
        outcomes: dict[int, Outcome] = {}
        vocabulary = self.vocabulary
        for shape in dict.fromkeys(shapes):
            group = [i for i, s in enumerate(shapes) if s == shape]
            try:
                batch = torch.from_numpy(np.stack([np.asarray(pixels[i], np.float32) for i in group]))
                bundles = self.pipe.encode_pixels(
                    batch,
                    [images[i] for i in group],
                    method=self.config.method,
                    config=self.config.encode,
                    vocabulary=vocabulary,
                    segment_from=self.config.naming.segment_from,
                )
                made = self.finish([items[i] for i in group], bundles)
            except MODEL_ERRORS as error:  # e.g. out of memory: the group fails, the job goes on
                made = encoding_failed([items[i] for i in group], error)
            outcomes.update(zip(group, made))
        return (outcomes[i] for i in range(len(items)))

    def finish(
        self, items: Sequence[tuple[str, str]], bundles: Sequence[Bundle], captions: Sequence | None = None
    ) -> Iterator[Outcome]:
        """The segment stage on encoded bundles: one outcome per item."""
        config = self.config
        named = (config.words is not None and not method_named(config.method).concepts) or self.captioner is not None
        voting = config.naming.voting if named else None
        for (source, name), bundle, caption in zip(items, bundles, captions or [None] * len(items)):
            try:
                result = self.pipe.segment(bundle, config.segment, output_size=config.output_size, naming=config.naming)
            except MODEL_ERRORS as error:
                yield Outcome(str(source), name, bundle=bundle, error=f"segmenting failed: {error}")
                continue
            yield Outcome(str(source), name, result, bundle, caption, voting=voting)


def encoding_failed(items: Sequence[tuple[str, str]], error: Exception) -> Iterator[Outcome]:
    """Every item of a batch whose encode failed, with the reason."""
    for source, name in items:
        yield Outcome(str(source), name, error=f"encoding failed: {error}")
