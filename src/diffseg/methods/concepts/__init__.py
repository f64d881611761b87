"""Concept maps: where each word is (ConceptAttention on SD3 / Flux, cross-attention on UNets), and the label map of
the most probable word."""

from .segment import probabilities, segment_concepts

__all__ = ["probabilities", "segment_concepts"]
