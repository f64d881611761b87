"""The architectures `testing.models` builds: each real diffusers architecture's config (full size, for benchmarks)
and its tiny version (the same structure shrunk, for tests), with the limits code depends on kept (a UNet's grids, a
transformer's `pos_embed_max_size`)."""

from __future__ import annotations

# Per architecture: family, UNet, VAE and text encoder sizes, scheduler. "sd15", "sd21" (768, v-prediction) and
# "sdxl" are the published configs of Stable Diffusion v1.5, v2.1 and SDXL base 1.0 (unet/, vae/, text_encoder*/
# config.json); the "tiny-*" ones keep their families' structure (SD: three cross-attention levels and a mid block,
# 64², 32², 16², 8² attention at 512²; SDXL: no attention in the first block, more transformer layers deeper down,
# two text encoders, the `text_time` added embedding), shrunk in width and depth.
_SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
_XL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
_TINY_VAE = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}
_SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
_CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
}

UNET_ARCHITECTURES = {
    "tiny": {
        "unet": {
            **_SD_BLOCKS,
            "sample_size": 64,
            "block_out_channels": (16, 16, 32, 32),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 2,
            "norm_num_groups": 8,
        },
        "vae": _TINY_VAE,
        "text": [_TINY_TEXT],
    },
    "tiny-sd2": {  # SD 2.x: 1024-wide text states (OpenCLIP ViT-H), linear projections, per-block head widths
        "unet": {
            **_SD_BLOCKS,
            "sample_size": 64,
            "block_out_channels": (16, 16, 32, 32),
            "layers_per_block": 1,
            "cross_attention_dim": 1024,
            "attention_head_dim": (2, 2, 4, 4),
            "use_linear_projection": True,
            "upcast_attention": True,
            "norm_num_groups": 8,
        },
        "vae": _TINY_VAE,
        "text": [{"hidden_size": 1024, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}],
        "scheduler": {"prediction_type": "v_prediction"},
    },
    "tiny-sdxl": {  # sample_size 64: trained at 512², as SDXL-Turbo; 64/32 of SDXL's 128 would be 1024²
        "unet": {
            **_XL_BLOCKS,
            "sample_size": 64,
            "block_out_channels": (16, 32, 32),
            "layers_per_block": 1,
            "transformer_layers_per_block": (1, 1, 2),
            "cross_attention_dim": 64,
            "attention_head_dim": (2, 2, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "norm_num_groups": 8,
        },
        "vae": _TINY_VAE,
        "text": [_TINY_TEXT, {**_TINY_TEXT, "projection_dim": 32}],
    },
    "sd15": {
        "unet": {
            **_SD_BLOCKS,
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,  # diffusers' name for the number of heads in SD 1.x UNets
        },
        "vae": _SD_VAE,
        "text": [{**_CLIP_L, "vocab_size": 49408}],
    },
    "sd21": {
        "unet": {
            **_SD_BLOCKS,
            "sample_size": 96,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": _SD_VAE,
        "text": [
            {
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 23,
                "num_attention_heads": 16,
                "hidden_act": "gelu",
                "vocab_size": 49408,
                "projection_dim": 512,
            }
        ],
        "scheduler": {"prediction_type": "v_prediction"},
    },
    "sdxl": {
        "unet": {
            **_XL_BLOCKS,
            "sample_size": 128,
            "block_out_channels": (320, 640, 1280),
            "layers_per_block": 2,
            "transformer_layers_per_block": (1, 2, 10),
            "cross_attention_dim": 2048,
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**_SD_VAE, "scaling_factor": 0.13025},
        "text": [
            {**_CLIP_L, "vocab_size": 49408},
            {
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_hidden_layers": 32,
                "num_attention_heads": 20,
                "hidden_act": "gelu",
                "vocab_size": 49408,
                "projection_dim": 1280,
            },
        ],
    },
}

# Diffusion transformers. "sd3-medium" and "flux-dev" are the published configs of SD3-medium and Flux.1-dev
# (transformer/, vae/, scheduler/ config.json); `flux-dev` takes `blocks` to shrink its depth for a benchmark.
# The tiny ones keep each family's structure: SD3's joint blocks (the last one context-pre-only), SD3.5-medium's
# dual attention in its first blocks and RMS q/k norms, Flux's double- then single-stream blocks with RoPE, both
# families' 16-channel VAE with a shift factor and their text encoders (two CLIPs and T5 for SD3; CLIP and T5 for
# Flux).
_TINY_T5 = {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_layers": 2, "num_heads": 4}
_TINY_DIT_VAE = {**_TINY_VAE, "latent_channels": 16, "scaling_factor": 1.5, "shift_factor": 0.06}
_SD3_VAE = {
    **_SD_VAE,
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
_FLUX_SCHEDULER = {  # Flux.1-dev's: the resolution-dependent shift
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
DIT_ARCHITECTURES = {
    "tiny-sd3": {
        "family": "sd3",
        "transformer": {
            "sample_size": 32,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 3,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "joint_attention_dim": 32,
            "caption_projection_dim": 32,
            "pooled_projection_dim": 64,
            # A reach of 1,024 px (SD3-medium's is 3,072): the methods' 1024² defaults fit, wide images meet the limit
            "pos_embed_max_size": 64,
        },
        "vae": _TINY_DIT_VAE,
        "text": [{**_TINY_TEXT, "projection_dim": 32}, {**_TINY_TEXT, "projection_dim": 32}],
        "t5": _TINY_T5,
        "scheduler": {"shift": 3.0},
    },
    "tiny-flux": {  # Flux.1-dev's structure: guidance embedding, resolution-dependent shift
        "family": "flux",
        "transformer": {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 2,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": 32,
            "pooled_projection_dim": 32,
            "guidance_embeds": True,
            "axes_dims_rope": (4, 6, 6),
        },
        "vae": _TINY_DIT_VAE,
        "text": [_TINY_TEXT],
        "t5": _TINY_T5,
        "scheduler": _FLUX_SCHEDULER,
    },
    "sd3-medium": {
        "family": "sd3",
        "transformer": {
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192,
        },
        "vae": _SD3_VAE,
        "scheduler": {"shift": 3.0},
    },
    "flux-dev": {
        "family": "flux",
        "transformer": {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": True,
            "axes_dims_rope": (16, 56, 56),
        },
        "vae": {**_SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},
        "scheduler": _FLUX_SCHEDULER,
    },
}
_TINY_SD3 = DIT_ARCHITECTURES["tiny-sd3"]
# SD3.5-medium's structure: dual attention (`attn2`) in the first blocks, RMS-normed queries and keys.
DIT_ARCHITECTURES["tiny-sd35"] = {
    **_TINY_SD3,
    "transformer": {**_TINY_SD3["transformer"], "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"},
}
# SD3-medium's native grid (1024², 64 patches a side) with a positional embedding of 64 patches: a checkpoint whose
# limit is its native size, so that every wide image meets it with default settings.
DIT_ARCHITECTURES["tiny-sd3-1024"] = {
    **_TINY_SD3,
    "transformer": {**_TINY_SD3["transformer"], "sample_size": 128, "pos_embed_max_size": 64},
}
ARCHITECTURES = tuple(UNET_ARCHITECTURES) + tuple(DIT_ARCHITECTURES)
