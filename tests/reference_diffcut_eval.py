"""A literal transcription of DiffCut's evaluation protocol (PaulCouairon/DiffCut @aa16df4), to test ours against.

Transcribed: `tools/utils.py` (`_fast_hist`, `hungarian_matching`), `dataloader/iterator.py` (`get_fine_to_coarse`,
`DataIterator.create_path` and the label half of `process_image` / `augmenter`), the scoring loop of
`eval_diffcut.py` (`Benchmark_Segmentation.evaluate`, its many-to-one background step included) and
`datasets/prepare_pascal_voc_sem_seg.py` (`convert_pas20`), which turns the official VOC layout into the folder the
reference reads. torchvision is not installed here: its `CenterCrop` is written out as torchvision computes it
(`crop_top = int(round((image_height - crop_height) / 2.0))`) and `Resize(..., NEAREST_EXACT)` of a tensor is
`F.interpolate(..., mode="nearest-exact")`, which is what it calls.

Predictions stand in for `generate_masks`: a label map at 128×128 is used as it is; one at the image's size goes
through the labels' crop and resizes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment as LinearSumAssignment

DATA = Path(__file__).resolve().parents[1] / "src" / "diffseg" / "data"


def _fast_hist(label_true, label_pred, n_class):
    pred_n_class = np.maximum(n_class, label_pred.max() + 1)
    mask = (label_true >= 0) & (label_true < n_class)  # Exclude unlabelled data.
    hist = np.bincount(pred_n_class * label_true[mask] + label_pred[mask], minlength=n_class * pred_n_class).reshape(
        n_class, pred_n_class
    )
    return hist


def hungarian_matching(pred, label, n_class):
    batch_size = pred.shape[0]
    tp = np.zeros(n_class)
    fp = np.zeros(n_class)
    fn = np.zeros(n_class)
    all = 0
    for i in range(batch_size):
        hist = _fast_hist(label[i].flatten(), pred[i].flatten(), n_class)
        row_ind, col_ind = LinearSumAssignment(hist, maximize=True)
        all += hist.sum()
        fn += np.sum(hist, 1) - hist[row_ind, col_ind]
        tp += hist[row_ind, col_ind]
        hist = hist[:, col_ind]
        fp += np.sum(hist, 0) - np.diag(hist)
    return tp, fp, fn, all, hist, col_ind


def get_fine_to_coarse(dataset_name):
    if dataset_name == "COCO-Stuff":
        d = json.loads((DATA / "cocostuff_fine_to_coarse27.json").read_text())["fine_index_to_coarse_index"]
        fine_to_coarse_dict = {int(k): v for k, v in d.items()}
        fine_to_coarse_dict[255] = -1
        labelmap = np.vectorize(lambda x: fine_to_coarse_dict[x])
    elif dataset_name == "COCO-Object":
        d = json.loads((DATA / "cocoobject_fine_to_object80.json").read_text())["fine_index_to_object_index"]
        fine_to_coarse_dict = {int(k): v for k, v in d.items()}
        fine_to_coarse_dict = {key: fine_to_coarse_dict[key] if key < 91 else -1 for key in fine_to_coarse_dict}
        labelmap = np.vectorize(lambda x: fine_to_coarse_dict[x])
    elif dataset_name == "Cityscapes":
        fine_to_coarse_dict = {k: (k - 7 if 7 <= k <= 33 else -1) for k in range(34)}  # the pickle's table
        fine_to_coarse_dict[-1] = -1
        labelmap = np.vectorize(lambda x: fine_to_coarse_dict[x])
    else:
        labelmap = np.vectorize(lambda x: -1 if x == 255 else x, otypes=[int])
    return labelmap


def create_path(dataset_name, root, file_list, split):
    image_path, label_path = [], []
    paths = {
        "VOC20": (root + "/images/" + split, root + "/annotations_pascal20/" + split),
        "Context": (root + "/images/" + split, root + "/annotations_ctx59/" + split),
        "COCO-Stuff": ("images/" + split + "2017", "annotations/" + split + "2017"),  # README layout
        "COCO-Object": ("images/" + split + "2017", "annotations/" + split + "2017"),
        "Cityscapes": ("leftImg8bit/" + split, "gtFine/" + split),
        "ADE20K": (root + "/images/" + split, root + "/annotations/" + split),
    }
    image_folder, label_folder = paths[dataset_name]
    if dataset_name == "Cityscapes":
        for folder in os.listdir(os.path.join(root, image_folder)):
            for file_path in sorted(Path(root, image_folder, folder).glob("*.png")):
                image_path.append(str(file_path))
                label_path.append(str(file_path).replace("leftImg8bit", "gtFine").replace(".png", "_labelIds.png"))
    elif "COCO" in dataset_name:
        for file in file_list:
            image_path.append(os.path.join(root, image_folder, file + ".jpg"))
            label_path.append(os.path.join(root, label_folder, file + ".png"))
    else:
        sort_images = sorted(os.listdir(image_folder))
        sort_labels = sorted(os.listdir(label_folder))
        for img, label in zip(sort_images, sort_labels):
            image_path.append(os.path.join(image_folder, img))
            label_path.append(os.path.join(label_folder, label))
    return image_path, label_path


def center_crop(x, crop):  # torchvision `F.center_crop` of a (C, H, W) tensor
    image_height, image_width = x.shape[-2:]
    crop_top = int(round((image_height - crop) / 2.0))
    crop_left = int(round((image_width - crop) / 2.0))
    return x[..., crop_top : crop_top + crop, crop_left : crop_left + crop]


def process_label(image_path, label, resolution=1024):
    """`process_image`'s label half: `c = min(w, h) - 1` from the image's shape, CenterCrop, Resize nearest-exact."""
    with Image.open(image_path) as image:
        s = (3, image.height, image.width)
    w, h = s[1], s[2]
    c = min(w, h) - 1
    label = center_crop(label, c)
    return F.interpolate(label[None].float(), size=(resolution, resolution), mode="nearest-exact")[0].to(torch.uint8)


def read_label(path):  # torchvision.io.read_image(label_path): (1, H, W) uint8, a grey PNG's values
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image))[None]


def convert_pas20(input, output):
    img = np.array(Image.open(input))
    img[img == 0] = 255
    img = img - 1
    img[img == 254] = 255
    assert img.dtype == np.uint8
    Image.fromarray(img).save(output)


def many_to_one(pred, label_map, N_CLASS):
    """`eval_diffcut.py`'s "Many-to-one matching for background", in place on `pred` and `label_map`."""
    _, _, _, _, hist, col_ind = hungarian_matching(pred, label_map, N_CLASS - 1)
    label_map[label_map == -1] = N_CLASS - 1
    assigned_gt_clusters = np.where(hist.max(axis=1) > 0)[0].tolist()
    assigned_pred_clusters = [col_ind[i] for i in assigned_gt_clusters]
    background_clusters = list(set(np.unique(pred)) - set(assigned_pred_clusters))
    bg_label = pred.max() + 1
    for bg_cls in background_clusters:
        pred[pred == bg_cls] = bg_label


