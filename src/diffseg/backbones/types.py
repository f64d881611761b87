"""What every layer knows of a checkpoint before and after it loads: its `Backbone` (facts read from its configs), its
`Geometry` (how it sees pixels, and the largest input it takes) and a prompt's `Conditioning`.

These are data, on the ground floor of `backbones/`: the families' tables fill them in (`families.detect`,
`dit.detect_transformer`), the denoiser kinds (`unet.UNetKind`, `transformer.TransformerKind`) run on them, and the
front ends' checks read them before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..grids import Grid

# What a method may ask of a denoiser (`Method.needs`); each kind declares what it gives, a family may add more.
SELF_ATTENTION = "self-attention"  # image-to-image attention at one grid or more (DiffSeg)
FEATURES = "features"  # one layer's image tokens (DiffCut)
CONCEPT_MAPS = "concept maps"  # where each of some words is (ConceptAttention; a UNet's cross-attention)
CLIP_TEXT_ATTENTION = "image-to-CLIP-text attention"  # a joint block's image queries over 77 CLIP keys (Seg4Diff)
CROSS_ATTENTION_NAMING = "cross-attention naming"  # the words' cross-attention can ride along its own pass


@dataclass(frozen=True)
class Geometry:
    """How a denoiser sees pixels: every sizing decision and every size check reads this one object.

    Attributes:
        name: what to call the model in messages ("SD3-medium").
        native_size: side of the square it was trained at, in pixels.
        size_multiple: input sides are multiples of this (a UNet: 8 × 2^downsamplings, so every level's grid halves
            the previous one exactly; a transformer: 8 × its patch, one token).
        grid_sides: sides of its attention grids at the native square size, finest first (SD 1.x: 64, 32, 16, 8;
            SDXL family: 64, 32; a transformer: its one token grid).
        max_side: the longest side in pixels it accepts, or None for any (SD3: `pos_embed_max_size` patches × patch
            × 8, its positional embedding's reach; UNets' convolutions and Flux's RoPE have no such limit).
    """

    name: str
    native_size: int
    size_multiple: int
    grid_sides: tuple[int, ...]
    max_side: int | None = None

    def check_resolution(self, resolution: int | None) -> int:
        """The side `resolution` names (default: the native size), or a ValueError naming what fits."""
        side = self.native_size if resolution is None else int(resolution)
        m = self.size_multiple
        if side < m or side % m:
            raise ValueError(f"`resolution` must be a positive multiple of {m} for {self.name} but is {side}.")
        if self.max_side is not None and side > self.max_side:
            raise ValueError(
                f"`resolution` {side} does not fit {self.name}: its positional embedding reaches {self.max_side} px "
                f"a side ({self.max_side // m} tokens). Pass `--resolution {self.max_side}` or lower."
            )
        return side

    def target_size(
        self, image_size: tuple[int, int], resolution: int | None = None, resize: str = "native"
    ) -> tuple[int, int]:
        """(height, width) in pixels the denoiser sees for an image of `image_size`.

        "native" keeps the aspect ratio at about `resolution`² pixels (default: the native size), each side rounded
        to the nearest multiple of `size_multiple` (at least one multiple); an extreme strip's long side is capped so
        that the area stays within budget, and a side past `max_side` is brought within it, the other side scaled
        with it (so every image fits with default settings). "square" is the paper's `resolution`×`resolution` (a
        square input gives the same size either way).
        """
        side = self.check_resolution(resolution)
        if resize == "square":
            return side, side
        if resize != "native":
            raise ValueError(f"`resize` must be 'native' or 'square' but is {resize!r}.")
        m = self.size_multiple
        h, w = image_size
        scale = (side * side / (h * w)) ** 0.5
        height, width = max(m, round(h * scale / m) * m), max(m, round(w * scale / m) * m)
        if height * width > 2 * side * side:  # an extreme strip, its short side raised to one multiple: cap the long
            # side so the area stays within the budget (the strip is squashed along its length, to at most 1:side²/m²)
            cap = max(m, side * side // min(height, width) // m * m)
            height, width = (height, cap) if height <= width else (cap, width)
        if self.max_side is not None and max(height, width) > self.max_side:  # the model's reach: scale both sides
            short = min(height, width) * self.max_side / max(height, width)
            short = max(m, min(self.max_side, round(short / m) * m))
            height, width = (short, self.max_side) if height <= width else (self.max_side, short)
        return height, width

    def grids(self, size: tuple[int, int]) -> list[Grid]:
        """The (h, w) attention grids of an input of `size` (H, W) pixels, finest first."""
        grids = []
        for side in self.grid_sides:
            pixels = self.native_size // side  # per token, along each axis
            grids.append((-(-size[0] // pixels), -(-size[1] // pixels)))
        return grids

    def finest_side(self, resolution: int | None = None) -> int:
        """Side of the finest grid of a square input at `resolution` (default native): the anchors' limit."""
        side = self.native_size if resolution is None else int(resolution)
        return self.grid_sides[0] * side // self.native_size


