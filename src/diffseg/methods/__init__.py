"""The methods: each turns what one UNet step produced into a label map, with no model.

- `diffseg/`: DiffSeg (Tian et al., CVPR 2024): self-attention aggregated over grids, merged by KL, labelled.
- `diffcut/`: DiffCut (Couairon et al., NeurIPS 2024): one layer's features cut by a recursive normalised cut.

A new method is a sub-package here with a `segment.py` holding its pure function on tensors; its config goes in
`diffseg.config` and its dispatch in `diffseg.segmentation`.
"""
