"""The backbone seam: what each Stable Diffusion family needs, read from the checkpoint's own configs.

One table of per-family facts (`FAMILIES`) and a few functions: `detect` (which family a UNet config is), `load`
(the components a family needs, from a hub id or a local folder), `encode_prompt` (the text conditioning) and
`unet_inputs` (everything the UNet's forward takes besides the latent and the timestep). The pipeline asks these;
nothing else in the package knows how a family differs.

| family | text encoders                        | conditioning                                              |
|--------|--------------------------------------|-----------------------------------------------------------|
| sd1    | CLIP ViT-L (`text_encoder`)          | last hidden state                                         |
| sd2    | OpenCLIP ViT-H (`text_encoder`)      | last hidden state (the converted encoder stops one early) |
| sdxl   | CLIP ViT-L + OpenCLIP bigG (`_2`)    | both penultimate states concatenated; bigG's pooled text  |
|        |                                      | embedding and (size, crop, size) time ids                 |
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DEFAULT_MODEL

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Backbone:
    """Facts about one checkpoint's family, all read from its configs.

    Attributes:
        family: "sd1", "sd2", "sdxl" (SDXL base and Turbo, SSD-1B, Segmind-Vega), or a diffusion transformer's
            (`dit`): "sd3" (SD3, SD3.5) or "flux" (Flux.1).
        name: what to call it in messages and tables, e.g. "SDXL", "SSD-1B", "Stable Diffusion 2.x (v-prediction)".
        native_size: side of the square it was trained at, in pixels (UNet `sample_size` × 8).
        size_multiple: image sides are rounded to a multiple of this, so that every UNet level's token grid halves
            the previous one exactly (8 × 2^downsamplings).
        text_encoders: component names of the text encoders, in conditioning order.
        tokenizers: component names of their tokenizers.
        diffcut_block: index into `unet.down_blocks` whose last transformer's `attn1` DiffCut reads (reference
            `LdmExtractor.register_hooks`: -2 for SD 1.x, -1 for the SDXL family); for a transformer, the block after
            which it reads the image tokens (`dit.feature_block`).
        prediction_type: the scheduler's ("epsilon" or "v_prediction"); one forward step reads attention either way.
        grid_sides: sides of the self-attention grids at the native square size, finest first (SD 1.x: 64, 32, 16,
            8; SDXL family: 64, 32, its first block having no attention; a transformer: its one token grid).
        denoiser: the component that denoises, "unet" or "transformer".
        text_tokens: length of the conditioning's text (a transformer's T5 tokens; CLIP's 77 for the UNets).
        depth: a transformer's blocks (Flux: double- and single-stream together); 0 for a UNet.
    """

    family: str
    name: str
    native_size: int
    size_multiple: int
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    diffcut_block: int
    prediction_type: str = "epsilon"
    grid_sides: tuple[int, ...] = ()
    denoiser: str = "unet"
    text_tokens: int = 77
    depth: int = 0

    @property
    def components(self) -> tuple[str, ...]:
        """Every component folder a checkpoint of this family must have (a transformer's text encoders are needed
        only until its empty prompt is cached: see `dit.load_text_encoders`)."""
        if self.denoiser == "transformer":
            return ("transformer", "vae", "scheduler")
        return ("unet", "vae", *self.text_encoders, *self.tokenizers)


# Per family: its text encoders and tokenizers, and DiffCut's block (the reference's choices).
FAMILIES: dict[str, dict] = {
    "sd1": {"text_encoders": ("text_encoder",), "tokenizers": ("tokenizer",), "diffcut_block": -2},
    "sd2": {"text_encoders": ("text_encoder",), "tokenizers": ("tokenizer",), "diffcut_block": -2},
    "sdxl": {
        "text_encoders": ("text_encoder", "text_encoder_2"),
        "tokenizers": ("tokenizer", "tokenizer_2"),
        "diffcut_block": -1,
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
    common = {
        "native_size": int(sample) * 8,
        "size_multiple": 8 * 2 ** (len(down) - 1),
        "prediction_type": prediction,
        "grid_sides": tuple(int(sample) >> level for level in sorted(levels)),
    }
    added = unet_config.get("addition_embed_type")
    if added == "text_time":
        layers = unet_config.get("transformer_layers_per_block", 1)
        deepest = max(layers) if isinstance(layers, (list, tuple)) else layers
        deepest = max(deepest) if isinstance(deepest, (list, tuple)) else deepest
        name = "SDXL" if deepest >= 10 else "SSD-1B" if deepest >= 4 else "SDXL (distilled, e.g. Segmind-Vega)"
        return Backbone("sdxl", name, **FAMILIES["sdxl"], **common)
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
    return Backbone(family, name, **FAMILIES[family], **common)


# ---------------------------------------------------------------------------------------------- loading


def _read_json(model: str, subfolder: str, name: str, local_files_only: bool) -> dict | None:
    """A component's config from a local folder or the hub (None if it has none)."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        path = folder / subfolder / name
        return _parse_json(path) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(model, name, subfolder=subfolder, local_files_only=local_files_only)
    except LocalEntryNotFoundError as error:  # offline and not cached: not "the checkpoint has no such file"
        raise OSError(str(error)) from error
    except EntryNotFoundError:
        return None
    return _parse_json(Path(path))


