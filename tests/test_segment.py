import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffseg import segment_attention
from diffseg.methods.diffseg import labelling
from diffseg.methods.diffseg.labelling import label_map, relabel
from diffseg.evaluation.metrics import hungarian_scores
from diffseg.methods.diffseg.merging import float16_underflow, merge_from_anchors
from diffseg.testing.synthetic import (
    attention_from_segmentation,
    blocks_segmentation,
    peaked_attention,
    shapes_segmentation,
    upsample_labels,
)

from naive import naive_segment


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels on which two label maps agree after the best one-to-one matching of their ids."""
    n = int(max(a.max(), b.max())) + 1
    return hungarian_scores(a, b, n).tp.sum() / a.size


@pytest.mark.parametrize(
    "truth",
    [blocks_segmentation(64, 2, 2), blocks_segmentation(64, 3, 3), blocks_segmentation(64, 2, 4)],
    ids=["2x2", "3x3", "2x4"],
)
def test_recovers_the_segmentation_the_attention_was_built_from(truth):
    attn = attention_from_segmentation(truth, seed=3)
    labels = segment_attention(attn)
    expected = upsample_labels(truth, (512, 512))
    scores = hungarian_scores(expected, labels, int(truth.max()) + 1)
    assert labels.max() + 1 == truth.max() + 1
    assert scores.miou >= 0.9


def test_recovers_large_shapes_at_their_own_resolution():
    truth = shapes_segmentation(64, seed=0, num_shapes=2)
    attn = attention_from_segmentation(truth, resolutions=(64,), seed=0)
    labels = segment_attention(attn, output_size=(64, 64))
    assert hungarian_scores(truth, labels, int(truth.max()) + 1).miou >= 0.9


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_a_literal_implementation_at_64(seed):
    truth = shapes_segmentation(64, seed=seed, num_shapes=4)
    attn = attention_from_segmentation(truth, heads=2, noise=0.2, seed=seed)
    ours = segment_attention(attn, num_points=4, output_size=(128, 128))
    theirs = naive_segment(attn, num_points=4, output_size=(128, 128))
    assert agreement(ours, theirs) >= 0.995


@pytest.mark.parametrize("tau", [0.3, 1.1])
def test_agrees_with_a_literal_implementation_with_every_query_an_anchor(tau):
    truth = shapes_segmentation(16, seed=2, num_shapes=3)
    attn = attention_from_segmentation(truth, resolutions=(16, 8, 4), heads=2, noise=0.3, seed=2)
    ours = segment_attention(attn, kl_threshold=tau, num_points=16, output_size=(96, 80))
    theirs = naive_segment(attn, kl_threshold=tau, num_points=16, output_size=(96, 80))
    assert ours.shape == (96, 80)
    assert agreement(ours, theirs) >= 0.995


def test_accepts_numpy_and_head_averaged_input_and_relabels_contiguously():
    attn = attention_from_segmentation(blocks_segmentation(64, 2, 2), seed=0)
    from_tensors = segment_attention(attn)
    from_numpy = segment_attention({r: a.mean(0).numpy() for r, a in attn.items()})
    np.testing.assert_array_equal(from_tensors, from_numpy)
    assert from_tensors.dtype == np.int32
    assert sorted(np.unique(from_tensors)) == list(range(from_tensors.max() + 1))


def test_threshold_controls_the_number_of_segments():
    attn = attention_from_segmentation(shapes_segmentation(64, seed=1, num_shapes=4), noise=0.3, sigma=0.2)
    counts = [segment_attention(attn, kl_threshold=t).max() + 1 for t in (0.2, 0.6, 1.1, 3.0)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_rejects_bad_parameters_with_the_argument_named():
    attn = attention_from_segmentation(blocks_segmentation(16, 2, 2), resolutions=(16, 8), heads=1)
    with pytest.raises(ValueError, match="`kl_threshold` has 2 values but `iterations` is 3"):
        segment_attention(attn, kl_threshold=(1.0, 1.0), num_points=4)
    with pytest.raises(ValueError, match="positive"):
        segment_attention(attn, kl_threshold=-1, num_points=4)
    with pytest.raises(ValueError, match="num_points"):
        segment_attention(attn, num_points=17)
    with pytest.raises(ValueError, match="output_size"):
        segment_attention(attn, num_points=4, output_size=(0, 5))


def test_per_iteration_thresholds_are_used_in_order():
    attn = attention_from_segmentation(shapes_segmentation(64, seed=1, num_shapes=4), noise=0.3, sigma=0.2)
    a = segment_attention(attn, kl_threshold=(0.3, 3.0), iterations=2)
    b = segment_attention(attn, kl_threshold=(0.3, 0.3), iterations=2)
    assert a.max() < b.max()


def test_label_map_upsamples_bilinearly_and_takes_the_first_maximum(monkeypatch):
    g = torch.Generator().manual_seed(0)
    proposals = torch.rand(6, 8, 8, generator=g)
    proposals[4] = proposals[1]  # an exact tie: the earlier proposal wins, so id 4 never appears
    up = F.interpolate(proposals[:, None], size=(37, 50), mode="bilinear", align_corners=False)[:, 0]
    expected, _ = relabel(up.argmax(0))
    np.testing.assert_array_equal(label_map(proposals, (37, 50)), expected.numpy())
    monkeypatch.setattr(labelling, "_PIXELS_PER_CHUNK", 37 * 50)  # one proposal at a time: same answer
    np.testing.assert_array_equal(label_map(proposals, (37, 50)), expected.numpy())


def test_relabel_keeps_order_and_closes_gaps():
    ids, k = relabel(torch.tensor([[7, 3], [3, 12]]))
    assert k == 3 and ids.tolist() == [[1, 0], [0, 2]]


def test_accepts_the_reference_list_of_resolutions():
    attn = attention_from_segmentation(blocks_segmentation(64, 2, 2), heads=2, seed=0)
    as_list = segment_attention([attn[64], attn[32], attn[16], attn[8]])
    np.testing.assert_array_equal(as_list, segment_attention(attn))


@pytest.mark.parametrize("reference_float16", [True, False])
def test_agrees_with_a_literal_implementation_on_peaked_attention(reference_float16):
    truth = shapes_segmentation(16, seed=6, num_shapes=5)
    attn = peaked_attention(truth, resolutions=(16, 8, 4), heads=4, seed=6)
    ours = segment_attention(attn, num_points=16, output_size=(64, 64), reference_float16=reference_float16)
    other = segment_attention(attn, num_points=16, output_size=(64, 64), reference_float16=not reference_float16)
    assert agreement(ours, other) < 0.99  # some maps underflow float16: the two modes really differ here
    theirs = naive_segment(attn, num_points=16, output_size=(64, 64), float16=reference_float16)
    assert agreement(ours, theirs) >= 0.995


def test_maps_that_underflow_float16_join_no_proposal_and_their_anchors_give_none():
    maps = torch.tensor(
        [[0.5, 0.5, 0.0, 0.0], [0.45, 0.55, 1e-9, 0.0], [0.25, 0.25, 0.25, 0.25], [0.3, 0.2, 0.25, 0.25]]
    )
    maps = maps / maps.sum(1, keepdim=True)
    assert float16_underflow(maps).tolist() == [True, True, False, False]
    kept = merge_from_anchors(maps, torch.tensor([0, 2]), threshold=5.0)
    torch.testing.assert_close(kept, maps[2:].mean(0, keepdim=True))  # anchor 0 dropped; maps 0, 1 excluded
    every = merge_from_anchors(maps, torch.tensor([0, 2]), threshold=5.0, reference_float16=False)
    assert every.shape == (2, 4)
    alone = merge_from_anchors(maps, torch.tensor([0, 1]), threshold=5.0)  # every anchor underflows: keep all maps
    assert alone.shape == (2, 4)
