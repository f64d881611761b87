"""A model's own input limits, read from its configs and honoured before any work: SD3's positional embedding.

SD3's learned positional embedding is a `pos_embed_max_size`² table of patches; diffusers refuses a side past it
("Width (85) cannot be greater than `pos_embed_max_size`: 64"). The backbone's geometry reads the limit, default
sizing keeps every image within it, and an explicit size past it is refused before the model loads.
"""

from __future__ import annotations

import pytest
from PIL import Image

from diffseg.backbones.dit import detect_transformer
from diffseg.backbones.families import read_backbone
from diffseg.io.outputs import read_labels
from diffseg.testing.architectures import DIT_ARCHITECTURES
from diffseg.testing.models import save_random_checkpoint

from conftest import quadrants_image, run_cli, tiny_model

SD3_MEDIUM = {"_class_name": "SD3Transformer2DModel", **DIT_ARCHITECTURES["sd3-medium"]["transformer"]}
# Aspect ratios a user meets, and the hard ones: panoramas, strips, a 1-pixel line.
SHAPES = [(720, 1280), (1000, 1000), (400, 1200), (300, 3000), (100, 1200), (1200, 100), (1, 5000), (4000, 3000)]


def test_the_positional_embeddings_reach_is_read_from_the_config():
    sd3 = detect_transformer(SD3_MEDIUM)
    assert sd3.geometry.max_side == 192 * 2 * 8  # 192 patches of 2 latents of 8 pixels: 3,072 px
    flux_dev = {"_class_name": "FluxTransformer2DModel", **DIT_ARCHITECTURES["flux-dev"]["transformer"]}
    flux = detect_transformer(flux_dev)
    assert flux.geometry.max_side is None  # RoPE: any size


@pytest.mark.parametrize("resolution", [None, 1024, 2048, 3072])
@pytest.mark.parametrize("shape", SHAPES)
def test_default_sizing_keeps_every_image_within_the_positional_embedding(shape, resolution):
    """Before: a 10:1 panorama at 1024 or a 3:1 photo at 2048 gave a side past 3,072 px and failed after the load."""
    geometry = detect_transformer(SD3_MEDIUM).geometry
    height, width = geometry.target_size(shape, resolution)
    assert max(height, width) <= geometry.max_side and min(height, width) >= 16
    assert height % 16 == 0 and width % 16 == 0
    if max(shape) <= 64 * min(shape):  # the aspect ratio kept, each side within one token of it (not squashed)
        assert abs(height * shape[1] - width * shape[0]) <= 16 * (shape[0] + shape[1])


def test_an_explicit_size_past_the_reach_is_refused_by_name():
    geometry = detect_transformer(SD3_MEDIUM).geometry
    with pytest.raises(ValueError, match=r"`resolution` 4096 does not fit SD3-medium.*--resolution 3072"):
        geometry.target_size((100, 100), 4096, "square")
    assert geometry.target_size((100, 100), 3072, "square") == (3072, 3072)


@pytest.fixture(scope="module")
def sd3_64(tmp_path_factory):
    """A tiny SD3 at SD3-medium's native 1024² (64 patches a side) whose positional embedding covers 64 patches: the
    model limit itself, which the default tiny SD3's table (three times its native grid, as SD3-medium's) leaves
    room past."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny-sd3-64"
    return save_random_checkpoint(folder, "tiny-sd3-1024", seed=0)


@pytest.mark.parametrize("method", ["diffseg", "diffcut", "seg4diff", "concepts"])
def test_wide_images_segment_with_default_settings_on_an_sd3_whose_embedding_covers_64_patches(
    sd3_64, method, tmp_path
):
    """Before: "Width (85) cannot be greater than `pos_embed_max_size`: 64" on a 16:9 photo, after the load."""
    assert read_backbone(sd3_64).geometry.max_side == 1024
    folder = tmp_path / "in"
    folder.mkdir()
    shapes = {"wide": (90, 160), "strip": (40, 480)}  # 16:9 and 12:1
    for name, (h, w) in shapes.items():
        Image.fromarray(quadrants_image(h, w)).save(folder / f"{name}.png")
    words = ("--concepts", "red, green") if method == "concepts" else ()
    code = run_cli("segment", folder, "-o", tmp_path / "out", *tiny_model(sd3_64), "--method", method, *words)
    assert code == 0
    folder = "concepts" if method == "concepts" else "labels"  # concept maps write their id maps apart
    for name, shape in shapes.items():
        labels = read_labels(tmp_path / "out" / folder / f"{name}.png")
        assert labels.shape == shape


def test_a_resolution_past_the_reach_is_refused_before_the_model_loads(sd3_64, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("diffseg.pipeline.DiffSegPipeline.from_pretrained", refuse)
    image = tmp_path / "a.png"
    Image.fromarray(quadrants_image(64, 64)).save(image)
    code = run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(sd3_64), "--resolution", "2048")
    assert code == 2
    error = capsys.readouterr().err
    assert "`resolution` 2048 does not fit" in error and "--resolution 1024" in error