def _parse_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"`{path}` is not valid JSON ({error}); re-download or repair that file.") from None


UNREACHABLE = "the Hugging Face hub cannot be reached and it is not in the local cache"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (assumed so behind a proxy, which we cannot probe).

    Without this, an offline machine spends a minute in the hub client's retries before failing. Probed once per
    process and environment: a run's checks and its loading share the answer.
    """
    from huggingface_hub import constants

    settings = tuple(os.environ.get(v) for v in (*_PROXIES, "HF_HUB_OFFLINE")) + (constants.ENDPOINT,)
    if settings not in _PROBES:
        _PROBES[settings] = _probe_hub(timeout)
    return _PROBES[settings]


_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_PROBES: dict[tuple, bool] = {}


def _probe_hub(timeout: float) -> bool:
    if any(os.environ.get(v) for v in _PROXIES):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _missing_weights(model: str, what: str, reason: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"Could not load {what} of the Stable Diffusion checkpoint {model!r}: {reason}\n"
        "diffseg needs a diffusers-format Stable Diffusion 1.x/2.x, SDXL-family, SD3 / SD3.5 or Flux.1 checkpoint. "
        "Without access to the "
        f"Hugging Face hub, download it on a machine that has it (for example `hf download {DEFAULT_MODEL} "
        "--local-dir sd-v1-4`), copy the folder here and pass its path: `diffseg segment ... --model ./sd-v1-4` or "
        "`DiffSegPipeline.from_pretrained('./sd-v1-4')`."
    )


def public_name(model: str | os.PathLike) -> str:
    """How a result names its checkpoint where others see it (the demo's downloads): a hub id as it is, a local
    folder by its own name, never the server's path to it."""
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else str(model)


def check_model_path(model: str) -> None:
    """Fail early, naming the fix, when `model` is neither an existing folder nor shaped like a hub id."""
    path = Path(model).expanduser()
    if not path.is_dir() and not _HUB_ID.match(model):
        what = "is a file, not a folder" if path.exists() else "does not exist"
        if path.suffix in (".safetensors", ".ckpt") and path.exists():  # a single-file checkpoint
            what += (
                " (a single-file checkpoint: convert it once with diffusers, e.g. "
                f"`StableDiffusionPipeline.from_single_file('{model}').save_pretrained('folder')`)"
            )
        raise FileNotFoundError(
            f"Model folder `{model}` {what}. Pass a diffusers-format Stable Diffusion folder (with unet/, "
            f"vae/, text_encoder/, tokenizer/ ...) or a hub id such as {DEFAULT_MODEL!r}."
        )


def read_backbone(model: str | os.PathLike, *, local_files_only: bool = False) -> Backbone:
    """The family of a checkpoint (hub id or folder) from its configs alone, without loading weights."""
    model = str(model)
    check_model_path(model)
    offline = False
    if not Path(model).expanduser().is_dir() and not local_files_only and not _hub_reachable():
        local_files_only = offline = True
    return _read_configs(model, local_files_only, offline)[0]


def _read_configs(model: str, local_files_only: bool, offline: bool) -> tuple[Backbone, dict | None]:
    from . import dit

    try:
        # The index first: offline, the hub's cache cannot tell a file the checkpoint lacks (an SD3's unet/) from one
        # never downloaded, so the denoiser to read is the one the index names.
        index = _read_json(model, "", "model_index.json", local_files_only)
        transformer = index is not None and "transformer" in index and "unet" not in index
        unet_config = None if transformer else _read_json(model, "unet", "config.json", local_files_only)
        transformer_config = None
        if unet_config is None:
            transformer_config = _read_json(model, "transformer", "config.json", local_files_only)
        scheduler_config = _read_json(model, "scheduler", "scheduler_config.json", local_files_only)
    except OSError as error:
        reason = UNREACHABLE if offline else str(error)
        raise _missing_weights(model, "the UNet or transformer config", reason) from error
    if transformer_config is not None:
        return dit.detect_transformer(transformer_config, index), scheduler_config
    if unet_config is None:
        folder = Path(model).expanduser()
        present = [f"{n}/" for n in ("vae", "text_encoder", "tokenizer") if not (folder / n).is_dir()]
        raise _missing_weights(
            model,
            "the UNet or transformer config",
            f"the folder lacks {', '.join(['unet/config.json (or transformer/config.json)', *present])}.",
        )
    return detect(unet_config, scheduler_config), scheduler_config


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' per-component "Loading weights" progress bars (restored afterwards)."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


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
    check_model_path(model)
    local = Path(model).expanduser().is_dir()
    offline = False
    if not local and not local_files_only and not _hub_reachable():
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
    with _quiet_loading():
        for name in backbone.components:
            loader, options = loaders[name]
            try:
                components[name] = loader.from_pretrained(
                    model, subfolder=name, local_files_only=local_files_only, **options
                )
            except (OSError, ValueError) as error:  # hub errors subclass OSError
                reason = UNREACHABLE if offline else error
                raise _missing_weights(model, f"`{name}`", str(reason)) from error
    components["scheduler"] = (
        DDPMScheduler.from_config(scheduler_config) if scheduler_config is not None else None
    )  # only its noise schedule is used (adding noise), which every diffusers scheduler shares
    return backbone, components


def _load_transformer(
    model: str, backbone: Backbone, dtype: torch.dtype, device: torch.device, local_files_only: bool, offline: bool
) -> dict[str, object]:
    """A diffusion transformer's components, and its empty prompt's conditioning from the cache when it is there
    (the text encoders, T5 among them, are then not loaded at all)."""
    from . import dit, prompt_cache

    def missing(name: str, error: Exception) -> FileNotFoundError:
        return _missing_weights(model, f"`{name}`", UNREACHABLE if offline else str(error))

    with _quiet_loading(), dit.quiet():
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
            prompt_cache.write(key, conditioning, public_name(model))
            del encoders  # T5-XXL alone is 9.5 GB in bfloat16: gone before the first image
    components["conditioning"] = conditioning
    return components


def load_text_encoders(
    model: str, backbone: Backbone, names: tuple[str, ...], *, dtype: torch.dtype, device: torch.device
) -> dict[str, object]:
    """A diffusion transformer's text encoders `names` (and their tokenizers), loaded on `device` for words (concept
    maps) when the empty prompt's conditioning came from the cache. The same errors as `load`."""
    from . import dit

    model = str(model)
    check_model_path(model)
    offline = not Path(model).expanduser().is_dir() and not _hub_reachable()

    def missing(name: str, error: Exception) -> FileNotFoundError:
        return _missing_weights(model, f"`{name}`", UNREACHABLE if offline else str(error))

    with _quiet_loading(), dit.quiet():
        loaded = dit.load_text_encoders(
            model, backbone, dtype=dtype, local_files_only=offline, missing=missing, only=names
        )
    return {n: e.to(device) if isinstance(e, torch.nn.Module) else e for n, e in loaded.items()}


def load_tokenizer(model: str | os.PathLike):
    """The checkpoint's first tokenizer alone (no weights: a few MB), so that naming words can be checked before the
    model loads."""
    from transformers import CLIPTokenizer

    model = str(model)
    check_model_path(model)
    local_files_only = not Path(model).expanduser().is_dir() and not _hub_reachable()
    try:
        return CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        reason = UNREACHABLE if local_files_only else error
        raise _missing_weights(model, "`tokenizer`", str(reason)) from None


# ---------------------------------------------------------------------------------------------- conditioning


@dataclass
class Conditioning:
    """Text conditioning of one prompt: (1, T, D) hidden states, and SDXL's (1, P) pooled text embedding."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) token ids of `prompt`, padded to the encoder's context, as Stable Diffusion pipelines tokenise."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.inference_mode()
def encode_prompt(backbone: Backbone, encoders: list, ids: list[torch.Tensor]) -> Conditioning:
    """The UNet's text conditioning for one prompt (diffusers' `encode_prompt` of each family, without guidance).

    Args:
        encoders: the family's text encoders, in `backbone.text_encoders` order.
        ids: (1, T) token ids for each encoder (its own tokenizer's).
    """
    if backbone.family != "sdxl":
        encoder = encoders[0]
        return Conditioning(encoder(ids[0].to(encoder.device))[0])
    # SDXL `encode_prompt`: each encoder's penultimate hidden state, concatenated over features; the pooled text
    # embedding of the last encoder (CLIPTextModelWithProjection's `text_embeds`).
    states, pooled = [], None
    for encoder, tokens in zip(encoders, ids):
        out = encoder(tokens.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        if out[0].dim() == 2:
            pooled = out[0]
    return Conditioning(torch.cat(states, dim=-1), pooled)


def unet_inputs(backbone: Backbone, conditioning: Conditioning, batch: int, size: tuple[int, int]) -> dict:
    """Keyword arguments of the UNet's forward besides latent and timestep, for `batch` images of `size` (H, W)
    pixels: the text states, and for SDXL `added_cond_kwargs` with the pooled text and the time ids
    (original size, crop top-left (0, 0), target size: diffusers' `_get_add_time_ids`; DiffCut's reference passes
    its square input size for both)."""
    inputs = {"encoder_hidden_states": conditioning.hidden.expand(batch, -1, -1)}
    if backbone.family == "sdxl":
        h, w = size
        time_ids = torch.tensor(
            [[h, w, 0, 0, h, w]], dtype=conditioning.hidden.dtype, device=conditioning.hidden.device
        )
        inputs["added_cond_kwargs"] = {
            "text_embeds": conditioning.pooled.expand(batch, -1),
            "time_ids": time_ids.expand(batch, -1),
        }
    return inputs


def diffcut_layer(backbone: Backbone, unet: torch.nn.Module) -> torch.nn.Module:
    """The `attn1` whose output DiffCut reads: the last transformer block of `down_blocks[backbone.diffcut_block]`
    (reference `LdmExtractor.register_hooks`)."""
    block = unet.down_blocks[backbone.diffcut_block]
    if not getattr(block, "attentions", None):
        raise ValueError(f"{backbone.name}'s down block {backbone.diffcut_block} has no attention for DiffCut to read.")
    return block.attentions[-1].transformer_blocks[-1].attn1


def target_size(
    image_size: tuple[int, int], backbone: Backbone, resolution: int | None = None, resize: str = "native"
) -> tuple[int, int]:
    """(height, width) in pixels the UNet sees for an image of `image_size`.

    "native" keeps the aspect ratio at about `resolution`² pixels (default: the family's native size), each side
    rounded to the nearest multiple of `backbone.size_multiple` (at least one multiple). "square" is the paper's
    `resolution`×`resolution` (a square input gives the same size either way).
    """
    side = backbone.native_size if resolution is None else int(resolution)
    m = backbone.size_multiple
    if side < m or side % m:
        raise ValueError(f"`resolution` must be a positive multiple of {m} for {backbone.name} but is {side}.")
    if resize == "square":
        return side, side
    if resize != "native":
        raise ValueError(f"`resize` must be 'native' or 'square' but is {resize!r}.")
    h, w = image_size
    scale = (side * side / (h * w)) ** 0.5
    height, width = max(m, round(h * scale / m) * m), max(m, round(w * scale / m) * m)
    if height * width > 2 * side * side:  # an extreme strip, its short side raised to one multiple: cap the long
        # side so the area stays within the budget (the strip is squashed along its length, to at most 1:side²/m²)
        cap = max(m, side * side // min(height, width) // m * m)
        height, width = (height, cap) if height <= width else (cap, width)
    return height, width
