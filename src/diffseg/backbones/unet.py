"""The UNet kind (SD 1.x, SD 2.x, the SDXL family): its conditioning, one step's inputs and what the methods capture.

| family | conditioning (`encode_prompt`)                                                     | forward's extra inputs |
|--------|------------------------------------------------------------------------------------|------------------------|
| sd1    | CLIP ViT-L's last hidden state                                                     | –                      |
| sd2    | OpenCLIP ViT-H's last hidden state (the converted encoder stops one early)         | –                      |
| sdxl   | both encoders' penultimate states concatenated; bigG's pooled text embedding       | pooled text, time ids  |

The family rows are `families.FAMILIES` (`text_time`: the SDXL family's added embedding).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import NOISE_SCHEDULE
from ..naming.vocabulary import build_vocabulary, word_scores
from ..words import Vocabulary
from .capture import capture_attention, capture_output, stop_after, token_grid
from .families import FAMILIES
from .kind import DenoiserKind, concat_inputs
from .types import Conditioning


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) token ids of `prompt`, padded to the encoder's context, as Stable Diffusion pipelines tokenise."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class UNetKind(DenoiserKind):
    """A Stable Diffusion UNet's answers to the methods (`kind.DenoiserKind`)."""

    label = "UNet"

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def _text_time(self) -> bool:
        return FAMILIES[self.backbone.family].get("text_time", False)

    # ------------------------------------------------------------------ conditioning

    @torch.inference_mode()
    def prompt_embedding(self, prompt: str | Vocabulary = "") -> Conditioning:
        """Text conditioning of a prompt, cached; the empty prompt's by default (reference `_UNCONDITIONAL_TOKENS`),
        or a vocabulary's prompt (its token ids as `build_vocabulary` made them; SDXL's second tokenizer reads the
        same words)."""
        key = prompt.input_ids if isinstance(prompt, Vocabulary) else prompt
        if key not in self._conditioning:
            text = prompt if isinstance(prompt, str) else prompt.prompt
            ids = [prompt_ids(self.text[name], text) for name in self.backbone.tokenizers]
            if isinstance(prompt, Vocabulary):
                ids[0] = torch.tensor([prompt.input_ids])
            self._conditioning[key] = self._encode_prompt(ids)
        return self._conditioning[key]

    def _encode_prompt(self, ids: list[torch.Tensor]) -> Conditioning:
        """The UNet's text conditioning for one prompt's (1, T) ids per tokenizer (diffusers' `encode_prompt` of each
        family, without guidance)."""
        encoders = [self.text[name] for name in self.backbone.text_encoders]
        if not self._text_time:
            return Conditioning(encoders[0](ids[0].to(encoders[0].device))[0])
        # SDXL `encode_prompt`: each encoder's penultimate hidden state, concatenated over features; the pooled text
        # embedding of the last encoder (CLIPTextModelWithProjection's `text_embeds`).
        states, pooled = [], None
        for encoder, tokens in zip(encoders, ids):
            out = encoder(tokens.to(encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if out[0].dim() == 2:
                pooled = out[0]
        return Conditioning(torch.cat(states, dim=-1), pooled)

    def text_inputs(self, conditioning: Conditioning, batch: int, size: tuple[int, int]) -> dict:
        """Keyword arguments of the UNet's forward besides latent and timestep, for `batch` images of `size` (H, W)
        pixels: the text states, and for the SDXL family `added_cond_kwargs` with the pooled text and the time ids
        (original size, crop top-left (0, 0), target size: diffusers' `_get_add_time_ids`; DiffCut's reference
        passes its square input size for both)."""
        inputs = {"encoder_hidden_states": conditioning.hidden.expand(batch, -1, -1)}
        if self._text_time:
            h, w = size
            hidden = conditioning.hidden
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=hidden.dtype, device=hidden.device)
            inputs["added_cond_kwargs"] = {
                "text_embeds": conditioning.pooled.expand(batch, -1),
                "time_ids": time_ids.expand(batch, -1),
            }
        return inputs

    def vocabulary(self, words: Sequence[str] | str) -> Vocabulary:
        """A `Vocabulary` for `words` with this checkpoint's tokenizer (see `vocabulary.build_vocabulary`)."""
        return build_vocabulary(words, self.text["tokenizer"])

    def check_concepts(self, words: tuple[str, ...]) -> None:
        for word in words:  # each its own prompt: fail before any image when one cannot be
            self.vocabulary([word])

    # ------------------------------------------------------------------ one step

    def _noise_schedule(self):
        if self.scheduler is not None:
            return self.scheduler
        from diffusers import DDPMScheduler

        return DDPMScheduler(**NOISE_SCHEDULE)

    def step_inputs(self, pixels, timestep, noise_seed, *, schedule=None, conditioning=None):
        """The UNet's inputs: VAE posterior mean × scaling factor (reference: the encoder's last layer, no sampling),
        noised for `timestep` when `noise_seed` is given, the (B,) timesteps and the text inputs; and the latent's
        grid. (`schedule` is a transformer's: a UNet's noise goes at `timestep`.)"""
        batch, size = len(pixels), tuple(pixels.shape[-2:])
        latents = self.clean_latents(pixels) * self.vae.config.scaling_factor  # (B, 4, H/8, W/8)
        t = torch.full((batch,), timestep, device=self.device, dtype=torch.long)
        if noise_seed is not None:
            # DiffCut reference: one (1, 4, h, w) draw from a generator seeded on the model's device, shared by the
            # batch. On the CPU (no CUDA generator) the draw differs from a GPU's, with the same distribution.
            generator_device = self.device if self.device.type == "cuda" else torch.device("cpu")
            generator = torch.Generator(device=generator_device).manual_seed(noise_seed)
            noise = torch.randn((1, *latents.shape[1:]), generator=generator, device=generator_device)
            latents = self._noise_schedule().add_noise(latents, noise.to(self.device).expand_as(latents), t)
        text = self.text_inputs(conditioning or self.prompt_embedding(), batch, size)
        return {"sample": latents.to(self.dtype), "timestep": t, **text}, tuple(latents.shape[-2:])

    # ------------------------------------------------------------------ captures

    @torch.inference_mode()
    def attend(
        self, pixels, *, timestep, noise_seed, schedule=None, vocabulary=None, segment_from="unconditional", blocks=None
    ):
        """Self-attention at every grid of one step (DiffSeg); with a vocabulary, the conditional copies run in the
        same batch and their cross-attention is kept. See `pipeline.DiffSegPipeline.attend`."""
        self.check_blocks(blocks)  # a UNet has none: refused
        batch, size = len(pixels), tuple(pixels.shape[-2:])
        inputs, grid = self.step_inputs(pixels, timestep, noise_seed)
        naming = vocabulary is not None  # the words' cross-attention is recorded too
        if naming:
            named = self.text_inputs(self.prompt_embedding(vocabulary), batch, size)
            inputs = concat_inputs(inputs, {"sample": inputs["sample"], "timestep": inputs["timestep"], **named})
        # The UNet's output is not needed: the forward ends after the last layer recorded.
        with self.lock, capture_attention(self.unet, grid, cross=naming, stop=True) as store:
            self.unet(**inputs)
        maps = store.maps()
        if not naming:
            return maps, store.layers, None
        half = slice(0, batch) if segment_from == "unconditional" else slice(batch, 2 * batch)
        cross = {g: m[batch:] for g, m in store.maps("cross").items()}
        return {g: m[half] for g, m in maps.items()}, store.layers, cross

    def feature_layer(self) -> torch.nn.Module:
        """The `attn1` whose output DiffCut reads: the last transformer block of `down_blocks[diffcut_block]`
        (reference `LdmExtractor.register_hooks`)."""
        block = self.unet.down_blocks[self.backbone.diffcut_block]
        if not getattr(block, "attentions", None):
            raise ValueError(
                f"{self.backbone.name}'s down block {self.backbone.diffcut_block} has no attention for DiffCut to read."
            )
        return block.attentions[-1].transformer_blocks[-1].attn1

    @torch.inference_mode()
    def features(self, pixels, *, timestep, noise_seed, schedule=None, blocks=None) -> torch.Tensor:
        """(B, h, w, C) tokens of DiffCut's layer, on the empty prompt; only that output is recorded, so the UNet
        keeps its fused attention, and nothing after the layer runs."""
        self.check_blocks(blocks)
        inputs, grid = self.step_inputs(pixels, timestep, noise_seed)
        layer = self.feature_layer()
        with self.lock, capture_output(layer) as record, stop_after(layer):
            self.unet(**inputs)
        tokens = record["output"]  # (B, h·w, C) at the layer's grid
        return tokens.reshape(len(pixels), *token_grid(tokens.shape[1], grid), -1)

    @torch.inference_mode()
    def concept_maps(self, pixels, words: tuple[str, ...], *, timestep, noise_seed, blocks=None, schedule=None):
        """A UNet's concept maps: each word's cross-attention, averaged over layers, heads and its tokens and
        L2-normalised over space as the naming step computes it (`vocabulary.word_scores`), then shared out over the
        words at each token. Each word is its own prompt, one batch of K × B, so no word's map depends on the
        others (CLIP reads a prompt left to right). (B, K, h, w) float32."""
        self.check_blocks(blocks)  # a UNet has none: refused
        vocabularies = [self.vocabulary([word]) for word in words]
        batch, size = len(pixels), tuple(pixels.shape[-2:])
        inputs, grid = self.step_inputs(pixels, timestep, noise_seed)
        step = {"sample": inputs["sample"], "timestep": inputs["timestep"]}
        parts = [step | self.text_inputs(self.prompt_embedding(v), batch, size) for v in vocabularies]
        joined = parts[0]
        for part in parts[1:]:
            joined = concat_inputs(joined, part)
        with self.lock, capture_attention(self.unet, grid, cross=True, self_attention=False, stop=True) as store:
            self.unet(**joined)
        cross = store.maps("cross")  # grid -> (K·B, h·w, 77), word-major
        scores = torch.empty(batch, len(words), grid[0] * grid[1])
        for k, vocabulary in enumerate(vocabularies):
            for b in range(batch):
                scores[b, k] = word_scores({g: m[k * batch + b] for g, m in cross.items()}, vocabulary, size=grid)[0]
        shares = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return shares.reshape(batch, len(words), *grid)
