"""Diffusion transformers as backbones: Stable Diffusion 3 / 3.5 (MM-DiT) and Flux.1.

What the UNet families' `families` module is for SD 1.x/2.x/SDXL, this is for the transformers: detection from the
checkpoint's configs, loading, the empty prompt's conditioning (computed once per checkpoint and cached, so the
4.7 B-parameter T5-XXL is not loaded again), the flow-matching latent at a timestep, and the transformer's inputs.

| family | transformer             | text encoders (empty prompt)           | conditioning                            |
|--------|-------------------------|----------------------------------------|-----------------------------------------|
| sd3    | SD3Transformer2DModel   | CLIP-L, CLIP-bigG (`_2`), T5 (`_3`)    | [CLIP-L‖bigG penultimate, padded; T5]   |
|        |                         |                                        | tokens (77 + 256); both CLIPs' pooled   |
| flux   | FluxTransformer2DModel  | CLIP-L (pooled), T5 (`_2`)             | T5 tokens (512 dev, 256 schnell); CLIP  |
|        |                         |                                        | pooled; text ids zero; dev: guidance    |

Timesteps keep SD's meaning on every family: `timestep` t of 0…999 is the point t/1000 of the scheduler's
training-time axis, and the noise level is the scheduler's own sigma there, its shift applied (SD3: σ = 3u/(1 + 2u);
Flux.1-dev: the resolution-dependent exponential shift of its pipeline, from the image's token count): exactly the
sigma at which diffusers' sampler calls the transformer with timestep 1000·σ.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .joint_capture import FluxJointCaptureProcessor, SD3JointCaptureProcessor
from .types import CLIP_TEXT_ATTENTION, CONCEPT_MAPS, FEATURES, SELF_ATTENTION, Backbone, Conditioning, Geometry

# Per family: the transformer class, its pipeline (whose `encode_prompt` makes the conditioning), latent channels
# the transformer takes (a variant with more is Fill / Depth / Canny), text encoders and tokenizers with their
# transformers classes, the text length (the pipelines' `max_sequence_length` defaults; Flux.1-schnell was
# trained with 256), what it gives beyond every transformer, its attention-capture processor, and the concept maps'
# text encoders and pooled vector.
DIT_FAMILIES: dict[str, dict] = {
    "sd3": {
        "transformer": "SD3Transformer2DModel",
        "pipeline": "StableDiffusion3Pipeline",
        "in_channels": 16,
        "text_encoders": ("text_encoder", "text_encoder_2", "text_encoder_3"),
        "tokenizers": ("tokenizer", "tokenizer_2", "tokenizer_3"),
        "encoder_classes": ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"),
        "tokenizer_classes": ("CLIPTokenizer", "CLIPTokenizer", "T5TokenizerFast"),
        "text_tokens": 256,
        "capabilities": frozenset({CLIP_TEXT_ATTENTION}),  # its joint blocks attend over CLIP's 77 tokens (Seg4Diff)
        "capture": SD3JointCaptureProcessor,
        "concept_encoders": ("text_encoder", "text_encoder_2"),  # both CLIPs (ConceptAttention's SD3 `encode_concepts`)
        "concept_pooled": True,  # the concept step keeps the empty prompt's pooled vector
    },
    "flux": {
        "transformer": "FluxTransformer2DModel",
        "pipeline": "FluxPipeline",
        "in_channels": 64,
        "text_encoders": ("text_encoder", "text_encoder_2"),
        "tokenizers": ("tokenizer", "tokenizer_2"),
        "encoder_classes": ("CLIPTextModel", "T5EncoderModel"),
        "tokenizer_classes": ("CLIPTokenizer", "T5TokenizerFast"),
        "text_tokens": 512,
        "capabilities": frozenset(),
        "capture": FluxJointCaptureProcessor,
        "concept_encoders": ("text_encoder_2",),  # T5 (ConceptAttention's Flux `embed_concepts`)
        "concept_pooled": False,  # reference `encode_image`: y = zeros (`embed_concepts`' vec), guidance 0
    },
}
# What every diffusion transformer gives the methods: its joint blocks' image-to-image attention (one grid), a
# block's image tokens, and concept maps (ConceptAttention); a family's row may add more.
TRANSFORMER_CAPABILITIES = frozenset({SELF_ATTENTION, FEATURES, CONCEPT_MAPS})
# Flux.1-dev's guidance embedding: its pipeline's default guidance scale (FluxPipeline.__call__).
FLUX_GUIDANCE = 3.5


def detect_transformer(config: Mapping, index: Mapping | None = None) -> Backbone:
    """The family of a transformer config (a diffusers `transformer/config.json`), or a one-line error.

    SD3 family: `SD3Transformer2DModel` (SD3-medium; SD3.5-medium: `dual_attention_layers`; SD3.5-large and
    -large-turbo: 38 layers). Flux: `FluxTransformer2DModel` (dev: `guidance_embeds`; schnell without). Names change
    nothing but messages and the text length (schnell: 256 tokens). `index`, the checkpoint's `model_index.json`,
    refuses a ControlNet pipeline.
    """
    kind = config.get("_class_name", "")
    family = next((f for f, facts in DIT_FAMILIES.items() if facts["transformer"] == kind), None)
    if family is None:
        raise ValueError(
            f"The checkpoint's transformer is a {kind or 'model of unknown class'}; diffseg reads SD3 / SD3.5 "
            "(SD3Transformer2DModel) and Flux.1 (FluxTransformer2DModel) transformers."
        )
    if index and index.get("controlnet"):
        raise ValueError("The checkpoint is a ControlNet pipeline; diffseg needs the plain text-to-image checkpoint.")
    expected, channels = DIT_FAMILIES[family]["in_channels"], config.get("in_channels")
    if channels != expected:
        raise ValueError(
            f"The checkpoint's transformer takes {channels} input channels (an inpainting, Fill, Depth or Canny "
            f"variant); diffseg needs the text-to-image {kind} ({expected} channels)."
        )
    facts = DIT_FAMILIES[family]
    if family == "sd3":
        layers = config.get("num_layers", 24)
        name = (
            "SD3.5-large" if layers >= 38 else "SD3.5-medium" if config.get("dual_attention_layers") else "SD3-medium"
        )
        native = int(config.get("sample_size", 128)) * 8
        tokens = facts["text_tokens"]
        # DiffCut's block: 9 of SD3-medium's 24 (Seg4Diff's semantic-grouping layer), the same depth elsewhere.
        block = round(9 * layers / 24)
        depth = layers
    else:
        dev = bool(config.get("guidance_embeds"))
        name = "Flux.1-dev" if dev else "Flux.1-schnell"
        native = 1024
        tokens = facts["text_tokens"] if dev else 256
        # DiffCut's block: the last double-stream block, the deepest whose image tokens have weights of their own
        # (the analogue of the UNet's deepest encoder layer that DiffCut's reference reads).
        block = config.get("num_layers", 19) - 1
        depth = config.get("num_layers", 19) + config.get("num_single_layers", 38)
    patch = config.get("patch_size", 2) if family == "sd3" else 2  # Flux packs 2×2 latent patches into a token
    # SD3's learned positional embedding is cropped from a `pos_embed_max_size`² table: no side may pass it (diffusers
    # `PatchEmbed.cropped_pos_embed`). Flux's RoPE and an SD3 without the table take any size.
    reach = config.get("pos_embed_max_size") if family == "sd3" else None
    geometry = Geometry(
        name,
        native_size=native,
        size_multiple=8 * patch,
        grid_sides=(native // (8 * patch),),
        max_side=None if reach is None else int(reach) * 8 * patch,
    )
    return Backbone(
        family,
        name,
        geometry,
        text_encoders=facts["text_encoders"],
        tokenizers=facts["tokenizers"],
        diffcut_block=block,
        prediction_type="flow",
        denoiser="transformer",
        text_tokens=tokens,
        depth=depth,
        joint_depth=config.get("num_layers", 24 if family == "sd3" else 19),
        capabilities=TRANSFORMER_CAPABILITIES | facts["capabilities"],
    )


# ---------------------------------------------------------------------------------------------- conditioning


def encode_empty_prompt(
    backbone: Backbone, encoders: Mapping[str, object], device: torch.device, transformer=None
) -> Conditioning:
    """The empty prompt's conditioning, by the family's own diffusers pipeline (`encode_prompt`, no guidance).

    `encoders` maps component names to the loaded text encoders and tokenizers; SD3 without `text_encoder_3` gets
    zeros in T5's place, as diffusers does (their width is the `transformer`'s `joint_attention_dim`: pass it).
    """
    import diffusers

    with quiet():
        pipeline = getattr(diffusers, DIT_FAMILIES[backbone.family]["pipeline"])
    names = (*backbone.text_encoders, *backbone.tokenizers)
    pipe = pipeline(transformer=transformer, vae=None, scheduler=None, **{n: encoders.get(n) for n in names})
    with torch.inference_mode():
        if backbone.family == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(
                "", None, None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=backbone.text_tokens,
            )  # fmt: skip
        else:
            hidden, pooled, _ = pipe.encode_prompt("", None, device=device, max_sequence_length=backbone.text_tokens)
    return Conditioning(hidden, pooled)


# ---------------------------------------------------------------------------------------------- one step


def sigma(backbone: Backbone, scheduler, timestep: int, tokens: int) -> float:
    """The noise level σ ∈ [0, 1] at `timestep` (0…num_train_timesteps−1) for an image of `tokens` image tokens.

    The scheduler's own mapping (diffusers `FlowMatchEulerDiscreteScheduler`): u = t / N on the training-time axis,
    then its shift, static (σ = s·u / (1 + (s − 1)·u), SD3's s = 3) or, with `use_dynamic_shifting` (Flux.1-dev),
    `time_shift(μ, 1, u)` with μ from the image's token count (FluxPipeline's `calculate_shift`).
    """
    config = scheduler.config
    u = timestep / config.num_train_timesteps
    if u <= 0:
        return 0.0
    if config.get("use_dynamic_shifting", False):
        return float(scheduler.time_shift(_shift(config, tokens), 1.0, torch.tensor(u)))
    shift = config.get("shift", 1.0)
    return shift * u / (1 + (shift - 1) * u)


def _shift(config, tokens: int) -> float:
    """μ of Flux's resolution-dependent shift for `tokens` image tokens (FluxPipeline's `calculate_shift`)."""
    with quiet():
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def schedule_sigma(scheduler, steps: int, from_end: int, *, family: str = "sd3", tokens: int = 4096) -> float:
    """σ at `timesteps[-from_end]` of the family's `steps`-step inference schedule, as its diffusers pipeline sets it.

    SD3: the scheduler's `set_timesteps(steps)`: where Seg4Diff's `prepare_latent` puts the noise
    (`scheduler.scale_noise(latent, scheduler.timesteps[-noise_steps], noise)`); SD3-medium, 28 steps, 8th from the
    end: σ = 0.5151. Flux: `FluxPipeline`'s σ = linspace(1, 1/steps, steps), shifted for `tokens` image tokens
    (dev; schnell has no shift): ConceptAttention's `get_schedule(4)[2]` is σ = 0.5 on schnell."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    copy = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    if family == "flux":
        copy.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=_shift(scheduler.config, tokens))
    else:
        copy.set_timesteps(steps)
    return float(copy.sigmas[len(copy.timesteps) - from_end])


