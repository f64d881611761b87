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

from ..grids import Grid, GridDict, by_size

# Attention scores computed at once (elements): 2**21 float32 = 8 MiB, a block of query rows over all heads.
_SCORES_PER_BLOCK = 1 << 21
_SCORES_PER_BLOCK_GPU = 1 << 26  # 256 MiB: on a GPU, fewer and larger kernels win


# A DiffSeg segmentation holds the captured means (the store's sums, divided in place) and their aggregate over the
# finest grid, plus the aggregation's and the merge's blocks: about 2.5 float32 copies of the self-attention at the peak
# (peak RSS of `diffseg segment --resolution 1024` and `1280` on the tiny SD 1.x: 2.6 and 2.4 times `attention_bytes`,
# the model included).
WORKING_COPIES = 2.5


def attention_bytes(backbone, size: tuple[int, int], batch: int = 1) -> int:
    """Bytes of the float32 self-attention a DiffSeg encode records for `batch` inputs of (H, W) pixels: each grid's
    (N, N) probabilities, N = h·w tokens (SD 1.x at 512²: 64², 32², 16², 8² grids, 72 MB; at 2048², 18 GB)."""
    total = 0
    for side in backbone.grid_sides:
        pixels = backbone.native_size // side  # per token, along each axis
        total += (-(-size[0] // pixels) * -(-size[1] // pixels)) ** 2
    return 4 * batch * total


def check_attention_memory(backbone, size: tuple[int, int], batch: int, device: torch.device) -> None:
    """Refuse, before the step runs, a DiffSeg input whose self-attention cannot fit the device's memory at all (torch
    would fail on one allocation after minutes of work), naming the largest resolution that can."""
    from .devices import device_memory

    available = device_memory(device)
    need = int(WORKING_COPIES * attention_bytes(backbone, size, batch))
    if available is None or need <= available:
        return
    fits = backbone.size_multiple
    area = size[0] * size[1]
    for side in range(int(area**0.5) // fits * fits, fits - 1, -fits):  # suggested with a quarter left for the rest
        if WORKING_COPIES * attention_bytes(backbone, (side, side), batch) <= 0.75 * available:
            fits = side
            break
    pixels = backbone.native_size // backbone.grid_sides[0]  # per token of the finest grid
    tokens = f"{-(-size[0] // pixels)}×{-(-size[1] // pixels)}"
    raise ValueError(
        f"DiffSeg on a {size[0]}×{size[1]} input (batch {batch}) records self-attention over {tokens} tokens: about "
        f"{_gib(need)} with its working copies, more than the {_gib(available)} of "
        f"{device.type.upper()} memory here. Use `--resolution {fits}` or lower (about that many pixels squared)"
        + (", or a smaller batch." if batch > 1 else ".")
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:,.0f} GiB" if size >= 10 * 2**30 else f"{size / 2**30:.2g} GiB"


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
        self._means: dict[str, GridDict] = {}  # kind -> `maps(kind)`, once taken

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
        if kind in self._means:
            raise RuntimeError(f"The store's {kind}-attention maps were already taken; record into a new store.")
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
        """(h, w) -> (B, h·w, keys) float32: mean over heads and over the layers of that grid, finest first.

        The sums become the means in place (no second copy of what can be gigabytes); recording ends there, and later
        calls return the same maps."""
        if kind not in self._means:
            sums, layers = self._sums[kind], self._layers[kind]
            with torch.inference_mode():  # the sums were made in it (an encode's forward)
                self._means[kind] = GridDict((g, sums[g].div_(layers[g])) for g in by_size(sums))
        return self._means[kind]


def attend_and_record(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    store: AttentionStore,
    kind: str = "self",
    *,
    image: slice | None = None,
    mask: torch.Tensor | None = None,
    text: slice | None = None,
    record_image: bool = True,
) -> torch.Tensor:
    """Explicit attention, (B, h, N, d) per tensor, whose probabilities also go into `store`: (B, h, Nq, d) out.

    The head mean of softmax(QKᵀ·scale) (softmax in float32 whatever the dtype) is added into the store's running
    sum for the queries `image` over the keys `image`, renormalised over them: the image-to-image part of a joint
    text-and-image attention, identical to a softmax over the image keys alone (MM-DiT). `image=None` records every
    query over every key (a UNet layer's own softmax). With `text`, the queries `image` over the keys `text`, as the
    joint softmax gives them (not renormalised), go into the store's "cross" sums (Seg4Diff's image-to-text maps);
    `record_image=False` then records those alone. Query rows go a block at a time: all heads' scores for a block
    stay small enough to live in cache, like a fused attention kernel's tiles, and the only full-size tensors written
    are the sums themselves.
    """
    batch, heads, n_q, head_dim = query.shape
    n_k = key.shape[2]
    block = _SCORES_PER_BLOCK if query.device.type == "cpu" else _SCORES_PER_BLOCK_GPU
    rows = max(1, block // (batch * heads * n_k))
    query = query * scale
    key_t = key.transpose(-1, -2).contiguous()  # (B, h, d, Nk)
    recorded = slice(0, n_q) if image is None else image
    n = recorded.stop - recorded.start
    if record_image:
        total, first = store.running_sum(batch, n, n if image is not None else n_k, query.device, kind)
    if text is not None:
        text_total, text_first = store.running_sum(batch, n, text.stop - text.start, query.device, "cross")
    out = torch.empty(batch, heads, n_q, head_dim, dtype=value.dtype, device=query.device)  # (B, h, Nq, d)
    # Blocks never straddle the recorded rows: before them (text), them, after them (text).
    for start, stop in ((0, recorded.start), (recorded.start, recorded.stop), (recorded.stop, n_q)):
        for r in range(start, stop, rows):
            end = min(r + rows, stop)
            scores = query[:, :, r:end] @ key_t  # (B, h, rows, Nk)
            if mask is not None:
                scores = scores + mask[:, :, r:end]
            if scores.dtype == torch.float32:  # in place: the same values, no second block-sized buffer to fill
                probs = torch.softmax(scores, dim=-1, out=scores)  # (B, h, rows, Nk)
            else:
                probs = scores.softmax(dim=-1, dtype=torch.float32)
            out[:, :, r:end] = probs.to(value.dtype) @ value  # (B, h, rows, d)
            if start != recorded.start:
                continue
            rows_in = slice(r - recorded.start, end - recorded.start)
            if text is not None:
                text_mean = probs[..., text].sum(dim=1).div_(heads)  # (B, rows, text keys)
                if text_first:
                    text_total[:, rows_in] = text_mean
                else:
                    text_total[:, rows_in] += text_mean
            if not record_image:
                continue
            kept = probs if image is None else probs[..., image]
            if image is not None:
                kept = kept / kept.sum(dim=-1, keepdim=True)  # the softmax over the image keys alone
            mean = kept.sum(dim=1).div_(heads)  # (B, rows, keys)
            if first:
                total[:, rows_in] = mean
            else:
                total[:, rows_in] += mean
    if record_image:
        store.added(n, kind)
    if text is not None:
        store.added(n, "cross")
    return out


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

        out = attend_and_record(query, key, value, attn.scale, self.store, self.kind, mask=attention_mask)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# A UNet's parts with attention, in the order its forward runs them (diffusers registers `up_blocks` before
# `mid_block`, so `attn_processors` lists the mid-block's layers last).
_FORWARD_ORDER = ("down_blocks", "mid_block", "up_blocks")


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


def last_attention_layer(unet: torch.nn.Module, *, cross: bool = False, self_attention: bool = True) -> torch.nn.Module:
    """The layer, among those `capture_attention` records with the same arguments, that the UNet's forward runs last:
    an encode that reads only attention needs nothing after it (`stop_after`), such as the last block's feed-forward
    and the output convolution (on SDXL, whose finest level has no attention, the whole last up-block)."""
    kinds = (["self"] if self_attention else []) + (["cross"] if cross else [])
    position = {name: k for k, name in enumerate(unet.attn_processors)}  # registration order within each part
    names = [name for kind in kinds for name in attention_layers(unet, kind)]
    last = max(names, key=lambda name: (_FORWARD_ORDER.index(name.split(".")[0]), position[name]))
    return unet.get_submodule(last.removesuffix(".processor"))


@contextmanager
def capture_attention(
    unet: torch.nn.Module,
    latent: tuple[int, int],
    *,
    cross: bool = False,
    self_attention: bool = True,
    stop: bool = False,
) -> Iterator[AttentionStore]:
    """Install capturing processors on the self-attention layers (and, with `cross`, the cross-attention layers;
    `self_attention=False` leaves the self-attention fused and unrecorded) for the duration of the block. The
    original processors are restored on exit, also when the forward raises. With `stop`, for a forward whose output
    is not read, the forward ends after the last recorded layer (`last_attention_layer`, `stop_after`): the maps are
    the same, and the block's code after the forward does not run.

        with capture_attention(unet, latents.shape[-2:]) as store:
            unet(latents, timestep, encoder_hidden_states=text)
        maps = store.maps()  # (h, w) -> (B, h·w, h·w)
    """
    if stop:
        last = last_attention_layer(unet, cross=cross, self_attention=self_attention)
        with capture_attention(unet, latent, cross=cross, self_attention=self_attention) as store, stop_after(last):
            yield store
        return
    store = AttentionStore(latent)
    original = unet.attn_processors  # name -> processor, every layer
    replace = {}
    if self_attention:
        replace.update({name: AttentionCaptureProcessor(store, "self") for name in attention_layers(unet, "self")})
    if cross:
        replace.update({name: AttentionCaptureProcessor(store, "cross") for name in attention_layers(unet, "cross")})
    # `set_attn_processor` with a dict wants a processor for every layer: keep the others as they are.
    unet.set_attn_processor({name: replace.get(name, proc) for name, proc in original.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(original)


class _Reached(Exception):
    """Raised by `stop_after`'s hook once its module has run; caught by `stop_after`."""


@contextmanager
def stop_after(module: torch.nn.Module) -> Iterator[None]:
    """Run a forward inside the block only as far as `module`: once it has run (and any hooks registered before this
    one have seen its output), the rest of the model is skipped. For encodes that read one layer and never the
    model's output (DiffCut's features, Seg4Diff's attention, a transformer's first blocks): the same result at
    a fraction of the work. Under block-level group offloading the blocks run so far are offloaded as usual; the
    model's small top-level modules stay onloaded until the next forward."""

    def hook(_module, _inputs, _output):
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _Reached:
        pass
    finally:
        handle.remove()


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
        record["output"] = output  # a tensor (a UNet's attn1) or a tuple (a transformer block's two streams)

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()
