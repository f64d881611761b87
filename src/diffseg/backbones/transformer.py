"""The MM-DiT transformer kind (SD3 / SD3.5, Flux.1): its conditioning, one step's inputs and what methods capture.

The family facts (classes, text encoders, noise schedules, the capture processor, the concept maps' encoders) are
rows of `dit.DIT_FAMILIES`; this class runs them. The empty prompt's conditioning comes with the checkpoint (read
from the user cache by `families.load`, or computed once from the text encoders given).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dit
from .families import load_text_encoders
from .capture import capture_output, stop_after, token_grid
from .concepts import ConceptTokens, concept_attention, default_blocks, encode_concepts, parse_concepts
from .joint_capture import capture_joint_attention
from .kind import DenoiserKind
from .types import CLIP_TEXT_ATTENTION, Conditioning


class TransformerKind(DenoiserKind):
    """A diffusion transformer's answers to the methods (`kind.DenoiserKind`)."""

    label = "transformer"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if "" not in self._conditioning:  # text encoders given in memory: encode the empty prompt with them, once
            empty = dit.encode_empty_prompt(self.backbone, self.text, self.device, self.denoiser)
            hidden, pooled = (t.to(self.device, self.dtype) for t in (empty.hidden, empty.pooled))
            self._conditioning[""] = Conditioning(hidden, pooled)
        self._concepts: dict[tuple[str, ...], ConceptTokens] = {}

    @property
    def transformer(self) -> torch.nn.Module:
        return self.denoiser

    @property
    def _row(self) -> dict:
        return dit.DIT_FAMILIES[self.backbone.family]

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """Its blocks in the order the image passes them (Flux: double-stream, then single-stream)."""
        return dit.blocks(self.transformer)

    def prompt_embedding(self, prompt: str = "") -> Conditioning:
        """The empty prompt's conditioning (the only prompt a transformer's methods condition on)."""
        if prompt != "":
            raise ValueError(f"{self.backbone.name} is conditioned on the empty prompt only; words are concept maps.")
        return self._conditioning[""]

    # ------------------------------------------------------------------ one step

    def _noise_schedule(self):
        if self.scheduler is None:
            raise ValueError(f"{self.backbone.name} needs its flow-matching `scheduler` to place a timestep.")
        return self.scheduler

    def step_inputs(self, pixels, timestep, noise_seed, *, schedule=None, conditioning=None):
        """The transformer's inputs on the flow-matching latent: noise at `timestep`, or at the (steps, from_end)
        point of its scheduler's inference schedule (`EncodeConfig.schedule`); and its patches' grid."""
        size = tuple(pixels.shape[-2:])
        tokens = dit.token_count(size, self.backbone)
        if schedule is not None:
            level = dit.schedule_sigma(self._noise_schedule(), *schedule, family=self.backbone.family, tokens=tokens)
        else:
            level = dit.sigma(self.backbone, self._noise_schedule(), timestep, tokens)
        # Contiguous layout: channels-last GroupNorm is not float32-exact on the CPU (`DenoiserKind.clean_latents`).
        x = dit.latents(self.vae, pixels.to(self.device, torch.float32), level, noise_seed)
        inputs = dit.transformer_inputs(
            self.backbone, self.transformer, conditioning or self.prompt_embedding(), x, level
        )
        return inputs, tuple(side // self.backbone.size_multiple for side in size)

    def capture(self, grid, chosen: range | None = None, **options):
        """`joint_capture.capture_joint_attention` on this transformer's blocks with its family's processor."""
        return capture_joint_attention(self.blocks, grid, self._row["capture"], chosen, **options)

    # ------------------------------------------------------------------ captures

    @torch.inference_mode()
    def attend(
        self, pixels, *, timestep, noise_seed, schedule=None, vocabulary=None, segment_from="unconditional", blocks=None
    ):
        """The image-to-image attention of the chosen blocks (default: every block), averaged: one grid (DiffSeg)."""
        if vocabulary is not None:
            self.vocabulary(vocabulary.words)  # refused: no cross-attention of its own to name segments with
        chosen = self.check_blocks(blocks)
        inputs, grid = self.step_inputs(pixels, timestep, noise_seed, schedule=schedule)
        last = self.blocks[-1 if chosen is None else chosen[-1]]
        with self.lock, self.capture(grid, chosen) as store, stop_after(last):  # later blocks are not needed
            self.transformer(**inputs)
        return store.maps(), store.layers, None

    @torch.inference_mode()
    def features(self, pixels, *, timestep, noise_seed, schedule=None, blocks=None) -> torch.Tensor:
        """(B, h, w, C) image tokens after DiffCut's block (`backbone.diffcut_block`, or the last of `blocks`)."""
        chosen = self.check_blocks(blocks)
        inputs, grid = self.step_inputs(pixels, timestep, noise_seed, schedule=schedule)
        layer = dit.feature_block(self.backbone, self.transformer, None if chosen is None else chosen[-1])
        with self.lock, capture_output(layer) as record, stop_after(layer):
            self.transformer(**inputs)
        tokens = record["output"][1]  # a block's (text, image) streams: the image's
        return tokens.reshape(len(pixels), *token_grid(tokens.shape[1], grid), -1)

    @torch.inference_mode()
    def text_attention(self, pixels, *, timestep, noise_seed, blocks=None, schedule=None) -> torch.Tensor:
        """(B, h, w, 77) float32: one block's image-to-text attention (Seg4Diff; reference `SD3Backbone.forward` and
        its `JointAttnProcessor2_0`): the empty prompt with T5's embeddings zero (`dit.seg4diff_conditioning`), noise
        at `schedule`, the softmax over the whole joint sequence, mean over heads, image queries over the 77 CLIP
        keys. `blocks` averages several blocks' maps, as the reference's list of layers (default:
        `dit.seg4diff_block`, 9 on SD3-medium)."""
        if CLIP_TEXT_ATTENTION not in self.backbone.capabilities:
            return super().text_attention(pixels)
        chosen = self.check_blocks(blocks)
        if chosen is None:
            block = dit.seg4diff_block(self.backbone)
            chosen = range(block, block + 1)
        conditioning = dit.seg4diff_conditioning(self.prompt_embedding())
        inputs, grid = self.step_inputs(pixels, timestep, noise_seed, schedule=schedule, conditioning=conditioning)
        tokens = dit.SEG4DIFF_TEXT_TOKENS
        capture = self.capture(grid, chosen, text_tokens=tokens, record_image=False)
        with self.lock, capture as store, stop_after(self.blocks[chosen[-1]]):
            self.transformer(**inputs)
        return store.maps("cross")[grid].reshape(len(pixels), *grid, tokens)

    # ------------------------------------------------------------------ concepts: words to pixels

    def concept_tokens(self, words: Sequence[str] | str) -> ConceptTokens:
        """Concept tokens for `words` (`concepts.encode_concepts`), computed once per word set. The text encoders
        they need (Flux: T5; SD3: both CLIPs) load on the first call when the checkpoint came without them (its
        empty prompt from the cache), and stay for the next."""
        words = parse_concepts(words)
        if words not in self._concepts:
            needed = self._row["concept_encoders"]
            if any(self.text.get(name) is None for name in needed):
                self.text.update(
                    load_text_encoders(self.model, self.backbone, needed, dtype=self.dtype, device=self.device)
                )
            width = self.transformer.config.joint_attention_dim
            self._concepts[words] = encode_concepts(self.backbone, self.text, words, self.device, width)
        return self._concepts[words]

    def check_concepts(self, words: tuple[str, ...]) -> None:
        self.concept_tokens(words)  # encoded once (loading their text encoder): fails before any image

    @torch.inference_mode()
    def concept_maps(self, pixels, words, *, timestep, noise_seed, blocks=None, schedule=None) -> torch.Tensor:
        """(B, K, h, w) float32 on the token grid, summing to 1 over the K concepts at every token: ConceptAttention
        (`backbones.concepts`) at the reference's noise level (`schedule`: step 2 of 4, σ = 0.5 on Flux.1-schnell)
        and blocks (`blocks` (first, last) joint blocks; default Flux's last four double blocks, SD3 every block);
        Flux, as its reference, with the pooled text vector and the guidance zero."""
        words = parse_concepts(words)
        chosen = self.check_blocks(blocks, joint=True)
        chosen = chosen or default_blocks(self.backbone.family, self.backbone.joint_depth)
        tokens = self.concept_tokens(words)
        conditioning = self.prompt_embedding()
        if not self._row["concept_pooled"]:
            conditioning = Conditioning(conditioning.hidden, torch.zeros_like(conditioning.pooled))
        inputs, grid = self.step_inputs(pixels, timestep, noise_seed, schedule=schedule, conditioning=conditioning)
        if "guidance" in inputs:
            inputs["guidance"] = torch.zeros_like(inputs["guidance"])
        family, last = self.backbone.family, self.transformer.transformer_blocks[chosen[-1]]
        with self.lock, concept_attention(self.transformer, family, tokens, chosen) as record, stop_after(last):
            self.transformer(**inputs)
        return record.maps().reshape(len(pixels), len(words), *grid)
