"""Step 2 of the method: capture self-attention probabilities from a diffusers UNet.

A diffusers attention processor, installed on the self-attention layers (`attn1` of each transformer block) only,
computes each head's softmax(QKᵀ/√d) explicitly, adds its mean over heads into a store and uses the same
probabilities for the layer's output, so the UNet computes what it always does. Query rows are processed a block
at a time: all heads' 4096×4096 probabilities are never held at once.

Reference: KerasCV's `SpatialTransformer` returns each layer's weights (batch, heads, r², r²), and the UNet sums
them `/5` per resolution; `DiffSeg.aggregate_weights` then takes the mean over heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..methods.diffseg.aggregation import Grid, GridDict, by_size

# Attention scores computed at once (elements): 2**21 float32 = 8 MiB, a block of query rows over all heads.
_SCORES_PER_BLOCK = 1 << 21
_SCORES_PER_BLOCK_GPU = 1 << 26  # 256 MiB: on a GPU, fewer and larger kernels win


def token_grid(tokens: int, latent: tuple[int, int]) -> Grid:
    """The (h, w) grid with `tokens` cells among a UNet's levels for a latent of (H, W): (H, W), then each stride-2
    downsampling's (ceil(H/2), ceil(W/2)), and so on."""
    h, w = int(latent[0]), int(latent[1])
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)  # a stride-2 convolution with padding 1: ceil(n / 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} tokens match no grid of the {latent[0]}×{latent[1]} latent's UNet levels.")
    return h, w


class AttentionStore:
    """Running sums of head-averaged attention probabilities, per attention grid, self and cross separately.

    Grids are keyed (h, w), each layer's read from its number of queries (`token_grid`).
    Results live here, not on the model or the pipeline, so concurrent encodes never share state.
    """

    def __init__(self, latent: tuple[int, int]) -> None:
        self.latent = (int(latent[0]), int(latent[1]))
        self._sums: dict[str, dict[Grid, torch.Tensor]] = {"self": {}, "cross": {}}  # (h, w) -> (B, h·w, keys)
        self._layers: dict[str, dict[Grid, int]] = {"self": {}, "cross": {}}

    @property
    def layers(self) -> dict[Grid, int]:
        """(h, w) -> number of self-attention layers added."""
        return GridDict(self._layers["self"])

    def add(self, head_mean: torch.Tensor, kind: str = "self") -> None:
        """Add one layer's head-averaged probabilities, (B, N, keys) float32 with N = h·w queries, at once (the
        capture processor adds its blocks through `running_sum`). `kind` is "self" or "cross"."""
        batch, queries, keys = head_mean.shape
        total, first = self.running_sum(batch, queries, keys, head_mean.device, kind)
        if first:
            total.copy_(head_mean)
        else:
            total += head_mean
        self.added(queries, kind)

    def running_sum(
        self, batch: int, queries: int, keys: int, device: torch.device, kind: str = "self"
    ) -> tuple[torch.Tensor, bool]:
        """The (B, queries, keys) float32 sum a layer adds its head mean into, a block of query rows at a time while
        the block is in cache (no full pass per layer), and whether the layer is its grid's first (whose blocks are
        written, not added). Count the layer with `added` once it is complete."""
        grid = token_grid(queries, self.latent)
        sums = self._sums[kind]
        if grid in sums:
            return sums[grid], False
        sums[grid] = torch.empty(batch, queries, keys, dtype=torch.float32, device=device)
        return sums[grid], True

    def added(self, queries: int, kind: str = "self") -> None:
        """Count one complete layer added through `running_sum`."""
        grid = token_grid(queries, self.latent)
        self._layers[kind][grid] = self._layers[kind].get(grid, 0) + 1

    def maps(self, kind: str = "self") -> dict[Grid, torch.Tensor]:
        """(h, w) -> (B, h·w, keys) float32: mean over heads and over the layers of that grid, finest first."""
        sums, layers = self._sums[kind], self._layers[kind]
        return GridDict((g, sums[g] / layers[g]) for g in by_size(sums))


