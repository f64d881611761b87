"""Every default of the method, written once.

The CLI, the demo and the evaluation harness read their defaults from here. Each default cites where it comes
from: the paper (Tian et al., "Diffuse, Attend, and Segment", CVPR 2024) or the reference implementation
(google/diffseg, `diffseg/segmentor.py` and `benchmarks.ipynb`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

# The weights the paper used (reference: KerasCV's port of Stable Diffusion v1.4).
DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_METHOD = "diffseg"  # the method every front end starts with (a name of `methods.registry.METHODS`)


RESIZE = ("native", "square")
CROPS = (None, "center")
MAX_RESOLUTION = 4096  # about 4096² pixels reach the UNet at most: beyond, one image's attention would not fit


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EncodeConfig:
    """How an image becomes what a method segments: one denoising step of a frozen UNet (DiffSeg's defaults)."""

    timestep: int = 300  # paper §4.1 and benchmarks.ipynb: `text_to_image(..., timestep=300)`
    # None: the model's native size (SD 1.x 512, SD 2.x-768 768, SDXL 1024; the paper's 512 for SD 1.4).
    resolution: int | None = None
    # "native": keep the aspect ratio at about resolution² pixels; "square": the paper's resolution×resolution.
    resize: str = "native"
    crop: str | None = None  # "center": central square first, as the benchmarks' data loaders do
    noise_seed: int | None = None  # reference adds no noise: the clean latent goes in at `timestep`
    # Diffusion transformers only: (first, last) block, inclusive, indices into the blocks in the order the image
    # passes them (Flux: double-, then single-stream). DiffSeg averages their attention (None: every block);
    # DiffCut reads the image tokens after `last` (None: the family's block, `dit.detect_transformer`).
    blocks: tuple[int, int] | None = None
    # Flow-matching models only: (steps, from_end) places the noise at `timesteps[-from_end]` of the scheduler's
    # `set_timesteps(steps)` (Seg4Diff's `NUM_INFERENCE_STEPS`, `NOISE_STEPS`) instead of at `timestep`; the
    # `timestep` then only records where that point lies on the training axis, rounded.
    schedule: tuple[int, int] | None = None
    # With resize "square" only: zero-pad the image's bottom and right to a multiple of this first (Seg4Diff:
    # detectron2's `ImageList.from_tensors(images, SIZE_DIVISIBILITY=32)` before its 1024² resize); labels cover that
    # padded frame squashed to the image's size, as the reference's (`sem_seg_postprocess` crops nothing of the 64²
    # maps). None: no padding.
    pad_multiple: int | None = None

    @property
    def padding(self) -> int | None:
        """The multiple the image is padded to before resizing, where it applies (`pad_multiple`, square only)."""
        return self.pad_multiple if self.resize == "square" else None

    @property
    def step(self) -> dict:
        """Where one step puts its noise: the keywords every denoiser kind's captures take."""
        return {"timestep": self.timestep, "noise_seed": self.noise_seed, "schedule": self.schedule}

    def __post_init__(self) -> None:  # validated once, where the settings are made
        if self.schedule is not None:
            ok = isinstance(self.schedule, tuple) and len(self.schedule) == 2 and all(_is_int(v) for v in self.schedule)
            if not ok or not 1 <= self.schedule[1] <= self.schedule[0]:
                raise ValueError(
                    f"`schedule` must be a (steps, from_end) pair, 1 ≤ from_end ≤ steps, but is {self.schedule!r}."
                )
        if self.pad_multiple is not None and (not _is_int(self.pad_multiple) or self.pad_multiple < 1):
            raise ValueError(f"`pad_multiple` must be a positive integer or None but is {self.pad_multiple!r}.")
        if not _is_int(self.timestep) or not 0 <= self.timestep <= 999:
            raise ValueError(f"`timestep` must be an integer in [0, 999] but is {self.timestep!r}.")
        resolution = self.resolution
        if resolution is not None and (not _is_int(resolution) or not 32 <= resolution <= MAX_RESOLUTION):
            raise ValueError(
                f"`resolution` must be from 32 to {MAX_RESOLUTION} (a multiple of 64; SDXL 32; SD3 and Flux 16) but is "
                f"{self.resolution!r}."
            )
        if self.resize not in RESIZE:
            raise ValueError(f"`resize` must be one of {RESIZE} but is {self.resize!r}.")
        if self.crop not in CROPS:
            raise ValueError(f"`crop` must be one of {CROPS} but is {self.crop!r}.")
        if self.noise_seed is not None and not _is_int(self.noise_seed):
            raise ValueError(f"`noise_seed` must be an integer or None but is {self.noise_seed!r}.")
        if self.blocks is not None:
            ok = isinstance(self.blocks, tuple) and len(self.blocks) == 2 and all(_is_int(b) for b in self.blocks)
            if not ok or not 0 <= self.blocks[0] <= self.blocks[1]:
                raise ValueError(
                    f"`blocks` must be a (first, last) pair of block indices, 0 ≤ first ≤ last, but is {self.blocks!r}."
                )


# DiffCut's reference (`tools/ldm.py`, `eval_diffcut.py`): t = 50 (`--step 50`), 1024² input (`--img_size 1024`,
# whatever the model), noise drawn once with `torch.Generator().manual_seed(42)` and added for that timestep.
# Seg4Diff's reference (`configs/eval_unsup.yaml`, `sd3_backbone.py`): 1024² input (squashed to a square: ours keeps
# the aspect ratio unless `resize="square"`, as for the other methods), noise at `timesteps[-8]` of a 28-step
# schedule (`NUM_INFERENCE_STEPS: 28`, `NOISE_STEPS: 8`): σ = 0.5151 for SD3, t ≈ 261 on the training axis. Its noise
# is unseeded (`randn_tensor`); ours is seeded, so that a run repeats.
SEG4DIFF_SCHEDULE = (28, 8)
SEG4DIFF_PAD = 32  # `MODEL.MASK_FORMER.SIZE_DIVISIBILITY`: its square path pads to a multiple of 32 first
# ConceptAttention's references: Flux `encode_image(num_steps=4, noise_timestep=2, seed=0)`, σ = `get_schedule(4)[2]`
# (0.5 on schnell); SD3 `encode_image(num_inference_steps=4, timestep_index=-2)`: both the point 2 from the end of a
# 4-step schedule. UNets (cross-attention) take the timestep, DiffSeg's 300, with the same seeded noise.
CONCEPT_SCHEDULE = (4, 2)
ENCODE_DEFAULTS = {
    "diffseg": EncodeConfig(),
    "diffcut": EncodeConfig(timestep=50, resolution=1024, noise_seed=42),
    "seg4diff": EncodeConfig(
        timestep=261, resolution=1024, noise_seed=0, schedule=SEG4DIFF_SCHEDULE, pad_multiple=SEG4DIFF_PAD
    ),
    "concepts": EncodeConfig(timestep=300, noise_seed=0, schedule=CONCEPT_SCHEDULE),
}


class _MethodDefault:
    """Marks an encode argument left to the method's default (`ENCODE_DEFAULTS`), where None means something."""

    def __repr__(self) -> str:
        return "<the method's default>"


METHOD_DEFAULT = _MethodDefault()


def encode_settings(defaults: EncodeConfig, **given) -> EncodeConfig:
    """A method's `EncodeConfig` (`defaults`, its `Method.encode_defaults`) with the arguments given (those not
    `METHOD_DEFAULT`) replacing its defaults, validated."""
    given = {k: v for k, v in given.items() if v is not METHOD_DEFAULT}
    # Another timestep than the method's places the noise itself; the method's own keeps its schedule point (Seg4Diff's
    # t = 261 stands for its step, σ = 0.5151).
    if given.get("timestep", defaults.timestep) != defaults.timestep and "schedule" not in given:
        given["schedule"] = None
    return replace(defaults, **given)


# Anchors per axis of DiffSeg's first merge. The paper's 16 is for a UNet's several grids aggregated; on one grid (a
# diffusion transformer's tokens) 8 recovers the segments best on synthetic attention with known segments (mIoU 0.75
# against 0.66 for 16 and 0.60 for 32, flat in τ from 0.9 to 1.5: `benchmarks/single_grid.py`).
NUM_POINTS, NUM_POINTS_SINGLE_GRID = 16, 8


def anchor_points(grids: int) -> int:
    """The default anchor grid for attention with `grids` grids."""
    return NUM_POINTS if grids > 1 else NUM_POINTS_SINGLE_GRID


@dataclass(frozen=True)
class SegmentConfig:
    """How attention becomes a label map (the method's steps 3-5)."""

    kl_threshold: float | tuple[float, ...] = 1.1  # paper: 1.1 on COCO-Stuff-27 (0.9 on Cityscapes)
    iterations: int = 3  # benchmarks.ipynb: `KL_THRESHOLD = [1.1]*3`
    # None: the paper's 16×16 anchor grid (`NUM_POINTS = 16`) on a UNet's several grids; 8×8 on a diffusion
    # transformer's single grid (`anchor_points`).
    num_points: int | None = None
    refine: bool = False  # paper's tables: no K-means refinement (`REFINEMENT = False`)
    # Reference `mask_merge` runs the first iteration in float16: maps with values that underflow it (common for
    # peaked attention) join no proposal and their anchors give none. True reproduces that, as the paper's numbers
    # did; False merges every map in float32 (log(0) guarded).
    reference_float16: bool = True
    output_size: tuple[int, int] = (512, 512)  # reference: label maps at 512×512 (`segment_attention`'s default)
    # None: proportional to the grid's side, normalised over those present (reference `get_weight_rato`). Keys are
    # grids: (h, w), "HxW", or a side r for r×r.
    resolution_weights: Mapping[object, float] | str | None = field(default=None)  # or a preset's name

    def __post_init__(self) -> None:  # validated once, where the settings are made
        if any(not math.isfinite(t) for t in self.thresholds()):
            raise ValueError(f"`kl_threshold` must be finite but is {self.kl_threshold}.")
        points = self.num_points
        if points is not None and (isinstance(points, bool) or not isinstance(points, int) or points < 2):
            raise ValueError(f"`num_points` must be an integer of at least 2 but is {self.num_points!r}.")

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


VOTING = ("majority", "mean")  # each pixel votes for its best word (the mode wins), or the best mean score
SEGMENT_FROM = ("unconditional", "conditional")  # with words: the UNet pass the self-attention comes from


@dataclass(frozen=True)
class NamingConfig:
    """How segments are named from a vocabulary's cross-attention (the paper's experimental extension)."""

    voting: str = "majority"  # reference `get_semantics` (ours is the mode of the votes; see `semantic`)
    min_confidence: float = 0.0  # every segment gets a word
    segment_from: str = "unconditional"  # segments from the unconditional pass: naming never changes them

    def __post_init__(self) -> None:  # validated once, where the settings are made
        if self.voting not in VOTING:
            raise ValueError(f"`voting` must be one of {VOTING} but is {self.voting!r}.")
        value = self.min_confidence
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
            raise ValueError(f"`min_confidence` must lie in [0, 1] (a share of votes or of scores) but is {value!r}.")
        if self.segment_from not in SEGMENT_FROM:
            raise ValueError(f"`segment_from` must be one of {SEGMENT_FROM} but is {self.segment_from!r}.")


# Stable Diffusion's training noise schedule (SD 1.x, 2.x and SDXL share it), for checkpoints without a scheduler.
NOISE_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


@dataclass(frozen=True)
class DiffCutConfig:
    """How one UNet layer's tokens become a label map (DiffCut, Couairon et al., NeurIPS 2024).

    Reference: `eval_diffcut.py` and `diffcut/recursive_normalized_cut.py` (PaulCouairon/DiffCut).
    """

    tau: float = 0.5  # `--tau 0.5`: a cut is accepted while its normalised-cut cost is below τ
    alpha: float = 10  # `--alpha 10`: exponent of the min-max normalised cosine affinity
    output_size: tuple[int, int] = (128, 128)  # `generate_masks(..., mask_size=(128, 128))`, where it is scored
    pamr: bool = False  # `--refinement` off by default: PAMR (10 iterations, dilations 1, 2, 4, 8) + 3×3 median

    def __post_init__(self) -> None:  # validated once, where the settings are made
        for name in ("tau", "alpha"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a positive number but is {value!r}.")


@dataclass(frozen=True)
class Seg4DiffConfig:
    """How an SD3 block's image-to-text attention becomes a label map (Seg4Diff, Kim et al., NeurIPS 2025).

    Reference: `seg4diff/seg4diff_model_unsup.py` (cvlab-kaist/Seg4Diff): `att2mask`, `mask_merge`, `KL`.
    """

    kl_threshold: float = 0.1  # `self.kl_threshold = 0.1`, set in the model (the yaml's KL_THRESHOLD is not read)
    power: float = 1.0  # `OUTPUT_POWER: 1.0` in `eval_unsup.yaml`: maps raised to it after min-max normalisation

    def __post_init__(self) -> None:  # validated once, where the settings are made
        for name in ("kl_threshold", "power"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a positive number but is {value!r}.")


@dataclass(frozen=True)
class ConceptConfig:
    """How concept maps become a label map: each pixel takes its most probable concept (the maps' argmax, as the
    references' segmentation). Nothing to set: the concepts themselves are the job's words."""


@dataclass(frozen=True)
class AppConfig:
    """Limits of the interactive demo (`diffseg app`)."""

    max_upload_mb: float = 20.0  # larger uploads are refused by the server
    max_pixels: int = 40_000_000  # larger images are refused with a message (decoding alone would take seconds)
    cache_size: int = 4  # attention bundles kept in the LRU: about 90 MB each for SD 1.x at 512²


# Named weightings of the attention grids, for the demo and the CLI (`--resolution-preset`): weights by rank,
# finest grid first, so one preset fits every model and aspect ratio (SD 1.x at 512²: 64, 32, 16, 8; SDXL at 1024²:
# 64, 32). "proportional" is None: the paper's default, computed over the grids present. A preset applies to a model
# when it weighs one of its grids (`preset_weights`).
RESOLUTION_PRESETS: dict[str, tuple[float, ...] | None] = {
    "proportional": None,
    "finest": (1.0,),
    "two finest": (2 / 3, 1 / 3),
    "second": (0.0, 1.0),
    "third and fourth": (0.0, 0.0, 2 / 3, 1 / 3),
    "equal": (1.0, 1.0, 1.0, 1.0),
}


def preset_weights(name: str, grids: Sequence) -> dict | None:
    """A preset's weights for `grids` (finest first); None for "proportional".

    Raises:
        ValueError: unknown preset, or one that weighs none of these grids.
    """
    if name not in RESOLUTION_PRESETS:
        raise ValueError(f"Unknown resolution preset {name!r}; choose one of {sorted(RESOLUTION_PRESETS)}.")
    ranks = RESOLUTION_PRESETS[name]
    if ranks is None:
        return None
    weights = {tuple(g): (ranks[i] if i < len(ranks) else 0.0) for i, g in enumerate(grids)}
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"Resolution preset {name!r} weighs none of this model's {len(grids)} attention grids.")
    return weights
