"""The six benchmarks under DiffCut's protocol, scored exactly as DiffCut's own evaluation code scores them.

Each benchmark gets a small fake dataset in its official layout (non-square images of odd sizes, blob labels with
unlabelled pixels, predictions at the image's size and at 128², more or fewer segments than classes), scored by
`diffseg evaluate NAME --protocol diffcut --predictions DIR` and by a literal transcription of the reference
(`reference_diffcut_eval.py`): every per-class TP, FP and FN count must be equal.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import reference_diffcut_eval as reference
from conftest import run_cli
from diffseg.evaluation.datasets import BENCHMARKS, coco_image_ids
from diffseg.evaluation.harness import evaluate
from diffseg.evaluation.metrics import hungarian_scores, merge_unmatched_into_background
from diffseg.evaluation.protocols import PROTOCOLS, diffcut_crop

# (height, width): both orientations, square, and long sides where torchvision's half-to-even offset rounding
# differs from flooring ((62 - 39) / 2 = 11.5 -> 12; (37 - 32) / 2 = 2.5 -> 2).
SIZES = [(40, 62), (62, 40), (33, 37), (50, 50), (45, 64), (81, 50)]


def blobs(rng, shape, values, cells=(5, 7)) -> np.ndarray:
    """A label map of rectangular regions drawn from `values` (a coarse random grid, upsampled nearest)."""
    grid = rng.choice(np.asarray(values), size=cells)
    rows = np.minimum(np.arange(shape[0]) * cells[0] // shape[0], cells[0] - 1)
    cols = np.minimum(np.arange(shape[1]) * cells[1] // shape[1], cells[1] - 1)
    return grid[rows][:, cols]


def save_png(array, path: Path, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, np.uint8), mode="P" if palette else "L")
    if palette:
        image.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
    image.save(path)


def save_jpg(shape, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), 127, np.uint8)).save(path)


def save_prediction(rng, shape, path: Path, k: int) -> None:
    """A prediction at the image's size, or (one in three) at DiffCut's 128² score size; k segments, ids sparse."""
    at_score_size = rng.random() < 1 / 3
    ids = rng.choice(np.arange(0, 3 * k, 3), size=k, replace=False)
    save_png(blobs(rng, (128, 128) if at_score_size else shape, ids, (4, 6)), path)


def make_voc(root: Path, preds: Path, rng) -> Path:
    """Official VOCdevkit/VOC2012 (palette PNGs: 0 background, 1–20, 255 border), and the reference's
    pascal_voc_d2 made from it by `convert_pas20`."""
    voc = root / "VOCdevkit" / "VOC2012"
    ids = [f"2007_{k:06d}" for k in range(len(SIZES))]
    for i, shape in zip(ids, SIZES):
        save_jpg(shape, voc / "JPEGImages" / f"{i}.jpg")
        label = blobs(rng, shape, [0, 0, 1, 5, 12, 15, 20, 255])
        label[:, :2] = 255  # a border
        save_png(label, voc / "SegmentationClass" / f"{i}.png", palette=True)
        save_prediction(rng, shape, preds / f"{i}.png", k=int(rng.integers(2, 9)))
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    d2 = root / "pascal_voc_d2"
    for i in ids:
        (d2 / "images" / "validation").mkdir(parents=True, exist_ok=True)
        (d2 / "annotations_pascal20" / "validation").mkdir(parents=True, exist_ok=True)
        (d2 / "images" / "validation" / f"{i}.jpg").write_bytes((voc / "JPEGImages" / f"{i}.jpg").read_bytes())
        reference.convert_pas20(
            voc / "SegmentationClass" / f"{i}.png", d2 / "annotations_pascal20" / "validation" / f"{i}.png"
        )
    return voc


def make_paired(root: Path, preds: Path, rng, images: str, labels: str, values, prefix: str) -> Path:
    for k, shape in enumerate(SIZES):
        stem = f"{prefix}{k:08d}"
        save_jpg(shape, root / images / f"{stem}.jpg")
        save_png(blobs(rng, shape, values), root / labels / f"{stem}.png")
        save_prediction(rng, shape, preds / f"{stem}.png", k=int(rng.integers(2, 12)))
    return root


def make_coco(root: Path, preds: Path, rng) -> list[str]:
    """DiffCut's COCO layout (images/val2017, annotations/val2017), fine ids of things and stuff, 255 unlabelled."""
    ids = list(coco_image_ids()[: len(SIZES)])
    for i, shape in zip(ids, SIZES):
        save_jpg(shape, root / "images" / "val2017" / f"{i}.jpg")
        save_png(
            blobs(rng, shape, [0, 0, 2, 17, 56, 62, 96, 105, 147, 149, 255]),
            root / "annotations" / "val2017" / f"{i}.png",
        )
        save_prediction(rng, shape, preds / f"{i}.png", k=int(rng.integers(2, 10)))
    return ids


