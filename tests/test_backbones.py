"""The backbone seam: each Stable Diffusion family known from its configs, loaded and conditioned as diffusers does."""

import json
import shutil

import numpy as np
import pytest
import torch

from diffseg import DiffSegPipeline
from diffseg.backbones.families import detect

from conftest import error_percentile, matched_agreement, quadrants_image, relative_error

SD_BLOCKS = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
XL_BLOCKS = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]


def xl(layers, sample=128):
    return {
        "down_block_types": XL_BLOCKS,
        "sample_size": sample,
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "transformer_layers_per_block": layers,
    }


@pytest.mark.parametrize(
    "config, scheduler, family, name, native, multiple, sides",
    [
        (
            {"down_block_types": SD_BLOCKS, "sample_size": 64, "cross_attention_dim": 768},
            {},
            "sd1",
            "Stable Diffusion 1.x",
            512,
            64,
            (64, 32, 16, 8),
        ),
        (
            {"down_block_types": SD_BLOCKS, "sample_size": 64, "cross_attention_dim": 1024},
            {},
            "sd2",
            "Stable Diffusion 2.x",
            512,
            64,
            (64, 32, 16, 8),
        ),
        (
            {"down_block_types": SD_BLOCKS, "sample_size": 96, "cross_attention_dim": 1024},
            {"prediction_type": "v_prediction"},
            "sd2",
            "Stable Diffusion 2.x (v-prediction)",
            768,
            64,
            (96, 48, 24, 12),
        ),
        (xl([1, 2, 10]), {}, "sdxl", "SDXL", 1024, 32, (64, 32)),
        (xl([1, 2, 10], sample=64), {}, "sdxl", "SDXL", 512, 32, (32, 16)),  # SDXL-Turbo: trained at 512²
        (xl([1, 2, 4]), {}, "sdxl", "SSD-1B", 1024, 32, (64, 32)),
        (xl([0, 2, 2]), {}, "sdxl", "SDXL (distilled, e.g. Segmind-Vega)", 1024, 32, (64, 32)),
    ],
)
def test_families_are_known_from_the_checkpoint_configs(config, scheduler, family, name, native, multiple, sides):
    backbone = detect(config, scheduler)
    assert (backbone.family, backbone.name, backbone.native_size) == (family, name, native)
    assert (backbone.size_multiple, backbone.grid_sides) == (multiple, sides)
    assert backbone.diffcut_block == (-1 if family == "sdxl" else -2)  # the reference's layer per family
    assert ("text_encoder_2" in backbone.components) == (family == "sdxl")


def test_unknown_checkpoints_get_a_one_line_error_naming_what_is_off():
    with pytest.raises(ValueError, match="9 input channels"):
        detect({"down_block_types": SD_BLOCKS, "in_channels": 9})
    with pytest.raises(ValueError, match="addition_embed_type='text'"):
        detect({"down_block_types": SD_BLOCKS, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="UNet2DModel"):
        detect({"_class_name": "UNet2DModel"})
    with pytest.raises(ValueError, match="no cross-attention"):
        detect({"down_block_types": ["DownBlock2D"] * 4})


def test_an_sdxl_folder_without_its_second_encoder_names_the_missing_folders(tiny_sdxl_checkpoint, tmp_path):
    partial = tmp_path / "xl"
    shutil.copytree(tiny_sdxl_checkpoint, partial)
    shutil.rmtree(partial / "text_encoder_2")
    shutil.rmtree(partial / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"SDXL.*lacks text_encoder_2/, tokenizer_2/"):
        DiffSegPipeline.from_pretrained(partial, device="cpu")
    config = json.loads((partial / "unet" / "config.json").read_text())
    config["in_channels"] = 9
    (partial / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="inpainting"):
        DiffSegPipeline.from_pretrained(partial, device="cpu")


def test_sdxl_conditioning_is_what_the_diffusers_sdxl_pipeline_computes(tiny_sdxl_pipeline):
    """Empty prompt: both encoders' penultimate states concatenated, the second's pooled embedding, time ids of
    (original size, crop (0, 0), target size) — compared with diffusers' own `encode_prompt` on the same modules."""
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_sdxl_pipeline
    reference = StableDiffusionXLPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        text_encoder_2=pipe.text_encoder_2,
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
    )
    embeds, _, pooled, _ = reference.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    ours = pipe.kind.prompt_embedding()
    torch.testing.assert_close(ours.hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)
    inputs = pipe.kind.text_inputs(ours, batch=2, size=(384, 704))
    time_ids = reference._get_add_time_ids(
        (384, 704), (0, 0), (384, 704), dtype=embeds.dtype, text_encoder_projection_dim=32
    )
    assert inputs["encoder_hidden_states"].shape == (2, 77, 64)
    torch.testing.assert_close(inputs["added_cond_kwargs"]["time_ids"], time_ids.expand(2, -1))
    assert inputs["added_cond_kwargs"]["text_embeds"].shape == (2, 32)


