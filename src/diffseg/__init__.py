"""DiffSeg: segment any image from Stable Diffusion self-attention, with no labels, training or prompt.

Tian et al., "Diffuse, Attend, and Segment: Unsupervised Zero-Shot Segmentation using Stable Diffusion", CVPR 2024.
"""

from .bundle import AttentionBundle
from .config import DEFAULT_MODEL, EncodeConfig, SegmentConfig
from .pipeline import DiffSegPipeline, Segmentation
from .segment import segment_attention

__all__ = [
    "DEFAULT_MODEL",
    "AttentionBundle",
    "DiffSegPipeline",
    "EncodeConfig",
    "SegmentConfig",
    "Segmentation",
    "segment_attention",
]
__version__ = "0.1.0"
