"""diffseg: segment any image with a frozen Stable Diffusion, with no labels, training or prompt.

Two methods, one API (a pure function on what the UNet produced, a bundle that caches it, one pipeline):
DiffSeg (Tian et al., "Diffuse, Attend, and Segment", CVPR 2024): self-attention merged by KL divergence;
DiffCut (Couairon et al., NeurIPS 2024): one UNet layer's features cut by a recursive normalised cut.
"""

from .bundle import AttentionBundle, FeatureBundle, load_bundle
from .config import DEFAULT_MODEL, DiffCutConfig, EncodeConfig, NamingConfig, SegmentConfig
from .methods.registry import METHODS
from .methods.diffcut.segment import segment_features
from .methods.diffseg.segment import segment_attention
from .pipeline import DiffSegPipeline, Segmentation

__all__ = [
    "DEFAULT_MODEL",
    "AttentionBundle",
    "FeatureBundle",
    "load_bundle",
    "METHODS",
    "NamingConfig",
    "DiffSegPipeline",
    "EncodeConfig",
    "SegmentConfig",
    "DiffCutConfig",
    "Segmentation",
    "segment_attention",
    "segment_features",
]
__version__ = "0.1.0"
