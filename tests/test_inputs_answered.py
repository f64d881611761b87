"""Every input answered, before the model loads where possible: elongated images and strips with the default
settings, grid keys as the README writes them, naming words and caption models, broken configs and bundles."""

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg import AttentionBundle
from diffseg.methods.diffseg.merging import anchor_grid
from diffseg.io.outputs import read_labels
from diffseg.config import ENCODE_DEFAULTS

from conftest import quadrants_image, run_cli, tiny_model


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model's weights start loading (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("diffseg.pipeline.DiffSegPipeline.from_pretrained", refuse)


def _save(tmp_path, array, name="a.png"):
    Image.fromarray(array).save(tmp_path / name)
    return tmp_path / name


def test_anchor_grids_fit_any_aspect_ratio_and_stay_the_references_on_squares():
    square = anchor_grid(16, (64, 64))
    step, start = 63 // 15, (63 - (63 // 15) * 15) // 2  # reference `generate_sampling_grid`
    axis = start + step * torch.arange(16)
    assert torch.equal(square, torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2))
    strip = anchor_grid(16, (8, 456))  # a 1:50 image's finest grid: one anchor per row, 16 along the length
    assert strip.shape == (8 * 16, 2) and torch.equal(strip[:, 0].unique(), torch.arange(8))
    assert torch.equal(anchor_grid(16, (1, 40))[:, 0].unique(), torch.tensor([0]))


def test_an_elongated_image_segments_with_the_default_settings(tiny_checkpoint, tmp_path):
    image = _save(tmp_path, np.tile(quadrants_image(40, 40), (1, 50, 1)))  # 40×2000, 1:50
    assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint)) == 0
    labels = read_labels(tmp_path / "out" / "labels" / "a.png")
    assert labels.shape == (40, 2000)  # before: "`num_points` must be an integer from 2 to 8 but is 16"


def test_an_explicit_anchor_grid_that_cannot_fit_is_refused_before_encoding(
    tiny_checkpoint, tmp_path, capsys, no_model_load
):
    image = _save(tmp_path, quadrants_image(64, 64))
    assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), "--num-points", "65") == 2
    assert "does not fit" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (3, 20000), (300, 5000)])
def test_the_pixel_budget_holds_for_every_shape(tiny_pipeline, shape):
    sd1 = tiny_pipeline.backbone
    assert (sd1.native_size, sd1.size_multiple) == (512, 64)  # SD 1.x's sizes
    height, width = sd1.geometry.target_size(shape)
    assert height % 64 == 0 and width % 64 == 0
    assert height * width <= 2 * 512 * 512  # within rounding of the 512² budget
    assert (height >= width) == (shape[0] >= shape[1])  # a strip stays a strip


def test_a_one_pixel_strip_is_segmented_at_its_own_size(tiny_checkpoint, tmp_path):
    image = _save(tmp_path, np.tile(quadrants_image(2, 2)[:1], (1, 2500, 1)))  # 1×5000
    assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint)) == 0
    assert read_labels(tmp_path / "out" / "labels" / "a.png").shape == (1, 5000)


def test_resolution_weights_take_grid_names_as_the_readme_writes_them(tiny_checkpoint, tiny_pipeline, tmp_path):
    image = _save(tmp_path, quadrants_image(180, 320))  # 16:9
    height, width = tiny_pipeline.input_size((180, 320))
    finest = f"{height // 8}x{width // 8}"
    out = tmp_path / "out"
    assert (
        run_cli("segment", image, "-o", out, *tiny_model(tiny_checkpoint), "--resolution-weights", f"{finest}:1") == 0
    )
    by_name = read_labels(out / "labels" / "a.png")
    # A side names the grid of that size on any aspect ratio: 64 is the 16:9 image's finest grid.
    assert run_cli("segment", image, "-o", out, *tiny_model(tiny_checkpoint), "--resolution-weights", "64:1,32:0") == 0
    np.testing.assert_array_equal(read_labels(out / "labels" / "a.png"), by_name)


@pytest.mark.parametrize("weights", ["64:nan", "64:-1", "64:inf", "64:0", "sixty:1", "64"])
def test_bad_resolution_weights_are_refused_by_the_parser(tiny_checkpoint, tmp_path, capsys, weights, no_model_load):
    image = _save(tmp_path, quadrants_image(64, 64))
    with pytest.raises(SystemExit) as exit_:
        run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), "--resolution-weights", weights)
    assert exit_.value.code == 2 and "--resolution-weights" in capsys.readouterr().err


def test_naming_words_are_checked_before_the_model_loads_in_one_short_line(
    tiny_checkpoint, tmp_path, capsys, no_model_load
):
    image = _save(tmp_path, quadrants_image(64, 64))
    assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), "--labels", " , ,") == 2
    assert "vocabulary is empty" in capsys.readouterr().err
    words = ",".join(f"word{k}" for k in range(500))
    assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), "--labels", words) == 2
    error = capsys.readouterr().err
    assert "500 words" in error and len(error) < 600


