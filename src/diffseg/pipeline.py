"""The pipeline: a checkpoint's components in, bundles and label maps out, for every method.

pipe = DiffSegPipeline.from_pretrained()              # CompVis/stable-diffusion-v1-4, or a local folder
result = pipe("photo.jpg")                             # encode + segment (DiffSeg)
bundle = pipe.encode("photo.jpg")                      # the expensive step, once
coarse = pipe.segment(bundle, kl_threshold=1.3)        # the cheap step, as often as you like (or a SegmentConfig)
cut = pipe.segment(pipe.encode("photo.jpg", method="diffcut"), tau=0.4)   # DiffCut

The pipeline composes: images are sized by the backbone's geometry, the method's row says what to capture, and the
denoiser's kind (`pipe.kind`: `backbones.unet.UNetKind` or `backbones.transformer.TransformerKind`) runs the step.
It never asks which kind or family it holds.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .backbones import families
from .backbones.concepts import parse_concepts
from .backbones.devices import resolve_device, resolve_dtype
from .backbones.kinds import backbone_of, make_kind
from .backbones.types import CROSS_ATTENTION_NAMING, Backbone, Conditioning
from .bundle import Bundle
from .config import (
    DEFAULT_METHOD,
    DEFAULT_MODEL,
    METHOD_DEFAULT,
    DiffCutConfig,
    EncodeConfig,
    NamingConfig,
    SegmentConfig,
    encode_settings,
)
from .io.images import as_array, to_model_input
from .io.images import crop as crop_image
from .methods.registry import check_runs_on, concept_method, method_named
from .segmentation import Segmentation, segment_bundle
from .words import Vocabulary

__all__ = ["DiffSegPipeline", "Segmentation", "segment_bundle", "resolve_device", "resolve_dtype"]

_NAMING = NamingConfig()
ImageLike = Image.Image | np.ndarray | str | os.PathLike


class DiffSegPipeline:
    """Frozen diffusion components that turn images into bundles and label maps.

    Any family the backbones know: SD 1.x, SD 2.x (512 and 768 v-prediction), SDXL (base, Turbo), SSD-1B,
    Segmind-Vega; or, with a `transformer` instead of a `unet`, SD3 / SD3.5 and Flux.1, whose empty-prompt
    conditioning is passed in (`from_pretrained` reads it from the user cache) or computed once from text encoders
    given. The UNet (transformer) and text encoders run in `dtype`; the VAE stays in float32 (its encoder overflows
    in float16). Components are attributes, as in diffusers pipelines: `unet` or `transformer`, `vae`,
    `text_encoder`, `tokenizer` (and, for SDXL, `text_encoder_2`, `tokenizer_2`), `scheduler`; `backbone` holds the
    checkpoint's facts and `kind` runs its denoiser.
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
        conditioning: Conditioning | None = None,
        model: str = "",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        backbone: Backbone | None = None,
        offload: bool = False,
        **text_components,
    ) -> None:
        if (unet is None) == (transformer is None):
            raise ValueError("Pass a `unet` (SD 1.x/2.x/SDXL) or a `transformer` (SD3, Flux.1), not both or neither.")
        denoiser = unet if unet is not None else transformer
        # The checkpoint's facts: as `from_pretrained` read them from its configs, or from these components.
        self.backbone = backbone or backbone_of(denoiser, scheduler)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = model
        text = dict(text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2)
        text.update(tokenizer_2=tokenizer_2, **text_components)
        self.kind = make_kind(
            self.backbone,
            denoiser,
            vae,
            scheduler,
            {k: v for k, v in text.items() if v is not None},
            device=self.device,
            dtype=self.dtype,
            offload=offload,
            model=model,
            conditioning=conditioning,
        )

    # The components, by their diffusers names (read from the kind, which holds them).
    unet = property(lambda self: self.kind.unet)
    transformer = property(lambda self: self.kind.transformer)
    vae = property(lambda self: self.kind.vae)
    scheduler = property(lambda self: self.kind.scheduler)
    text_encoder = property(lambda self: self.kind.text.get("text_encoder"))
    tokenizer = property(lambda self: self.kind.text.get("tokenizer"))
    text_encoder_2 = property(lambda self: self.kind.text.get("text_encoder_2"))
    tokenizer_2 = property(lambda self: self.kind.text.get("tokenizer_2"))

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the transformer: the network one step runs."""
        return self.kind.denoiser

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
        """Load a diffusers-format checkpoint of any family diffseg knows: a hub id or a local folder.

        `offload` keeps the UNet or transformer in CPU memory and runs it on `device` a block at a time (for a
        checkpoint larger than the GPU: Flux.1-dev on 24 GB).

        Raises:
            FileNotFoundError: the folder, a component or the weights are missing, or the hub cannot be reached; the
                message says how to pass a local folder instead.
            ValueError: the checkpoint is not a Stable Diffusion family diffseg knows; the message says what is off.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        backbone, components = families.load(model, dtype=dtype, local_files_only=local_files_only, device=device)
        return cls(**components, model=str(model), device=device, dtype=dtype, backbone=backbone, offload=offload)

    # ------------------------------------------------------------------ words

    def vocabulary(self, words: Sequence[str] | str) -> Vocabulary:
        """A `Vocabulary` for `words` with this checkpoint's tokenizer (see `vocabulary.build_vocabulary`)."""
        return self.kind.vocabulary(words)

    def words_for(self, spec, words: Sequence[str] | str | None) -> Vocabulary | tuple[str, ...] | None:
        """How method `spec` takes `words`: a `Vocabulary` when its own pass names its segments (DiffSeg's
        cross-attention, on a kind that has it); else the words as a tuple, which are the concepts (`concepts`,
        which needs them) or the concepts whose maps name its segments.

        Raises:
            ValueError: no words for the concepts method, or words no encoder takes.
        """
        if spec.concepts and words is None:
            raise ValueError("The concepts method maps words to pixels: pass them, e.g. --concepts 'cat, dog, sky'.")
        if words is None:
            return None
        if spec.names_segments and CROSS_ATTENTION_NAMING in self.backbone.capabilities:
            return self.kind.vocabulary(words)
        words = parse_concepts(words)
        self.kind.check_concepts(words)
        return words

    # ------------------------------------------------------------------ encode: the expensive step

    def input_size(
        self, image_size: tuple[int, int], resolution: int | None = None, resize: str = "native"
    ) -> tuple[int, int]:
        """(height, width) in pixels the denoiser sees for an image of `image_size` (`Geometry.target_size`)."""
        return self.backbone.geometry.target_size(image_size, resolution, resize)

    @torch.inference_mode()
    def encode(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        method: str = DEFAULT_METHOD,
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
                layer's features), "seg4diff" (SD3: one block's image-to-text attention) or "concepts" (where each of
                the `labels` is: concept maps).
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
            config = encode_settings(spec.encode_defaults, **given, noise_seed=noise_seed, blocks=blocks)
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
            pixels = to_model_input([arrays[i] for i in members], size, config.padding)  # (B, 3, H, W) in [-1, 1]
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
        method: str = DEFAULT_METHOD,
        config: EncodeConfig | None = None,
        vocabulary: Vocabulary | tuple[str, ...] | None = None,
        segment_from: str = _NAMING.segment_from,
    ) -> list[Bundle]:
        """Bundles of a prepared batch (see `images.to_model_input`) whose (H, W, 3) uint8 `images` (after any
        crop) the labels will cover: the method's encode step (`methods.registry`) with `config`'s timestep and noise
        (default: the method's). What `encode` does once images are decoded and resized, and what the job runner
        calls on batches decoded elsewhere (the Ray job's decode tasks)."""
        spec = method_named(method)
        check_runs_on(spec, self.backbone)
        config = config or spec.encode_defaults
        if spec.concepts or not isinstance(vocabulary, tuple):
            return spec.encode(self, pixels, images, config, vocabulary, segment_from)
        # Words that name the segments through their concept maps: a second step on the same pixels, at the concept
        # maps' own noise and blocks.
        bundles = spec.encode(self, pixels, images, config, None, segment_from)
        concepts = concept_method()
        named_by = concepts.encode(self, pixels, images, concepts.encode_defaults, vocabulary, segment_from)
        return [dataclasses.replace(b, named_by=n) for b, n in zip(bundles, named_by)]

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

    def __call__(self, image: ImageLike, *, method: str = DEFAULT_METHOD, **kwargs) -> Segmentation:
        """Encode and segment one image. Keywords of `encode` (timestep, crop, resolution, resize, noise_seed, labels,
        segment_from) go to the encode; the rest to `segment`."""
        encode_keys = {"timestep", "crop", "resolution", "resize", "noise_seed", "labels", "segment_from", "blocks"}
        encode_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in encode_keys}
        return self.segment(self.encode(image, method=method, **encode_kwargs), **kwargs)