# Seg4Diff reads the image queries' attention over the first 77 text keys (`attn_scores[:, :, :4096, 4096:4096+77]`):
# the CLIP half of SD3's empty-prompt conditioning, whose T5 half is 77 zeros (`text_encoder_3=None`).
SEG4DIFF_TEXT_TOKENS = 77


def seg4diff_conditioning(conditioning: Conditioning) -> Conditioning:
    """Seg4Diff's conditioning from SD3's empty-prompt conditioning: its 77 CLIP tokens, then 77 zeros in T5's place
    (the reference builds `StableDiffusion3Pipeline` with `text_encoder_3=None`, whose T5 embeddings are zeros of
    the tokenizer's 77 tokens), and the same pooled CLIP embedding."""
    clip = conditioning.hidden[:, :SEG4DIFF_TEXT_TOKENS]
    return Conditioning(torch.cat([clip, torch.zeros_like(clip)], dim=1), conditioning.pooled)


def seg4diff_block(backbone: Backbone) -> int:
    """Seg4Diff's block: `ATTENTION_LAYERS: [9]` of SD3-medium's 24, at the same depth in others (the block DiffCut
    reads on SD3 is this one)."""
    return backbone.diffcut_block


def latents(vae, pixels: torch.Tensor, level: float, noise_seed: int | None) -> torch.Tensor:
    """The flow-matching latent x_σ = (1 − σ)·x₀ + σ·ε (diffusers `FlowMatchEulerDiscreteScheduler.scale_noise`),
    x₀ = (posterior mean − shift_factor) × scaling_factor (the SD3 / Flux pipelines' latent scaling; posterior mean,
    no sampling, as for the UNets). Without `noise_seed` the clean latent (DiffSeg's paper)."""
    config = vae.config
    mean = vae.encode(pixels).latent_dist.mean  # (B, 16, H/8, W/8)
    x0 = (mean - (config.get("shift_factor") or 0.0)) * config.scaling_factor
    if noise_seed is None:
        return x0
    generator_device = pixels.device if pixels.device.type == "cuda" else torch.device("cpu")
    generator = torch.Generator(device=generator_device).manual_seed(noise_seed)
    noise = torch.randn((1, *x0.shape[1:]), generator=generator, device=generator_device).to(x0.device)
    return (1 - level) * x0 + level * noise.expand_as(x0)


