import numpy as np
import pytest
from PIL import Image

from diffseg.io.images import as_array, center_crop, find_images, load_image, to_model_input

from conftest import quadrants_image
from naive import tf_bilinear


def test_alpha_is_composited_over_white_and_gray_becomes_rgb(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = np.asarray(load_image(tmp_path / "a.png"))
    assert image[0, 0].tolist() == [255, 0, 0] and image[3, 0].tolist() == [255, 255, 255]
    Image.fromarray(np.full((3, 5), 77, np.uint8), "L").save(tmp_path / "g.png")
    assert np.asarray(load_image(tmp_path / "g.png")).shape == (3, 5, 3)
    assert as_array(np.full((3, 5), 0.5)).shape == (3, 5, 3)


@pytest.mark.parametrize(
    "content, message", [(b"", "is empty"), (b"GIF89a-broken", "not in an image format")], ids=["empty", "corrupt"]
)
def test_bad_files_name_themselves(tmp_path, content, message):
    path = tmp_path / "bad.gif"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"bad.gif.*{message}"):
        load_image(path)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png")


def test_an_image_past_pillows_pixel_guard_is_named_with_what_to_do(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: past twice the guard, as 400 MP is
    with pytest.raises(ValueError, match=r"huge.png` has more than the 2,000 pixels Pillow decodes .*downscale it"):
        load_image(tmp_path / "huge.png")


def test_center_crop_uses_the_reference_offsets():
    image = np.arange(5 * 8).reshape(5, 8)
    np.testing.assert_array_equal(center_crop(image), image[:, 1:6])  # (8 - 5) // 2 = 1
    np.testing.assert_array_equal(center_crop(image.T), image.T[1:6])


def test_model_input_is_tensorflow_bilinear_in_minus_one_to_one():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    x = to_model_input([image], 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    expected = tf_bilinear(image[:, :, 1].astype(np.float64), 64, 64) / 127.5 - 1
    np.testing.assert_allclose(x[0, 1].numpy(), expected, atol=1e-5)
    big = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)  # downsampling: no antialiasing, as tf.image.resize
    np.testing.assert_allclose(
        to_model_input([big], 64)[0, 0].numpy(),
        tf_bilinear(big[:, :, 0].astype(np.float64), 64, 64) / 127.5 - 1,
        atol=1e-5,
    )


def test_find_images_walks_folders_globs_and_files(image_folder, tmp_path):
    found, missing = find_images([image_folder, tmp_path / "nothing-*.jpg", tmp_path / "absent.png"])
    names = [name for _, name in found]
    assert names == ["alpha", "corrupt", "empty", "photo", "sub/gray"]  # sorted; notes.txt is not an image
    assert [item for item, _ in missing] == [str(tmp_path / "nothing-*.jpg"), str(tmp_path / "absent.png")]
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError, match="would both be written as `photo`"):
        find_images([image_folder / "photo.jpg", tmp_path / "photo.png"])


@pytest.mark.parametrize(
    "make",
    [
        lambda v: Image.fromarray(v.astype(np.uint16) * 257),  # 16-bit grayscale ("I;16")
        lambda v: Image.fromarray(v.astype(np.int32) * 257),  # "I": how Pillow reads many 16-bit PNGs
        lambda v: Image.fromarray(v.astype(np.float32) / 255),  # "F": float TIFF in [0, 1]
    ],
    ids=["I;16", "I", "F"],
)
def test_high_bit_depth_grayscale_keeps_its_content(make, tmp_path):
    values = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (16, 1))  # a ramp, dark to light
    image = make(values)
    path = tmp_path / ("deep.png" if image.mode == "I;16" else "deep.tif")  # 16-bit PNG; 32-bit and float TIFFs
    image.save(path)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (16, 64, 3) and np.abs(rgb[..., 0].astype(int) - values).max() <= 1


def test_other_modes_reach_the_model_with_their_content(tmp_path):
    base = quadrants_image(32, 32)
    Image.fromarray(base).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert np.abs(np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int) - base).mean() < 20
    la = Image.fromarray(base[..., 0]).convert("LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "la.png"))[..., 0], base[..., 0])
    frames = [Image.fromarray(base), Image.fromarray(255 - base)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = np.asarray(load_image(tmp_path / "anim.gif")).astype(int)
    assert np.abs(first - base).mean() < 30  # the first frame (GIF palette), not the inverted second


def test_globs_do_not_follow_folder_link_loops(tmp_path):
    (tmp_path / "set" / "sub").mkdir(parents=True)
    Image.fromarray(quadrants_image(8, 8)).save(tmp_path / "set" / "a.jpg")
    Image.fromarray(quadrants_image(8, 8)).save(tmp_path / "set" / "sub" / "b.jpg")
    (tmp_path / "set" / "sub" / "loop").symlink_to(tmp_path / "set", target_is_directory=True)
    found, missing = find_images([str(tmp_path / "set" / "**" / "*.jpg")])
    assert sorted(p.name for p, _ in found) == ["a.jpg", "b.jpg"] and not missing
    found, _ = find_images([tmp_path / "set"])
    assert sorted(name for _, name in found) == ["a", "sub/b"]