def make_cityscapes(root: Path, preds: Path, rng) -> None:
    for k, shape in enumerate(SIZES):
        city = ("aachen", "bonn")[k % 2]
        stem = f"{city}_{k:06d}_000019"
        save_jpg(shape, root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png")
        save_png(
            blobs(rng, shape, [0, 1, 7, 8, 11, 21, 23, 26, 33]),
            root / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png",
        )
        save_prediction(rng, shape, preds / city / f"{stem}_leftImg8bit.png", k=int(rng.integers(2, 10)))


CASES = {
    # our name: (the reference's name, builder returning (our root, the reference's root, its file list))
    "voc20": "VOC20",
    "context59": "Context",
    "cocoobject": "COCO-Object",
    "cocostuff27": "COCO-Stuff",
    "cityscapes": "Cityscapes",
    "ade20k": "ADE20K",
}


def build(name: str, tmp_path: Path, seed: int):
    rng = np.random.default_rng(seed)
    preds = tmp_path / "preds"
    if name == "voc20":
        ours = make_voc(tmp_path, preds, rng)
        return ours, tmp_path / "pascal_voc_d2", None, "validation"
    if name == "context59":
        root = make_paired(
            tmp_path / "pascal_ctx_d2",
            preds,
            rng,
            "images/validation",
            "annotations_ctx59/validation",
            [0, 3, 14, 30, 58, 255, 255],
            "2008_",
        )
        return root, root, None, "validation"
    if name == "ade20k":
        root = make_paired(
            tmp_path / "ADEChallengeData2016",
            preds,
            rng,
            "images/validation",
            "annotations/validation",
            [0, 0, 1, 2, 7, 99, 149, 150, 150],
            "ADE_val_",
        )
        return root, root, None, "validation"
    if name in ("cocoobject", "cocostuff27"):
        ids = make_coco(tmp_path / "coco", preds, rng)
        return tmp_path / "coco", tmp_path / "coco", ids, "val"
    make_cityscapes(tmp_path / "cityscapes", preds, rng)
    return tmp_path / "cityscapes", tmp_path / "cityscapes", None, "val"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(CASES))