def transformer_inputs(
    backbone: Backbone, transformer, conditioning: Conditioning, x: torch.Tensor, level: float
) -> dict:
    """Keyword arguments of the transformer's forward for latents `x` (B, 16, h, w) at noise level `level`, as the
    family's pipeline passes them: SD3 timestep 1000·σ; Flux the 2×2-packed latent, its image ids (row, column per
    token, for RoPE), zero text ids, timestep σ (the model multiplies by 1000) and, for dev, the guidance."""
    batch, dtype = len(x), transformer.dtype
    text = conditioning.hidden.to(x.device, dtype).expand(batch, -1, -1)
    pooled = conditioning.pooled.to(x.device, dtype).expand(batch, -1)
    if backbone.family == "sd3":
        t = torch.full((batch,), 1000 * level, device=x.device, dtype=dtype)
        return {
            "hidden_states": x.to(dtype),
            "timestep": t,
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
        }
    with quiet():
        from diffusers import FluxPipeline

    _, channels, h, w = x.shape
    inputs = {
        "hidden_states": FluxPipeline._pack_latents(x.to(dtype), batch, channels, h, w),  # (B, h/2·w/2, 64)
        "timestep": torch.full((batch,), level, device=x.device, dtype=dtype),
        "encoder_hidden_states": text,
        "pooled_projections": pooled,
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, x.device, dtype),
        "txt_ids": torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
    }
    if transformer.config.get("guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), FLUX_GUIDANCE, device=x.device, dtype=torch.float32)
    return inputs


def blocks(transformer) -> list[torch.nn.Module]:
    """The transformer's blocks in the order the image passes them (Flux: double-stream, then single-stream)."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", ())]


def feature_block(backbone: Backbone, transformer, index: int | None = None) -> torch.nn.Module:
    """The block after which DiffCut reads the image tokens' hidden states (default `backbone.diffcut_block`)."""
    sequence = blocks(transformer)
    index = backbone.diffcut_block if index is None else index
    if not -len(sequence) <= index < len(sequence):
        raise ValueError(f"{backbone.name} has {len(sequence)} blocks; block {index} does not exist.")
    return sequence[index]


# ---------------------------------------------------------------------------------------------- loading


def load(model: str, backbone: Backbone, *, dtype: torch.dtype, local_files_only: bool, missing) -> dict[str, object]:
    """The transformer (in `dtype`), the VAE (float32) and the flow-matching scheduler of a checkpoint; text
    encoders load only through `load_text_encoders`, when the empty prompt's conditioning is not cached."""
    import diffusers

    loaders = {
        "transformer": (getattr(diffusers, DIT_FAMILIES[backbone.family]["transformer"]), {"torch_dtype": dtype}),
        "vae": (diffusers.AutoencoderKL, {"torch_dtype": torch.float32}),
        "scheduler": (diffusers.FlowMatchEulerDiscreteScheduler, {}),
    }
    components = {}
    for name, (loader, options) in loaders.items():
        try:
            components[name] = loader.from_pretrained(
                model, subfolder=name, local_files_only=local_files_only, **options
            )
        except (OSError, ValueError) as error:
            raise missing(name, error) from error
    return components


def load_text_encoders(
    model: str,
    backbone: Backbone,
    *,
    dtype: torch.dtype,
    local_files_only: bool,
    missing,
    only: tuple[str, ...] | None = None,
) -> dict[str, object]:
    """The family's text encoders and tokenizers (`only`: those text encoders, with their tokenizers). SD3 without
    `text_encoder_3/` (a checkpoint saved without T5) runs with zeros in its place, as diffusers does; every other
    component must be there."""
    import transformers

    facts = DIT_FAMILIES[backbone.family]
    folder = Path(model).expanduser()
    loaded: dict[str, object] = {}
    for encoder, tokenizer, encoder_class, tokenizer_class in zip(
        backbone.text_encoders, backbone.tokenizers, facts["encoder_classes"], facts["tokenizer_classes"]
    ):
        if only is not None and encoder not in only:
            continue
        if encoder == "text_encoder_3" and folder.is_dir() and not (folder / encoder).is_dir():
            continue  # SD3 saved without T5: zeros in its place
        try:
            loaded[encoder] = getattr(transformers, encoder_class).from_pretrained(
                model, subfolder=encoder, local_files_only=local_files_only, torch_dtype=dtype
            )
            loaded[tokenizer] = getattr(transformers, tokenizer_class).from_pretrained(
                model, subfolder=tokenizer, local_files_only=local_files_only
            )
        except (OSError, ValueError) as error:
            raise missing(encoder, error) from error
    return loaded


@contextmanager
def quiet() -> Iterator[None]:
    """Without transformers' notices about optional image backends, printed when diffusers' pipelines import."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


def checkpoint_files(model: str, names: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime) of every file in the named component folders of a local checkpoint: what the
    conditioning cache keys a local folder by, so that replaced weights are never taken for the cached ones."""
    folder = Path(model).expanduser().resolve()
    files = []
    for name in names:
        for path in sorted((folder / name).rglob("*")) if (folder / name).is_dir() else ():
            if path.is_file():
                stat = path.stat()
                files.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return files


def hub_revision(config_path: str | os.PathLike) -> str:
    """The commit of a hub checkpoint, from the cached path of one of its files (…/snapshots/COMMIT/…)."""
    parts = Path(config_path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else ""


def token_count(size: tuple[int, int], backbone: Backbone) -> int:
    """Image tokens of an input of `size` (H, W) pixels."""
    return math.prod(side // backbone.size_multiple for side in size)
