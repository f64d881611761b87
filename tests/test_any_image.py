"""Any image, any Stable Diffusion, either method: through the CLI as users meet it."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg import AttentionBundle
from diffseg.app.cache import BundleCache
from diffseg.app.demo import slider_weights
from diffseg.app.view import render
from diffseg.io.outputs import read_labels

from conftest import quadrants_image, run_cli, tiny_model


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    Image.fromarray(quadrants_image(200, 400)).save(folder / "wide.png")
    Image.fromarray(quadrants_image(300, 180)).save(folder / "tall.jpg", quality=95)
    return folder


@pytest.mark.parametrize(
    "family, extra",
    [
        ("sd1", ()),
        ("sd2", ()),
        ("sdxl", ()),
        ("sd1", ("--dtype", "float16")),
        ("sdxl", ("--dtype", "bfloat16")),
        ("sd1", ("--method", "diffcut")),
        ("sdxl", ("--method", "diffcut", "--pamr")),
    ],
)
def test_segment_writes_label_maps_of_each_image_size_for_every_family(
    family, extra, wide_folder, tiny_checkpoint, tiny_sd2_checkpoint, tiny_sdxl_checkpoint, tmp_path
):
    checkpoint = {"sd1": tiny_checkpoint, "sd2": tiny_sd2_checkpoint, "sdxl": tiny_sdxl_checkpoint}[family]
    out = tmp_path / "out"
    assert run_cli("segment", wide_folder, "-o", out, *tiny_model(checkpoint), *extra) == 0
    for name, (h, w) in {"wide": (200, 400), "tall": (300, 180)}.items():
        with Image.open(out / "labels" / f"{name}.png") as png:
            assert png.size == (w, h)
        with Image.open(out / "overlays" / f"{name}.png") as png:
            assert png.size == (w, h)


def test_a_12_megapixel_photo_gets_a_full_size_label_map(tiny_checkpoint, tmp_path):
    rng = np.random.default_rng(0)
    photo = np.kron(quadrants_image(30, 40), np.ones((100, 100, 1), np.uint8))  # 3000×4000, four colours
    photo = np.clip(photo.astype(np.int16) + rng.integers(-8, 8, photo.shape), 0, 255).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=90)
    out = tmp_path / "out"
    assert run_cli("segment", tmp_path / "photo.jpg", "-o", out, *tiny_model(tiny_checkpoint), "--no-overlay") == 0
    labels = read_labels(out / "labels" / "photo.png")
    assert labels.shape == (3000, 4000) and set(np.unique(labels)) == set(range(labels.max() + 1))


def test_square_resize_is_one_option_away_and_changes_only_the_input_shape(tiny_pipeline, wide_folder):
    native = tiny_pipeline.encode(str(wide_folder / "wide.png"))
    square = tiny_pipeline.encode(str(wide_folder / "wide.png"), resize="square")
    assert next(iter(native.attention)) == (48, 88) and next(iter(square.attention)) == (64, 64)
    for bundle in (native, square):
        assert tiny_pipeline.segment(bundle).labels.shape == (200, 400)


def test_bundles_keep_rectangular_grids_and_features_and_old_bundles_still_load(tiny_pipeline, tmp_path):
    from safetensors.torch import save_file

    bundle = tiny_pipeline.encode(quadrants_image(200, 400))
    loaded = AttentionBundle.load(bundle.save(tmp_path / "rect.safetensors"))
    assert list(loaded.attention) == list(bundle.attention) and loaded.layers == bundle.layers
    np.testing.assert_array_equal(tiny_pipeline.segment(loaded).labels, tiny_pipeline.segment(bundle).labels)
    cut = tiny_pipeline.encode(quadrants_image(200, 400), method="diffcut")
    again = AttentionBundle.load(cut.save(tmp_path / "cut.safetensors"))
    assert again.method == "diffcut" and torch.equal(again.features, cut.features)
    np.testing.assert_array_equal(tiny_pipeline.segment(again).labels, tiny_pipeline.segment(cut).labels)
    # The first format: square grids keyed by side ("attention.64").
    square = tiny_pipeline.encode(quadrants_image(128, 128))
    tensors = {f"attention.{h}": t.contiguous() for (h, _), t in square.attention.items()}
    tensors["image"] = torch.from_numpy(square.image.copy())
    metadata = {"format": "diffseg-attention-bundle/1", "timestep": "300", "model": "m", "layers": '{"64": 3}'}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata=metadata)
    old = AttentionBundle.load(tmp_path / "v1.safetensors")
    assert list(old.attention) == list(square.attention) and old.layers == {(64, 64): 3}
    np.testing.assert_array_equal(tiny_pipeline.segment(old).labels, tiny_pipeline.segment(square).labels)


def test_malformed_bundle_fields_are_named(tiny_pipeline, tmp_path):
    from safetensors.torch import save_file

    good = tiny_pipeline.encode(quadrants_image(64, 64))
    tensors = {f"attention.{h}x{w}": t.contiguous() for (h, w), t in good.attention.items()}
    tensors["image"] = torch.from_numpy(good.image.copy())
    cases = {
        "timestep": {"format": "diffseg-bundle/2", "timestep": "soon"},
        "layers": {"format": "diffseg-bundle/2", "timestep": "300", "layers": "{not json"},
        "vocabulary": {"format": "diffseg-bundle/2", "timestep": "300", "vocabulary": '{"words": 1}'},
    }
    for field, metadata in cases.items():
        path = tmp_path / f"{field}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=f"{path.name}.*`{field}`"):
            AttentionBundle.load(path)
    bad = dict(tensors)
    bad["attention.8x8"] = torch.full_like(bad["attention.8x8"], float("nan"))
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata={"format": "diffseg-bundle/2", "timestep": "300"})
    with pytest.raises(ValueError, match="nan.safetensors.*NaN.*8x8"):
        AttentionBundle.load(tmp_path / "nan.safetensors")


def test_the_demo_path_runs_on_sdxl_with_either_method(tiny_sdxl_pipeline, tmp_path):
    """The demo's cache and slider path (what the page calls) on the tiny SDXL: two grids, both methods."""
    cache = BundleCache(tiny_sdxl_pipeline, capacity=2, folder=tmp_path)
    image = quadrants_image(200, 400)
    entry, encoded = cache.get(image, 300)
    assert encoded and list(entry.bundle.attention) == [(22, 46), (11, 23)]  # 352×736 pixels: multiples of 32
    weights = slider_weights(entry.bundle, [1.0, 0.5, 0.0, 0.0])
    result = tiny_sdxl_pipeline.segment(entry.bundle, kl_threshold=0.3, resolution_weights=weights)
    view = render(result, entry.image, tmp_path / "diffseg", "wide")
    assert read_labels(view.label_file).shape == (200, 400) and len(view.rows) == result.num_segments >= 1
    entry, encoded = cache.get(image, 50, (), "diffcut")
    assert encoded and entry.bundle.method == "diffcut"
    result = tiny_sdxl_pipeline.segment(entry.bundle, tau=0.6, alpha=10, pamr=False)
    view = render(result, entry.image, tmp_path / "diffcut", "wide")
    assert read_labels(view.label_file).shape == (200, 400) and len(view.rows) == result.num_segments >= 1


def test_arguments_are_checked_before_the_model_loads(tiny_checkpoint, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(quadrants_image(64, 64)).save(image)
    for args, message in [
        (("--timestep", "5000"), "--timestep"),
        (("--num-points", "1"), "--num-points"),
        (("--kl-threshold", "inf"), "--kl-threshold"),
        (("--resolution", "100"), "multiple of 64"),
        (("--method", "diffcut", "--tau", "nan"), "--tau"),
        (("--method", "concepts"), "--concepts"),
        (("--concepts", "sky", "--words", "sky"), "a method of its own"),
        (("--output-size", "60000x60000"), "--output-size"),
    ]:
        assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), *args) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