class AttentionCaptureProcessor:
    """A diffusers attention processor that records softmax(QKᵀ/√d), averaged over heads, into a store.

    It follows `AttnProcessor2_0` step for step, but computes attention explicitly, a block of query rows at a time,
    and reuses those probabilities for the output. Softmax runs in float32 whatever the model's dtype.
    """

    def __init__(self, store: AttentionStore, kind: str = "self") -> None:
        self.store = store
        self.kind = kind  # "self" (attn1) or "cross" (attn2: queries over the prompt's tokens)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, Nq, d)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, Nk, d)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, h, Nk, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.upcast_attention:
            query, key = query.float(), key.float()

        n_q, n_k = query.shape[2], key.shape[2]
        # Query rows per block: all heads' scores for a block stay small enough to live in cache, like a fused
        # attention kernel's tiles; the only full-size tensor written is the (B, Nq, Nk) head mean itself.
        block = _SCORES_PER_BLOCK if query.device.type == "cpu" else _SCORES_PER_BLOCK_GPU
        rows = max(1, block // (batch_size * heads * n_k))
        query = query * attn.scale
        key_t = key.transpose(-1, -2).contiguous()  # (B, h, d, Nk)
        # The head mean goes straight into the store's running sum over this grid's layers (B, Nq, Nk), a block at a
        # time while it is in cache: the same values as a full head-mean tensor added afterwards, without its passes.
        total, first = self.store.running_sum(batch_size, n_q, n_k, query.device, self.kind)
        out = torch.empty(batch_size, heads, n_q, head_dim, dtype=value.dtype, device=query.device)  # (B, h, Nq, d)
        for r in range(0, n_q, rows):
            scores = query[:, :, r : r + rows] @ key_t  # (B, h, rows, Nk)
            if attention_mask is not None:
                scores = scores + attention_mask[:, :, r : r + rows]
            probs = scores.softmax(dim=-1, dtype=torch.float32)  # (B, h, rows, Nk)
            mean = probs.sum(dim=1).div_(heads)  # (B, rows, Nk)
            if first:
                total[:, r : r + rows] = mean
            else:
                total[:, r : r + rows] += mean
            out[:, :, r : r + rows] = probs.to(value.dtype) @ value  # (B, h, rows, d)
        self.store.added(n_q, self.kind)

        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
        hidden_states = hidden_states.to(value.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_layers(unet: torch.nn.Module, kind: str = "self") -> list[str]:
    """Processor names of the UNet's self-attention (`attn1`) or cross-attention (`attn2`) layers."""
    suffix = "attn1.processor" if kind == "self" else "attn2.processor"
    names = [name for name in unet.attn_processors if name.endswith(suffix)]
    if not names:
        raise ValueError(
            f"{type(unet).__name__} has no attention layers named '*.{suffix[:5]}'; DiffSeg needs a Stable Diffusion "
            "UNet (diffusers UNet2DConditionModel)."
        )
    return names


@contextmanager
def capture_attention(
    unet: torch.nn.Module, latent: tuple[int, int], *, cross: bool = False
) -> Iterator[AttentionStore]:
    """Install capturing processors on the self-attention layers (and, with `cross`, the cross-attention layers) for
    the duration of the block. The original processors are restored on exit, also when the forward raises.

        with capture_attention(unet, latents.shape[-2:]) as store:
            unet(latents, timestep, encoder_hidden_states=text)
        maps = store.maps()  # (h, w) -> (B, h·w, h·w)
    """
    store = AttentionStore(latent)
    original = unet.attn_processors  # name -> processor, every layer
    replace = {name: AttentionCaptureProcessor(store, "self") for name in attention_layers(unet, "self")}
    if cross:
        replace.update({name: AttentionCaptureProcessor(store, "cross") for name in attention_layers(unet, "cross")})
    # `set_attn_processor` with a dict wants a processor for every layer: keep the others as they are.
    unet.set_attn_processor({name: replace.get(name, proc) for name, proc in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


@contextmanager
def capture_output(module: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record `module`'s output during the block (DiffCut's features: one `attn1`'s output, the UNet keeping its
    fused attention). The hook is removed on exit, also when the forward raises.

        with capture_output(unet.down_blocks[-1].attentions[-1].transformer_blocks[-1].attn1) as out:
            unet(...)
        tokens = out["output"]  # (B, h·w, C)
    """
    record: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        record["output"] = output.detach()

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()