def test_a_caption_model_that_cannot_be_had_is_named_at_once(
    tiny_checkpoint, tmp_path, capsys, monkeypatch, no_model_load
):
    pytest.importorskip("nltk")
    image = _save(tmp_path, quadrants_image(64, 64))
    base = ["segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), "--caption"]
    assert run_cli(*base, "--caption-model", tmp_path / "no" / "such" / "folder") == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub unreachable: no minutes of retries
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert run_cli(*base) == 2
    assert "cannot be reached" in capsys.readouterr().err


def test_a_corrupted_config_is_named(tiny_checkpoint, tmp_path, capsys):
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    config = broken / "unet" / "config.json"
    config.write_text(config.read_text()[:-30])
    image = _save(tmp_path, quadrants_image(64, 64))
    assert run_cli("segment", image, "-o", tmp_path / "out", "--model", broken, "--device", "cpu") == 2
    error = capsys.readouterr().err
    assert "unet/config.json" in error and "not valid JSON" in error


@pytest.mark.parametrize("device", ["cuda:99", "mps"])
def test_a_device_this_machine_lacks_is_named_before_the_model_loads(
    tiny_checkpoint, tmp_path, capsys, no_model_load, device
):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has Apple's MPS")
    image = _save(tmp_path, quadrants_image(64, 64))
    for command in ("segment", "segment-dataset"):  # before: torch's bare AssertionError, or one per Ray worker
        assert run_cli(command, image, "-o", tmp_path / command, "--model", tiny_checkpoint, "--device", device) == 2
        error = capsys.readouterr().err
        assert f"`device` is '{device}'" in error and "Traceback" not in error
    from diffseg.jobs.dataset import segment_dataset

    with pytest.raises(ValueError, match=f"`device` is '{device}'"):  # the library's job: before Ray starts
        segment_dataset(tmp_path, tmp_path / "job", model=str(tiny_checkpoint), device=device)


def test_the_attention_memory_model_is_the_captured_attentions_size(tiny_pipeline, tiny_sdxl_pipeline):
    from diffseg.backbones.capture import attention_bytes
    from diffseg.io.images import to_model_input

    for pipe, size in ((tiny_pipeline, (128, 192)), (tiny_pipeline, (64, 64)), (tiny_sdxl_pipeline, (96, 160))):
        pixels = to_model_input([quadrants_image(*size)] * 2, size)  # (2, 3, H, W)
        maps, _, _ = pipe.kind.attend(pixels, **ENCODE_DEFAULTS["diffseg"].step)
        assert attention_bytes(pipe.backbone, size, 2) == sum(4 * m.numel() for m in maps.values()), size


def test_a_diffseg_input_whose_attention_cannot_fit_is_refused_before_any_work(
    tiny_checkpoint, tiny_pipeline, tmp_path, capsys, monkeypatch
):
    """A 64 MiB machine: the tiny SD 1.x at 512² records 68 MiB of attention. Before: minutes of UNet, then torch's
    bare allocation error per image (271 GB for `--resolution 4096` on SD 1.x)."""
    monkeypatch.setattr("diffseg.backbones.devices.device_memory", lambda device: 64 << 20)
    image = _save(tmp_path, quadrants_image(64, 64))
    assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), "--resolution", "512") == 2
    error = capsys.readouterr().err
    assert "64×64 tokens: about 0.17 GiB" in error and "--resolution 320` or lower" in error
    with pytest.raises(ValueError, match="more than the 0.062 GiB of CPU memory"):  # the library, before the VAE runs
        tiny_pipeline.encode(quadrants_image(64, 64), resolution=512)
    assert run_cli("segment", image, "-o", tmp_path / "small", *tiny_model(tiny_checkpoint), "--resolution", "256") == 0


def test_every_bundle_field_is_validated_at_load(tiny_pipeline, tmp_path):
    from safetensors.torch import save_file

    diffcut = tiny_pipeline.encode(quadrants_image(64, 64), method="diffcut")
    good = {"image": torch.from_numpy(diffcut.image.copy()), "features": diffcut.features.contiguous()}
    metadata = {"format": "diffseg-bundle/2", "timestep": "50"}
    cases = {
        "flat-image": ({**good, "image": torch.zeros(12, dtype=torch.uint8)}, "`image` shaped"),
        "nan-features": ({**good, "features": torch.full_like(good["features"], math.nan)}, "NaN or infinite"),
        "inf-features": ({**good, "features": torch.full_like(good["features"], math.inf)}, "NaN or infinite"),
        "flat-features": ({**good, "features": good["features"].reshape(-1)}, "`features` shaped"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=f"{path.name}.*{message}"):
            AttentionBundle.load(path)
    save_file(good, str(tmp_path / "good.safetensors"), metadata=metadata)
    assert AttentionBundle.load(tmp_path / "good.safetensors").features.shape == diffcut.features.shape


@pytest.mark.parametrize(
    "config, settings, option",
    [
        ("DiffCutConfig", {"tau": 0.0}, "tau"),
        ("DiffCutConfig", {"alpha": float("nan")}, "alpha"),
        ("SegmentConfig", {"num_points": 1}, "num_points"),
        ("SegmentConfig", {"kl_threshold": float("inf")}, "kl_threshold"),
        ("SegmentConfig", {"kl_threshold": (1.0, 1.1), "iterations": 3}, "kl_threshold"),
    ],
)
def test_configs_refuse_bad_settings_where_they_are_made_naming_the_setting(config, settings, option):
    import diffseg

    with pytest.raises(ValueError, match=f"`{option}`"):
        getattr(diffseg, config)(**settings)


def test_the_cli_reports_a_config_error_under_the_option_name(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(quadrants_image(64)).save(image)
    for argv, option in ((("--method", "diffcut", "--tau", "-1"), "--tau"), (("--num-points", "1"), "--num-points")):
        assert run_cli("segment", image, "-o", tmp_path / "out", "--model", str(tmp_path), *argv) == 2
        assert f"`{option}`" in capsys.readouterr().err
