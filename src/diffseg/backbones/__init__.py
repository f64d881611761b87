"""The backbone seam: per-family facts and loading (`families`), capturing attention or a layer's output during a UNet
forward (`capture`), device and dtype placement (`devices`). A new Stable Diffusion family is a row of
`families.FAMILIES` and, where it conditions differently, a branch of `families.encode_prompt`/`unet_inputs`."""
