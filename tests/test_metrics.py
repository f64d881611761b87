import numpy as np
import pytest

from diffseg.evaluation.metrics import Scores, confusion_matrix, hungarian_scores


def test_confusion_matrix_ignores_unlabelled_and_widens_for_extra_predictions():
    labels = np.array([0, 0, 1, 1, 2, -1, 255])
    preds = np.array([0, 0, 1, 4, 2, 3, 3])
    hist = confusion_matrix(labels, preds, 3)
    assert hist.shape == (3, 5)  # C × max(C, max id + 1)
    assert hist.tolist() == [[2, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 1, 0, 0]]


def test_more_segments_than_classes():
    # class 0: 6 px split over ids 0 (4 px) and 5 (2 px); class 1: 4 px as id 1.
    labels = np.array([0] * 6 + [1] * 4)
    preds = np.array([0, 0, 0, 0, 5, 5, 1, 1, 1, 1])
    s = hungarian_scores(labels, preds, 2)
    assert s.tp.tolist() == [4, 4] and s.fn.tolist() == [2, 0] and s.fp.tolist() == [0, 0] and s.all == 10
    assert s.pixel_accuracy == pytest.approx(0.8)
    assert s.miou == pytest.approx((4 / 6 + 1) / 2)


def test_fewer_segments_than_classes():
    # One segment covers classes 0 (5 px) and 1 (3 px): it goes to class 0; class 1 gets an empty column.
    labels = np.array([0] * 5 + [1] * 3)
    preds = np.zeros(8, int)
    s = hungarian_scores(labels, preds, 2)
    assert s.tp.tolist() == [5, 0] and s.fn.tolist() == [0, 3] and s.fp.tolist() == [3, 0]
    assert s.iou.tolist() == [5 / 8, 0.0]


def test_class_absent_from_the_image_is_nan_and_left_out_of_the_mean():
    labels = np.array([0, 0, 2, 2])
    preds = np.array([7, 7, 3, 3])  # ids need not be contiguous
    s = hungarian_scores(labels, preds, 3)
    assert s.tp.tolist() == [2, 0, 2] and s.fp.tolist() == [0, 0, 0] and s.fn.tolist() == [0, 0, 0]
    assert np.isnan(s.iou[1]) and s.miou == 1.0 and s.pixel_accuracy == 1.0


def test_non_contiguous_ids_score_as_their_relabelled_version():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 4, 500)
    preds = rng.integers(0, 6, 500)
    sparse = np.array([3, 10, 11, 40, 41, 99])[preds]
    a, b = hungarian_scores(labels, preds, 4), hungarian_scores(labels, sparse, 4)
    assert a.tp.sum() == b.tp.sum() and a.all == b.all
    assert sorted(a.tp.tolist()) == sorted(b.tp.tolist())


def test_all_pixels_ignored_scores_nothing():
    s = hungarian_scores(np.full(10, 255), np.arange(10), 27)
    assert s.all == 0 and s.tp.sum() == s.fp.sum() == s.fn.sum() == 0
    total = Scores.zeros(27)
    total += s
    assert np.isnan(total.pixel_accuracy) and np.isnan(total.miou)


def test_scores_accumulate_over_images():
    a = hungarian_scores(np.array([0, 0, 1]), np.array([0, 0, 1]), 2)
    b = hungarian_scores(np.array([1, 1, 1, 0]), np.array([0, 0, 1, 1]), 2)
    total = Scores.zeros(2)
    total += a
    total += b
    assert total.images == 2 and total.all == 7
    assert total.tp.tolist() == (a.tp + b.tp).tolist()
    assert total.pixel_accuracy == pytest.approx((a.tp.sum() + b.tp.sum()) / 7)


def test_matches_a_hand_worked_example():
    # 3 classes, 4 predicted ids. Confusion (rows classes, columns ids):
    #   class 0: [5, 1, 0, 0]   class 1: [0, 2, 3, 0]   class 2: [0, 0, 0, 4]
    # Best assignment: 0->id0 (5), 1->id2 (3), 2->id3 (4) = 12 of 15 pixels.
    labels = np.array([0] * 6 + [1] * 5 + [2] * 4)
    preds = np.array([0] * 5 + [1] + [1] * 2 + [2] * 3 + [3] * 4)
    s = hungarian_scores(labels, preds, 3)
    assert s.tp.tolist() == [5, 3, 4]
    assert s.fn.tolist() == [1, 2, 0]
    assert s.fp.tolist() == [0, 0, 0]  # id1 is unmatched: its 3 pixels count as FN only
    assert s.pixel_accuracy == pytest.approx(12 / 15)
