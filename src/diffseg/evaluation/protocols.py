"""How a benchmark's image, label and prediction become the pixels that are scored: DiffSeg's protocol or DiffCut's.

- "diffseg" (google/diffseg, `data/coco/coco_data.py`): the central square of side min(H, W) at offsets
  `(H - side) // 2`, image resized bilinearly and labels nearest-neighbour (TensorFlow's half-pixel nearest, torch's
  "nearest-exact") to 512×512, scored there; one-to-one Hungarian matching per image.
- "diffcut" (PaulCouairon/DiffCut @aa16df4, `dataloader/iterator.py` and `eval_diffcut.py`): torchvision's
  `CenterCrop` of side min(H, W) − 1, whose offsets round half to even (`int(round((H - side) / 2.0))`), then
  `Resize(1024)`: bilinear without antialiasing for the image, "nearest-exact" for the labels; labels then go to
  128×128 with `F.interpolate`'s default "nearest", where DiffCut predicts. Per-image Hungarian matching, preceded on
  VOC20, Context and COCO-Object by the many-to-one background step, and PAMR (when asked) after that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import center_crop
from .datasets import Benchmark
from .metrics import Scores, hungarian_scores, merge_unmatched_into_background, supervised_scores

RESOLUTION = 512  # google/diffseg `RESOLUTION = 512`
DIFFCUT_INPUT = 1024  # `eval_diffcut.py --img_size 1024`
DIFFCUT_SCORE = (128, 128)  # `generate_masks(..., mask_size=(128, 128))` and the labels' second resize


def _resize(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(array)).float()[None, None]
    return F.interpolate(t, size=size, mode=mode)[0, 0].long().numpy()


def diffcut_crop(array: np.ndarray) -> np.ndarray:
    """DiffCut's crop of an (H, W, ...) array: `T.CenterCrop(min(H, W) - 1)`, torchvision's offsets
    `int(round((H - side) / 2.0))` (Python's round: half to even)."""
    height, width = array.shape[:2]
    side = min(height, width) - 1  # `c = min(w, h) - 1`
    if side < 1:
        raise ValueError(f"image is {height}×{width}; DiffCut's protocol crops a square of side min(H, W) - 1")
    top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
    return array[top : top + side, left : left + side]


@dataclass(frozen=True)
class Protocol:
    """One protocol's crop, resizes and matching."""

    name: str
    score_size: tuple[int, int]
    input_size: int  # the square the method sees
    # The encode's own crop of the protocol's `crop` (already square: "center" changes nothing), and the input size
    # for a method with none of its own: DiffSeg's 512 under both unsupervised protocols.
    job_crop: str | None = "center"
    default_resolution: int = RESOLUTION

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The part of an (H, W, ...) image the method is given (then resized to `input_size` squared)."""
        raise NotImplementedError

    def label(self, classes: np.ndarray) -> np.ndarray:
        """(H, W) classes at the image's size -> the labels scored, at `score_size`."""
        raise NotImplementedError

    def prediction(self, labels: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """A precomputed label map (at the score size, or at the image's size) -> the ids scored."""
        if labels.shape == self.score_size:
            return labels
        if labels.shape == tuple(image_size):
            return self.label(labels)  # through the labels' own crop and resizes
        raise ValueError(
            f"prediction is {labels.shape[0]}×{labels.shape[1]}; expected the score size "
            f"{self.score_size[0]}×{self.score_size[1]} or the image's size {image_size[0]}×{image_size[1]}"
        )

    def score(
        self, bench: Benchmark, labels: np.ndarray, predictions: np.ndarray, refine_with: np.ndarray | None = None
    ) -> Scores:
        """Per-class TP/FP/FN of one image: labels and predictions at the score size; `refine_with`, the (H, W, 3)
        uint8 image, asks for PAMR where the protocol has it."""
        raise NotImplementedError


class DiffSegProtocol(Protocol):
    def crop(self, image: np.ndarray) -> np.ndarray:
        return center_crop(image)

    def label(self, classes: np.ndarray) -> np.ndarray:
        return _resize(center_crop(classes), self.score_size, "nearest-exact")  # `tf.image.resize(NEAREST)`

    def prediction(self, labels: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        side = min(image_size)
        if labels.shape == (side, side) and labels.shape != tuple(image_size):  # the central square, at its size
            return _resize(labels, self.score_size, "nearest-exact")
        return super().prediction(labels, image_size)

    def score(self, bench, labels, predictions, refine_with=None) -> Scores:
        if refine_with is not None:
            raise ValueError("PAMR after scoring is DiffCut's protocol; under DiffSeg's, DiffCut refines its own maps.")
        if bench.background:  # the background class holds every unlabelled pixel, as under DiffCut's protocol
            labels = np.where(labels < 0, bench.num_classes - 1, labels)
        return hungarian_scores(labels, predictions, bench.num_classes)


class DiffCutProtocol(Protocol):
    def crop(self, image: np.ndarray) -> np.ndarray:
        return diffcut_crop(image)

    def label(self, classes: np.ndarray) -> np.ndarray:
        square = _resize(diffcut_crop(classes), (DIFFCUT_INPUT, DIFFCUT_INPUT), "nearest-exact")
        return _resize(square, self.score_size, "nearest")  # `F.interpolate(label_map, size=(128, 128))`

    def score(self, bench, labels, predictions, refine_with=None) -> Scores:
        if bench.background:  # "Many-to-one matching for background"
            labels, predictions = merge_unmatched_into_background(labels, predictions, bench.num_classes)
        if refine_with is not None:  # `if self.refinement:` comes after the merge
            from ..methods.diffcut.pamr import refine_labels

            predictions = refine_labels(torch.from_numpy(predictions), self.refinement_image(refine_with)).numpy()
        return hungarian_scores(labels, predictions, bench.num_classes)

    def refinement_image(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, 128, 128) float image PAMR refines with: the cropped image / 255, bilinear to 1024 (no
        antialiasing), then `F.interpolate(images[j][None], size=(128, 128), mode="bilinear")`."""
        x = torch.from_numpy(np.ascontiguousarray(diffcut_crop(image))).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=(DIFFCUT_INPUT, DIFFCUT_INPUT), mode="bilinear", align_corners=False)
        return F.interpolate(x, size=self.score_size, mode="bilinear", align_corners=False)


class ConceptsProtocol(Protocol):
    """Open-vocabulary scoring of concept maps whose words are the classes (ConceptAttention's VOC multi-class
    experiment, `run_multi_class_seg_experiment.py`): the whole image squashed to 1024² (no crop), labels to the 64×64
    token grid by PIL's NEAREST (torch's "nearest-exact"), predictions already classes, scored with no matching."""

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image

    def label(self, classes: np.ndarray) -> np.ndarray:
        return _resize(classes, self.score_size, "nearest-exact")  # `transforms.Resize((64, 64), Image.NEAREST)`

    def score(self, bench, labels, predictions, refine_with=None) -> Scores:
        return supervised_scores(labels, predictions, bench.num_classes)


PROTOCOLS: dict[str, Protocol] = {
    "diffseg": DiffSegProtocol("diffseg", (RESOLUTION, RESOLUTION), RESOLUTION),
    "diffcut": DiffCutProtocol("diffcut", DIFFCUT_SCORE, DIFFCUT_INPUT),
    "concepts": ConceptsProtocol("concepts", (64, 64), 1024, job_crop=None, default_resolution=1024),
}
