"""The DiffSeg pipeline: Stable Diffusion components in, attention bundles and label maps out.

pipe = DiffSegPipeline.from_pretrained()           # CompVis/stable-diffusion-v1-4, or a local folder
result = pipe("photo.jpg")                          # encode + segment
bundle = pipe.encode("photo.jpg")                   # the expensive step, once
coarse = pipe.segment(bundle, kl_threshold=1.3)     # the cheap step, as often as you like
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .bundle import AttentionBundle
from .capture import capture_attention
from .config import DEFAULT_MODEL, EncodeConfig, SegmentConfig
from .images import as_array, crop as crop_image, to_model_input
from .segment import segment_attention
from .semantic import SegmentLabel, Vocabulary, assign_labels, build_vocabulary, word_scores
from .visualisation import overlay

_ENCODE = EncodeConfig()
_SEGMENT = SegmentConfig()
_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

ImageLike = Image.Image | np.ndarray | str | os.PathLike


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


def segment_bundle(
    bundle: AttentionBundle,
    *,
    kl_threshold: float | Sequence[float] = _SEGMENT.kl_threshold,
    iterations: int = _SEGMENT.iterations,
    num_points: int = _SEGMENT.num_points,
    refine: bool = _SEGMENT.refine,
    resolution_weights: Mapping[int, float] | None = _SEGMENT.resolution_weights,
    output_size: tuple[int, int] | None = None,
    reference_float16: bool = _SEGMENT.reference_float16,
    voting: str = "majority",
    min_confidence: float = 0.0,
) -> Segmentation:
    """Segment a bundle (see `segment_attention`); labels at the image's size unless `output_size` is given.

    A bundle encoded with labels also gets its segments named (`semantic.assign_labels`, with `voting` and
    `min_confidence`); naming never changes the label map.
    """
    size = tuple(output_size) if output_size is not None else bundle.image_size
    labels = segment_attention(
        bundle.attention,
        kl_threshold=kl_threshold,
        iterations=iterations,
        num_points=num_points,
        refine=refine,
        resolution_weights=resolution_weights,
        output_size=size,
        reference_float16=reference_float16,
    )
    names = None
    if bundle.cross_attention is not None and bundle.vocabulary is not None:
        scores = word_scores(bundle.cross_attention, bundle.vocabulary)
        names = assign_labels(labels, scores, bundle.vocabulary.words, voting=voting, min_confidence=min_confidence)
    image = bundle.image
    if image.shape[:2] != size:
        image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))
    return Segmentation(labels=labels, num_segments=int(labels.max()) + 1, image=image, names=names)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto" picks CUDA, then Apple's MPS, then the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto" is float16 on a GPU and float32 on the CPU; names like "bfloat16" are accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise ValueError(f"`dtype` must be 'auto' or one of {sorted(choices)} but is {dtype!r}.")
    return choices[dtype]


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a frozen module to `device` and `dtype` (casting only when needed: diffusers warns on every cast)."""
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.to(device).eval().requires_grad_(False)


