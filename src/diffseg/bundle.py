"""Bundles: what each method segments, computed once per image (the UNet's expensive step).

An `AttentionBundle` (DiffSeg: self-attention per grid), a `FeatureBundle` (DiffCut: one layer's tokens), a
`TextAttentionBundle` (Seg4Diff: one block's image-to-text attention) or a `ConceptBundle` (concept maps of words).

Encode once, segment many: the demo's sliders, evaluation sweeps and `--resume` re-run only steps 3-5 on it.
A bundle saves to and loads from one safetensors file, so segmentation can be re-run without the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import numpy as np
import torch

from .io.outputs import atomic_path
from .grids import GridDict, by_size, grid_key
from .words import Vocabulary

FORMAT = "diffseg-bundle/2"  # grids keyed "HxW"; DiffCut features
_FORMAT_V1 = "diffseg-attention-bundle/1"  # square grids keyed by side r; still read


BUNDLE_TYPES: dict[str, type] = {}  # method name -> its bundle type: what `load_bundle` makes of a file


class Saved:
    """What every bundle type shares: the encoded image, where it came from, and the file format. A subclass names
    its method (`method`), which the file records and `load_bundle` reads back through `BUNDLE_TYPES`."""

    method: ClassVar[str]
    image: np.ndarray
    timestep: int
    model: str
    family: str

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            BUNDLE_TYPES[cls.method] = cls

    @classmethod
    def holds(cls, tensors: dict) -> bool:
        """Whether a file without a recorded method (written before methods were recorded) holds this type."""
        return False

    @classmethod
    def from_file(cls, path: Path, tensors: dict, metadata: dict, common: dict, field_of) -> Saved:
        """The bundle of a file's tensors and metadata (`common`: image, timestep, model, family, named_by)."""
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the encoded image: the label map's default size."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The method's own tensors and metadata, besides the image and provenance."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to a safetensors file (atomically: a reader never sees half a file)."""
        from safetensors.torch import save_file

        tensors, metadata = self._tensors()
        tensors["image"] = torch.tensor(np.asarray(self.image, dtype=np.uint8))
        named_by = getattr(self, "named_by", None)
        if named_by is not None:  # the concept maps that name its segments
            tensors["named_by.concept_maps"] = named_by.concept_maps.detach().float().cpu().contiguous()
            metadata["named_by.words"] = json.dumps(list(named_by.words))
        metadata = {"format": FORMAT, "method": self.method, "timestep": str(self.timestep), "model": self.model,
                    **metadata}  # fmt: skip
        if self.family:
            metadata["family"] = self.family
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        """Read a bundle written by `save`, of either method (see `load_bundle`)."""
        return load_bundle(path)


@dataclass
class AttentionBundle(Saved):
    """What DiffSeg segments: the UNet's self-attention at every grid of one image, with the image it came from.

    Attributes:
        attention: (h, w) -> (h·w, h·w) float32 query × key probabilities, averaged over heads and over the layers
            of that grid; rows sum to 1. Finest first.
        image: (H, W, 3) uint8 RGB, the region that was encoded (after any crop), at its own resolution.
        timestep: the UNet timestep the attention was taken at.
        model: the checkpoint (hub id or folder) that produced it.
        layers: (h, w) -> number of self-attention layers averaged at that grid.
        cross_attention: (h, w) -> (h·w, T) cross-attention over the vocabulary prompt's T tokens, when encoded with
            words.
        vocabulary: the words (and their token positions) the cross-attention belongs to.
        family: the model family that produced it ("sd1", "sd2", "sdxl", "sd3", "flux"; empty if unknown).
        named_by: the concept maps of the words that name its segments, where the cross-attention of its own pass
            cannot (a diffusion transformer; every method but DiffSeg on a UNet).
    """

    method: ClassVar[str] = "diffseg"

    attention: dict[tuple[int, int], torch.Tensor]
    image: np.ndarray
    timestep: int
    model: str = ""
    layers: dict[tuple[int, int], int] = field(default_factory=dict)
    cross_attention: dict[tuple[int, int], torch.Tensor] | None = None
    vocabulary: Vocabulary | None = None
    family: str = ""
    named_by: ConceptBundle | None = None

    def __post_init__(self) -> None:
        self.attention = GridDict((grid_key(g), t) for g, t in self.attention.items())
        self.layers = GridDict((grid_key(g), int(n)) for g, n in self.layers.items())
        if self.cross_attention is not None:
            self.cross_attention = GridDict((grid_key(g), t) for g, t in self.cross_attention.items())
        if not self.attention:
            raise ValueError("An attention bundle needs attention maps at one grid at least; it has none.")

    def to(self, device) -> AttentionBundle:
        """A copy whose attention maps are on `device` (where segmenting then runs)."""
        return dataclasses.replace(self, attention={g: t.to(device) for g, t in self.attention.items()})

    @classmethod
    def holds(cls, tensors: dict) -> bool:
        return any(key.startswith("attention.") for key in tensors)

    @classmethod
    def from_file(cls, path: Path, tensors: dict, metadata: dict, common: dict, field_of) -> AttentionBundle:
        attention, cross = _checked_grids(path, tensors, field_of)
        if not attention:
            raise ValueError(f"Bundle `{path}` holds no attention maps; re-encode the image.")
        layers = metadata.get("layers", "{}")
        return cls(
            attention=attention,
            layers=field_of("layers", lambda: {grid_key(r): int(n) for r, n in json.loads(layers).items()}),
            cross_attention=cross or None,
            vocabulary=field_of("vocabulary", lambda: _vocabulary(metadata.get("vocabulary"))),
            **common,
        )

    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {f"attention.{h}x{w}": t.detach().float().cpu().contiguous() for (h, w), t in self.attention.items()}
        for (h, w), t in (self.cross_attention or {}).items():
            tensors[f"cross.{h}x{w}"] = t.detach().float().cpu().contiguous()
        metadata = {"layers": json.dumps({f"{h}x{w}": n for (h, w), n in self.layers.items()})}
        if self.vocabulary is not None:
            metadata["vocabulary"] = json.dumps(dataclasses.asdict(self.vocabulary))
        return tensors, metadata


