"""Fault injection: `segment` and `evaluate` killed at random moments (several seeds), then resumed. Every output is
complete and valid, nothing done is recomputed, nothing is missing. (`segment-dataset`: tests/test_dataset_job.py.)"""

import json
import signal

import numpy as np
import pytest
from PIL import Image

from diffseg.io.outputs import read_labels

from conftest import kill_mid_run, quadrants_image, run_cli, tiny_model
from test_evaluate import make_coco

IMAGES = 10


@pytest.mark.slow  # a subprocess or Ray instance started (and killed)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_killed_at_random_resumes_without_losing_or_redoing_anything(tiny_checkpoint, tmp_path, seed):
    folder, out = tmp_path / "images", tmp_path / "out"
    folder.mkdir()
    for k in range(IMAGES):
        Image.fromarray(np.roll(quadrants_image(64, 96), 7 * k, axis=1)).save(folder / f"{k}.png")
    argv = ["segment", folder, "-o", out, *tiny_model(tiny_checkpoint), "--resume", "--npy"]
    process = kill_mid_run(argv, lambda: len(list((out / "arrays").glob("*.npy"))) >= 1, seed)
    complete = {p.stem for p in (out / "arrays").glob("*.npy")}  # the last file an image gets
    assert process.returncode == -signal.SIGKILL and 1 <= len(complete) < IMAGES  # killed mid-run
    stamps = {p: p.stat().st_mtime_ns for name in complete for p in out.rglob(f"{name}.*")}
    for png in (out / "labels").glob("*.png"):  # whatever was on disk is whole
        assert read_labels(png).shape == (64, 96)
    assert run_cli(*argv) == 0
    for k in range(IMAGES):
        assert read_labels(out / "labels" / f"{k}.png").shape == (64, 96)
        np.testing.assert_array_equal(np.load(out / "arrays" / f"{k}.npy"), read_labels(out / "labels" / f"{k}.png"))
        with Image.open(out / "overlays" / f"{k}.png") as overlay:
            assert overlay.size == (96, 64)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # done before: not recomputed
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow  # a subprocess or Ray instance started (and killed)
@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_killed_at_random_resumes_to_every_image_once(tiny_checkpoint, tmp_path, seed):
    ids = make_coco(tmp_path / "coco", n=6)
    run = tmp_path / "run"
    argv = ["evaluate", "cocostuff27", "--root", tmp_path / "coco", "--limit", "6", "-o", run]
    argv += [*tiny_model(tiny_checkpoint)]
    results = run / "results.jsonl"
    process = kill_mid_run(argv, lambda: results.exists() and results.read_text().count("\n") >= 1, seed)
    before = [line for line in results.read_text().splitlines() if line.endswith("}")]
    assert process.returncode == -signal.SIGKILL and 1 <= len(before) < len(ids)  # killed mid-run
    assert run_cli(*argv) == 0
    lines = results.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["id"] for r in records) == sorted(ids)  # each image once, none missing
    assert lines[: len(before)] == before  # scored before the kill: kept, not recomputed
    assert json.loads((run / "summary.json").read_text())["images"] == len(ids)