@dataclass(frozen=True)
class Backbone:
    """Facts about one checkpoint, all read from its configs.

    Attributes:
        family: its row in the family tables ("sd1", "sd2", "sdxl" — SDXL base and Turbo, SSD-1B, Segmind-Vega —;
            "sd3" — SD3, SD3.5 —, "flux").
        name: what to call it in messages and tables, e.g. "SDXL", "SSD-1B", "Stable Diffusion 2.x (v-prediction)".
        geometry: how it sees pixels (`Geometry`).
        text_encoders: component names of the text encoders, in conditioning order.
        tokenizers: component names of their tokenizers.
        diffcut_block: index into `unet.down_blocks` whose last transformer's `attn1` DiffCut reads (reference
            `LdmExtractor.register_hooks`: -2 for SD 1.x, -1 for the SDXL family); for a transformer, the block after
            which it reads the image tokens (`transformer.TransformerKind.features`).
        prediction_type: the scheduler's ("epsilon", "v_prediction"; "flow" for the transformers).
        denoiser: the kind of denoiser, "unet" or "transformer" (`kinds.KINDS`).
        text_tokens: length of the conditioning's text (a transformer's T5 tokens; CLIP's 77 for the UNets).
        depth: a transformer's blocks (Flux: double- and single-stream together); 0 for a UNet.
        joint_depth: a transformer's joint (double-stream) blocks, those with a text stream; 0 for a UNet.
        capabilities: what it gives the methods (`SELF_ATTENTION`, ...): its kind's, and its family's own.
    """

    family: str
    name: str
    geometry: Geometry
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    diffcut_block: int
    prediction_type: str = "epsilon"
    denoiser: str = "unet"
    text_tokens: int = 77
    depth: int = 0
    joint_depth: int = 0
    capabilities: frozenset[str] = frozenset()

    @property
    def native_size(self) -> int:
        return self.geometry.native_size

    @property
    def size_multiple(self) -> int:
        return self.geometry.size_multiple

    @property
    def grid_sides(self) -> tuple[int, ...]:
        return self.geometry.grid_sides

    @property
    def components(self) -> tuple[str, ...]:
        """Every component folder a checkpoint of this family must have (a transformer's text encoders are needed
        only until its empty prompt is cached: see `dit.load_text_encoders`)."""
        if self.denoiser == "transformer":
            return ("transformer", "vae", "scheduler")
        return ("unet", "vae", *self.text_encoders, *self.tokenizers)

    def check_blocks(self, blocks: tuple[int, int] | None, *, joint: bool = False) -> range | None:
        """The block indices `blocks` (first, last, inclusive) names, checked against this model (`joint`: among its
        joint blocks alone, those with a text stream); None for the method's default."""
        if blocks is None:
            return None
        if not self.depth:
            raise ValueError(f"`--blocks` chooses a diffusion transformer's blocks; {self.name} is a UNet.")
        count = self.joint_depth if joint else self.depth
        first, last = blocks
        if not 0 <= first <= last < count:
            which = "joint (double-stream) blocks" if joint and count != self.depth else "blocks"
            raise ValueError(
                f"`--blocks {first}:{last}` does not fit: {self.name} has {which} 0 to {count - 1}"
                + (" (concept maps read those alone)." if joint else ".")
            )
        return range(first, last + 1)


@dataclass
class Conditioning:
    """Text conditioning of one prompt: (1, T, D) hidden states, and a (1, P) pooled text embedding where the family
    takes one (SDXL, SD3, Flux)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