class OneTensorBundle(Saved):
    """A bundle whose method reads one tensor, the field named `tensor`, saved under that name."""

    tensor: ClassVar[str]

    def to(self, device):
        """A copy whose tensor is on `device` (where segmenting then runs)."""
        return dataclasses.replace(self, **{self.tensor: getattr(self, self.tensor).to(device)})

    @classmethod
    def holds(cls, tensors: dict) -> bool:
        return cls.tensor in tensors

    @classmethod
    def from_file(cls, path: Path, tensors: dict, metadata: dict, common: dict, field_of) -> OneTensorBundle:
        if cls.tensor not in tensors:
            raise ValueError(f"Bundle `{path}` of method {cls.method} holds no `{cls.tensor}`; re-encode the image.")
        return cls(_checked_features(path, tensors[cls.tensor], cls.tensor), **common)

    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return {self.tensor: getattr(self, self.tensor).detach().float().cpu().contiguous()}, {}


@dataclass
class FeatureBundle(OneTensorBundle):
    """What DiffCut segments: one UNet layer's tokens of one image, with the image it came from.

    Attributes:
        features: (h, w, C) float32 tokens of DiffCut's layer.
        image: (H, W, 3) uint8 RGB, the region that was encoded (after any crop), at its own resolution.
        timestep: the UNet timestep the features were taken at.
        model: the checkpoint (hub id or folder) that produced it.
        family: the model family that produced it (see `AttentionBundle`).
        named_by: the concept maps of the words that name its segments (see `AttentionBundle`).
    """

    method: ClassVar[str] = "diffcut"
    tensor: ClassVar[str] = "features"

    features: torch.Tensor
    image: np.ndarray
    timestep: int
    model: str = ""
    family: str = ""
    named_by: ConceptBundle | None = None


@dataclass
class TextAttentionBundle(OneTensorBundle):
    """What Seg4Diff segments: one SD3 block's image-to-text attention of one image, with the image it came from.

    Attributes:
        text_attention: (h, w, T) float32: each image token's attention over the empty prompt's T = 77 CLIP tokens
            (softmax over the whole joint sequence, mean over heads).
        image, timestep, model, family, named_by: as `FeatureBundle`'s.
    """

    method: ClassVar[str] = "seg4diff"
    tensor: ClassVar[str] = "text_attention"

    text_attention: torch.Tensor
    image: np.ndarray
    timestep: int
    model: str = ""
    family: str = ""
    named_by: ConceptBundle | None = None


@dataclass
class ConceptBundle(OneTensorBundle):
    """Where each concept word is in one image (`pipeline.concept_maps`), with the image it came from.

    Attributes:
        concept_maps: (K, h, w) float32 on the token grid, summing to 1 over the K concepts at every token.
        words: the K concepts, in the order given (the label map's ids).
        image, timestep, model, family: as `FeatureBundle`'s.
    """

    method: ClassVar[str] = "concepts"
    tensor: ClassVar[str] = "concept_maps"

    concept_maps: torch.Tensor
    image: np.ndarray
    timestep: int
    model: str = ""
    family: str = ""
    words: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.concept_maps.dim() != 3 or self.concept_maps.shape[0] != len(self.words):
            raise ValueError(
                f"`concept_maps` shaped {tuple(self.concept_maps.shape)} do not hold one (h, w) map per word of "
                f"{list(self.words)}."
            )

    @classmethod
    def from_file(cls, path: Path, tensors: dict, metadata: dict, common: dict, field_of) -> ConceptBundle:
        maps = _checked_features(path, tensors.get("concept_maps", torch.empty(0)), "concept_maps")
        words = field_of("words", lambda: tuple(str(w) for w in json.loads(metadata["words"])))
        return field_of("concept_maps", lambda: cls(maps, words=words, **common))

    def _tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, _ = super()._tensors()
        return tensors, {"words": json.dumps(list(self.words))}


