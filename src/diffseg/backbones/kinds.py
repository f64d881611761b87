"""The table of denoiser kinds, and the one place that tells them apart: which kind a checkpoint's modules are.

`KINDS[backbone.denoiser]` is the class that runs it (`unet.UNetKind`, `transformer.TransformerKind`); a new kind of
denoiser is one class answering `kind.DenoiserKind`'s questions and one row here.
"""

from __future__ import annotations

import torch

from . import dit, families
from .devices import place
from .kind import DenoiserKind
from .transformer import TransformerKind
from .types import Backbone
from .unet import UNetKind

KINDS: dict[str, type[DenoiserKind]] = {"unet": UNetKind, "transformer": TransformerKind}


def backbone_of(denoiser: torch.nn.Module, scheduler=None) -> Backbone:
    """A loaded UNet's or transformer's `Backbone`, from its config (the class name tells the kind)."""
    config = {**denoiser.config, "_class_name": type(denoiser).__name__}
    if "Transformer" in config["_class_name"]:
        return dit.detect_transformer(config)
    return families.detect(config, scheduler.config if scheduler is not None else None)


def make_kind(
    backbone: Backbone,
    denoiser: torch.nn.Module,
    vae: torch.nn.Module,
    scheduler,
    text: dict[str, object],
    *,
    device: torch.device,
    dtype: torch.dtype,
    offload: bool = False,
    model: str = "",
    conditioning=None,
) -> DenoiserKind:
    """The kind that runs `backbone`, its modules placed: the denoiser and text encoders in `dtype` on `device` (the
    denoiser, with `offload`, in CPU memory and brought to `device` a block at a time), the VAE in float32 (its
    encoder overflows in float16); `conditioning`, the empty prompt's where it was cached (a transformer's)."""
    missing = [n for n in (*backbone.text_encoders, *backbone.tokenizers) if text.get(n) is None]
    if backbone.denoiser == "unet" and missing:
        raise ValueError(f"A {backbone.name} UNet needs {', '.join(f'`{n}`' for n in missing)} as well.")
    text = {n: place(m, device, dtype) if isinstance(m, torch.nn.Module) else m for n, m in text.items()}
    return KINDS[backbone.denoiser](
        backbone,
        _place_denoiser(denoiser, device, dtype, offload),
        place(vae, device, torch.float32),
        scheduler,
        text,
        device=device,
        dtype=dtype,
        model=model,
        conditioning=conditioning,
    )


def _place_denoiser(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, offload: bool):
    """The UNet or transformer on `device` in `dtype`; with `offload`, kept in CPU memory and brought to `device` a
    block at a time as the forward reaches it (diffusers' block-level group offloading: Flux.1-dev's 24 GB of
    bfloat16 weights then run on a GPU with a fraction of that). On the CPU the hooks run and move nothing."""
    if not offload:
        return place(model, device, dtype)
    model = place(model, torch.device("cpu"), dtype)
    model.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1)
    return model
