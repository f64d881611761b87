"""Concept attention on a diffusion transformer: words as extra tokens through the text stream, read against the image.

ConceptAttention (Helbling et al., ICML 2025; helblazer811/ConceptAttention, `concept_attention/flux/dit_block.py`
and `sd3/dit_block.py`). Each concept word becomes one token (`encode_concepts`). In every joint (double-stream)
block the concept tokens take the text stream's weights: its modulation, its q/k/v projections and norms, its
output projection and feed-forward. They attend to [concepts; image], so the image stream never sees them and the
denoiser's output is unchanged. A block's map is the dot product of the concept tokens' attention outputs with the
image tokens' attention outputs, before the output projection ("output space"), softmaxed over the concepts. The
maps of the chosen blocks are averaged.

The two references differ in three details, each kept per family:

| detail          | Flux (`flux/dit_block.py`)                 | SD3 (`sd3/dit_block.py`)                      |
|-----------------|--------------------------------------------|-----------------------------------------------|
| image vectors   | image rows of the [text; image] attention  | image rows of an [image; concepts] attention  |
| concept vectors | as they are                                | L2-normalised (`norm + 1e-8`)                 |
| other tokens    | none                                       | CLIP's start token, first; it has no map      |

Memory: a block adds one (B, K, N) map into a running sum; nothing per block is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..words import parse_words

# The references' blocks: Flux `encode_image(layer_indices=list(range(15, 19)))`, the last four of its 19 double-stream
# blocks; SD3 `encode_image(layer_indices=None)`, every block.
FLUX_CONCEPT_BLOCKS = 4


@dataclass(frozen=True)
class ConceptTokens:
    """Concept words as text-stream tokens of one checkpoint.

    Attributes:
        words: the concepts, in the order given.
        hidden: (1, prefix + K, D) the text encoder's embeddings, before the transformer's `context_embedder`.
        prefix: tokens before the concepts that take part in the attention but have no map (SD3: CLIP's start token).
    """

    words: tuple[str, ...]
    hidden: torch.Tensor
    prefix: int = 0


def parse_concepts(words: Sequence[str] | str) -> tuple[str, ...]:
    """The distinct concepts of a list or a comma-separated string (`words.parse_words`)."""
    return parse_words(
        words, empty="No concepts given: pass at least one word, e.g. --concepts 'cat, dog, grass, sky'."
    )


def word_starts(tokenizer, concept: str, offset: int, limit: int | None = None) -> list[int]:
    """Positions of the first token of each word of `concept` in its own encoding, `offset` being the tokens before
    the first word (CLIP's start token: 1; T5: 0). A single word has one: the token the references keep.

    Raises:
        ValueError: a word with no tokens, or a concept longer than the encoder's `limit` tokens (its end token
            included).
    """
    starts, position = [], offset
    for word in concept.split():
        count = len(tokenizer(word, add_special_tokens=False).input_ids)
        if not count:
            raise ValueError(f"The concept {concept!r} has a word with no tokens ({word!r}); remove it.")
        starts.append(position)
        position += count
    if limit is not None and position + 1 > limit:
        raise ValueError(
            f"The concept {concept!r} takes {position + 1} tokens; the text encoder holds {limit}. Use fewer words."
        )
    return starts


def encode_concepts(
    backbone, encoders: Mapping[str, object], words: Sequence[str], device, width: int
) -> ConceptTokens:
    """Each concept encoded on its own, one token each (so that the words' order changes nothing but the order).

    Flux (reference `embed_concepts`): T5 at the checkpoint's text length (padding attended, as the reference's
    `HFEmbedder` and diffusers do), its first token. SD3 (reference `encode_concepts`): CLIP-L and CLIP-bigG's
    penultimate layers side by side, padded to T5's width, the token after the start token; the start token (the same
    for every prompt) goes first, as in the reference's joint prompt. A concept of several words is the mean of each
    word's first token in the phrase's encoding: a single word keeps the references' token. `width` is the
    transformer's `joint_attention_dim`.
    """
    import diffusers

    from .dit import DIT_FAMILIES, quiet

    words = tuple(words)
    family = backbone.family
    with quiet():
        pipeline = getattr(diffusers, DIT_FAMILIES[family]["pipeline"])
    names = (*backbone.text_encoders, *backbone.tokenizers)
    pipe = pipeline(transformer=None, vae=None, scheduler=None, **{n: encoders.get(n) for n in names})
    tokens, prefix = [], 0
    with torch.inference_mode():
        for word in words:
            if family == "flux":
                t5 = encoders["text_encoder_2"]
                hidden = pipe._get_t5_prompt_embeds(
                    word, max_sequence_length=backbone.text_tokens, device=device, dtype=t5.dtype
                )
                starts = word_starts(encoders["tokenizer_2"], word, 0, hidden.shape[1])
            else:
                halves = [pipe._get_clip_prompt_embeds(word, device=device, clip_model_index=i)[0] for i in (0, 1)]
                hidden = torch.cat(halves, dim=-1)  # (1, 77, 768 + 1280)
                starts = word_starts(encoders["tokenizer"], word, 1, hidden.shape[1])
                prefix = 1
                start_token = hidden[:, :1]
            tokens.append(hidden[:, starts].mean(dim=1, keepdim=True))
    hidden = torch.cat(([start_token] if prefix else []) + tokens, dim=1)
    if family == "sd3":  # CLIP's width padded to the joint width (SD3's `encode_prompt` pads before joining T5)
        hidden = F.pad(hidden, (0, width - hidden.shape[-1]))
    return ConceptTokens(words, hidden, prefix)


def default_blocks(family: str, joint_blocks: int) -> range:
    """The references' blocks: Flux the last four double-stream blocks (15–18 of 19), SD3 every block."""
    if family == "flux":
        return range(max(0, joint_blocks - FLUX_CONCEPT_BLOCKS), joint_blocks)
    return range(joint_blocks)