def test_each_benchmark_under_the_diffcut_protocol_equals_diffcuts_own_code(name, seed, tmp_path):
    ours_root, ref_root, file_list, split = build(name, tmp_path, seed)
    summary = evaluate(
        name,
        ours_root,
        tmp_path / "run",
        predictions=tmp_path / "preds",
        protocol="diffcut",
        progress=False,
        limit=len(SIZES),  # COCO lists 2,175 images; the fake dataset has the first few
    )
    acc, iou, miou, (tp, fp, fn, total) = reference.evaluate(
        CASES[name], ref_root, tmp_path / "preds", file_list, split
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert summary.images == len(SIZES) and not summary.skipped
    assert np.array_equal(np.sum([r["tp"] for r in records], axis=0), tp)
    assert np.array_equal(np.sum([r["fp"] for r in records], axis=0), fp)
    assert np.array_equal(np.sum([r["fn"] for r in records], axis=0), fn)
    assert sum(r["all"] for r in records) == total
    assert summary.pixel_accuracy == pytest.approx(acc, rel=1e-12) and summary.miou == pytest.approx(miou, rel=1e-12)
    assert len(summary.iou) == BENCHMARKS[name].num_classes == len(iou)


def test_the_crop_rounds_half_to_even_as_torchvision():
    image = np.arange(40 * 62).reshape(40, 62)
    assert np.array_equal(diffcut_crop(image), reference.center_crop(image, 39))
    assert diffcut_crop(image)[0, 0] == image[0, 12]  # (62 - 39) / 2 = 11.5 rounds to 12, not 11
    image = np.arange(33 * 37).reshape(33, 37)
    assert diffcut_crop(image)[0, 0] == image[0, 2]  # 2.5 rounds to 2


def test_the_background_step_merges_every_unassigned_cluster_into_one():
    # Classes 0 and 1 lie in cluster 0 only; clusters 1 and 2 cover unlabelled pixels. The matching gives class 1
    # cluster 1 (no overlap), yet class 1 counts as assigned (its row, over the matched columns, has pixels), so
    # cluster 1 is kept and cluster 2 alone is renamed: the reference's rule, not "matched with overlap".
    labels = np.array([[0, 0, 1, -1, -1, -1]])
    pred = np.array([[0, 0, 0, 1, 1, 2]])
    merged_labels, merged = merge_unmatched_into_background(labels, pred, 3)
    assert merged.tolist() == [[0, 0, 0, 1, 1, 3]] and merged_labels.tolist() == [[0, 0, 1, 2, 2, 2]]
    rng = np.random.default_rng(3)
    for _ in range(200):
        labels = rng.choice([-1, 0, 1, 2, 3], size=(1, 1, 16, 16), p=[0.3, 0.3, 0.2, 0.1, 0.1])
        pred = rng.integers(0, int(rng.integers(1, 9)), size=(1, 16, 16))
        ours_labels, ours_pred = merge_unmatched_into_background(labels[0, 0], pred[0], 5)
        label_map, p = labels.copy(), pred.copy()
        reference.many_to_one(p, label_map, 5)
        assert np.array_equal(ours_labels, label_map[0, 0]) and np.array_equal(ours_pred, p[0])
        ours = hungarian_scores(ours_labels, ours_pred, 5)
        tp, fp, fn, total, _, _ = reference.hungarian_matching(p, label_map[0], 5)
        assert np.array_equal(ours.tp, tp) and np.array_equal(ours.fp, fp) and np.array_equal(ours.fn, fn)


def test_ade20k_scores_other_and_drops_the_150th_class_only_under_diffcuts_protocol():
    bench = BENCHMARKS["ade20k"]
    diffcut, diffseg = bench.class_map("diffcut"), bench.class_map("diffseg")
    assert diffcut[0] == 0 and diffcut[149] == 149 and diffcut[150] == -1
    assert diffseg[0] == -1 and diffseg[1] == 0 and diffseg[150] == 149
    assert bench.class_names("diffcut")[0] == "other" and bench.class_names("diffseg")[-1] == "flag"


def test_voc_reads_the_official_layout_and_the_d2_one_alike(tmp_path):
    rng = np.random.default_rng(5)
    make_voc(tmp_path, tmp_path / "preds", rng)
    runs = [
        evaluate(
            "voc20",
            tmp_path / folder,
            tmp_path / f"{folder.replace('/', '_')}-{protocol}",
            predictions=tmp_path / "preds",
            protocol=protocol,
            progress=False,
        )
        for folder in ("VOCdevkit/VOC2012", "pascal_voc_d2")
        for protocol in ("diffcut", "diffseg")
    ]
    assert runs[0].iou == runs[2].iou and runs[1].iou == runs[3].iou and runs[0].images == len(SIZES)


def test_a_prediction_of_another_size_is_skipped_naming_the_sizes_it_may_have(tmp_path):
    rng = np.random.default_rng(6)
    make_paired(
        tmp_path / "ctx",
        tmp_path / "preds",
        rng,
        "images/validation",
        "annotations_ctx59/validation",
        [0, 1, 255],
        "2008_",
    )
    save_png(np.zeros((100, 100)), tmp_path / "preds" / "2008_00000000.png")
    summary = evaluate(
        "context59",
        tmp_path / "ctx",
        tmp_path / "run",
        predictions=tmp_path / "preds",
        protocol="diffcut",
        progress=False,
    )
    assert summary.images == len(SIZES) - 1
    assert "128×128" in summary.skipped[0]["reason"] and "40×62" in summary.skipped[0]["reason"]


def test_evaluate_all_writes_one_table_and_a_chart_per_benchmark(tmp_path, capsys):
    datasets, preds = tmp_path / "datasets", tmp_path / "preds"
    rng = np.random.default_rng(7)
    make_voc(datasets, preds / "voc20", rng)
    make_paired(
        datasets / "ADEChallengeData2016",
        preds / "ade20k",
        rng,
        "images/validation",
        "annotations/validation",
        [0, 1, 2, 150],
        "ADE_val_",
    )
    out = tmp_path / "all"
    code = run_cli(
        "evaluate", "all", "--root", datasets, "--predictions-root", preds, "--protocol", "diffcut", "-o", out
    )
    captured = capsys.readouterr()
    assert code == 1  # four benchmarks are not there, and say so
    assert "skipped benchmark cityscapes: no cityscapes under" in captured.err
    table = (out / "results.md").read_text()
    assert "| method | PASCAL VOC 2012 | ADE20K |" in table and "DiffCut + PAMR | 65.2 | 44.3 |" in table
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "method,PASCAL VOC 2012,ADE20K" and rows[-1] == f"images scored,{len(SIZES)},{len(SIZES)}"
    for name in ("voc20", "ade20k"):
        with Image.open(out / name / "per_class_iou.png") as chart:
            assert chart.format == "PNG" and chart.width > 300
        assert json.loads((out / name / "summary.json").read_text())["images"] == len(SIZES)
    # The same command again resumes: nothing is scored twice, the table is the same.
    assert (
        run_cli("evaluate", "all", "--root", datasets, "--predictions-root", preds, "--protocol", "diffcut", "-o", out)
        == 1
    )
    assert "Resuming: 6 of 6" in capsys.readouterr().err and (out / "results.md").read_text() == table


def test_a_label_scored_at_the_score_size_is_the_reference_label(tmp_path):
    rng = np.random.default_rng(8)
    for shape in SIZES:
        raw = blobs(rng, shape, [0, 3, 9, 255]).astype(np.uint8)
        path = tmp_path / "label.png"
        save_png(raw, path)
        image = tmp_path / "image.jpg"
        save_jpg(shape, image)
        expected = reference.process_label(image, reference.read_label(path))[None].float()
        import torch.nn.functional as F

        expected = F.interpolate(expected, size=(128, 128))[0, 0].numpy().astype(int)
        assert np.array_equal(PROTOCOLS["diffcut"].label(raw.astype(np.int64)), expected)


def test_pamr_refines_after_the_background_step_as_the_reference():
    import torch

    from diffseg.methods.diffcut.pamr import refine_labels

    rng = np.random.default_rng(9)
    bench, rules = BENCHMARKS["voc20"], PROTOCOLS["diffcut"]
    for _ in range(3):
        labels = blobs(rng, (128, 128), [-1, -1, 0, 4, 11])
        pred = blobs(rng, (128, 128), [0, 2, 5, 7, 9], (6, 5))
        image = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
        ours = rules.score(bench, labels, pred, refine_with=image)
        refine = lambda ids: refine_labels(torch.from_numpy(ids), rules.refinement_image(image)).numpy()  # noqa: E731
        # eval_diffcut.py: the background step, then `pred = self.pamr(pred, im)`, then the final matching.
        label_map, p = labels[None, None].copy(), pred[None].copy()
        reference.many_to_one(p, label_map, 21)
        p = refine(p[0])[None]
        tp, fp, fn, _, _, _ = reference.hungarian_matching(p, label_map[0], 21)
        assert np.array_equal(ours.tp, tp) and np.array_equal(ours.fp, fp) and np.array_equal(ours.fn, fn)


def test_evaluate_voc20_with_diffcut_and_pamr_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    from conftest import tiny_model

    make_voc(tmp_path, tmp_path / "preds", np.random.default_rng(10))
    out = tmp_path / "run"
    argv = ("evaluate", "voc20", "--root", tmp_path / "VOCdevkit" / "VOC2012", "--limit", "2", "-o", out)
    assert run_cli(*argv, *tiny_model(tiny_checkpoint), "--method", "diffcut", "--protocol", "diffcut", "--pamr") == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["pamr"] is True and settings["protocol"] == "diffcut" and settings["dataset"] == "voc20"
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["tp"]) == 21 and r["all"] == 128 * 128 for r in records)
    assert "voc20: unsupervised, per-image Hungarian matching, 21 classes, diffcut protocol" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ open-vocabulary