def _check_local_checkpoint(model: str) -> None:
    """Fail early, naming what is missing, when `model` is meant as a local folder."""
    path = Path(model).expanduser()
    if path.is_dir():
        missing = [name for name in _COMPONENTS if not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"Model folder `{model}` lacks {', '.join(f'{m}/' for m in missing)}. DiffSeg needs a diffusers-format "
                "Stable Diffusion checkpoint with unet/, vae/, text_encoder/ and tokenizer/ subfolders."
            )
    elif not _HUB_ID.match(model):
        raise FileNotFoundError(
            f"Model folder `{model}` does not exist. Pass a diffusers-format Stable Diffusion folder (with unet/, "
            f"vae/, text_encoder/, tokenizer/) or a hub id such as {DEFAULT_MODEL!r}."
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (assumed so behind a proxy, which we cannot probe).

    Without this, an offline machine spends a minute in the hub client's retries before failing.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_error(model: str, component: str, error: Exception, offline: bool) -> OSError:
    reason = "the Hugging Face hub cannot be reached and it is not in the local cache" if offline else str(error)
    return FileNotFoundError(
        f"Could not load `{component}` of the Stable Diffusion checkpoint {model!r}: {reason}\n"
        "DiffSeg needs a diffusers-format Stable Diffusion 1.x/2.x checkpoint. Without access to the Hugging Face "
        f"hub, download it on a machine that has it (for example `hf download {DEFAULT_MODEL} --local-dir sd-v1-4`), "
        "copy the folder here and pass its path: `diffseg segment ... --model ./sd-v1-4` or "
        "`DiffSegPipeline.from_pretrained('./sd-v1-4')`."
    )


class DiffSegPipeline:
    """Frozen Stable Diffusion components that turn images into attention bundles and label maps.

    The UNet and text encoder run in `dtype`; the VAE stays in float32 (its encoder overflows in float16).
    """

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler=None,
        *,
        model: str = "",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.unet = _place(unet, self.device, self.dtype)
        # channels-last convolutions: the VAE encoder is the larger half of an encode on a CPU (15 % faster there).
        self.vae = _place(vae, self.device, torch.float32).to(memory_format=torch.channels_last)
        self.text_encoder = _place(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.model = model
        self._prompt_embeddings: dict[str, torch.Tensor] = {}
        # Capture swaps the UNet's processors for the length of a forward: one encode at a time per pipeline.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        local_files_only: bool = False,
    ) -> DiffSegPipeline:
        """Load a diffusers-format Stable Diffusion 1.x/2.x checkpoint: a hub id or a local folder.

        Raises:
            FileNotFoundError: the folder or a component is missing, or the hub cannot be reached; the message says
                how to pass a local folder instead.
        """
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        model = str(model)
        _check_local_checkpoint(model)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        offline = False
        if not Path(model).expanduser().is_dir() and not local_files_only and not _hub_reachable():
            local_files_only = offline = True  # the hub cache may still hold it
        loaded = {}
        for name, loader, options in (
            ("unet", UNet2DConditionModel, {"torch_dtype": dtype}),
            ("vae", AutoencoderKL, {"torch_dtype": torch.float32}),
            ("text_encoder", CLIPTextModel, {}),
            ("tokenizer", CLIPTokenizer, {}),
        ):
            try:
                loaded[name] = loader.from_pretrained(
                    model, subfolder=name, local_files_only=local_files_only, **options
                )
            except (OSError, ValueError) as error:  # hub errors subclass OSError
                raise _load_error(model, name, error, offline) from error
        try:
            scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=local_files_only)
        except (OSError, ValueError):
            scheduler = None  # only needed to add noise; Stable Diffusion's schedule is used then
        return cls(**loaded, scheduler=scheduler, model=model, device=device, dtype=dtype)

    # ------------------------------------------------------------------ encode: the expensive step

    @torch.inference_mode()
    def prompt_embedding(self, prompt: str | Vocabulary = _ENCODE.prompt) -> torch.Tensor:
        """(1, 77, C) text conditioning; the empty prompt's by default (reference `_UNCONDITIONAL_TOKENS`), or a
        vocabulary's prompt (its token ids as built by `semantic.build_vocabulary`)."""
        key = prompt.input_ids if isinstance(prompt, Vocabulary) else prompt
        if key not in self._prompt_embeddings:
            if isinstance(prompt, Vocabulary):
                ids = torch.tensor([prompt.input_ids])
            else:
                ids = self.tokenizer(
                    prompt,
                    padding="max_length",
                    max_length=self.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
            self._prompt_embeddings[key] = self.text_encoder(ids.to(self.device))[0]
        return self._prompt_embeddings[key]

    def vocabulary(self, words: Sequence[str] | str) -> Vocabulary:
        """A `Vocabulary` for `words` with this pipeline's tokenizer (see `semantic.build_vocabulary`)."""
        return build_vocabulary(words, self.tokenizer)

    def _noise_schedule(self):
        if self.scheduler is not None:
            return self.scheduler
        from diffusers import DDPMScheduler

        # Stable Diffusion 1.x/2.x training schedule.
        return DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
        )

    @torch.inference_mode()
    def encode(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        timestep: int = _ENCODE.timestep,
        crop: str | None = _ENCODE.crop,
        resolution: int = _ENCODE.resolution,
        noise_seed: int | None = _ENCODE.noise_seed,
        labels: Sequence[str] | str | None = None,
        segment_from: str = "unconditional",
    ) -> AttentionBundle | list[AttentionBundle]:
        """Run the VAE and one UNet step; capture self-attention at every resolution.

        Args:
            images: one image or a list (Pillow, (H, W, 3) uint8 array, or path); a list goes through the UNet as
                one batch.
            timestep: UNet timestep (paper: 300).
            crop: None to resize the whole image, "center" to take the central square first (the benchmarks').
            resolution: side the image is resized to (paper: 512; a multiple of 64).
            noise_seed: None feeds the clean latent, as the paper does; an int adds seeded noise for `timestep`.
            labels: words to name segments with (a list or a comma-separated string). The UNet then also runs
                conditioned on a prompt of these words, in the same batch, and its cross-attention is captured.
            segment_from: with `labels`, which pass the self-attention comes from: "unconditional" (default; the
                segments are exactly those without labels) or "conditional" (text changes the self-attention too).

        Returns:
            An `AttentionBundle` per image (a list for a list).
        """
        single = isinstance(images, (Image.Image, np.ndarray, str, os.PathLike))
        batch = [images] if single else list(images)
        if not batch:
            raise ValueError("`images` is empty; pass at least one image.")
        if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 <= timestep < 1000:
            raise ValueError(f"`timestep` must be an integer in [0, 999] but is {timestep!r}.")
        if resolution % 64 or resolution < 64:
            raise ValueError(f"`resolution` must be a positive multiple of 64 but is {resolution}.")

        # 1. Decode and crop: the region encoded is also what the labels will cover.
        arrays = [crop_image(as_array(image), crop) for image in batch]
        # 2. Resize and scale to [-1, 1], as the reference's data loaders.
        pixels = to_model_input(arrays, resolution)
        # 3-4. VAE and one UNet step with self-attention (and, for labels, cross-attention) captured.
        vocabulary = self.vocabulary(labels) if labels is not None else None
        maps, layers, cross = self.attend(
            pixels, timestep=timestep, noise_seed=noise_seed, vocabulary=vocabulary, segment_from=segment_from
        )

        bundles = [
            AttentionBundle(
                attention={r: m[i].cpu() for r, m in maps.items()},
                image=arrays[i],
                timestep=timestep,
                model=self.model,
                layers=layers,
                cross_attention=None if cross is None else {r: m[i].cpu() for r, m in cross.items()},
                vocabulary=vocabulary,
            )
            for i in range(len(batch))
        ]
        return bundles[0] if single else bundles

    @torch.inference_mode()
    def attend(
        self,
        pixels: torch.Tensor,
        *,
        timestep: int = _ENCODE.timestep,
        noise_seed: int | None = _ENCODE.noise_seed,
        vocabulary: Vocabulary | None = None,
        segment_from: str = "unconditional",
    ) -> tuple[dict[int, torch.Tensor], dict[int, int], dict[int, torch.Tensor] | None]:
        """VAE and one UNet step on a prepared batch (see `images.to_model_input`), attention captured.

        Args:
            pixels: (B, 3, R, R) float32 in [-1, 1].
            vocabulary: words to name segments with: the batch then runs twice through the UNet in one call,
                unconditional (empty prompt) and conditioned on the words' prompt, and the conditional half's
                cross-attention is captured.
            segment_from: with a vocabulary, the half the self-attention comes from ("unconditional" or
                "conditional").

        Returns:
            (maps, layers, cross): r -> (B, r², r²) head- and layer-averaged self-attention; r -> number of
            self-attention layers averaged; r -> (B, r², T) cross-attention over the prompt's T tokens (None
            without a vocabulary). Tensors are on the pipeline's device.
        """
        if segment_from not in ("unconditional", "conditional"):
            raise ValueError(f"`segment_from` must be 'unconditional' or 'conditional' but is {segment_from!r}.")
        batch = len(pixels)
        pixels = pixels.to(self.device, torch.float32, memory_format=torch.channels_last)
        # VAE: posterior mean × scaling factor (reference: the encoder's last layer, no sampling).
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        latents = latents.to(self.dtype)
        t = torch.full((batch,), timestep, device=self.device, dtype=torch.long)
        if noise_seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(noise_seed)
            noise = torch.randn(latents.shape, generator=generator).to(self.device, self.dtype)
            latents = self._noise_schedule().add_noise(latents, noise, t)
        # One UNet step conditioned on the empty prompt; with a vocabulary, the conditional copies in the same batch.
        text = self.prompt_embedding().expand(batch, -1, -1)
        if vocabulary is not None:
            latents, t = torch.cat([latents, latents]), torch.cat([t, t])
            text = torch.cat([text, self.prompt_embedding(vocabulary).expand(batch, -1, -1)])
        with self._lock, capture_attention(self.unet, cross=vocabulary is not None) as store:
            self.unet(latents, t, encoder_hidden_states=text)
        maps = store.maps()
        if vocabulary is None:
            return maps, store.layers, None
        half = slice(0, batch) if segment_from == "unconditional" else slice(batch, 2 * batch)
        cross = {r: m[batch:] for r, m in store.maps("cross").items()}
        return {r: m[half] for r, m in maps.items()}, store.layers, cross

    # ------------------------------------------------------------------ segment: the cheap step

    def segment(self, bundle: AttentionBundle, **kwargs) -> Segmentation:
        """Segment a bundle; see `segment_bundle`. Needs no model: a loaded bundle works as well. On a GPU pipeline
        the merging runs on the GPU."""
        if self.device.type == "cuda":
            bundle = dataclasses.replace(bundle, attention={r: t.to(self.device) for r, t in bundle.attention.items()})
        return segment_bundle(bundle, **kwargs)

    def __call__(
        self,
        image: ImageLike,
        *,
        timestep: int = _ENCODE.timestep,
        crop: str | None = _ENCODE.crop,
        **segment_kwargs,
    ) -> Segmentation:
        """Encode and segment one image."""
        return self.segment(self.encode(image, timestep=timestep, crop=crop), **segment_kwargs)
