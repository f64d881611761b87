import json
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffseg.evaluation.datasets import BENCHMARKS, coco_class_map, coco_image_ids
from diffseg.evaluation.protocols import PROTOCOLS
from diffseg.config import SegmentConfig
from diffseg.evaluation.harness import evaluate

from conftest import kill_mid_run, quadrants_image, run_cli, tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_coco(root: Path, n: int = 4, missing_label: int | None = None) -> list[str]:
    """COCO-Stuff layout with the first n listed ids: quadrant images, fine-id labels (with 255 unlabelled)."""
    ids = list(coco_image_ids()[:n])
    (root / "val2017").mkdir(parents=True)
    (root / "annotation_val2017").mkdir(parents=True)
    for k, i in enumerate(ids):
        h, w = (240, 320) if k % 2 else (300, 200)
        Image.fromarray(quadrants_image(h, w)).save(root / "val2017" / f"{i}.jpg", quality=95)
        label = np.full((h, w), 255, np.uint8)
        label[: h // 2, : w // 2] = 0  # person -> coarse 9
        label[: h // 2, w // 2 :] = 149  # sky-other
        label[h // 2 :, : w // 2] = 147  # road
        label[h // 2 :, w // 2 : -8] = 96  # building ... leave an unlabelled strip
        if k != missing_label:
            Image.fromarray(label).save(root / "annotation_val2017" / f"{i}.png")
    return ids


def make_cityscapes(root: Path) -> list[str]:
    names = []
    for city, n in (("aachen", 2), ("bonn", 1)):
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True)
        for k in range(n):
            stem = f"{city}_{k:06d}_000019"
            Image.fromarray(quadrants_image(128, 256)).save(
                root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png"
            )
            ids = np.zeros((128, 256), np.uint8)
            ids[:64] = 23  # sky -> class 16
            ids[64:, :128] = 7  # road -> 0
            ids[64:, 128:] = 26  # car -> 19
            Image.fromarray(ids).save(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png")
            names.append(f"{city}/{stem}_leftImg8bit")
    return names


def test_package_data_equals_the_shared_copies():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not beside the repository")
    lines = (SHARED / "cocostuff27_val_imagelist.txt").read_text().splitlines()
    shared_ids = [line.strip() for line in lines if line.strip()]
    assert list(coco_image_ids()) == shared_ids and len(shared_ids) == 2175
    mapping = json.loads((SHARED / "cocostuff_fine_to_coarse27.json").read_text())["fine_index_to_coarse_index"]
    table = coco_class_map()
    assert all(table[int(k)] == v for k, v in mapping.items())
    assert table[255] == -1 and set(table[:182]) <= set(range(27))
    shipped = Path(__file__).resolve().parents[1] / "src" / "diffseg" / "data" / "cocoobject_fine_to_object80.json"
    assert shipped.read_text() == (SHARED / "cocoobject_fine_to_object80.json").read_text()


def test_label_protocol_crops_the_centre_and_resizes_nearest():
    label = np.zeros((4, 6), np.int64)
    label[:, 1:5] = np.arange(4)[None, :]  # central square = columns 1..4
    out = PROTOCOLS["diffseg"].label(label)
    assert out.shape == (512, 512)
    assert out[0, :128].tolist() == [0] * 128 and out[0, -128:].tolist() == [3] * 128
    assert sorted(np.unique(out)) == [0, 1, 2, 3]


def test_cityscapes_ids_map_7_to_33_onto_27_classes():
    table = BENCHMARKS["cityscapes"].class_map()
    assert table[7] == 0 and table[33] == 26 and table[6] == -1 and table[34] == -1 and table[0] == -1


def test_evaluate_cocostuff_end_to_end_reports_a_missing_label(tiny_checkpoint, tmp_path, capsys):
    ids = make_coco(tmp_path / "coco", n=4, missing_label=2)
    out = tmp_path / "run"
    code = run_cli(
        "evaluate",
        "cocostuff27",
        "--root",
        tmp_path / "coco",
        "--limit",
        "4",
        "-o",
        out,
        *tiny_model(tiny_checkpoint),
        "--batch-size",
        "2",
    )
    captured = capsys.readouterr()
    assert code == 1 and f"skipped {ids[2]}: label" in captured.err
    assert "DiffSeg (Tian et al. 2024)" in captured.out and "72.5" in captured.out
    assert "DiffCut (Couairon et al. 2024)" in captured.out and "49.1" in captured.out
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [ids[0], ids[1], ids[3]]
    for r in records:
        assert len(r["tp"]) == len(r["fp"]) == len(r["fn"]) == 27
        # every labelled pixel of the 512² square is counted once; a segment count a label map can hold
        assert r["all"] == sum(r["tp"]) + sum(r["fn"]) and 0 < r["all"] <= 512 * 512
        assert 1 <= r["segments"] <= 16 * 16 and r["seconds"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["images"] == 3 and summary["settings"]["kl_threshold"] == 1.1 and summary["settings"]["timestep"] == 300
    )
    tp = sum(sum(r["tp"]) for r in records)
    assert summary["pixel_accuracy"] == pytest.approx(tp / sum(r["all"] for r in records))
    assert summary["skipped"] == [
        {"id": ids[2], "reason": f"label `{tmp_path / 'coco' / 'annotation_val2017' / (ids[2] + '.png')}` not found"}
    ]


def test_resumed_run_gives_the_uninterrupted_summary(tiny_pipeline, tmp_path):
    make_coco(tmp_path / "coco", n=4)
    kwargs = {"config": SegmentConfig(kl_threshold=0.5), "progress": False}
    full = evaluate("cocostuff27", tmp_path / "coco", tmp_path / "full", pipeline=tiny_pipeline, limit=4, **kwargs)
    evaluate("cocostuff27", tmp_path / "coco", tmp_path / "part", pipeline=tiny_pipeline, limit=2, **kwargs)
    with open(tmp_path / "part" / "results.jsonl", "a") as f:
        f.write('{"id": "000000000785", "tp": [1, 2')  # a line torn by a kill
    resumed = evaluate("cocostuff27", tmp_path / "coco", tmp_path / "part", pipeline=tiny_pipeline, limit=4, **kwargs)
    assert resumed.images == full.images == 4
    assert resumed.pixel_accuracy == full.pixel_accuracy and resumed.iou == full.iou
    lines = (tmp_path / "part" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    with pytest.raises(ValueError, match="other settings"):
        evaluate(
            "cocostuff27",
            tmp_path / "coco",
            tmp_path / "part",
            pipeline=tiny_pipeline,
            limit=4,
            config=SegmentConfig(kl_threshold=0.9),
            progress=False,
        )


@pytest.mark.slow  # a subprocess or Ray instance started (and killed)
def test_a_killed_run_resumes_to_the_same_summary(tiny_checkpoint, tiny_pipeline, tmp_path):
    make_coco(tmp_path / "coco", n=4)
    full = evaluate(
        "cocostuff27",
        tmp_path / "coco",
        tmp_path / "full",
        pipeline=tiny_pipeline,
        limit=4,
        config=SegmentConfig(kl_threshold=1.1, iterations=3, num_points=16, refine=False, resolution_weights=None),
        progress=False,
    )
    run = tmp_path / "killed"
    argv = ["evaluate", "cocostuff27", "--root", tmp_path / "coco", "--limit", "4", "-o", run]
    argv += [*tiny_model(tiny_checkpoint)]
    results = run / "results.jsonl"
    process = kill_mid_run(argv, lambda: results.exists() and results.read_text().count("\n") >= 1)
    scored = (run / "results.jsonl").read_text().count("\n")
    assert process.returncode == -signal.SIGKILL and 1 <= scored < 4  # the kill happened mid-run
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else None
    assert summary is None or 0 < summary["images"] <= scored  # whatever was on disk is whole JSON, never ahead
    assert run_cli(*argv) == 0
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["images"] == 4 and resumed["pixel_accuracy"] == full.pixel_accuracy and resumed["iou"] == full.iou


def test_predictions_mode_scores_label_pngs_of_any_method(tiny_checkpoint, tiny_pipeline, tmp_path, capsys):
    ids = make_coco(tmp_path / "coco", n=3)
    # DiffSeg's own CLI output, at the protocol's size, scores exactly as the in-process evaluation.
    assert (
        run_cli(
            "segment",
            tmp_path / "coco" / "val2017",
            "-o",
            tmp_path / "pred",
            "--crop",
            "center",
            "--output-size",
            "512",
            "--no-overlay",
            *tiny_model(tiny_checkpoint),
        )
        == 0
    )
    direct = evaluate(
        "cocostuff27",
        tmp_path / "coco",
        tmp_path / "direct",
        pipeline=tiny_pipeline,
        limit=3,
        progress=False,
        config=SegmentConfig(kl_threshold=1.1),
    )
    scored = evaluate(
        "cocostuff27",
        tmp_path / "coco",
        tmp_path / "scored",
        predictions=tmp_path / "pred" / "labels",
        limit=3,
        progress=False,
    )
    assert scored.images == 3 and scored.pixel_accuracy == direct.pixel_accuracy and scored.iou == direct.iou
    # A perfect method: the coarse labels themselves, at the whole image's size, with shuffled ids.
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for i in ids:
        with Image.open(tmp_path / "coco" / "annotation_val2017" / f"{i}.png") as label:
            coarse = coco_class_map()[np.asarray(label)]
        Image.fromarray(((coarse + 1) * 7 % 256).astype(np.uint8)).save(perfect / f"{i}.png")
    code = run_cli(
        "evaluate",
        "cocostuff27",
        "--root",
        tmp_path / "coco",
        "--limit",
        "3",
        "-o",
        tmp_path / "perfect-run",
        "--predictions",
        perfect,
        "--json",
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["pixel_accuracy"] == 1.0 and result["miou"] == 1.0 and result["images"] == 3


def test_evaluate_cityscapes_layout(tiny_pipeline, tmp_path):
    names = make_cityscapes(tmp_path / "cs")
    summary = evaluate(
        "cityscapes",
        tmp_path / "cs",
        tmp_path / "run",
        pipeline=tiny_pipeline,
        progress=False,
        config=SegmentConfig(kl_threshold=0.9),
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(names) and summary.images == 3
    labelled = 128 * 128 * 512 * 512 // (128 * 128)  # the whole 128×128 centre square is labelled
    assert all(r["all"] == labelled for r in records)


def test_misplaced_dataset_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BENCHMARKS["cocostuff27"].samples(tmp_path / "absent")
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"annotation_val2017.*000000000139\.png"):
        BENCHMARKS["cocostuff27"].samples(tmp_path / "coco")
    (tmp_path / "cs" / "leftImg8bit").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val"):
        BENCHMARKS["cityscapes"].samples(tmp_path / "cs")


def test_evaluate_diffcut_under_its_own_protocol_scores_at_128(tiny_checkpoint, tiny_pipeline, tmp_path, capsys):
    ids = make_coco(tmp_path / "coco", n=2)
    out = tmp_path / "run"
    argv = ("evaluate", "cocostuff27", "--root", tmp_path / "coco", "--limit", "2", "-o", out)
    assert run_cli(*argv, *tiny_model(tiny_checkpoint), "--method", "diffcut", "--protocol", "diffcut") == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["method"].startswith("diffcut:") and settings["timestep"] == 50 and settings["tau"] == 0.5
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ids
    # Each image's counts cover exactly its 128×128 labelled pixels (DiffCut's `eval_diffcut.py` protocol).
    for record in records:
        assert 128 * 128 * 0.8 < record["all"] <= 128 * 128  # labelled pixels: all but the unlabelled strip
    assert "DiffCut (Couairon et al. 2024)" in capsys.readouterr().out


def test_bad_arguments_are_refused_before_settings_are_written(tiny_checkpoint, tmp_path, capsys):
    make_coco(tmp_path / "coco", n=1)
    out = tmp_path / "run"
    argv = (
        "evaluate",
        "cocostuff27",
        "--root",
        tmp_path / "coco",
        "--limit",
        "1",
        "-o",
        out,
        *tiny_model(tiny_checkpoint),
    )
    for bad, message in ((("--num-points", "1"), "--num-points"), (("--timestep", "5000"), "--timestep")):
        assert run_cli(*argv, *bad) == 2 and message in capsys.readouterr().err
        assert not (out / "settings.json").exists()
    assert run_cli(*argv) == 0  # the corrected command is not refused as "other settings"
