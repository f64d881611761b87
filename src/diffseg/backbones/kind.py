"""The seam between the pipeline and a kind of denoiser: what every method asks of a UNet or an MM-DiT transformer.

A kind is one object per loaded checkpoint holding its modules, and answering the same few questions whatever it is:
its conditioning (`prompt_embedding`), one step's inputs (`step_inputs`: latents, noise, timestep), the captures the
methods read (`attend`, `features`, `text_attention`, `concept_maps`), and the words it can take (`vocabulary`,
`check_concepts`). Its facts before loading (geometry, blocks, capabilities) are the `Backbone`'s. Two
implementations: `unet.UNetKind` and `transformer.TransformerKind`; `KINDS` picks one by `Backbone.denoiser`, so the
pipeline composes and never asks which it holds. Families within a kind are rows of its tables.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..words import Vocabulary
from .types import Backbone, Conditioning


class DenoiserKind:
    """What the UNet and the transformer share: their modules, device and dtype, the VAE's clean latent, the noise
    schedule, a cache of prompt conditionings and the lock that keeps one capturing forward at a time.

    Attributes:
        backbone: the checkpoint's facts (`Backbone`).
        denoiser: the UNet or transformer module.
        vae: the VAE, in float32.
        scheduler: the checkpoint's scheduler (its noise schedule), or None.
        text: component name -> text encoder or tokenizer ("text_encoder", "tokenizer", "text_encoder_2", ...).
        model: the checkpoint (hub id or folder), to load what is needed later (a transformer's word encoders).
        conditioning: the empty prompt's conditioning where it was computed before (a transformer's, cached).
    """

    def __init__(
        self,
        backbone: Backbone,
        denoiser: torch.nn.Module,
        vae: torch.nn.Module,
        scheduler,
        text: dict[str, object],
        *,
        device: torch.device,
        dtype: torch.dtype,
        model: str = "",
        conditioning: Conditioning | None = None,
    ) -> None:
        self.backbone = backbone
        self.denoiser = denoiser
        self.vae = vae
        self.scheduler = scheduler
        self.text = text
        self.device, self.dtype, self.model = device, dtype, model
        self._conditioning: dict[object, Conditioning] = {}
        if conditioning is not None:  # the empty prompt's, as the checkpoint's cache had it
            pooled = None if conditioning.pooled is None else conditioning.pooled.to(device, dtype)
            self._conditioning[""] = Conditioning(conditioning.hidden.to(device, dtype), pooled)
        # Capture swaps processors or hooks a layer for one forward: one denoiser step at a time.
        self.lock = threading.Lock()

    label = "denoiser"  # what progress messages call it ("UNet", "transformer")
    # The modules by their diffusers names (`pipeline.unet` is None on a transformer and the other way round).
    unet: torch.nn.Module | None = None
    transformer: torch.nn.Module | None = None

    def clean_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mean of (B, 3, H, W) pixels in [-1, 1] (the references' latent: no sampling), float32.

        Contiguous layout: PyTorch's channels-last GroupNorm on the CPU loses float32 accuracy where activations have
        a large mean (the VAE encoder's output 7e-5 from a float64 recomputation, against 1.5e-6 contiguous)."""
        pixels = pixels.to(self.device, torch.float32)
        return self.vae.encode(pixels).latent_dist.mean  # (B, C, H/8, W/8)

    def check_blocks(self, blocks: tuple[int, int] | None, *, joint: bool = False) -> range | None:
        """`Backbone.check_blocks`: the block range `blocks` names on this model, or None for the default."""
        return self.backbone.check_blocks(blocks, joint=joint)

    # ------------------------------------------------------------------ what each kind answers

    def prompt_embedding(self, prompt: str | Vocabulary = "") -> Conditioning:
        """The conditioning of `prompt` (the empty prompt's by default), cached."""
        raise NotImplementedError

    def step_inputs(
        self,
        pixels: torch.Tensor,
        timestep: int,
        noise_seed: int | None,
        *,
        schedule: tuple[int, int] | None = None,
        conditioning: Conditioning | None = None,
    ) -> tuple[dict, tuple[int, int]]:
        """Keyword arguments of one denoiser forward on (B, 3, H, W) `pixels`, conditioned on the empty prompt (or on
        `conditioning`), and the (h, w) grid of its finest tokens."""
        raise NotImplementedError

    def vocabulary(self, words: Sequence[str] | str) -> Vocabulary:
        """A `Vocabulary` of `words` for naming segments within its own pass (a kind with `CROSS_ATTENTION_NAMING`)."""
        raise ValueError(
            f"Naming segments with words reads a UNet's cross-attention; {self.backbone.name} has none. Use an SD "
            "1.x/2.x or SDXL checkpoint to name segments."
        )

    def check_concepts(self, words: tuple[str, ...]) -> None:
        """Fail before any image when one of the concept `words` cannot be encoded."""
        raise NotImplementedError

    def text_attention(self, pixels: torch.Tensor, **settings) -> torch.Tensor:
        """(B, h, w, 77) image-to-CLIP-text attention of one joint block (a kind with `CLIP_TEXT_ATTENTION`)."""
        raise ValueError(f"{self.backbone.name} has no joint image-text attention over CLIP tokens to read.")


def concat_inputs(a: dict, b: dict) -> dict:
    """Two forward input dicts (tensors, and nested dicts of tensors) joined along the batch axis."""
    return {k: concat_inputs(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}
