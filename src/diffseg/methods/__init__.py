"""The methods: each turns what one denoiser step produced into a label map, with no model.

- `diffseg/`: DiffSeg (Tian et al., CVPR 2024): self-attention aggregated over grids, merged by KL, labelled.
- `diffcut/`: DiffCut (Couairon et al., NeurIPS 2024): one layer's features cut by a recursive normalised cut.
- `seg4diff/`: Seg4Diff (Kim et al., NeurIPS 2025): one SD3 block's image-to-text attention merged by KL.
- `concepts/`: concept maps (ConceptAttention, Helbling et al., ICML 2025): each pixel's most probable word.

A method is one folder and one row: its pure function on tensors (`segment.py`) and its `Method` row with its
controls (`method.py`, the types in `spec.py`); `registry.METHODS` collects the rows, and the pipeline, the job runner
and every front end (CLI options, the demo's controls, the bundle loader) are made from them.
"""
