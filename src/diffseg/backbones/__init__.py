"""The backbones: what a checkpoint is and how it runs.

Ground floor `types` (`Backbone`, `Geometry`, `Conditioning`, the capabilities). The families' tables and loading:
`families` (UNets), `dit` (diffusion transformers), `prompt_cache`. The kinds of denoiser, one implementation each
of `kind.DenoiserKind`: `unet.UNetKind`, `transformer.TransformerKind` (table: `kinds.KINDS`). Capturing attention:
`capture` (the store, a UNet's processors), `joint_capture` (an MM-DiT's), `concepts` (ConceptAttention). Device
and dtype: `devices`."""