Bundle = AttentionBundle | FeatureBundle | TextAttentionBundle | ConceptBundle


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle written by `save` (this format or the first, square-only one) as the bundle type of the method
    it records (`BUNDLE_TYPES`; a file from before methods were recorded: the type whose tensors it holds).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a bundle, truncated, or a field malformed; the message names the file and the field.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Bundle `{path}` does not exist.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") not in (FORMAT, _FORMAT_V1):
                raise ValueError(f"`{path}` is not a diffseg bundle (format {metadata.get('format')!r}).")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, RuntimeError, SafetensorError) as error:  # truncated or foreign files
        raise ValueError(f"`{path}` could not be read as a bundle ({error}).") from error

    def field_of(name, read):
        try:
            return read()
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"Bundle `{path}` has a malformed `{name}` ({error!r}); re-encode the image.") from None

    image = field_of("image", lambda: tensors["image"].numpy())
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape or image.dtype != np.uint8:
        raise ValueError(
            f"Bundle `{path}` has an `image` shaped {image.shape} ({image.dtype}); it must be (H, W, 3) uint8 "
            "RGB. Re-encode the image."
        )
    common = {
        "image": image,
        "timestep": field_of("timestep", lambda: int(metadata["timestep"])),
        "model": metadata.get("model", ""),
        "family": metadata.get("family", ""),
    }
    kind = _bundle_type(path, metadata.get("method"), tensors)
    if "named_by.concept_maps" in tensors and kind is not ConceptBundle:  # the concept maps that name the segments
        maps = _checked_features(path, tensors["named_by.concept_maps"], "named_by")
        words = field_of("named_by", lambda: tuple(str(w) for w in json.loads(metadata["named_by.words"])))
        common["named_by"] = field_of("named_by", lambda: ConceptBundle(maps, image, common["timestep"], words=words))
    return kind.from_file(path, tensors, metadata, common, field_of)


def _bundle_type(path: Path, method: str | None, tensors: dict) -> type:
    """The bundle type of a file: its recorded method's (`BUNDLE_TYPES`), or for a file that records none (written
    before methods were recorded), the first type whose tensors it holds."""
    if method is None:
        found = next((kind for kind in BUNDLE_TYPES.values() if kind.holds(tensors)), None)
        if found is None:
            raise ValueError(f"Bundle `{path}` holds neither attention maps nor features; re-encode the image.")
        return found
    if method not in BUNDLE_TYPES:
        raise ValueError(
            f"Bundle `{path}` was made by method {method!r}, which this installation does not have (it has "
            f"{', '.join(BUNDLE_TYPES)}): install or register that method, or re-encode the image."
        )
    return BUNDLE_TYPES[method]


def _checked_features(path: Path, features: torch.Tensor, name: str = "features") -> torch.Tensor:
    if features.dim() != 3 or 0 in features.shape:
        raise ValueError(
            f"Bundle `{path}` has `{name}` shaped {tuple(features.shape)}; they must be (h, w, C). Re-encode the image."
        )
    if not bool(torch.isfinite(features).all()):
        raise ValueError(
            f"Bundle `{path}` has NaN or infinite `{name}`; re-encode the image (in float32 if half precision "
            "overflowed)."
        )
    return features


def _checked_grids(path: Path, tensors: dict, field_of) -> tuple[dict, dict]:
    """(attention, cross) grid -> tensor, finest first, each checked: finite probabilities, attention square."""

    def grids(prefix):
        found = {grid_key(k.split(".", 1)[1]): t for k, t in tensors.items() if k.startswith(prefix)}
        return {g: found[g] for g in by_size(found)}

    attention, cross = field_of("attention", lambda: grids("attention.")), field_of("cross", lambda: grids("cross."))
    for name, maps in (("attention", attention), ("cross", cross)):
        for grid, t in maps.items():
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(
                    f"Bundle `{path}` has NaN, infinite or negative `{name}` at grid {grid[0]}x{grid[1]}; "
                    "re-encode the image (in float32 if half precision overflowed)."
                )
    for grid, t in attention.items():
        if t.dim() not in (2, 3) or tuple(t.shape[-2:]) != (grid[0] * grid[1],) * 2:
            raise ValueError(
                f"Bundle `{path}` has `attention` at grid {grid[0]}x{grid[1]} shaped {tuple(t.shape)}; it must be "
                f"({grid[0] * grid[1]}, {grid[0] * grid[1]}). Re-encode the image."
            )
    return attention, cross


def _vocabulary(text: str | None) -> Vocabulary | None:
    if not text:
        return None
    data = json.loads(text)
    return Vocabulary(tuple(data["words"]), tuple(data["input_ids"]), tuple(tuple(i) for i in data["token_indices"]))