def reference_multi_class(mask: np.ndarray, labels: np.ndarray, classes: int = 21):
    """`run_multi_class_seg_experiment.py`'s per-class accumulation, transcribed: intersection and union of the
    predicted and true masks of each class; accuracy over labelled pixels (`batch_pix_accuracy`)."""
    inter, union = np.zeros(classes), np.zeros(classes)
    for class_index in range(classes):
        inter[class_index] += ((mask == class_index) & (labels == class_index)).sum()
        union[class_index] += ((mask == class_index) | (labels == class_index)).sum()
    correct = ((mask + 1 == labels + 1) * (labels + 1 > 0)).sum()
    return inter, union, correct / (labels + 1 > 0).sum()


def test_open_vocabulary_scores_are_the_references_intersections_and_unions():
    from diffseg.evaluation.metrics import supervised_scores

    rng = np.random.default_rng(3)
    labels = blobs(rng, (64, 64), [0, 3, 7, 20])
    mask = np.where(rng.random((64, 64)) < 0.7, labels, rng.choice([0, 3, 9, 20], size=(64, 64)))
    ours = supervised_scores(labels, mask, 21)
    inter, union, accuracy = reference_multi_class(mask, labels)
    np.testing.assert_array_equal(ours.tp, inter)
    np.testing.assert_array_equal(ours.tp + ours.fp + ours.fn, union)
    assert ours.pixel_accuracy == pytest.approx(accuracy)
    present = union > 0
    assert ours.miou == pytest.approx((inter[present] / union[present]).mean())
    # An unlabelled pixel (VOC's border) is not scored, whatever is predicted there.
    bordered = labels.copy()
    bordered[:, :4] = -1
    assert supervised_scores(bordered, mask, 21).all == int((bordered >= 0).sum())


