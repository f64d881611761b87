"""Nothing lost on resume or beside another run: every requested output checked, temporary files removed only when
provably stale (never a live writer's), and none left beside a finished output."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from diffseg.io.outputs import _HOST, is_stale, read_labels

from conftest import quadrants_image, run_cli, tiny_model


def _images(folder, count=2):
    folder.mkdir()
    for k in range(count):
        Image.fromarray(np.roll(quadrants_image(64, 96), 11 * k, axis=1)).save(folder / f"{k}.png")
    return folder


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_writers_temporary_file_survives_another_run_and_a_dead_writers_does_not(tiny_checkpoint, tmp_path):
    """Two runs writing one folder: the second must not delete the first's file in flight (same output name)."""
    folder = _images(tmp_path / "images", 1)
    labels = tmp_path / "out" / "labels"
    labels.mkdir(parents=True)
    live = labels / f".0.png.{_HOST}-{os.getpid()}.inflight.tmp"  # this process is alive: a concurrent writer
    dead = labels / f".0.png.{_HOST}-{_dead_pid()}.k1ll3d.tmp"
    live.write_bytes(b"being written")
    dead.write_bytes(b"half a PNG")
    assert run_cli("segment", folder, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint)) == 0
    assert live.read_bytes() == b"being written" and not dead.exists()
    assert read_labels(labels / "0.png").shape == (64, 96)


def test_temporary_files_of_another_host_are_stale_only_when_older_than_the_run(tmp_path):
    other = tmp_path / ".a.png.elsewhere-1.abc.tmp"
    other.write_bytes(b"x")
    assert not is_stale(other, started=other.stat().st_mtime - 1)  # written after the run began: maybe live
    assert is_stale(other, started=other.stat().st_mtime + 1)
    assert not is_stale(tmp_path / "a.png", started=float("inf"))  # not a temporary output at all


def test_a_stale_temporary_file_beside_a_finished_output_is_removed_on_resume(tiny_checkpoint, tmp_path, capsys):
    folder = _images(tmp_path / "images", 1)
    out = tmp_path / "out"
    argv = ["segment", folder, "-o", out, *tiny_model(tiny_checkpoint), "--resume"]
    assert run_cli(*argv) == 0
    stale = out / "labels" / ".0.png.k1ll3d.tmp"  # the kind an older version left, recording no writer
    stale.write_bytes(b"half a PNG")
    os.utime(stale, (0, 0))
    capsys.readouterr()
    assert run_cli(*argv) == 0 and "Nothing to do" in capsys.readouterr().err
    assert not stale.exists()


def test_segment_resume_redoes_an_image_whose_requested_format_is_missing(tiny_checkpoint, tmp_path, capsys):
    folder = _images(tmp_path / "images")
    out = tmp_path / "out"
    argv = ["segment", folder, "-o", out, *tiny_model(tiny_checkpoint), "--resume"]
    assert run_cli(*argv) == 0
    capsys.readouterr()
    assert run_cli(*argv, "--npy") == 0
    assert "Segmented 2 images" in capsys.readouterr().err
    assert all((out / "arrays" / f"{k}.npy").is_file() for k in range(2))


def test_segment_dataset_resume_writes_every_requested_format_that_is_missing(
    local_ray, tiny_checkpoint, tmp_path, capsys
):
    """A re-run that asks for more formats, a kill between the label map and the overlay, and an adopted orphan
    label map: each image whose requested outputs are not all there is done again; the others are skipped."""
    folder = _images(tmp_path / "images", 3)
    out = tmp_path / "job"
    argv = ["segment-dataset", folder, "-o", out, *tiny_model(tiny_checkpoint), "--batch-size", "1"]
    assert run_cli(*argv, "--no-overlay") == 0
    capsys.readouterr()
    assert run_cli(*argv, "--no-overlay", "--coco", "--npy") == 0  # more formats on a re-run
    assert "Done 3, skipped 0" in capsys.readouterr().err
    assert all((out / sub / f"{k}{suffix}").is_file() for k in range(3) for sub, suffix in [("coco", ".json")])
    (out / "arrays" / "1.npy").unlink()  # killed between the label map and its array
    capsys.readouterr()
    assert run_cli(*argv, "--no-overlay", "--coco", "--npy") == 0
    assert "Done 1, skipped 2" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out / "arrays" / "1.npy"), read_labels(out / "labels" / "1.png"))
    (out / "manifest.parquet").unlink()  # orphans: adopted only where every requested output is there
    (out / "coco" / "2.json").unlink()
    capsys.readouterr()
    assert run_cli(*argv, "--no-overlay", "--coco", "--npy") == 0
    assert "Done 1, skipped 2" in capsys.readouterr().err and (out / "coco" / "2.json").is_file()
    assert not list(out.rglob("*.tmp"))
