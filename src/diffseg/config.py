"""Every default of the method, written once.

The CLI, the demo and the evaluation harness read their defaults from here. Each default cites where it comes
from: the paper (Tian et al., "Diffuse, Attend, and Segment", CVPR 2024) or the reference implementation
(google/diffseg, `diffseg/segmentor.py` and `benchmarks.ipynb`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# The weights the paper used (reference: KerasCV's port of Stable Diffusion v1.4).
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


@dataclass(frozen=True)
class EncodeConfig:
    """How an image becomes attention: one denoising step of a frozen UNet."""

    timestep: int = 300  # paper §4.1 and benchmarks.ipynb: `text_to_image(..., timestep=300)`
    resolution: int = 512  # reference: images resized to 512×512 -> 64×64 latents
    crop: str | None = None  # "center": central square first, as the benchmarks' data loaders do
    prompt: str = ""  # reference: `_UNCONDITIONAL_TOKENS`, the embedding of the empty prompt
    noise_seed: int | None = None  # reference adds no noise: the clean latent goes in at `timestep`


@dataclass(frozen=True)
class SegmentConfig:
    """How attention becomes a label map (the method's steps 3-5)."""

    kl_threshold: float | tuple[float, ...] = 1.1  # paper: 1.1 on COCO-Stuff-27 (0.9 on Cityscapes)
    iterations: int = 3  # benchmarks.ipynb: `KL_THRESHOLD = [1.1]*3`
    num_points: int = 16  # paper: 16×16 anchor grid (`NUM_POINTS = 16`)
    refine: bool = False  # paper's tables: no K-means refinement (`REFINEMENT = False`)
    # Reference `mask_merge` runs the first iteration in float16: maps with values that underflow it (common for
    # peaked attention) join no proposal and their anchors give none. True reproduces that, as the paper's numbers
    # did; False merges every map in float32 (log(0) guarded).
    reference_float16: bool = True
    # None: proportional to the resolution, normalised over those present (reference `get_weight_rato`).
    resolution_weights: Mapping[int, float] | None = field(default=None)

    def thresholds(self) -> tuple[float, ...]:
        """One KL threshold per merge iteration, validated."""
        return merge_thresholds(self.kl_threshold, self.iterations)


def merge_thresholds(kl_threshold: float | Sequence[float], iterations: int) -> tuple[float, ...]:
    """Expand `kl_threshold` (one float, or one per iteration) to a tuple of `iterations` positive floats."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"`iterations` must be a positive integer but is {iterations!r}.")
    if isinstance(kl_threshold, (int, float)):
        values = (float(kl_threshold),) * iterations
    else:
        values = tuple(float(t) for t in kl_threshold)
        if len(values) != iterations:
            raise ValueError(
                f"`kl_threshold` has {len(values)} values but `iterations` is {iterations}; "
                "pass one threshold per iteration or a single float."
            )
    if any(not t > 0 for t in values):
        raise ValueError(f"`kl_threshold` values must be positive but are {values}.")
    return values


@dataclass(frozen=True)
class AppConfig:
    """Limits of the interactive demo (`diffseg app`)."""

    max_upload_mb: float = 20.0  # larger uploads are refused by the server
    max_pixels: int = 40_000_000  # larger images are refused with a message (decoding alone would take seconds)
    cache_size: int = 4  # attention bundles kept in the LRU: about 90 MB each for SD 1.x at 512²


# Named weightings of the resolutions, for the demo and the CLI (`--resolution-preset`).
# "proportional" is None: the paper's default, computed over the resolutions present.
RESOLUTION_PRESETS: dict[str, Mapping[int, float] | None] = {
    "proportional": None,
    "64 only": {64: 1.0, 32: 0.0, 16: 0.0, 8: 0.0},
    "64+32": {64: 2 / 3, 32: 1 / 3, 16: 0.0, 8: 0.0},
    "32 only": {64: 0.0, 32: 1.0, 16: 0.0, 8: 0.0},
    "16+8": {64: 0.0, 32: 0.0, 16: 2 / 3, 8: 1 / 3},
    "equal": {64: 0.25, 32: 0.25, 16: 0.25, 8: 0.25},
}