def test_class_concepts_are_the_references_background_words_then_the_present_classes(tmp_path):
    from diffseg.evaluation.datasets import BENCHMARKS
    from diffseg.evaluation.harness import BACKGROUND_CONCEPTS, ClassConcepts

    voc = BENCHMARKS["voc20"]
    label = np.array([[20, 14, -1], [2, 14, 20]])
    words, classes = ClassConcepts().words(voc, label, "concepts")
    assert words == [*BACKGROUND_CONCEPTS, "bird", "person"]
    np.testing.assert_array_equal(classes, [20] * 5 + [2, 14])
    words, classes = ClassConcepts(("background",), all_classes=True).words(voc, label, "concepts")
    assert len(words) == 21 and words[1:] == voc.class_names()[:20] and classes[0] == 20
    # The official layout's background (0) is the background class and its border unlabelled under this protocol.
    make_voc(tmp_path, tmp_path / "preds", np.random.default_rng(4))
    sample = voc.samples(tmp_path / "VOCdevkit" / "VOC2012")[0]
    raw = np.asarray(Image.open(sample.label))
    read = voc.read_label(sample.label, "concepts")
    assert (read[raw == 0] == 20).all() and (read[raw == 255] == -1).all() and (read[raw == 5] == 4).all()


def test_evaluate_voc21_with_concepts_from_classes_through_the_cli(tiny_flux_checkpoint, tmp_path, capsys):
    from conftest import tiny_model

    make_voc(tmp_path, tmp_path / "preds", np.random.default_rng(11))
    out = tmp_path / "run"
    argv = ("evaluate", "voc21", "--root", tmp_path / "VOCdevkit" / "VOC2012", "--limit", "2", "-o", out)
    assert run_cli(*argv, *tiny_model(tiny_flux_checkpoint), "--concepts-from-classes") == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["protocol"] == "concepts" and settings["method"].startswith("concepts:")
    assert settings["background_concepts"] == ["background", "floor", "grass", "tree", "sky"]
    voc = BENCHMARKS["voc20"]
    for record, sample in zip(
        [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()],
        voc.samples(tmp_path / "VOCdevkit" / "VOC2012"),
    ):
        label = PROTOCOLS["concepts"].label(voc.read_label(sample.label, "concepts"))
        assert record["all"] == int((label >= 0).sum())  # the 64×64 grid, the border not scored
        present = set(np.unique(label[label >= 0]).tolist()) | {20}
        assert all(record["fp"][c] == 0 for c in range(21) if c not in present)  # only its words are predicted
    text = capsys.readouterr().out
    assert "open-vocabulary, no matching, 21 classes, concepts protocol" in text and "ConceptAttention" in text
    assert run_cli(*argv, *tiny_model(tiny_flux_checkpoint), "--concepts-from-classes", "--method", "diffcut") == 2
    assert (
        run_cli("evaluate", "ade20k", "--root", tmp_path, *tiny_model(tiny_flux_checkpoint), "--concepts-from-classes")
        == 2
    )


def test_class_id_predictions_are_scored_open_vocabulary_too(tmp_path, capsys):
    """`--concepts-from-classes --predictions DIR`: PNGs of class ids (background last), scored with no matching: the
    truth itself scores 100 %, the truth with two classes swapped less."""
    make_voc(tmp_path, tmp_path / "unused", np.random.default_rng(12))
    voc, root = BENCHMARKS["voc20"], tmp_path / "VOCdevkit" / "VOC2012"
    for folder, swap in (("truth", False), ("swapped", True)):
        for sample in voc.samples(root):
            classes = voc.read_label(sample.label, "concepts")
            if swap:
                classes = np.where(classes == 20, 4, np.where(classes == 4, 20, classes))
            save_png(np.where(classes < 0, 0, classes), tmp_path / folder / f"{sample.id}.png")
    argv = ("evaluate", "voc21", "--root", root, "--concepts-from-classes", "--json")
    assert run_cli(*argv, "--predictions", tmp_path / "truth", "-o", tmp_path / "a") == 0
    truth = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert truth["miou"] == pytest.approx(1.0) and truth["pixel_accuracy"] == pytest.approx(1.0)
    assert run_cli(*argv, "--predictions", tmp_path / "swapped", "-o", tmp_path / "b") == 0
    swapped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert swapped["miou"] < 0.9 and swapped["pixel_accuracy"] < 1.0
