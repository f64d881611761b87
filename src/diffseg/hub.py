"""Where checkpoints come from: a local folder or the Hugging Face hub, and the one-line errors when they cannot be had.

Public helpers every loader shares (the backbones', the caption model's): whether the hub answers (probed once per
process and environment, so an offline machine does not spend a minute in the hub client's retries), a config read
from either place, the error that says how to pass a local folder instead.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .config import DEFAULT_MODEL

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def read_json(model: str, subfolder: str, name: str, local_files_only: bool) -> dict | None:
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


def hub_reachable(timeout: float = 3.0) -> bool:
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


def missing_weights(model: str, what: str, reason: str) -> FileNotFoundError:
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
    if not path.is_dir() and not HUB_ID.match(model):
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


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Without transformers' per-component "Loading weights" progress bars (restored afterwards)."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()
