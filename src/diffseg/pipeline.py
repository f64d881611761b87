"""The pipeline: Stable Diffusion components in, bundles and label maps out, for DiffSeg and DiffCut.

pipe = DiffSegPipeline.from_pretrained()              # CompVis/stable-diffusion-v1-4, or a local folder
result = pipe("photo.jpg")                             # encode + segment (DiffSeg)
bundle = pipe.encode("photo.jpg")                      # the expensive step, once
coarse = pipe.segment(bundle, kl_threshold=1.3)        # the cheap step, as often as you like (or a SegmentConfig)
cut = pipe.segment(pipe.encode("photo.jpg", method="diffcut"), tau=0.4)   # DiffCut

How each Stable Diffusion family loads and is conditioned lives in `backbones`; this module only runs it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .backbones import dit
from .backbones import families as backbones
from .backbones.concepts import ConceptTokens, concept_attention, default_blocks, encode_concepts, parse_concepts
from .backbones.capture import (
    check_attention_memory,
    capture_attention,
    capture_joint_attention,
    capture_output,
    stop_after,
    token_grid,
)
from .backbones.devices import place, resolve_device, resolve_dtype
from .bundle import Bundle
from .config import (
    DEFAULT_MODEL,
    ENCODE_DEFAULTS,
    METHOD_DEFAULT,
    NOISE_SCHEDULE,
    SEGMENT_FROM,
    DiffCutConfig,
    EncodeConfig,
    NamingConfig,
    SegmentConfig,
    encode_settings,
)
from .io.images import as_array, to_model_input
from .io.images import crop as crop_image
from .naming.vocabulary import Vocabulary, build_vocabulary, word_scores
from .methods.registry import METHODS, method_named
from .segmentation import Segmentation, segment_bundle

__all__ = ["DiffSegPipeline", "Segmentation", "segment_bundle", "resolve_device", "resolve_dtype"]

_NAMING = NamingConfig()
ImageLike = Image.Image | np.ndarray | str | os.PathLike


class DiffSegPipeline:
    """Frozen Stable Diffusion components that turn images into bundles and label maps.

    Any family `backbones.detect` knows: SD 1.x, SD 2.x (512 and 768 v-prediction), SDXL (base, Turbo), SSD-1B,
    Segmind-Vega; or, with a `transformer` instead of a `unet`, SD3 / SD3.5 and Flux.1 (`backbones.dit`), whose
    empty-prompt conditioning is passed in (`from_pretrained` reads it from the user cache) or computed once from
    text encoders given. The UNet (transformer) and text encoders run in `dtype`; the VAE stays in float32 (its
    encoder overflows in float16). Components are attributes, as in diffusers pipelines: `unet` or `transformer`,
    `vae`, `text_encoder`, `tokenizer` (and, for SDXL, `text_encoder_2`, `tokenizer_2`), `scheduler`; `backbone`
    holds the family's facts.
    """

    def __init__(
        self,
        unet=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        scheduler=None,
        *,
        transformer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        conditioning: backbones.Conditioning | None = None,
        model: str = "",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        backbone: backbones.Backbone | None = None,
        offload: bool = False,
        **text_components,
    ) -> None:
        if (unet is None) == (transformer is None):
            raise ValueError("Pass a `unet` (SD 1.x/2.x/SDXL) or a `transformer` (SD3, Flux.1), not both or neither.")
        # The family's facts: as `from_pretrained` read them from the checkpoint's configs, or from these components.
        if backbone is None:
            scheduler_config = scheduler.config if scheduler is not None else None
            backbone = (
                backbones.detect(unet.config, scheduler_config)
                if transformer is None
                else dit.detect_transformer({**transformer.config, "_class_name": type(transformer).__name__})
            )
        self.backbone = backbone
        if self.backbone.family == "sdxl" and (text_encoder_2 is None or tokenizer_2 is None):
            raise ValueError(f"A {self.backbone.name} UNet needs `text_encoder_2` and `tokenizer_2` as well.")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.unet = None if unet is None else _place_denoiser(unet, self.device, self.dtype, offload)
        self.transformer = (
            None if transformer is None else _place_denoiser(transformer, self.device, self.dtype, offload)
        )
        # channels-last convolutions: the VAE encoder is the larger half of an encode on a CPU (15 % faster there).
        self.vae = place(vae, self.device, torch.float32).to(memory_format=torch.channels_last)
        self.text_encoder = None if text_encoder is None else place(text_encoder, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.text_encoder_2 = None if text_encoder_2 is None else place(text_encoder_2, self.device, self.dtype)
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler
        self.model = model
        self._conditioning: dict[object, backbones.Conditioning] = {}
        self._text_components = {k: v for k, v in text_components.items() if v is not None}
        self._concepts: dict[tuple[str, ...], ConceptTokens] = {}
        if self.transformer is not None:
            if conditioning is None:  # text encoders given in memory: encode the empty prompt with them, once
                encoders = dict(text_encoder=self.text_encoder, text_encoder_2=text_encoder_2, **text_components)
                encoders.update(tokenizer=tokenizer, tokenizer_2=tokenizer_2)
                conditioning = dit.encode_empty_prompt(self.backbone, encoders, self.device, self.transformer)
            self._conditioning[""] = backbones.Conditioning(
                conditioning.hidden.to(self.device, self.dtype), conditioning.pooled.to(self.device, self.dtype)
            )
        # Capture swaps processors (DiffSeg) or hooks a layer (DiffCut) for one forward: one denoiser step at a time.
        self._lock = threading.Lock()

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the transformer: the network one step runs."""
        return self.unet if self.unet is not None else self.transformer

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        local_files_only: bool = False,
        offload: bool = False,
    ) -> DiffSegPipeline:
        """Load a diffusers-format Stable Diffusion checkpoint of any family diffseg knows: a hub id or a local folder.

        `offload` keeps the UNet or transformer in CPU memory and runs it on `device` a block at a time (for a
        checkpoint larger than the GPU: Flux.1-dev on 24 GB).

        Raises:
            FileNotFoundError: the folder, a component or the weights are missing, or the hub cannot be reached; the
                message says how to pass a local folder instead.
            ValueError: the checkpoint is not a Stable Diffusion family diffseg knows; the message says what is off.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        backbone, components = backbones.load(model, dtype=dtype, local_files_only=local_files_only, device=device)
        return cls(**components, model=str(model), device=device, dtype=dtype, backbone=backbone, offload=offload)

    # ------------------------------------------------------------------ conditioning

    @property
    def text_encoders(self) -> list:
        return [getattr(self, name) for name in self.backbone.text_encoders]

    @property
    def tokenizers(self) -> list:
        return [getattr(self, name) for name in self.backbone.tokenizers]

    @torch.inference_mode()
    def prompt_embedding(self, prompt: str | Vocabulary = "") -> backbones.Conditioning:
        """Text conditioning of a prompt, cached; the empty prompt's by default (reference `_UNCONDITIONAL_TOKENS`),
        or a vocabulary's prompt (its token ids as built by `semantic.build_vocabulary`; SDXL's second tokenizer
        reads the same words)."""
        key = prompt.input_ids if isinstance(prompt, Vocabulary) else prompt
        if key not in self._conditioning:
            ids = [
                backbones.prompt_ids(tokenizer, prompt if isinstance(prompt, str) else prompt.prompt)
                for tokenizer in self.tokenizers
            ]
            if isinstance(prompt, Vocabulary):
                ids[0] = torch.tensor([prompt.input_ids])
            self._conditioning[key] = backbones.encode_prompt(self.backbone, self.text_encoders, ids)
        return self._conditioning[key]

    def vocabulary(self, words: Sequence[str] | str) -> Vocabulary:
        """A `Vocabulary` for `words` with this pipeline's tokenizer (see `semantic.build_vocabulary`)."""
        self._check_words()
        return build_vocabulary(words, self.tokenizer)

    def words_for(self, spec, words: Sequence[str] | str | None) -> Vocabulary | tuple[str, ...] | None:
        """How method `spec` takes `words`: a `Vocabulary` when its own UNet pass names its segments (DiffSeg's
        cross-attention); else the words as a tuple, which are the concepts (`concepts`, which needs them) or the
        concepts whose maps name its segments (every other method, and every method on a diffusion transformer).

        Raises:
            ValueError: no words for the concepts method, or words no encoder takes.
        """
        if spec.concepts and words is None:
            raise ValueError("The concepts method maps words to pixels: pass them, e.g. --concepts 'cat, dog, sky'.")
        if words is None:
            return None
        if spec.names_segments and self.unet is not None:
            return self.vocabulary(words)
        words = parse_concepts(words)
        if self.unet is not None:
            for word in words:  # each its own prompt: fail before any image when one cannot be
                self.vocabulary([word])
        else:
            self.concept_tokens(words)  # encoded once (loading their text encoder): fails before any image
        return words

    def _check_words(self) -> None:
        if self.transformer is not None:
            raise ValueError(
                f"Naming segments with words reads a UNet's cross-attention; {self.backbone.name} has none. Use an SD "
                "1.x/2.x or SDXL checkpoint to name segments."
            )

    def _noise_schedule(self):
        if self.scheduler is not None:
            return self.scheduler
        if self.transformer is not None:
            raise ValueError(f"{self.backbone.name} needs its flow-matching `scheduler` to place a timestep.")
        from diffusers import DDPMScheduler

        return DDPMScheduler(**NOISE_SCHEDULE)

    # ------------------------------------------------------------------ encode: the expensive step

    def input_size(
        self, image_size: tuple[int, int], resolution: int | None = None, resize: str = "native"
    ) -> tuple[int, int]:
        """(height, width) in pixels the UNet sees for an image of `image_size` (see `backbones.target_size`)."""
        return backbones.target_size(image_size, self.backbone, resolution, resize)

    @torch.inference_mode()
    def encode(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        method: str = "diffseg",
        timestep: int = METHOD_DEFAULT,
        crop: str | None = METHOD_DEFAULT,
        resolution: int | None = METHOD_DEFAULT,
        resize: str = METHOD_DEFAULT,
        noise_seed: int | None = METHOD_DEFAULT,
        blocks: tuple[int, int] | None = None,
        labels: Sequence[str] | str | None = None,
        segment_from: str = _NAMING.segment_from,
        config: EncodeConfig | None = None,
    ) -> Bundle | list[Bundle]:
        """Run the VAE and one UNet step; keep what `method` segments.

        Args:
            images: one image or a list (Pillow, (H, W, 3) uint8 array, or path). Images of the same input size go
                through the UNet as one batch.
            method: a name of `methods.registry.METHODS`: "diffseg" (self-attention at every grid), "diffcut" (one
                layer's features), "seg4diff" (SD3 only: one block's image-to-text attention) or "concepts" (where
                each of the `labels` is: concept maps).
            timestep: UNet timestep (default: DiffSeg 300, DiffCut 50, as their papers; Seg4Diff 261, where its
                reference's step 8 of 28 lies, and that step's exact noise level).
            crop: None to use the whole image, "center" to take the central square first (the benchmarks').
            resolution: about resolution² pixels reach the UNet (a multiple of the family's `size_multiple`).
                Default: the model's native size for DiffSeg (SD 1.x 512, SD 2.x-768 768, SDXL 1024); 1024 for
                DiffCut (its reference's input size).
            resize: "native" keeps the aspect ratio (a 16:9 photo gives a 16:9 latent); "square" is the paper's
                resolution×resolution. A square image gives the same input either way.
            noise_seed: None feeds the clean latent (DiffSeg's paper); an int adds seeded noise for `timestep`
                (DiffCut's reference: 42, drawn on the pipeline's device as the reference draws on its GPU).
            blocks: SD3 / Flux only: (first, last) transformer blocks, inclusive; DiffSeg averages their attention
                (default: every block), DiffCut reads the image tokens after `last` (default: the family's block).
            labels: words to name segments with (a list or a comma-separated string). DiffSeg on a UNet: the UNet
                also runs conditioned on a prompt of these words, in the same batch, and its cross-attention is kept;
                any other method or family: the words' concept maps, one more step (`bundle.named_by`). For
                "concepts": the words to find.
            segment_from: with `labels`, the pass the self-attention comes from: "unconditional" (default; the
                segments are exactly those without labels) or "conditional" (text changes the self-attention too).
            config: an `EncodeConfig` to use as it is, instead of the method's defaults and the keywords above.

        Returns:
            A bundle per image (a list for a list): an `AttentionBundle` (DiffSeg), a `FeatureBundle` (DiffCut), a
            `TextAttentionBundle` (Seg4Diff) or a `ConceptBundle` (concepts).
        """
        # 1. Check inputs: the settings are made (and validated) once.
        spec = method_named(method)
        if config is None:
            given = {"timestep": timestep, "crop": crop, "resolution": resolution, "resize": resize}
            config = encode_settings(method, **given, noise_seed=noise_seed, blocks=blocks)
        single = isinstance(images, (Image.Image, np.ndarray, str, os.PathLike))
        batch = [images] if single else list(images)
        if not batch:
            raise ValueError("`images` is empty; pass at least one image.")
        vocabulary = self.words_for(spec, labels)

        # 2. Decode and crop: the region encoded is also what the labels will cover.
        arrays = [crop_image(as_array(image), config.crop) for image in batch]
        sizes = [self.input_size(a.shape[:2], config.resolution, config.resize) for a in arrays]

        # 3. One UNet batch per input size (a list of photos of one camera is one batch).
        bundles: list[Bundle | None] = [None] * len(batch)
        for size in dict.fromkeys(sizes):
            members = [i for i, s in enumerate(sizes) if s == size]
            pixels = to_model_input([arrays[i] for i in members], size)  # (B, 3, H, W) in [-1, 1]
            made = self.encode_pixels(
                pixels,
                [arrays[i] for i in members],
                method=method,
                config=config,
                vocabulary=vocabulary,
                segment_from=segment_from,
            )
            for i, bundle in zip(members, made):
                bundles[i] = bundle
        return bundles[0] if single else bundles

    @torch.inference_mode()
    def encode_pixels(
        self,
        pixels: torch.Tensor,
        images: Sequence[np.ndarray],
        *,
        method: str = "diffseg",
        config: EncodeConfig | None = None,
        vocabulary: Vocabulary | tuple[str, ...] | None = None,
        segment_from: str = _NAMING.segment_from,
    ) -> list[Bundle]:
        """Bundles of a prepared batch (see `images.to_model_input`) whose (H, W, 3) uint8 `images` (after any
        crop) the labels will cover: the method's encode step (`methods.registry`) with `config`'s timestep and noise
        (default: the method's). What `encode` does once images are decoded and resized, and what the job runner
        calls on batches decoded elsewhere (the Ray job's decode tasks)."""
        spec = method_named(method)
        if not spec.runs_on(self.backbone.family):
            others = ", ".join(name for name, m in METHODS.items() if m.runs_on(self.backbone.family))
            raise ValueError(
                f"{spec.name} runs on {', '.join(spec.families)} checkpoints; this is {self.backbone.name}. Use "
                f"another method (one of {others})."
            )
        config = config or spec.encode_defaults
        if spec.concepts or not isinstance(vocabulary, tuple):
            return spec.encode(self, pixels, images, config, vocabulary, segment_from)
        # Words that name the segments through their concept maps: a second step on the same pixels, at the concept
        # maps' own noise (`ENCODE_DEFAULTS["concepts"]`) and blocks.
        bundles = spec.encode(self, pixels, images, config, None, segment_from)
        concepts = METHODS["concepts"]
        named_by = concepts.encode(self, pixels, images, concepts.encode_defaults, vocabulary, segment_from)
        return [dataclasses.replace(b, named_by=n) for b, n in zip(bundles, named_by)]

    def _step_inputs(
        self, pixels: torch.Tensor, timestep: int, noise_seed: int | None, *, schedule=None, conditioning=None
    ) -> tuple[dict, tuple]:
        """Keyword arguments of one denoiser forward on `pixels`, conditioned on the empty prompt (or on
        `conditioning`), and the (h, w) grid of its finest tokens (a UNet: the latent's; a transformer: its
        patches'). A transformer's noise goes at `timestep`, or at the (steps, from_end) point of its scheduler's
        inference schedule (`EncodeConfig.schedule`)."""
        size = tuple(pixels.shape[-2:])
        if self.transformer is not None:
            if schedule is not None:
                tokens = dit.token_count(size, self.backbone)
                level = dit.schedule_sigma(
                    self._noise_schedule(), *schedule, family=self.backbone.family, tokens=tokens
                )
            else:
                level = dit.sigma(self.backbone, self._noise_schedule(), timestep, dit.token_count(size, self.backbone))
            pixels = pixels.to(self.device, torch.float32, memory_format=torch.channels_last)
            x = dit.latents(self.vae, pixels, level, noise_seed)
            conditioning = conditioning or self.prompt_embedding()
            inputs = dit.transformer_inputs(self.backbone, self.transformer, conditioning, x, level)
            return inputs, tuple(side // self.backbone.size_multiple for side in size)
        latents, t = self._latents(pixels, timestep, noise_seed)
        inputs = backbones.unet_inputs(self.backbone, self.prompt_embedding(), len(pixels), size)
        return {"sample": latents, "timestep": t, **inputs}, tuple(latents.shape[-2:])

    def _latents(
        self, pixels: torch.Tensor, timestep: int, noise_seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean × scaling factor (reference: the encoder's last layer, no sampling), noised for
        `timestep` when `noise_seed` is given; and the (B,) timesteps."""
        batch = len(pixels)
        pixels = pixels.to(self.device, torch.float32, memory_format=torch.channels_last)
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor  # (B, 4, H/8, W/8)
        t = torch.full((batch,), timestep, device=self.device, dtype=torch.long)
        if noise_seed is not None:
            # DiffCut reference: one (1, 4, h, w) draw from a generator seeded on the model's device, shared by the
            # batch. On the CPU (no CUDA generator) the draw differs from a GPU's, with the same distribution.
            generator_device = self.device if self.device.type == "cuda" else torch.device("cpu")
            generator = torch.Generator(device=generator_device).manual_seed(noise_seed)
            noise = torch.randn((1, *latents.shape[1:]), generator=generator, device=generator_device)
            latents = self._noise_schedule().add_noise(latents, noise.to(self.device).expand_as(latents), t)
        return latents.to(self.dtype), t

    @torch.inference_mode()
    def attend(
        self,
        pixels: torch.Tensor,
        *,
        timestep: int = ENCODE_DEFAULTS["diffseg"].timestep,
        noise_seed: int | None = ENCODE_DEFAULTS["diffseg"].noise_seed,
        vocabulary: Vocabulary | None = None,
        segment_from: str = _NAMING.segment_from,
        blocks: tuple[int, int] | None = None,
    ) -> tuple[dict, dict, dict | None]:
        """VAE and one UNet step on a prepared batch (see `images.to_model_input`), attention captured (DiffSeg).

        Args:
            pixels: (B, 3, H, W) float32 in [-1, 1], H and W multiples of `backbone.size_multiple`.
            vocabulary: words to name segments with: the batch then runs twice through the UNet in one call,
                unconditional (empty prompt) and conditioned on the words' prompt, and the conditional half's
                cross-attention is captured.
            segment_from: with a vocabulary, the half the self-attention comes from ("unconditional" or
                "conditional").
            blocks: a diffusion transformer's (first, last) blocks to average (default: every block).

        Returns:
            (maps, layers, cross): (h, w) -> (B, h·w, h·w) head- and layer-averaged self-attention, finest first;
            (h, w) -> number of self-attention layers averaged; (h, w) -> (B, h·w, T) cross-attention over the
            prompt's T tokens (None without a vocabulary). Tensors are on the pipeline's device.
        """
        if segment_from not in SEGMENT_FROM:
            raise ValueError(f"`segment_from` must be one of {SEGMENT_FROM} but is {segment_from!r}.")
        batch, size = len(pixels), tuple(pixels.shape[-2:])
        check_attention_memory(self.backbone, size, batch * (2 if vocabulary is not None else 1), self.device)
        # One step conditioned on the empty prompt; with a vocabulary, the conditional copies in the same batch.
        inputs, grid = self._step_inputs(pixels, timestep, noise_seed)
        if self.transformer is not None:
            if vocabulary is not None:
                self._check_words()
            chosen = self._blocks(blocks)
            last = dit.blocks(self.transformer)[-1 if chosen is None else chosen[-1]]
            capture = capture_joint_attention(self.transformer, grid, self.backbone.family, chosen)
            with self._lock, capture as store, stop_after(last):  # the blocks after the range are not needed
                self.transformer(**inputs)
            return store.maps(), store.layers, None
        self._blocks(blocks)  # a UNet has none: refused
        naming = vocabulary is not None  # the words' cross-attention is recorded too
        if naming:
            named = backbones.unet_inputs(self.backbone, self.prompt_embedding(vocabulary), batch, size)
            inputs = _concat(inputs, {"sample": inputs["sample"], "timestep": inputs["timestep"], **named})
        # The UNet's output is not needed: the forward ends after the last layer recorded.
        with self._lock, capture_attention(self.unet, grid, cross=naming, stop=True) as store:
            self.unet(**inputs)
        maps = store.maps()
        if not naming:
            return maps, store.layers, None
        half = slice(0, batch) if segment_from == "unconditional" else slice(batch, 2 * batch)
        cross = {g: m[batch:] for g, m in store.maps("cross").items()}
        return {g: m[half] for g, m in maps.items()}, store.layers, cross

    @torch.inference_mode()
    def features(
        self,
        pixels: torch.Tensor,
        *,
        timestep: int = ENCODE_DEFAULTS["diffcut"].timestep,
        noise_seed: int | None = ENCODE_DEFAULTS["diffcut"].noise_seed,
        blocks: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """VAE and one UNet step on a prepared batch, DiffCut's layer output kept (reference `LdmExtractor`).

        The output of `attn1` of the last transformer block of `down_blocks[backbone.diffcut_block]`, on the empty
        prompt. Only that output is recorded, so the UNet keeps its fused attention.

        Returns:
            (B, h, w, C) tokens on the pipeline's device, in the UNet's dtype.
        """
        chosen = self._blocks(blocks)
        inputs, grid = self._step_inputs(pixels, timestep, noise_seed)
        if self.transformer is not None:
            layer = dit.feature_block(self.backbone, self.transformer, None if chosen is None else chosen[-1])
        else:
            layer = backbones.diffcut_layer(self.backbone, self.unet)
        # One forward at a time: the hook sees every forward. Nothing after the layer is needed: the forward stops.
        with self._lock, capture_output(layer) as record, stop_after(layer):
            self.denoiser(**inputs)
        # A UNet's attn1 gives (B, h·w, C); a transformer block its (text, image) streams, the image's second.
        tokens = record["output"] if self.transformer is None else record["output"][1]
        return tokens.reshape(len(pixels), *token_grid(tokens.shape[1], grid), -1)

    @torch.inference_mode()
    def text_attention(
        self,
        pixels: torch.Tensor,
        *,
        timestep: int = ENCODE_DEFAULTS["seg4diff"].timestep,
        noise_seed: int | None = ENCODE_DEFAULTS["seg4diff"].noise_seed,
        blocks: tuple[int, int] | None = None,
        schedule: tuple[int, int] | None = ENCODE_DEFAULTS["seg4diff"].schedule,
    ) -> torch.Tensor:
        """VAE and one SD3 step on a prepared batch, one block's image-to-text attention kept (Seg4Diff).

        Reference `SD3Backbone.forward` and its `JointAttnProcessor2_0`: the empty prompt with T5's embeddings zero
        (`dit.seg4diff_conditioning`), noise at `schedule` (default: 8th from the end of 28 steps), and in the
        chosen block the softmax over the whole joint sequence, mean over heads, image queries over the 77 CLIP
        keys. `blocks` (first, last) averages several blocks' maps, as the reference's list of layers (default:
        `dit.seg4diff_block`, 9 on SD3-medium).

        Returns:
            (B, h, w, 77) float32 on the pipeline's device.
        """
        if self.backbone.family != "sd3":
            raise ValueError(
                f"Seg4Diff reads an SD3 block's image-to-text attention; {self.backbone.name} is not an SD3 or SD3.5 "
                "checkpoint. Use `--method diffseg` or `diffcut` with it, or an SD3 checkpoint."
            )
        chosen = self._blocks(blocks)
        if chosen is None:
            block = dit.seg4diff_block(self.backbone)
            chosen = range(block, block + 1)
        conditioning = dit.seg4diff_conditioning(self.prompt_embedding())
        inputs, grid = self._step_inputs(pixels, timestep, noise_seed, schedule=schedule, conditioning=conditioning)
        tokens = dit.SEG4DIFF_TEXT_TOKENS
        capture = capture_joint_attention(self.transformer, grid, "sd3", chosen, text_tokens=tokens, record_image=False)
        with self._lock, capture as store, stop_after(dit.blocks(self.transformer)[chosen[-1]]):
            self.transformer(**inputs)
        return store.maps("cross")[grid].reshape(len(pixels), *grid, tokens)

    # ------------------------------------------------------------------ concepts: words to pixels

    def concept_tokens(self, words: Sequence[str] | str) -> ConceptTokens:
        """A diffusion transformer's concept tokens for `words` (`concepts.encode_concepts`), computed once per word
        set. The text encoders they need (Flux: T5; SD3: both CLIPs) load on the first call when the pipeline has
        none (its empty prompt came from the cache), and stay for the next."""
        words = parse_concepts(words)
        if words not in self._concepts:
            needed = ("text_encoder_2",) if self.backbone.family == "flux" else ("text_encoder", "text_encoder_2")
            encoders = {**self._text_components, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
            encoders.update(text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2)
            if any(encoders.get(name) is None for name in needed):
                loaded = backbones.load_text_encoders(
                    self.model, self.backbone, needed, dtype=self.dtype, device=self.device
                )
                for name, component in loaded.items():  # the pipeline's attributes, as if given at the start
                    setattr(self, name, component)
                encoders.update(loaded)
            width = self.transformer.config.joint_attention_dim
            self._concepts[words] = encode_concepts(self.backbone, encoders, words, self.device, width)
        return self._concepts[words]

    @torch.inference_mode()
    def concept_maps(
        self,
        pixels: torch.Tensor,
        words: Sequence[str] | str,
        *,
        timestep: int = ENCODE_DEFAULTS["concepts"].timestep,
        noise_seed: int | None = ENCODE_DEFAULTS["concepts"].noise_seed,
        blocks: tuple[int, int] | None = None,
        schedule: tuple[int, int] | None = ENCODE_DEFAULTS["concepts"].schedule,
    ) -> torch.Tensor:
        """Where each word is in a prepared batch: (B, K, h, w) float32 on the token grid, summing to 1 over the K
        concepts at every token.

        SD3 and Flux: ConceptAttention (`backbones.concepts`) at the reference's noise level (`schedule`: step 2 of 4,
        σ = 0.5 on Flux.1-schnell) and blocks (`blocks` (first, last) joint blocks; default Flux's last four double
        blocks, SD3 every block); Flux, as its reference, with the pooled text vector and the guidance zero. UNets:
        each word's cross-attention (`concept_cross_attention`).
        """
        words = parse_concepts(words)
        if self.transformer is None:
            self._blocks(blocks)  # a UNet has none: refused
            return self.concept_cross_attention(pixels, words, timestep=timestep, noise_seed=noise_seed)
        joint = len(self.transformer.transformer_blocks)
        chosen = self._blocks(blocks) or default_blocks(self.backbone.family, joint)
        if chosen.stop > joint:
            raise ValueError(
                f"Concept maps read joint (double-stream) blocks; {self.backbone.name} has {joint} (0 to {joint - 1}), "
                f"not {chosen.start}:{chosen.stop - 1}."
            )
        tokens = self.concept_tokens(words)
        conditioning = self.prompt_embedding()
        if self.backbone.family == "flux":  # reference `encode_image`: y = zeros (`embed_concepts`' vec), guidance 0
            conditioning = backbones.Conditioning(conditioning.hidden, torch.zeros_like(conditioning.pooled))
        inputs, grid = self._step_inputs(pixels, timestep, noise_seed, schedule=schedule, conditioning=conditioning)
        if "guidance" in inputs:
            inputs["guidance"] = torch.zeros_like(inputs["guidance"])
        family, last = self.backbone.family, self.transformer.transformer_blocks[chosen[-1]]
        with self._lock, concept_attention(self.transformer, family, tokens, chosen) as record, stop_after(last):
            self.transformer(**inputs)
        return record.maps().reshape(len(pixels), len(words), *grid)

    @torch.inference_mode()
    def concept_cross_attention(
        self, pixels: torch.Tensor, words: tuple[str, ...], *, timestep: int, noise_seed: int | None
    ) -> torch.Tensor:
        """A UNet's concept maps: each word's cross-attention, averaged over layers, heads and its tokens and
        L2-normalised over space as the naming step computes it (`vocabulary.word_scores`), then shared out over the
        words at each token. Each word is its own prompt, one batch of K × B, so no word's map depends on the
        others (CLIP reads a prompt left to right)."""
        vocabularies = [self.vocabulary([word]) for word in words]
        batch, size = len(pixels), tuple(pixels.shape[-2:])
        inputs, grid = self._step_inputs(pixels, timestep, noise_seed)
        parts = [
            {"sample": inputs["sample"], "timestep": inputs["timestep"]}
            | backbones.unet_inputs(self.backbone, self.prompt_embedding(v), batch, size)
            for v in vocabularies
        ]
        joined = parts[0]
        for part in parts[1:]:
            joined = _concat(joined, part)
        with self._lock, capture_attention(self.unet, grid, cross=True, self_attention=False, stop=True) as store:
            self.unet(**joined)
        cross = store.maps("cross")  # grid -> (K·B, h·w, 77), word-major
        scores = torch.empty(batch, len(words), grid[0] * grid[1])
        for k, vocabulary in enumerate(vocabularies):
            for b in range(batch):
                scores[b, k] = word_scores({g: m[k * batch + b] for g, m in cross.items()}, vocabulary, size=grid)[0]
        shares = scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return shares.reshape(batch, len(words), *grid)

    def _blocks(self, blocks: tuple[int, int] | None) -> range | None:
        """The transformer block indices `blocks` (first, last) names, checked against this model."""
        if blocks is None:
            return None
        if self.transformer is None:
            raise ValueError(f"`blocks` chooses a diffusion transformer's blocks; {self.backbone.name} is a UNet.")
        count = len(dit.blocks(self.transformer))
        first, last = blocks
        if not 0 <= first <= last < count:
            raise ValueError(
                f"`blocks` {first}:{last} is out of range: {self.backbone.name} has blocks 0 to {count - 1}."
            )
        return range(first, last + 1)

    # ------------------------------------------------------------------ segment: the cheap step

    def segment(
        self,
        bundle: Bundle,
        config: SegmentConfig | DiffCutConfig | None = None,
        *,
        output_size: tuple[int, int] | None = None,
        naming: NamingConfig | None = None,
        **overrides,
    ) -> Segmentation:
        """Segment a bundle with its method's settings (`config`, and/or keyword overrides of its fields); see
        `segment_bundle`. Needs no model: a loaded bundle works as well. On a GPU pipeline the work runs on the GPU."""
        if self.device.type == "cuda":
            bundle = bundle.to(self.device)
        return segment_bundle(bundle, config, output_size=output_size, naming=naming, **overrides)

    def __call__(self, image: ImageLike, *, method: str = "diffseg", **kwargs) -> Segmentation:
        """Encode and segment one image. Keywords of `encode` (timestep, crop, resolution, resize, noise_seed, labels,
        segment_from) go to the encode; the rest to `segment`."""
        encode_keys = {"timestep", "crop", "resolution", "resize", "noise_seed", "labels", "segment_from", "blocks"}
        encode_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in encode_keys}
        return self.segment(self.encode(image, method=method, **encode_kwargs), **kwargs)


def _place_denoiser(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, offload: bool):
    """The UNet or transformer on `device` in `dtype`; with `offload`, kept in CPU memory and brought to `device` a
    block at a time as the forward reaches it (diffusers' block-level group offloading: Flux.1-dev's 24 GB of
    bfloat16 weights then run on a GPU with a fraction of that). On the CPU the hooks run and move nothing."""
    if not offload:
        return place(model, device, dtype)
    model = place(model, torch.device("cpu"), dtype)
    model.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1)
    return model


def _concat(a: dict, b: dict) -> dict:
    """Two UNet input dicts (tensors, and nested dicts of tensors) joined along the batch axis."""
    return {k: _concat(v, b[k]) if isinstance(v, dict) else torch.cat([v, b[k]]) for k, v in a.items()}
