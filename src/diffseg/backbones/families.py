"""Which checkpoint this is, and its components: the UNet families' table, detection and loading for every family.

One table of per-family facts of the UNets (`FAMILIES`; the transformers' is `dit.DIT_FAMILIES`) and a few
functions: `detect` (which family a UNet config is), `read_backbone` (a checkpoint's `Backbone` from its configs
alone, before any weights), `load` (the components a family needs, from a hub id or a local folder). How a UNet is
conditioned and run is its kind's (`unet.UNetKind`); a transformer's, `transformer.TransformerKind`.

| family | text encoders                        | conditioning                                              |
|--------|--------------------------------------|-----------------------------------------------------------|
| sd1    | CLIP ViT-L (`text_encoder`)          | last hidden state                                         |
| sd2    | OpenCLIP ViT-H (`text_encoder`)      | last hidden state (the converted encoder stops one early) |
| sdxl   | CLIP ViT-L + OpenCLIP bigG (`_2`)    | both penultimate states concatenated; bigG's pooled text  |
|        |                                      | embedding and (size, crop, size) time ids                 |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import hub
from . import dit
from .types import CONCEPT_MAPS, CROSS_ATTENTION_NAMING, FEATURES, SELF_ATTENTION, Backbone, Geometry

# What every UNet gives the methods: self-attention at each grid, a layer's features, each word's cross-attention
# (concept maps), and naming words riding along DiffSeg's own pass.
UNET_CAPABILITIES = frozenset({SELF_ATTENTION, FEATURES, CONCEPT_MAPS, CROSS_ATTENTION_NAMING})


# Per family: its text encoders and tokenizers, DiffCut's block (the reference's choices), and whether its UNet takes
# SDXL's added text-and-time embedding.
FAMILIES: dict[str, dict] = {
    "sd1": {"text_encoders": ("text_encoder",), "tokenizers": ("tokenizer",), "diffcut_block": -2},
    "sd2": {"text_encoders": ("text_encoder",), "tokenizers": ("tokenizer",), "diffcut_block": -2},
    "sdxl": {
        "text_encoders": ("text_encoder", "text_encoder_2"),
        "tokenizers": ("tokenizer", "tokenizer_2"),
        "diffcut_block": -1,
        "text_time": True,  # `addition_embed_type == "text_time"`: pooled text and time ids (`UNetKind.text_inputs`)
    },
}


def detect(unet_config: Mapping, scheduler_config: Mapping | None = None) -> Backbone:
    """The family of a UNet config (a diffusers `unet/config.json`), or a one-line error naming what is missing.

    SDXL family: `addition_embed_type == "text_time"` (pooled text and time ids). Otherwise SD 1.x (768-wide
    cross-attention, CLIP ViT-L) or SD 2.x (1024-wide, OpenCLIP ViT-H). Names within the SDXL family come from the
    depth of its deepest down block (10 transformer layers: SDXL; 4: SSD-1B; fewer: a smaller distillation such as
    Segmind-Vega); they change nothing but messages.
    """
    kind = unet_config.get("_class_name", "UNet2DConditionModel")
    if kind != "UNet2DConditionModel":
        raise ValueError(f"The checkpoint's UNet is a {kind}; diffseg needs a Stable Diffusion UNet2DConditionModel.")
    if unet_config.get("in_channels", 4) != 4:
        raise ValueError(
            f"The checkpoint's UNet takes {unet_config['in_channels']} input channels (an inpainting or depth model); "
            "diffseg needs a text-to-image Stable Diffusion checkpoint (4 latent channels)."
        )
    down = list(unet_config.get("down_block_types", ()))
    if not any("CrossAttn" in block for block in down):
        raise ValueError("The checkpoint's UNet has no cross-attention blocks; it is not a Stable Diffusion UNet.")
    sample = unet_config.get("sample_size", 64)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    prediction = (scheduler_config or {}).get("prediction_type", "epsilon")
    levels = {i for i, block in enumerate(down) if "CrossAttn" in block}
    if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        levels.add(len(down) - 1)  # the mid block works on the last level's grid
    geometry = {
        "native_size": int(sample) * 8,
        "size_multiple": 8 * 2 ** (len(down) - 1),
        "grid_sides": tuple(int(sample) >> level for level in sorted(levels)),
    }
    common = {"prediction_type": prediction, "capabilities": UNET_CAPABILITIES}
    added = unet_config.get("addition_embed_type")
    if added == "text_time":
        layers = unet_config.get("transformer_layers_per_block", 1)
        deepest = max(layers) if isinstance(layers, (list, tuple)) else layers
        deepest = max(deepest) if isinstance(deepest, (list, tuple)) else deepest
        name = "SDXL" if deepest >= 10 else "SSD-1B" if deepest >= 4 else "SDXL (distilled, e.g. Segmind-Vega)"
        return _backbone("sdxl", name, geometry, common)
    if added is not None:
        raise ValueError(
            f"The checkpoint's UNet has `addition_embed_type={added!r}`, which none of the Stable Diffusion "
            "families diffseg knows uses (SD 1.x, SD 2.x, SDXL, SSD-1B, Segmind-Vega)."
        )
    width = unet_config.get("cross_attention_dim", 768)
    family = "sd2" if width == 1024 else "sd1"
    name = "Stable Diffusion 2.x" if family == "sd2" else "Stable Diffusion 1.x"
    if prediction == "v_prediction":
        name += " (v-prediction)"
    return _backbone(family, name, geometry, common)


def _backbone(family: str, name: str, geometry: dict, common: dict) -> Backbone:
    row = {k: v for k, v in FAMILIES[family].items() if k != "text_time"}  # the kind's own, read from the row
    return Backbone(family, name, Geometry(name, **geometry), **row, **common)


# ---------------------------------------------------------------------------------------------- loading


def read_backbone(model: str | os.PathLike, *, local_files_only: bool = False) -> Backbone:
    """The family of a checkpoint (hub id or folder) from its configs alone, without loading weights."""
    model = str(model)
    hub.check_model_path(model)
    offline = False
    if not Path(model).expanduser().is_dir() and not local_files_only and not hub.hub_reachable():
        local_files_only = offline = True
    return _read_configs(model, local_files_only, offline)[0]


def _read_configs(model: str, local_files_only: bool, offline: bool) -> tuple[Backbone, dict | None]:
    try:
        # The index first: offline, the hub's cache cannot tell a file the checkpoint lacks (an SD3's unet/) from one
        # never downloaded, so the denoiser to read is the one the index names.
        index = hub.read_json(model, "", "model_index.json", local_files_only)
        transformer = index is not None and "transformer" in index and "unet" not in index
        unet_config = None if transformer else hub.read_json(model, "unet", "config.json", local_files_only)
        transformer_config = None
        if unet_config is None:
            transformer_config = hub.read_json(model, "transformer", "config.json", local_files_only)
        scheduler_config = hub.read_json(model, "scheduler", "scheduler_config.json", local_files_only)
    except OSError as error:
        reason = hub.UNREACHABLE if offline else str(error)
        raise hub.missing_weights(model, "the UNet or transformer config", reason) from error
    if transformer_config is not None:
        return dit.detect_transformer(transformer_config, index), scheduler_config
    if unet_config is None:
        folder = Path(model).expanduser()
        present = [f"{n}/" for n in ("vae", "text_encoder", "tokenizer") if not (folder / n).is_dir()]
        raise hub.missing_weights(
            model,
            "the UNet or transformer config",
            f"the folder lacks {', '.join(['unet/config.json (or transformer/config.json)', *present])}.",
        )
    return detect(unet_config, scheduler_config), scheduler_config


def load(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype,
    local_files_only: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[Backbone, dict[str, object]]:
    """Load the components a checkpoint's family needs, from a hub id or a local diffusers folder.

    The UNet (or transformer) and text encoders load in `dtype`; the VAE in float32 (every family's VAE encoder
    overflows in float16: SD 1.x/2.x at large activations, SDXL's at almost any input). Weights load with
    accelerate's low-memory path when it is installed (it is a dependency), so no warning is printed.

    Returns:
        (backbone, components): components maps "unet", "vae", "text_encoder", "tokenizer" (and, for SDXL,
        "text_encoder_2", "tokenizer_2"), plus "scheduler" (None if the checkpoint has none). A diffusion
        transformer's: "transformer", "vae", "scheduler" and "conditioning", the empty prompt's, read from the
        user's cache or computed on `device` by text encoders loaded for it alone (`prompt_cache`).

    Raises:
        FileNotFoundError: the folder, a component or the weights are missing, or the hub cannot be reached; the
            message says what is missing and how to pass a local folder instead.
        ValueError: the checkpoint is not a Stable Diffusion family diffseg knows.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = str(model)
    hub.check_model_path(model)
    local = Path(model).expanduser().is_dir()
    offline = False
    if not local and not local_files_only and not hub.hub_reachable():
        local_files_only = offline = True  # the hub cache may still hold it

    # 1. Read the configs and decide the family.
    backbone, scheduler_config = _read_configs(model, local_files_only, offline)
    if local:
        missing = [name for name in backbone.components if not (Path(model).expanduser() / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"Model folder `{model}` is a {backbone.name} checkpoint but lacks "
                f"{', '.join(f'{m}/' for m in missing)}; copy the complete diffusers folder."
            )

    if backbone.denoiser == "transformer":
        return backbone, _load_transformer(model, backbone, dtype, torch.device(device), local_files_only, offline)

    # 2. Load each component.
    loaders = {
        "unet": (UNet2DConditionModel, {"torch_dtype": dtype}),
        "vae": (AutoencoderKL, {"torch_dtype": torch.float32}),
        "text_encoder": (CLIPTextModel, {"torch_dtype": dtype}),
        "text_encoder_2": (CLIPTextModelWithProjection, {"torch_dtype": dtype}),
        "tokenizer": (CLIPTokenizer, {}),
        "tokenizer_2": (CLIPTokenizer, {}),
    }
    components: dict[str, object] = {}
    with hub.quiet_loading():
        for name in backbone.components:
            loader, options = loaders[name]
            try:
                components[name] = loader.from_pretrained(
                    model, subfolder=name, local_files_only=local_files_only, **options
                )
            except (OSError, ValueError) as error:  # hub errors subclass OSError
                reason = hub.UNREACHABLE if offline else error
                raise hub.missing_weights(model, f"`{name}`", str(reason)) from error
    components["scheduler"] = (
        DDPMScheduler.from_config(scheduler_config) if scheduler_config is not None else None
    )  # only its noise schedule is used (adding noise), which every diffusers scheduler shares
    return backbone, components


def _load_transformer(
    model: str, backbone: Backbone, dtype: torch.dtype, device: torch.device, local_files_only: bool, offline: bool
) -> dict[str, object]:
    """A diffusion transformer's components, and its empty prompt's conditioning from the cache when it is there
    (the text encoders, T5 among them, are then not loaded at all)."""
    from . import prompt_cache

    def missing(name: str, error: Exception) -> FileNotFoundError:
        return hub.missing_weights(model, f"`{name}`", hub.UNREACHABLE if offline else str(error))

    with hub.quiet_loading(), dit.quiet():
        components = dit.load(model, backbone, dtype=dtype, local_files_only=local_files_only, missing=missing)
        text = (*backbone.text_encoders, *backbone.tokenizers)
        if Path(model).expanduser().is_dir():
            identity = {"folder": str(Path(model).expanduser().resolve()), "files": dit.checkpoint_files(model, text)}
        else:
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(model, "model_index.json", local_files_only=local_files_only)
            identity = {"hub": model, "revision": dit.hub_revision(index)}
        identity.update(family=backbone.family, tokens=backbone.text_tokens, dtype=str(dtype))
        key = prompt_cache.cache_key(identity)
        conditioning = prompt_cache.read(key)
        if conditioning is None:
            encoders = dit.load_text_encoders(
                model, backbone, dtype=dtype, local_files_only=local_files_only, missing=missing
            )
            encoders = {n: e.to(device) if isinstance(e, torch.nn.Module) else e for n, e in encoders.items()}
            conditioning = dit.encode_empty_prompt(backbone, encoders, device, components["transformer"])
            prompt_cache.write(key, conditioning, hub.public_name(model))
            del encoders  # T5-XXL alone is 9.5 GB in bfloat16: gone before the first image
    components["conditioning"] = conditioning
    return components


def load_text_encoders(
    model: str, backbone: Backbone, names: tuple[str, ...], *, dtype: torch.dtype, device: torch.device
) -> dict[str, object]:
    """A diffusion transformer's text encoders `names` (and their tokenizers), loaded on `device` for words (concept
    maps) when the empty prompt's conditioning came from the cache. The same errors as `load`."""
    model = str(model)
    hub.check_model_path(model)
    offline = not Path(model).expanduser().is_dir() and not hub.hub_reachable()

    def missing(name: str, error: Exception) -> FileNotFoundError:
        return hub.missing_weights(model, f"`{name}`", hub.UNREACHABLE if offline else str(error))

    with hub.quiet_loading(), dit.quiet():
        loaded = dit.load_text_encoders(
            model, backbone, dtype=dtype, local_files_only=offline, missing=missing, only=names
        )
    return {n: e.to(device) if isinstance(e, torch.nn.Module) else e for n, e in loaded.items()}


def load_tokenizer(model: str | os.PathLike):
    """The checkpoint's first tokenizer alone (no weights: a few MB), so that naming words can be checked before the
    model loads."""
    from transformers import CLIPTokenizer

    model = str(model)
    hub.check_model_path(model)
    local_files_only = not Path(model).expanduser().is_dir() and not hub.hub_reachable()
    try:
        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        reason = hub.UNREACHABLE if local_files_only else error
        raise hub.missing_weights(model, "`tokenizer`", str(reason)) from None
