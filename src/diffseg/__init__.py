"""diffseg: segment any image with a frozen Stable Diffusion, with no labels, training or prompt.

Three methods, one API (a pure function on what the denoiser produced, a bundle that caches it, one pipeline):
DiffSeg (Tian et al., "Diffuse, Attend, and Segment", CVPR 2024): self-attention merged by KL divergence;
DiffCut (Couairon et al., NeurIPS 2024): one layer's features cut by a recursive normalised cut;
Seg4Diff (Kim et al., NeurIPS 2025; SD3 and SD3.5): one block's image-to-text attention merged by KL divergence.
And concept maps: where each of your words is (ConceptAttention on SD3 / Flux, cross-attention on UNets).
"""

from .bundle import AttentionBundle, ConceptBundle, FeatureBundle, TextAttentionBundle, load_bundle
from .config import (
    DEFAULT_MODEL,
    ConceptConfig,
    DiffCutConfig,
    EncodeConfig,
    NamingConfig,
    Seg4DiffConfig,
    SegmentConfig,
)
from .methods.registry import METHODS
from .methods.diffcut.segment import segment_features
from .methods.diffseg.segment import segment_attention
from .methods.seg4diff.segment import segment_text_attention
from .pipeline import DiffSegPipeline, Segmentation

__all__ = [
    "DEFAULT_MODEL",
    "AttentionBundle",
    "FeatureBundle",
    "TextAttentionBundle",
    "ConceptBundle",
    "load_bundle",
    "METHODS",
    "NamingConfig",
    "DiffSegPipeline",
    "EncodeConfig",
    "SegmentConfig",
    "DiffCutConfig",
    "Seg4DiffConfig",
    "ConceptConfig",
    "Segmentation",
    "segment_attention",
    "segment_features",
    "segment_text_attention",
]
__version__ = "0.1.0"
