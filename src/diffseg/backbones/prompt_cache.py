"""The empty prompt's conditioning, computed once per checkpoint and kept in the user's cache.

DiffSeg and DiffCut condition every image on the empty prompt, whose embeddings are a constant of the checkpoint.
For the diffusion transformers that constant costs loading T5-XXL (4.7 B parameters, 9.5 GB in bfloat16); so the
first run computes it and writes it here, and later runs read it and never load the text encoders.

Entries live in `$DIFFSEG_CACHE/prompts/` (default `$XDG_CACHE_HOME/diffseg`, else `~/.cache/diffseg`), one
safetensors file per checkpoint identity: a local folder by its resolved path and the size and modification time
of every text-encoder and tokenizer file (replaced weights are a new entry), a hub checkpoint by its id and commit;
and by the family's text length and the dtype the encoders ran in. Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .types import Conditioning


def cache_folder() -> Path:
    """Where diffseg keeps what it computes once per checkpoint."""
    root = (
        os.environ.get("DIFFSEG_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffseg"
    )
    return Path(root).expanduser() / "prompts"


def cache_key(identity: dict) -> str:
    """A file name for a checkpoint identity (any JSON-able description)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def read(key: str) -> Conditioning | None:
    """The cached conditioning under `key`, or None (absent, or unreadable: it is then recomputed and rewritten)."""
    from safetensors.torch import load_file

    path = cache_folder() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception:  # a truncated or foreign file: recompute
        return None
    if "hidden" not in tensors:
        return None
    return Conditioning(tensors["hidden"], tensors.get("pooled"))


def write(key: str, conditioning: Conditioning, description: str) -> Path | None:
    """Store `conditioning` under `key` (a temporary file renamed into place: a reader never sees half a file).
    A cache that cannot be written (read-only home) is not an error: the next run computes it again."""
    from safetensors.torch import save_file

    folder = cache_folder()
    tensors = {"hidden": conditioning.hidden.detach().contiguous().cpu()}
    if conditioning.pooled is not None:
        tensors["pooled"] = conditioning.pooled.detach().contiguous().cpu()
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        os.close(handle)
        save_file(tensors, tmp, metadata={"checkpoint": description})
        os.replace(tmp, folder / f"{key}.safetensors")
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return None
    return folder / f"{key}.safetensors"
