"""Seg4Diff (Kim et al., NeurIPS 2025), unsupervised: one SD3 block's image-to-text attention, min-max normalised,
merged greedily by symmetric KL; the merged maps' argmax is the label map (`segment_text_attention`)."""

from .segment import merge_maps, normalise_maps, segment_text_attention

__all__ = ["merge_maps", "normalise_maps", "segment_text_attention"]