def test_each_family_encodes_its_grids_and_exposes_its_components(tiny_sd2_checkpoint, tiny_sdxl_pipeline):
    sd2 = DiffSegPipeline.from_pretrained(tiny_sd2_checkpoint, device="cpu", dtype="float32")
    assert sd2.backbone.family == "sd2" and sd2.backbone.prediction_type == "v_prediction"
    assert sd2.text_encoder_2 is None and sd2.unet is not None and sd2.vae is not None
    bundle = sd2.encode(quadrants_image(256, 256))
    assert list(bundle.attention) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    xl = tiny_sdxl_pipeline
    assert xl.text_encoder_2 is not None and xl.tokenizer_2 is not None
    bundle = xl.encode(quadrants_image(256, 256))
    assert list(bundle.attention) == [(32, 32), (16, 16)]  # no attention in SDXL's first block
    assert bundle.layers == {(32, 32): 3, (16, 16): 8}  # more transformer layers deeper down, and the mid block
    cut = xl.encode(quadrants_image(256, 256), method="diffcut")
    assert cut.method == "diffcut" and cut.features.shape == (32, 32, 32)  # down_blocks[-1] at 1024² input


def test_native_size_keeps_the_aspect_ratio_and_square_images_are_unchanged(tiny_pipeline):
    sd = tiny_pipeline.backbone
    assert sd.geometry.target_size((200, 400)) == (384, 704)  # ≈512² pixels, sides multiples of 64
    assert sd.geometry.target_size((400, 200)) == (704, 384)
    assert sd.geometry.target_size((3000, 4000)) == (448, 576)
    assert sd.geometry.target_size((300, 300)) == sd.geometry.target_size((300, 300), resize="square") == (512, 512)
    assert sd.geometry.target_size((200, 400), 512, "square") == (512, 512)
    with pytest.raises(ValueError, match="multiple of 64"):
        sd.geometry.target_size((200, 400), 100)
    bundle = tiny_pipeline.encode(quadrants_image(200, 400))
    assert next(iter(bundle.attention)) == (48, 88)  # the 384×704 input's 1:1.83 latent
    square = quadrants_image(300, 300)
    native = tiny_pipeline.segment(tiny_pipeline.encode(square), kl_threshold=0.6).labels
    paper = tiny_pipeline.segment(tiny_pipeline.encode(square, resize="square"), kl_threshold=0.6).labels
    np.testing.assert_array_equal(native, paper)


@pytest.mark.parametrize(
    "dtype, relative, p99, tolerance", [("float16", 0.05, 5e-3, 0.97), ("bfloat16", 0.3, 5e-2, 0.6)]
)
def test_half_precision_label_maps_agree_with_float32(tiny_checkpoint, tiny_pipeline, dtype, relative, p99, tolerance):
    """UNet and text encoder in half precision on the CPU (the VAE stays float32): attention within a relative
    error of 5 % (float16) or 30 % (bfloat16) and a 99th-percentile error of 5e-3 or 5e-2 (never the largest of
    millions of elements: that one depends on the CPU's kernels), and label maps agreeing with float32's on ≥ 97 %
    (float16) or ≥ 60 % (bfloat16) of pixels once ids are matched. DiffCut's features likewise. bfloat16's 8-bit
    mantissa moves merge decisions of this untrained model: 69-79 % at τ 0.6-1.0 on one CPU, 90 % on another."""
    half = DiffSegPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype=dtype)
    assert half.unet.dtype == half.text_encoder.dtype == getattr(torch, dtype) and half.vae.dtype == torch.float32
    image = quadrants_image()
    ours, reference = half.encode(image), tiny_pipeline.encode(image)
    for grid in reference.attention:
        assert relative_error(ours.attention[grid], reference.attention[grid]) <= relative, grid
        assert error_percentile(ours.attention[grid], reference.attention[grid], 99) <= p99, grid
    a, b = half.segment(ours, kl_threshold=0.9).labels, tiny_pipeline.segment(reference, kl_threshold=0.9).labels
    assert a.max() > 0 and matched_agreement(a, b) >= tolerance
    cut, cut32 = half.encode(image, method="diffcut"), tiny_pipeline.encode(image, method="diffcut")
    assert matched_agreement(half.segment(cut).labels, tiny_pipeline.segment(cut32).labels) >= tolerance


def test_the_hub_is_probed_once_per_environment(monkeypatch):
    from diffseg import hub

    probes = []
    monkeypatch.setattr(hub, "_PROBES", {})
    monkeypatch.setattr(hub, "_probe_hub", lambda timeout: probes.append(timeout) or False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert [hub.hub_reachable() for _ in range(3)] == [False] * 3 and len(probes) == 1  # checks, then loading
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # another environment: asked again
    hub.hub_reachable()
    assert len(probes) == 2
