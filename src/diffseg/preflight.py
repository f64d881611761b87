"""Settings checked against a checkpoint before its weights load: one `preflight` every front end calls.

The checkpoint's configs (`backbones.families.read_backbone`, read once per run) say what it can take: its
geometry (sizes, the longest side its positional embedding reaches), its blocks, its capabilities. A setting it
cannot take is refused here, by name, before the model loads and before any image: the CLI, the demo, the
evaluation and the Ray job all call this.
"""

from __future__ import annotations

import torch

from .backbones.types import Backbone
from .config import EncodeConfig
from .methods.registry import check_runs_on, method_named


def preflight(
    backbone: Backbone,
    method: str,
    encode: EncodeConfig | None = None,
    segment=None,
    *,
    device: torch.device | None = None,
    num_points: int | None = None,
) -> None:
    """Refuse what `backbone` cannot take of a run of `method` with these settings.

    Args:
        encode: the encode settings (default: the method's); its resolution and resize are sized by the backbone's
            geometry, its blocks counted against the model's (a method that reads joint blocks: those alone).
        segment: the method's settings object; the method's own check reads it (DiffSeg: the grids its resolution
            weights name).
        device: where the model will run (None: a cluster's workers, which check their own); the method's memory
            check reads it.
        num_points: DiffSeg's anchor grid as the user gave it (None: the default, which fits any model).

    Raises:
        ValueError: the method does not run on this backbone, or a setting does not fit it; the message names the
            setting and what fits.
    """
    spec = method_named(method)
    check_runs_on(spec, backbone)
    encode = encode or spec.encode_defaults
    backbone.geometry.target_size((1, 1), encode.resolution, encode.resize)  # a size it cannot take, named
    backbone.check_blocks(encode.blocks, joint=spec.joint_blocks)
    if spec.preflight is not None:
        spec.preflight(backbone, encode, segment, device=device, num_points=num_points)
