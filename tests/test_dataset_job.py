import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.jobs.dataset import list_inputs, read_manifest
from diffseg.io.outputs import read_labels

from conftest import kill_mid_run, quadrants_image, run_cli, tiny_model

ray = pytest.importorskip("ray", reason="Ray is not installed (the ray extra)")


def run_job(source, output, checkpoint, *extra):
    return run_cli(
        "segment-dataset",
        source,
        "-o",
        output,
        *tiny_model(checkpoint),
        "--batch-size",
        "1",
        "--kl-threshold",
        "0.5",
        # the README's Ray options, at their values for this machine: a local instance, one CPU worker
        "--ray-address",
        "local",
        "--concurrency",
        "1",
        "--num-gpus-per-worker",
        "0",
        *extra,
    )


def test_inputs_from_lists_are_named_relative_to_their_common_folder(tmp_path):
    (tmp_path / "list.txt").write_text("/data/a/x.jpg\n# a comment\n/data/a/b/y.png\n\n/data/a/z.jpeg\n")
    assert list_inputs(tmp_path / "list.txt") == [
        ("/data/a/x.jpg", "x"),
        ("/data/a/b/y.png", "b/y"),
        ("/data/a/z.jpeg", "z"),
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"uri": ["s3://bucket/set/1.jpg", "s3://bucket/set/2.jpg"]}), tmp_path / "list.parquet")
    assert [n for _, n in list_inputs(tmp_path / "list.parquet")] == ["1", "2"]
    pq.write_table(pa.table({"other": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="column named path"):
        list_inputs(tmp_path / "bad.parquet")
    (tmp_path / "dupes.txt").write_text("/a/x.jpg\n/a/x.png\n")
    with pytest.raises(ValueError, match="both be written as `x`"):
        list_inputs(tmp_path / "dupes.txt")


def test_segment_dataset_matches_segment_records_failures_and_resumes(
    local_ray, tiny_checkpoint, image_folder, tmp_path, capsys
):
    out = tmp_path / "job"
    # 1. First run: good images done, bad ones failed with the reason; the job still finishes.
    assert run_job(image_folder, out, tiny_checkpoint) == 1
    # Ray's workers run torch on one thread; float reductions depend on the thread count, so compare like with like.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert (
            run_cli(
                "segment",
                image_folder,
                "-o",
                tmp_path / "cli",
                *tiny_model(tiny_checkpoint),
                "--kl-threshold",
                "0.5",
                "--no-overlay",
            )
            == 1
        )
    finally:
        torch.set_num_threads(threads)
    manifest = read_manifest(out)
    assert set(manifest) == {"photo", "alpha", "sub/gray", "corrupt", "empty"}
    for name, size in {"photo": (240, 320), "alpha": (200, 200), "sub/gray": (128, 96)}.items():
        row = manifest[name]
        labels = read_labels(out / "labels" / f"{name}.png")
        assert row["status"] == "done" and row["error"] == "" and (row["height"], row["width"]) == size
        assert row["num_segments"] == labels.max() + 1 and Path(row["output"]) == out / "labels" / f"{name}.png"
        np.testing.assert_array_equal(labels, read_labels(tmp_path / "cli" / "labels" / f"{name}.png"))
    assert manifest["corrupt"]["status"] == "failed" and "corrupt.jpg" in manifest["corrupt"]["error"]
    assert manifest["empty"]["status"] == "failed" and "empty (0 bytes)" in manifest["empty"]["error"]
    assert not list(out.rglob("*.tmp"))
    # 2. Second run: nothing new is processed; only the failures are retried (and fail again).
    mtime = (out / "labels" / "photo.png").stat().st_mtime_ns
    capsys.readouterr()
    assert run_job(image_folder, out, tiny_checkpoint) == 1
    assert "Done 0, skipped 3 (already done), failed 2" in capsys.readouterr().err
    assert (out / "labels" / "photo.png").stat().st_mtime_ns == mtime
    # 3. Deleted outputs are redone, and only those.
    (out / "labels" / "alpha.png").unlink()
    (image_folder / "corrupt.jpg").unlink()
    (image_folder / "empty.png").unlink()
    assert run_job(image_folder, out, tiny_checkpoint) == 0
    assert "Done 1, skipped 2 (already done), failed 0" in capsys.readouterr().err
    assert (out / "labels" / "alpha.png").is_file() and (out / "labels" / "photo.png").stat().st_mtime_ns == mtime
    # 4. Naming words on a re-run: every image lacks its names file, so every image is done again, named.
    assert run_job(image_folder, out, tiny_checkpoint, "--labels", "red, green") == 0
    assert "Done 3, skipped 0 (already done), failed 0" in capsys.readouterr().err
    manifest = read_manifest(out)
    for name in ("photo", "alpha", "sub/gray"):
        names = json.loads(manifest[name]["labels"])
        assert set(names) == {str(i) for i in range(manifest[name]["num_segments"])}
        assert set(names.values()) <= {"red", "green", None} and (out / "semantics" / f"{name}.json").is_file()


def _worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "SegmentWorker" in cmdline:
                pids.append(int(proc.name))
    return pids


def test_a_killed_worker_loses_at_most_its_batch(local_ray, tiny_checkpoint, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(8):
        Image.fromarray(np.roll(quadrants_image(96, 128), 8 * k, axis=1)).save(folder / f"img{k}.png")
    out = tmp_path / "job"
    killed = []

    def kill_a_worker_mid_way():
        deadline = time.time() + 180
        while time.time() < deadline and not killed:
            if len(list((out / "labels").glob("*.png"))) >= 2:
                for pid in _worker_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_a_worker_mid_way, daemon=True)
    watcher.start()
    code = run_job(folder, out, tiny_checkpoint)
    watcher.join(timeout=1)
    assert killed, "the worker was never seen running"
    manifest = read_manifest(out)
    assert set(manifest) == {f"img{k}" for k in range(8)}
    for name, row in manifest.items():
        assert row["status"] == "done" or (row["status"] == "failed" and row["error"]), row
        if row["status"] == "done":
            assert (out / "labels" / f"{name}.png").is_file()
    assert code == (0 if all(r["status"] == "done" for r in manifest.values()) else 1)
    assert sum(r["status"] == "failed" for r in manifest.values()) <= 1  # at most the killed worker's batch


@pytest.mark.parametrize("method", ["diffseg", "diffcut"])
def test_segment_dataset_runs_sdxl_with_mixed_shapes_and_matches_segment(
    local_ray, tiny_sdxl_checkpoint, tmp_path, method
):
    """The tiny SDXL, a wide, a tall and a square image in one worker batch (one UNet call per input shape):
    every label map has its image's size and equals `diffseg segment`'s."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (h, w) in {"wide": (120, 240), "tall": (200, 100), "square": (96, 96)}.items():
        Image.fromarray(quadrants_image(h, w)).save(folder / f"{name}.png")
    out = tmp_path / "job"
    extra = ("--method", method, "--batch-size", "3")
    assert run_job(folder, out, tiny_sdxl_checkpoint, *extra) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray's workers: float reductions depend on the thread count
    try:
        cli = ("--method", method, "--kl-threshold", "0.5", "--no-overlay")
        assert run_cli("segment", folder, "-o", tmp_path / "cli", *tiny_model(tiny_sdxl_checkpoint), *cli) == 0
    finally:
        torch.set_num_threads(threads)
    manifest = read_manifest(out)
    for name, size in {"wide": (120, 240), "tall": (200, 100), "square": (96, 96)}.items():
        labels = read_labels(out / "labels" / f"{name}.png")
        assert manifest[name]["status"] == "done" and labels.shape == size
        np.testing.assert_array_equal(labels, read_labels(tmp_path / "cli" / "labels" / f"{name}.png"))


def test_segment_dataset_runs_a_transformer_checkpoint_and_matches_segment(local_ray, tiny_sd3_checkpoint, tmp_path):
    """The tiny SD3 on Ray: a wide and a square image, label maps at their sizes, equal to `diffseg segment`'s."""
    folder = tmp_path / "images"
    folder.mkdir()
    sizes = {"wide": (72, 128), "square": (64, 64)}
    for name, (h, w) in sizes.items():
        Image.fromarray(quadrants_image(h, w)).save(folder / f"{name}.png")
    out = tmp_path / "job"
    assert run_job(folder, out, tiny_sd3_checkpoint) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray's workers: float reductions depend on the thread count
    try:
        cli = ("--kl-threshold", "0.5", "--no-overlay")
        assert run_cli("segment", folder, "-o", tmp_path / "cli", *tiny_model(tiny_sd3_checkpoint), *cli) == 0
    finally:
        torch.set_num_threads(threads)
    for name, size in sizes.items():
        labels = read_labels(out / "labels" / f"{name}.png")
        assert labels.shape == size
        np.testing.assert_array_equal(labels, read_labels(tmp_path / "cli" / "labels" / f"{name}.png"))


def test_segment_dataset_writes_concept_maps_as_segment_does(local_ray, tiny_flux_checkpoint, tmp_path):
    """`--concepts` on Ray: the concept label maps and probabilities `diffseg segment --concepts` writes."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(quadrants_image(72, 128)).save(folder / "wide.png")
    concepts = ("--concepts", "sky, grass, red thing", "--npy")
    assert run_job(folder, tmp_path / "job", tiny_flux_checkpoint, *concepts) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray's workers: float reductions depend on the thread count
    try:
        assert run_cli("segment", folder, "-o", tmp_path / "cli", *tiny_model(tiny_flux_checkpoint), *concepts) == 0
    finally:
        torch.set_num_threads(threads)
    for output in ("concepts/wide.png", "concepts/wide.json", "concept-maps/wide.npy"):
        assert (tmp_path / "job" / output).is_file(), output
    np.testing.assert_array_equal(
        read_labels(tmp_path / "job" / "concepts" / "wide.png"), read_labels(tmp_path / "cli" / "concepts" / "wide.png")
    )
    maps = np.load(tmp_path / "job" / "concept-maps" / "wide.npy")
    assert maps.shape == (3, 72, 128)
    np.testing.assert_allclose(maps, np.load(tmp_path / "cli" / "concept-maps" / "wide.npy"), atol=1e-5)


@pytest.mark.parametrize(
    "option, value",
    [("--ray-address", "bogus"), ("--num-gpus-per-worker", "-1"), ("--num-gpus-per-worker", "nan"),
     ("--num-gpus-per-worker", "1.5")],
)  # fmt: skip
def test_cluster_settings_are_refused_by_name_before_ray_starts(tiny_checkpoint, tmp_path, capsys, option, value):
    """Before: Ray's own "Invalid address format: bogus" or "cannot convert float NaN to integer", once Ray ran."""
    Image.fromarray(quadrants_image(32, 32)).save(tmp_path / "a.png")
    argv = ("segment-dataset", tmp_path / "a.png", "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), option, value)
    assert run_cli(*argv) == 2
    assert f"`{option}` must be" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess or Ray instance started (and killed)
def test_ray_address_local_starts_a_local_instance_whatever_ray_address_says():
    import subprocess
    import sys

    script = (
        "import ray; from diffseg.jobs.dataset import _connect; _connect('local'); "
        "print('nodes', len(ray.nodes())); ray.shutdown()"
    )
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # nothing listens there: joining it would hang or fail
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nodes 1" in done.stdout


def test_resume_adopts_an_orphan_label_map_while_naming_segments(local_ray, tiny_checkpoint, tmp_path, capsys):
    """A label PNG whose manifest row was lost is adopted on resume, also when the run names segments."""
    import pyarrow.parquet as pq

    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(2):
        Image.fromarray(quadrants_image(64, 64 + 32 * k)).save(folder / f"{k}.png")
    out = tmp_path / "job"
    assert run_job(folder, out, tiny_checkpoint, "--labels", "red, green") == 0
    table = pq.read_table(out / "manifest.parquet").to_pylist()
    pq.write_table(pq.read_table(out / "manifest.parquet").slice(0, 1), out / "manifest.parquet")  # a row lost
    capsys.readouterr()
    assert run_job(folder, out, tiny_checkpoint, "--labels", "red, green") == 0
    assert "skipped 2 (already done), failed 0" in capsys.readouterr().err
    manifest = read_manifest(out)
    assert {row["name"] for row in table} == set(manifest) and all(r["status"] == "done" for r in manifest.values())


@pytest.mark.slow  # a subprocess or Ray instance started (and killed)
@pytest.mark.parametrize("seed", [0, 1])
def test_segment_dataset_killed_at_random_resumes_without_losing_or_redoing_anything(
    local_ray, tiny_checkpoint, tmp_path, seed
):
    """The whole job (driver and its own local Ray) killed a random moment after its first label map, then
    resumed: every image done once, label maps written before the kill untouched, none half-written."""
    folder, out = tmp_path / "images", tmp_path / "job"
    folder.mkdir()
    for k in range(8):
        Image.fromarray(np.roll(quadrants_image(64, 96), 9 * k, axis=1)).save(folder / f"{k}.png")
    argv = ["segment-dataset", folder, "-o", out, *tiny_model(tiny_checkpoint), "--batch-size", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # its own process group: the kill takes its Ray processes too
    process = kill_mid_run(argv, lambda: bool(list((out / "labels").glob("*.png"))), seed, group=True, env=env)
    done = sorted((out / "labels").glob("*.png"))
    assert process.returncode == -signal.SIGKILL and 1 <= len(done) < 8  # killed mid-run
    stamps = {p: p.stat().st_mtime_ns for p in done}
    assert run_job(folder, out, tiny_checkpoint) == 0
    manifest = read_manifest(out)
    assert set(manifest) == {str(k) for k in range(8)} and all(r["status"] == "done" for r in manifest.values())
    for k in range(8):
        assert read_labels(out / "labels" / f"{k}.png").shape == (64, 96)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # not recomputed
    assert not list(out.rglob("*.tmp"))
