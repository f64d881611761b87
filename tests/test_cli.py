import numpy as np
import pytest
from PIL import Image

from diffseg import segment_attention
from diffseg.io.outputs import read_labels

from conftest import run_cli, tiny_model


def test_segment_writes_outputs_for_good_images_and_reports_bad_ones(
    tiny_checkpoint, tiny_pipeline, image_folder, tmp_path, capsys
):
    out = tmp_path / "out"
    code = run_cli(
        "segment",
        image_folder,
        "-o",
        out,
        *tiny_model(tiny_checkpoint),
        "--batch-size",
        "2",
        "--npy",
        "--kl-threshold",
        "0.5",
    )
    err = capsys.readouterr().err
    assert code == 1  # bad files make the run fail at the end, after the good ones are written
    assert "corrupt.jpg" in err and "empty.png" in err and "Segmented 3 images" in err
    sizes = {"photo": (240, 320), "alpha": (200, 200), "sub/gray": (128, 96)}
    for name, size in sizes.items():
        labels = read_labels(out / "labels" / f"{name}.png")
        assert labels.shape == size
        np.testing.assert_array_equal(labels, np.load(out / "arrays" / f"{name}.npy"))
        with Image.open(out / "overlays" / f"{name}.png") as overlay:
            assert overlay.size == (size[1], size[0]) and overlay.mode == "RGB"
    # The CLI's labels are the library's labels for the same image and parameters.
    bundle = tiny_pipeline.encode(str(image_folder / "photo.jpg"))
    expected = segment_attention(bundle.attention, kl_threshold=0.5, output_size=(240, 320))
    np.testing.assert_array_equal(read_labels(out / "labels" / "photo.png"), expected)
    assert not list(out.rglob("*.tmp")) and not (out / "labels" / "corrupt.png").exists()


def test_resume_skips_images_whose_outputs_exist(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    (image_folder / "corrupt.jpg").unlink()
    (image_folder / "empty.png").unlink()
    assert run_cli("segment", image_folder, "-o", out, *tiny_model(tiny_checkpoint)) == 0
    kept = [out / "labels" / "photo.png", out / "overlays" / "sub" / "gray.png"]
    mtimes = [p.stat().st_mtime_ns for p in kept]
    (out / "labels" / "alpha.png").unlink()
    capsys.readouterr()
    assert run_cli("segment", image_folder, "-o", out, *tiny_model(tiny_checkpoint), "--resume") == 0
    err = capsys.readouterr().err
    assert "Segmented 1 images" in err and "2 already done" in err
    assert [p.stat().st_mtime_ns for p in kept] == mtimes
    assert (out / "labels" / "alpha.png").is_file()


def test_files_and_globs_are_accepted_and_missing_inputs_reported(tiny_checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(
        "segment",
        image_folder / "photo.jpg",
        str(image_folder / "sub" / "*.png"),
        tmp_path / "missing.jpg",
        "-o",
        out,
        *tiny_model(tiny_checkpoint),
        "--no-overlay",
    )
    assert code == 1 and "missing.jpg: no such file or folder" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["gray.png", "photo.png"]
    assert not (out / "overlays").exists()


def test_known_errors_are_one_line_messages(tmp_path, image_folder, capsys):
    assert run_cli("segment", image_folder, "-o", tmp_path / "o", "--model", tmp_path / "no-model") == 2
    err = capsys.readouterr().err
    assert err.startswith("diffseg: error: Model folder") and "Traceback" not in err
    assert run_cli("segment", image_folder, "-o", tmp_path / "o", "--kl-threshold", "1,1") == 2
    assert "`--kl-threshold` has 2 values" in capsys.readouterr().err


def test_traceback_on_request(tmp_path, image_folder, monkeypatch):
    monkeypatch.setenv("DIFFSEG_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        run_cli("segment", image_folder, "-o", tmp_path / "o", "--model", tmp_path / "no-model")


def test_outputs_get_the_mode_of_any_new_file_not_0600(tiny_checkpoint, tmp_path):
    from diffseg.io.outputs import _UMASK

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "a.png")
    assert run_cli("segment", tmp_path / "a.png", "-o", tmp_path / "out", *tiny_model(tiny_checkpoint)) == 0
    modes = {path.stat().st_mode & 0o777 for path in (tmp_path / "out").rglob("*.png")}
    assert modes == {0o666 & ~_UMASK}  # 0o644 under the usual umask: others sharing the folder can read them


def test_resume_knows_which_input_made_an_output(tiny_checkpoint, tmp_path, capsys):
    from diffseg.io.outputs import label_source

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "a.jpg")
    argv = ("segment", folder, "-o", out, *tiny_model(tiny_checkpoint), "--resume")
    assert run_cli(*argv) == 0
    assert label_source(out / "labels" / "a.png") == str((folder / "a.jpg").resolve())
    (folder / "a.jpg").unlink()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "a.png")  # same stem, another image
    capsys.readouterr()
    assert run_cli(*argv) == 0
    assert "Segmented 1 images" in capsys.readouterr().err  # not skipped as done
    assert label_source(out / "labels" / "a.png") == str((folder / "a.png").resolve())
    assert run_cli(*argv) == 0 and "Nothing to do" in capsys.readouterr().err  # now it is done


