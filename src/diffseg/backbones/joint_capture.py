"""Capturing an MM-DiT's joint attention: one processor class per variant, as diffusers keeps them.

`SD3JointCaptureProcessor` follows SD3's `JointAttnProcessor2_0` step for step (joint sequence [image; text]),
`FluxJointCaptureProcessor` Flux's `FluxAttnProcessor` ([text; image], RoPE on queries and keys before the scores;
a single-stream block receives the sequence already joined). Both take diffusers' processor signature and record,
through `capture.attend_and_record`, the image-to-image part of the attention (and, with `text_tokens`, the image
queries over the first text keys) into an `AttentionStore`. A family's row (`dit.DIT_FAMILIES`) names its class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .capture import AttentionStore, attend_and_record


class _JointCapture:
    """What both variants keep: the store, how many image tokens there are, which text keys to record."""

    def __init__(
        self, store: AttentionStore, image_tokens: int, text_tokens: int | None = None, record_image: bool = True
    ) -> None:
        self.store = store
        self.image_tokens = image_tokens
        self.text_tokens = text_tokens
        self.record_image = record_image

    def _record(self, query, key, value, scale, image: slice, text: slice | None, mask) -> torch.Tensor:
        return attend_and_record(
            query, key, value, scale, self.store, image=image, mask=mask, text=text, record_image=self.record_image
        )


class SD3JointCaptureProcessor(_JointCapture):
    """SD3 / SD3.5's `JointAttnProcessor2_0`, recording: image tokens first, then text (`[image; text]`)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ):
        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:  # the text stream's projections, after the image's: [image; text]
            text = [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]
            text_q, text_k, text_v = (
                p(encoder_hidden_states).view(batch, -1, heads, head_dim).transpose(1, 2) for p in text
            )
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=2) for pair in ((query, text_q), (key, text_k), (value, text_v)))
        image = slice(0, self.image_tokens)
        text = None if self.text_tokens is None else slice(self.image_tokens, self.image_tokens + self.text_tokens)
        out = self._record(query, key, value, attn.scale, image, text, attention_mask)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            out, text_out = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        return (out, text_out) if encoder_hidden_states is not None else out


class FluxJointCaptureProcessor(_JointCapture):
    """Flux.1's `FluxAttnProcessor`, recording: text first, then image (`[text; image]`), RoPE before the scores."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
        *args,
        **kwargs,
    ):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_q, text_k, text_v = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))  # (B, N, h, d)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # [text; image]
            text_q, text_k, text_v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (text_q, text_k, text_v))
            text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((text_q, query), (text_k, key), (text_v, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        length = query.shape[1]
        image = slice(length - self.image_tokens, length)
        text = None if self.text_tokens is None else slice(0, self.text_tokens)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # (B, h, N, d)
        out = self._record(query, key, value, attn.head_dim**-0.5, image, text, attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, N, h·d)
        if encoder_hidden_states is None:
            return out
        text_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], self.image_tokens], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())


@contextmanager
def capture_joint_attention(
    blocks: Sequence[torch.nn.Module],
    grid: tuple[int, int],
    processor: type[_JointCapture],
    chosen: range | None = None,
    *,
    text_tokens: int | None = None,
    record_image: bool = True,
) -> Iterator[AttentionStore]:
    """Record the image-to-image attention of a diffusion transformer's `blocks` (each one's `attn`, in the order the
    image passes them; `chosen`, indices into them, to keep a range) during the block: one grid, `grid` = (h, w)
    tokens, with the family's `processor` class. The original processors are restored on exit, also when the
    forward raises.

        with capture_joint_attention(dit.blocks(transformer), (64, 64), SD3JointCaptureProcessor) as store:
            transformer(**inputs)
        maps = store.maps()  # {(64, 64): (B, 4096, 4096)}, rows summing to 1, the mean over blocks

    With `text_tokens`, `store.maps("cross")` holds the image-to-text attention over the first `text_tokens` text
    keys, (B, h·w, text_tokens); `record_image=False` records only that.
    """
    store = AttentionStore(grid)
    chosen = range(len(blocks)) if chosen is None else chosen
    originals = {}
    recorder = processor(store, grid[0] * grid[1], text_tokens, record_image)
    try:
        for index in chosen:
            attn = blocks[index].attn
            originals[index] = attn.processor
            attn.processor = recorder  # the attribute `set_processor` sets, on these blocks only
        yield store
    finally:
        for index, original in originals.items():
            blocks[index].attn.processor = original
