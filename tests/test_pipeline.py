import numpy as np
import pytest
import torch
from PIL import Image

from diffseg import AttentionBundle, DiffSegPipeline, segment_attention

from conftest import error_percentile, quadrants_image, relative_error


def test_encode_returns_head_and_layer_averaged_attention_per_resolution(tiny_pipeline):
    bundle = tiny_pipeline.encode(quadrants_image())
    assert isinstance(bundle, AttentionBundle)
    # A 256×320 image at SD 1.x's native pixel count: 448×576 pixels, 56×72 latent, 4 grids halving.
    assert {g: tuple(m.shape) for g, m in bundle.attention.items()} == {
        (56, 72): (4032, 4032),
        (28, 36): (1008, 1008),
        (14, 18): (252, 252),
        (7, 9): (63, 63),
    }
    assert bundle.layers == {(56, 72): 3, (28, 36): 3, (14, 18): 3, (7, 9): 1}
    assert bundle.timestep == 300 and bundle.image_size == (256, 320)
    for m in bundle.attention.values():
        torch.testing.assert_close(m.sum(1), torch.ones(len(m)), atol=1e-5, rtol=0)


def test_a_batch_gives_what_single_images_give(tiny_pipeline):
    a, b = quadrants_image(), quadrants_image()[::-1, ::-1].copy()
    batch = tiny_pipeline.encode([a, b])
    assert isinstance(batch, list) and len(batch) == 2
    for image, bundle in zip((a, b), batch):
        single = tiny_pipeline.encode(image)
        for r in single.attention:
            # Batched convolutions round differently (oneDNN picks other kernels); a mixed-up batch is off by far more.
            assert relative_error(bundle.attention[r], single.attention[r]) < 2e-2
            assert error_percentile(bundle.attention[r], single.attention[r], 99) < 5e-3


def test_timestep_and_noise_change_the_attention(tiny_pipeline):
    image = quadrants_image()
    base = tiny_pipeline.encode(image).attention[(28, 36)]
    assert not torch.allclose(tiny_pipeline.encode(image, timestep=50).attention[(28, 36)], base, atol=1e-4)
    noisy = tiny_pipeline.encode(image, noise_seed=0).attention[(28, 36)]
    assert not torch.allclose(noisy, base, atol=1e-4)
    torch.testing.assert_close(tiny_pipeline.encode(image, noise_seed=0).attention[(28, 36)], noisy)


def test_segment_gives_labels_at_the_image_size_and_an_overlay(tiny_pipeline):
    bundle = tiny_pipeline.encode(quadrants_image(200, 300))
    result = tiny_pipeline.segment(bundle, kl_threshold=0.5)
    assert result.labels.shape == (200, 300)
    assert result.num_segments == result.labels.max() + 1 > 1
    np.testing.assert_array_equal(
        result.labels, segment_attention(bundle.attention, kl_threshold=0.5, output_size=(200, 300))
    )
    assert result.overlay.size == (300, 200) and result.overlay.mode == "RGB"
    assert tiny_pipeline.segment(bundle, output_size=(512, 512)).labels.shape == (512, 512)


def test_center_crop_encodes_the_central_square(tiny_pipeline):
    image = quadrants_image(200, 300)
    bundle = tiny_pipeline.encode(image, crop="center")
    assert bundle.image_size == (200, 200)
    np.testing.assert_array_equal(bundle.image, image[:, 50:250])