def evaluate(dataset_name, root, predictions, file_list=None, split="validation"):
    """`Benchmark_Segmentation.evaluate` over precomputed predictions (`predictions/ID.png`), batch size 1."""
    N_CLASS = {"COCO-Stuff": 27, "COCO-Object": 81, "VOC20": 21, "Context": 60, "Cityscapes": 27, "ADE20K": 150}[
        dataset_name
    ]
    fine_to_coarse_map = get_fine_to_coarse(dataset_name)
    images, labels_paths = create_path(dataset_name, str(root), file_list, split)
    TP, FP, FN, ALL = np.zeros(N_CLASS), np.zeros(N_CLASS), np.zeros(N_CLASS), 0
    for image_path, label_path in zip(images, labels_paths):
        label = process_label(image_path, read_label(label_path))[None]  # the DataLoader's batch of one
        labels = fine_to_coarse_map(label)
        stem = Path(image_path).stem
        if dataset_name == "Cityscapes":  # predictions are named by the sample's id, CITY/STEM
            stem = f"{Path(image_path).parent.name}/{stem}"
        with Image.open(Path(predictions) / f"{stem}.png") as p:
            pred = np.array(p).astype(np.int64)
        if pred.shape != (128, 128):  # at the image's size: the labels' own crop and resizes
            pred = F.interpolate(process_label(image_path, torch.from_numpy(pred)[None])[None].float(), (128, 128))
            pred = pred[0].long().numpy()
        else:
            pred = pred[None]
        label_map = labels[0:1]
        label_map = F.interpolate(torch.Tensor(label_map), size=(128, 128))
        label_map = label_map.cpu().numpy().astype(int)
        if dataset_name in ["VOC20", "Context", "COCO-Object"]:
            many_to_one(pred, label_map, N_CLASS)
        tp, fp, fn, all, _, _ = hungarian_matching(pred, label_map, N_CLASS)
        TP += tp
        FP += fp
        FN += fn
        ALL += all
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = TP.sum() / ALL
        iou = TP / (TP + FP + FN)
    return acc, iou, np.nanmean(iou), (TP, FP, FN, ALL)