def test_an_unwritable_output_folder_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path, capsys):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("not a folder")
    assert run_cli("segment", tmp_path / "a.png", "-o", tmp_path / "file" / "out", *tiny_model(tiny_checkpoint)) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess or Ray instance started (and killed)
def test_temporary_files_left_by_a_killed_run_are_removed(tiny_checkpoint, tmp_path):
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "a.png")
    stale = tmp_path / "out" / "labels" / ".a.png.k1ll3d.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a PNG")
    assert run_cli("segment", tmp_path / "a.png", "-o", tmp_path / "out", *tiny_model(tiny_checkpoint)) == 0
    assert not stale.exists() and not list((tmp_path / "out").rglob("*.tmp"))


def test_coco_rle_from_one_pass_equals_pycocotools_encoding_each_mask():
    """The run-length pass gives, per segment, exactly pycocotools' RLE of its mask, area and box included (maps
    starting and ending with a segment's run, single rows and columns, an id the map lacks)."""
    pytest.importorskip("pycocotools")
    from pycocotools import mask as coco_mask

    from diffseg.io.outputs import coco_record

    rng = np.random.default_rng(0)
    for shape, count in [((7, 9), 4), ((50, 31), 12), ((1, 40), 3), ((40, 1), 2), ((30, 30), 1)]:
        blocks = rng.integers(0, count, (max(1, shape[0] // 5), max(1, shape[1] // 5)))
        labels = np.kron(blocks, np.ones((5, 5), np.int64))[: shape[0], : shape[1]]
        labels[0, 0] = labels.max() + 1  # a run at the very start; the id before it may be missing
        for annotation in coco_record("x.png", labels)["annotations"]:
            mask = np.asfortranarray((labels == annotation["id"])[:, :, None], dtype=np.uint8)
            (expected,) = coco_mask.encode(mask)
            assert annotation["segmentation"]["counts"] == expected["counts"].decode("ascii")
            assert annotation["area"] == int(mask.sum())
            assert annotation["bbox"] == [float(v) for v in coco_mask.toBbox([expected])[0]]


def test_coco_output_holds_one_rle_mask_per_segment_that_decodes_to_the_label_map(tiny_checkpoint, tmp_path):
    import json

    from pycocotools import mask as coco_mask

    Image.fromarray(np.kron(np.arange(4, dtype=np.uint8).reshape(2, 2) * 60, np.ones((40, 48), np.uint8))).save(
        tmp_path / "a.png"
    )
    out = tmp_path / "out"
    argv = ("segment", tmp_path / "a.png", "-o", out, *tiny_model(tiny_checkpoint), "--coco", "--kl-threshold", "0.5")
    assert run_cli(*argv) == 0
    labels = read_labels(out / "labels" / "a.png")
    record = json.loads((out / "coco" / "a.json").read_text())
    assert (record["image"]["height"], record["image"]["width"]) == labels.shape
    assert [a["id"] for a in record["annotations"]] == list(range(labels.max() + 1))
    for annotation in record["annotations"]:
        rle = {**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode([rle])[:, :, 0].astype(bool), labels == annotation["id"])
        assert annotation["area"] == int((labels == annotation["id"]).sum())


def test_an_unreadable_sub_folder_is_reported_and_fails_the_run(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Tests run as root, whom permissions do not stop: the folder's listing is made to fail as it would for a user."""
    import os

    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "locked" / "b.png")
    scandir = os.scandir

    def denied(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    assert run_cli("segment", folder, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint)) == 1
    err = capsys.readouterr().err
    assert "locked" in err and "could not be read" in err and "Segmented 1 images" in err
