"""The methods: each turns what one UNet step produced into a label map, with no model.

- `diffseg/`: DiffSeg (Tian et al., CVPR 2024): self-attention aggregated over grids, merged by KL, labelled.
- `diffcut/`: DiffCut (Couairon et al., NeurIPS 2024): one layer's features cut by a recursive normalised cut.

`registry` is the method table: one row per method (its config type, bundle type, encode step and segment step), which
the pipeline, the job runner and every front end read. A new method is a sub-package here with a `segment.py` holding
its pure function on tensors, its config in `diffseg.config`, and its row in `registry`.
"""