class ConceptRecord:
    """The running mean over blocks of the (B, K, N) concept maps, softmaxed over concepts, float32."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.blocks = 0

    def add(self, maps: torch.Tensor) -> None:
        self.total = maps if self.total is None else self.total + maps
        self.blocks += 1

    def maps(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("No block recorded concept maps: the forward did not reach the chosen blocks.")
        return self.total / self.blocks


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h·d) -> (B, h, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _joined(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h·d)."""
    return x.transpose(1, 2).flatten(2)


def _rope(x: torch.Tensor, rotary, rows: slice) -> torch.Tensor:
    """Flux's rotary embedding of the positions `rows` on (B, h, N, d) queries or keys, as its attention applies it."""
    from diffusers.models.embeddings import apply_rotary_emb

    cos, sin = rotary
    return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=2)


def concept_step(block, family: str, concepts: torch.Tensor, inputs: dict, temb: torch.Tensor, prefix: int):
    """One joint block's concept step: the (B, K, N) maps (softmax over the K concepts) and the concept tokens after
    the block (None after a block whose text stream ends there, SD3's last).

    `inputs` are the keyword arguments the block called its `attn` with: the modulated image and text tokens (and,
    for Flux, the rotary embedding of [text; image])."""
    attn = block.attn
    heads = attn.heads
    image, text = inputs["hidden_states"], inputs["encoder_hidden_states"]
    n_image, n_text = image.shape[1], text.shape[1]

    # The image's queries, keys and values, as the block's attention makes them.
    iq, ik, iv = (_heads(p(image), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        iq, ik = attn.norm_q(iq), attn.norm_k(ik)

    # The concepts through the text stream's modulation and projections (reference: `txt_mod`, `txt_attn.qkv`).
    last = getattr(block, "context_pre_only", False)  # SD3's last block ends the text stream; Flux's blocks never do
    if last:
        normed = block.norm1_context(concepts, temb)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(concepts, emb=temb)
    cq, ck, cv = (_heads(p(normed), heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)

    if family == "flux":
        # RoPE on [text; image]: the image's positions; the concepts' ids are zero (reference `concept_ids`), whose
        # rotation is the identity.
        rotary = inputs["image_rotary_emb"]
        iq, ik = _rope(iq, rotary, slice(n_text, None)), _rope(ik, rotary, slice(n_text, None))
        tk, tv = (_heads(p(text), heads) for p in (attn.add_k_proj, attn.add_v_proj))
        tk = attn.norm_added_k(tk) if attn.norm_added_k is not None else tk
        tk = _rope(tk, rotary, slice(0, n_text))
        # Image vectors: the image rows of the [text; image] attention (`img_attn`).
        image_out = F.scaled_dot_product_attention(iq, torch.cat([tk, ik], 2), torch.cat([tv, iv], 2))
        concept_out = F.scaled_dot_product_attention(cq, torch.cat([ck, ik], 2), torch.cat([cv, iv], 2))
    else:
        # SD3 reference: one attention over [image; concepts] gives both the image and the concept vectors.
        joint = F.scaled_dot_product_attention(torch.cat([iq, cq], 2), torch.cat([ik, ck], 2), torch.cat([iv, cv], 2))
        image_out, concept_out = joint[:, :, :n_image], joint[:, :, n_image:]
    image_out, concept_out = _joined(image_out), _joined(concept_out)  # (B, N, h·d), (B, P + K, h·d)

    vectors = concept_out[:, prefix:].float()
    if family == "sd3":  # reference `_compute_heatmaps`: concept vectors L2-normalised
        vectors = vectors / (vectors.norm(dim=-1, keepdim=True) + 1e-8)
    maps = (vectors @ image_out.float().transpose(1, 2)).softmax(dim=1)  # (B, K, N), softmax over the concepts

    if last:
        return maps, None
    # The concept tokens' residual update, as the text stream's (reference: `txt_attn.proj`, `txt_mlp`).
    concepts = concepts + gate_msa.unsqueeze(1) * attn.to_add_out(concept_out.to(concepts.dtype))
    normed = block.norm2_context(concepts) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    concepts = concepts + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    if concepts.dtype == torch.float16:
        concepts = concepts.clip(-65504, 65504)
    return maps, concepts


@contextmanager
def concept_attention(transformer, family: str, tokens: ConceptTokens, chosen: range) -> Iterator[ConceptRecord]:
    """Run concept tokens alongside a transformer's forward inside the block; the record holds the mean over the
    `chosen` joint blocks of their maps. The concept stream starts at the transformer's `context_embedder` (as the
    text does) and passes every joint block up to the last chosen one; nothing of the model's own computation changes.
    Hooks are removed on exit, also when the forward raises.

        with concept_attention(transformer, "flux", tokens, range(15, 19)) as record:
            transformer(**inputs)
        maps = record.maps()  # (B, K, N)
    """
    record = ConceptRecord()
    state: dict[str, object] = {}
    handles = []

    def embedded(module, _inputs, output):
        batch = output.shape[0]
        hidden = tokens.hidden.to(output.device, output.dtype)
        state["concepts"] = module.forward(hidden).expand(batch, -1, -1)  # `forward`: not this hook again

    def block_inputs(_module, _args, kwargs):
        state["temb"] = kwargs["temb"]

    def attention_done(block, index):
        # The step runs when the block's attention has run, inside the block's forward: under block-level offloading
        # the block's weights are on the device then.
        def hook(_module, _args, kwargs, _output):
            if state.get("concepts") is None:
                return
            maps, state["concepts"] = concept_step(
                block, family, state["concepts"], kwargs, state["temb"], tokens.prefix
            )
            if index in chosen:
                record.add(maps)

        return hook

    try:
        handles.append(transformer.context_embedder.register_forward_hook(embedded))
        for index in range(chosen.stop):
            block = transformer.transformer_blocks[index]
            handles.append(block.register_forward_pre_hook(block_inputs, with_kwargs=True))
            handles.append(block.attn.register_forward_hook(attention_done(block, index), with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()
