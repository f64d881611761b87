"""Segmentation metrics: per-image Hungarian matching (unsupervised), or none (open-vocabulary), accumulated over a
dataset.

The reference protocol (`diffseg/utils.py`, `hungarian_matching`, after PiCIE): per image, a confusion matrix of
shape C × max(C, predicted ids + 1) over labelled pixels; the assignment of classes to predicted ids that
maximises matched pixels; TP += matched counts, FN += row sums − matched, FP += column sums of the matched columns
− matched, ALL += labelled pixels. Pixel accuracy = ΣTP / ALL; mIoU = nan-mean of TP / (TP + FP + FN).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, max(C, predictions.max() + 1)) int64 counts: rows true classes, columns predicted ids.

    Pixels whose label is outside [0, C) (unlabelled, e.g. -1 or 255) are ignored. Predicted ids must be >= 0.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"`labels` has {labels.size} pixels but `predictions` has {predictions.size}.")
    if predictions.size and predictions.min() < 0:
        raise ValueError(f"Predicted ids must be >= 0 but the smallest is {predictions.min()}.")
    columns = max(num_classes, int(predictions.max(initial=-1)) + 1)
    labelled = (labels >= 0) & (labels < num_classes)
    counts = np.bincount(labels[labelled] * columns + predictions[labelled], minlength=num_classes * columns)
    return counts.reshape(num_classes, columns)


@dataclass
class Scores:
    """Per-class matched counts, summed over the images added."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    all: int = 0
    images: int = field(default=0)

    @classmethod
    def zeros(cls, num_classes: int) -> Scores:
        return cls(np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64))

    def __iadd__(self, other: Scores) -> Scores:
        self.tp = self.tp + other.tp
        self.fp = self.fp + other.fp
        self.fn = self.fn + other.fn
        self.all += other.all
        self.images += other.images
        return self

    @property
    def pixel_accuracy(self) -> float:
        return float(self.tp.sum() / self.all) if self.all else float("nan")

    @property
    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for a class with no pixels and no matched prediction."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.tp / (self.tp + self.fp + self.fn)

    @property
    def miou(self) -> float:
        iou = self.iou
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def hungarian_scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> Scores:
    """Score one image: match predicted ids to classes one-to-one, maximising matched pixels.

    Args:
        labels: (H, W) true classes in [0, C), anything else ignored.
        predictions: (H, W) predicted ids >= 0, any number of them, contiguous or not.
        num_classes: C.
    """
    hist = confusion_matrix(labels, predictions, num_classes)  # (C, P), P >= C
    rows, cols = linear_sum_assignment(hist, maximize=True)  # every class gets a column, since P >= C
    matched = hist[rows, cols]
    tp = np.zeros(num_classes, np.int64)
    fp = np.zeros(num_classes, np.int64)
    fn = np.zeros(num_classes, np.int64)
    tp[rows] = matched
    fn[rows] = hist.sum(axis=1)[rows] - matched
    fp[rows] = hist.sum(axis=0)[cols] - matched
    return Scores(tp=tp, fp=fp, fn=fn, all=int(hist.sum()), images=1)


def supervised_scores(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> Scores:
    """Score one image whose predictions are classes already (open-vocabulary: no matching): the confusion matrix's
    diagonal is TP, the rest of each row FN, the rest of each class column FP. Labels outside [0, C) are not scored;
    predicted ids of no class count as wrong."""
    hist = confusion_matrix(labels, predictions, num_classes)  # (C, P), P >= C
    tp = np.diagonal(hist).copy()
    return Scores(
        tp=tp, fp=hist[:, :num_classes].sum(axis=0) - tp, fn=hist.sum(axis=1) - tp, all=int(hist.sum()), images=1
    )


def merge_unmatched_into_background(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """DiffCut's many-to-one background step (`eval_diffcut.py`, VOC20, Context and COCO-Object), before scoring.

    1. A first matching over the foreground classes only (the last class, background, left out).
    2. Every predicted id present that is not the match of an "assigned" class becomes one new id, `max + 1`.
       A class is assigned when its row of the confusion matrix, restricted to the matched columns, has a pixel
       (reference: `hist[:, col_ind].max(axis=1) > 0`).
    3. Unlabelled pixels (-1) become the background class `num_classes - 1`.

    Returns:
        (labels, predictions), both new arrays of the inputs' shapes, for `hungarian_scores(..., num_classes)`.
    """
    labels = np.asarray(labels).astype(np.int64)
    predictions = np.asarray(predictions).astype(np.int64)
    hist = confusion_matrix(labels, predictions, num_classes - 1)
    _, cols = linear_sum_assignment(hist, maximize=True)
    assigned = cols[hist[:, cols].max(axis=1) > 0]
    unmatched = np.setdiff1d(np.unique(predictions), assigned)
    merged = np.where(np.isin(predictions, unmatched), predictions.max() + 1, predictions)
    return np.where(labels == -1, num_classes - 1, labels), merged