def test_calling_the_pipeline_encodes_and_segments(tiny_pipeline, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(quadrants_image()).save(path)
    result = tiny_pipeline(str(path), kl_threshold=0.5)
    expected = tiny_pipeline.segment(tiny_pipeline.encode(quadrants_image()), kl_threshold=0.5)
    np.testing.assert_array_equal(result.labels, expected.labels)


def test_bundle_round_trips_through_safetensors(tiny_pipeline, tmp_path):
    bundle = tiny_pipeline.encode(quadrants_image())
    path = bundle.save(tmp_path / "photo.safetensors")
    loaded = AttentionBundle.load(path)
    assert loaded.timestep == bundle.timestep and loaded.layers == bundle.layers and loaded.model == bundle.model
    np.testing.assert_array_equal(loaded.image, bundle.image)
    for r in bundle.attention:
        torch.testing.assert_close(loaded.attention[r], bundle.attention[r], rtol=0, atol=0)
    np.testing.assert_array_equal(
        tiny_pipeline.segment(loaded, kl_threshold=0.7).labels, tiny_pipeline.segment(bundle, kl_threshold=0.7).labels
    )
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.safetensors"):
        AttentionBundle.load(tmp_path / "junk.safetensors")


def test_bad_encode_arguments_are_named(tiny_pipeline):
    with pytest.raises(ValueError, match="`timestep`"):
        tiny_pipeline.encode(quadrants_image(), timestep=1000)
    with pytest.raises(ValueError, match="`crop`"):
        tiny_pipeline.encode(quadrants_image(), crop="middle")
    with pytest.raises(ValueError, match="empty"):
        tiny_pipeline.encode([])


def test_missing_weights_give_an_actionable_error(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffSegPipeline.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):  # a file is not a missing folder
        DiffSegPipeline.from_pretrained(tmp_path / "weights.safetensors")
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError,
        match=r"lacks unet/config.json \(or transformer/config.json\), vae/, text_encoder/, tokenizer/",
    ):
        DiffSegPipeline.from_pretrained(partial)
    broken = tmp_path / "broken"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        (broken / name).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"--model \./sd-v1-4"):
        DiffSegPipeline.from_pretrained(broken)


def test_unreachable_hub_id_fails_fast_with_the_local_folder_hint(monkeypatch):
    import diffseg.hub as hub

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(FileNotFoundError, match="(?s)cannot be reached.*pass its path"):
        DiffSegPipeline.from_pretrained("someone/not-a-real-model")


def test_other_resolutions_discover_their_attention_sides(tiny_pipeline):
    bundle = tiny_pipeline.encode(quadrants_image(), resolution=256, resize="square")
    assert sorted(bundle.attention) == [(4, 4), (8, 8), (16, 16), (32, 32)]
    assert bundle.layers == {(32, 32): 3, (16, 16): 3, (8, 8): 3, (4, 4): 1}
    assert {g: tuple(m.shape) for g, m in bundle.attention.items()}[(32, 32)] == (1024, 1024)
    result = tiny_pipeline.segment(bundle, num_points=8)
    assert result.labels.shape == (256, 320) and set(np.unique(result.labels)) == set(range(result.num_segments))


def test_settings_can_be_passed_as_the_config_objects(tiny_pipeline):
    from diffseg import DiffCutConfig, SegmentConfig

    bundle = tiny_pipeline.encode(quadrants_image(128, 128))
    np.testing.assert_array_equal(
        tiny_pipeline.segment(bundle, SegmentConfig(kl_threshold=0.5, num_points=8)).labels,
        tiny_pipeline.segment(bundle, kl_threshold=0.5, num_points=8).labels,
    )
    cut = tiny_pipeline.encode(quadrants_image(128, 128), method="diffcut")
    np.testing.assert_array_equal(
        tiny_pipeline.segment(cut, DiffCutConfig(tau=0.3)).labels, tiny_pipeline.segment(cut, tau=0.3).labels
    )
    with pytest.raises(ValueError, match="takes a DiffCutConfig"):
        tiny_pipeline.segment(cut, SegmentConfig())


def test_the_vaes_latent_is_float32_exact_as_the_references_is(tiny_pipeline):
    """The VAE runs contiguous: PyTorch's channels-last GroupNorm on the CPU loses accuracy on large-mean activations
    (a bright flat region): before, the encode's latent was 1.4e-4 (relative) from a float64 recomputation, now
    5e-7; every method's agreement with its reference moved with it."""
    import copy

    import torch

    from diffseg.io.images import to_model_input

    image = quadrants_image(256, 320)
    image[:128] = 250
    pixels = to_model_input([image], (256, 320))
    reference = copy.deepcopy(tiny_pipeline.vae).double()
    with torch.inference_mode():
        exact = reference.encode(pixels.double()).latent_dist.mean
        ours = tiny_pipeline.kind.clean_latents(pixels)
        inputs, _ = tiny_pipeline.kind.step_inputs(pixels, 300, None)
    assert relative_error(ours, exact) < 1e-5
    scaled = exact * tiny_pipeline.vae.config.scaling_factor
    assert relative_error(inputs["sample"], scaled) < 1e-5  # what the step is given
