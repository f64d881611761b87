"""The attention bundle: everything segmentation needs, computed once per image and timestep.

Encode once, segment many: the demo's sliders, evaluation sweeps and `--resume` re-run only steps 3-5 on it.
A bundle saves to and loads from one safetensors file, so segmentation can be re-run without the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .outputs import atomic_path
from .semantic import Vocabulary

FORMAT = "diffseg-attention-bundle/1"


@dataclass
class AttentionBundle:
    """Self-attention of one image, with the image it came from.

    Attributes:
        attention: r -> (r², r²) float32 query × key probabilities, averaged over heads and over the layers of
            that resolution; rows sum to 1.
        image: (H, W, 3) uint8 RGB, the region that was encoded (after any crop), at its own resolution.
        timestep: the UNet timestep the attention was taken at.
        model: the checkpoint (hub id or folder) that produced it.
        layers: r -> number of self-attention layers averaged at that resolution.
        cross_attention: r -> (r², T) cross-attention over the vocabulary prompt's T tokens, when encoded with labels.
        vocabulary: the words (and their token positions) the cross-attention belongs to.
    """

    attention: dict[int, torch.Tensor]
    image: np.ndarray
    timestep: int
    model: str = ""
    layers: dict[int, int] = field(default_factory=dict)
    cross_attention: dict[int, torch.Tensor] | None = None
    vocabulary: Vocabulary | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the encoded image: the label map's default size."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle to a safetensors file (atomically: a reader never sees half a file)."""
        from safetensors.torch import save_file

        tensors = {f"attention.{r}": t.detach().float().cpu().contiguous() for r, t in self.attention.items()}
        tensors["image"] = torch.tensor(np.asarray(self.image, dtype=np.uint8))
        for r, t in (self.cross_attention or {}).items():
            tensors[f"cross.{r}"] = t.detach().float().cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "timestep": str(self.timestep),
            "model": self.model,
            "layers": json.dumps({str(r): n for r, n in self.layers.items()}),
        }
        if self.vocabulary is not None:
            metadata["vocabulary"] = json.dumps(dataclasses.asdict(self.vocabulary))
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionBundle:
        """Read a bundle written by `save`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Attention bundle `{path}` does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise ValueError(f"`{path}` is not a DiffSeg attention bundle (format {metadata.get('format')!r}).")
                attention = {
                    int(key.split(".", 1)[1]): f.get_tensor(key) for key in f.keys() if key.startswith("attention.")
                }
                image = f.get_tensor("image").numpy()
                cross = {int(key.split(".", 1)[1]): f.get_tensor(key) for key in f.keys() if key.startswith("cross.")}
        except (OSError, RuntimeError, SafetensorError) as error:  # truncated or foreign files
            raise ValueError(f"`{path}` could not be read as an attention bundle ({error}).") from error
        return cls(
            attention=dict(sorted(attention.items(), reverse=True)),
            image=image,
            timestep=int(metadata["timestep"]),
            model=metadata.get("model", ""),
            layers={int(r): n for r, n in json.loads(metadata.get("layers", "{}")).items()},
            cross_attention=dict(sorted(cross.items(), reverse=True)) or None,
            vocabulary=_vocabulary(metadata.get("vocabulary")),
        )


def _vocabulary(text: str | None) -> Vocabulary | None:
    if not text:
        return None
    data = json.loads(text)
    return Vocabulary(tuple(data["words"]), tuple(data["input_ids"]), tuple(tuple(i) for i in data["token_indices"]))
