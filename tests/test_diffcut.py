"""DiffCut's recursive normalised cut and label assignment against a literal transcription of its reference."""

import sys

import numpy as np
import pytest
import torch

from diffseg import segment_features
from diffseg.methods.diffcut.ncut import affinity_matrix, assemble_clusters, fiedler_vector, recursive_ncut
from diffseg.methods.diffcut.pamr import pamr

from naive_diffcut import naive_pamr, naive_segment_features


def blob_features(seed: int, h: int = 16, w: int = 16, c: int = 32, noise: float = 0.5) -> np.ndarray:
    """(h·w, C) float32 tokens: a few random regions (nearest of k random centres), each a random vector plus noise."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 7))
    centres, points = rng.normal(size=(k, c)), rng.uniform(0, 1, size=(k, 2))
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    regions = ((yy[None] - points[:, 0, None, None]) ** 2 + (xx[None] - points[:, 1, None, None]) ** 2).argmin(0)
    return (centres[regions] + noise * rng.normal(size=(h, w, c))).reshape(h * w, c).astype(np.float32)


def agreement(ours: np.ndarray, reference: np.ndarray) -> float:
    """Share of pixels with the same id, the reference's ids made contiguous in their order (as ours are)."""
    contiguous = np.unique(reference, return_inverse=True)[1].reshape(reference.shape)
    return float((ours == contiguous).mean())


def test_segment_features_agrees_with_the_literal_reference_on_random_feature_maps():
    scores = []
    for seed in range(24):
        features = blob_features(seed, noise=[0.3, 0.6, 1.0][seed % 3])
        ours = segment_features(features, output_size=(64, 64))
        reference = naive_segment_features(features, 16, 16, size=(64, 64), exact=True)
        scores.append(agreement(ours, reference))
    # Where both compute the same tree, ids and pixels match; eigenvector rounding may move a boundary pixel.
    assert np.mean(scores) >= 0.995 and min(scores) >= 0.98, scores


def test_shallow_trees_match_the_reference_float32_assembly_exactly():
    """With few accepted cuts the reference's float32 sums are exact, and its own assembly gives our ids."""
    for seed in range(6):
        features = blob_features(seed, noise=0.3)
        tokens = torch.nn.functional.normalize(torch.from_numpy(features).T, dim=0)
        assert len(recursive_ncut(tokens, tau=0.5, alpha=10)) < 20  # sums below 2²⁴
        ours = segment_features(features, output_size=(32, 32))
        assert agreement(ours, naive_segment_features(features, 16, 16, size=(32, 32))) == 1.0


def test_deep_trees_get_one_label_per_distinct_set_of_masks_where_float32_collapses():
    features = blob_features(1, noise=2.0)  # noisy: a cut is accepted almost everywhere, hundreds of masks
    tokens = torch.nn.functional.normalize(torch.from_numpy(features).T, dim=0)
    masks = recursive_ncut(tokens, tau=0.5, alpha=10)
    assert len(masks) > 60  # float32 `max_value` sums are past 2²⁴ long before the end
    ids = assemble_clusters(masks, 256)
    membership = torch.stack(masks, dim=1)  # (N, M)
    distinct = torch.unique(membership, dim=0)
    assert int(ids.max()) + 1 == len(distinct)
    for k in range(len(distinct)):  # tokens share an id exactly when they share their masks
        same = (membership == membership[ids == k][0]).all(dim=1)
        assert torch.equal(same, ids == k)
    ours = segment_features(features, output_size=(16, 16))
    exact = naive_segment_features(features, 16, 16, size=(16, 16), exact=True)
    collapsed = naive_segment_features(features, 16, 16, size=(16, 16))
    assert agreement(ours, exact) >= 0.98
    assert len(np.unique(collapsed)) < len(np.unique(exact))  # the reference's float32 assembly merges clusters


def _tight_clusters(seed: int) -> tuple[np.ndarray, float, float]:
    """(64, 16) tokens in 2-4 tight clusters, with a random α and τ: nearly disconnected graphs, where a branch's
    Fiedler vector often comes out all positive (the root's in about one map in five), so the first threshold keeps
    every token on one side and the reference's float32 rounding decides between NaN, a near-free trivial cut (on
    which it recurses without end) and a near-free real one."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    centres, regions = rng.normal(size=(k, 16)), rng.integers(0, k, size=64)
    features = (centres[regions] + rng.uniform(1e-4, 0.3) * rng.normal(size=(64, 16))).astype(np.float32)
    return features, float(rng.choice([10, 20, 40])), float(rng.choice([0.5, 1.0]))


def _root_fiedler_is_positive(features: np.ndarray, alpha: float) -> bool:
    tokens = torch.nn.functional.normalize(torch.from_numpy(features).T, dim=0)
    affinity = affinity_matrix(tokens, alpha)
    degree = affinity.sum(dim=1)
    y = fiedler_vector(torch.diag(degree) - affinity, degree)
    return y is not None and bool((y > 0).all())


def test_every_map_the_reference_finishes_gets_its_labels_pixel_for_pixel():
    """160 maps: tight clusters (near-free cuts, all-positive Fiedler vectors) and noisy blobs (near-ties between
    thresholds and between clusters' similarities). Where the literal reference finishes, every pixel agrees; where
    it recurses without end (which maps do depends on the CPU's rounding), we end the branch with a valid map."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(400)
    compared, positive, looping = 0, 0, 0
    try:
        for seed in range(160):
            if seed % 2 == 0:
                features, alpha, tau = _tight_clusters(seed)
            else:
                features, alpha, tau = blob_features(seed, h=8, w=8, c=16, noise=(0.05, 0.3, 1.0)[seed % 3]), 10.0, 0.5
            ours = segment_features(features, tau=tau, alpha=alpha, output_size=(16, 16))
            try:
                reference = naive_segment_features(features, 8, 8, tau=tau, alpha=alpha, size=(16, 16), exact=True)
            except RecursionError:
                looping += 1
                assert set(np.unique(ours)) == set(range(ours.max() + 1)), seed
                continue
            compared += 1
            positive += _root_fiedler_is_positive(features, alpha) if seed % 2 == 0 else 0
            assert agreement(ours, reference) == 1.0, seed
    finally:
        sys.setrecursionlimit(limit)
    assert compared >= 140 and positive >= 10, (compared, positive, looping)


def test_degenerate_inputs_give_a_real_segmentation():
    rng = np.random.default_rng(0)
    assert segment_features(np.ones((64, 8), np.float32), output_size=(8, 8)).max() == 0  # constant: one segment
    assert segment_features(np.ones((1, 8), np.float32), output_size=(4, 4)).max() == 0  # one token
    two = np.repeat(rng.normal(size=(2, 8)), 32, axis=0).astype(np.float32)  # duplicate tokens, two values
    labels = segment_features(two, output_size=(8, 8))
    np.testing.assert_array_equal(labels, np.repeat([0, 1], 32).reshape(8, 8))
    zeros = np.zeros((16, 4), np.float32)  # all-zero features: no affinity to cut
    assert segment_features(zeros, output_size=(4, 4)).max() == 0


def test_features_are_read_as_tokens_or_grids_arrays_or_tensors():
    features = blob_features(3, h=8, w=12)
    grid = features.reshape(8, 12, -1)
    a = segment_features(grid, output_size=(16, 24))
    np.testing.assert_array_equal(a, segment_features(torch.from_numpy(grid), output_size=(16, 24)))
    assert a.shape == (16, 24) and a.dtype == np.int32
    square = blob_features(3)
    np.testing.assert_array_equal(
        segment_features(square, output_size=(32, 32)),
        segment_features(square.reshape(16, 16, -1), output_size=(32, 32)),
    )
    batch_of_one = torch.from_numpy(square)[None]  # the reference's `features[j:j+1]`, (1, h·w, C)
    np.testing.assert_array_equal(
        segment_features(batch_of_one, output_size=32), segment_features(square, output_size=(32, 32))
    )
    with pytest.raises(ValueError, match="not a square grid"):
        segment_features(features)  # 96 tokens: pass (h, w, C)
    with pytest.raises(ValueError, match="NaN"):
        segment_features(np.full((16, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="tau"):
        segment_features(square, tau=float("inf"))
    with pytest.raises(ValueError, match="needs the `image`"):
        segment_features(square, pamr=True)


def test_pamr_equals_the_reference_shift_convolutions():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0, 1, size=(1, 3, 24, 20))).float()
    masks = torch.from_numpy(rng.uniform(0, 1, size=(1, 3, 24, 20))).float()
    torch.testing.assert_close(pamr(image, masks), naive_pamr(image, masks), atol=1e-6, rtol=1e-5)


def test_pamr_within_a_memory_budget_gives_what_the_whole_image_at_once_gives():
    """Tiles of rows (with their halo) and chunks of labels, down to one row and one label at a time: the same ids
    as PAMR on every one-hot mask at once (the reference's way), then the median filter."""
    from scipy.ndimage import median_filter

    from diffseg.methods.diffcut.pamr import refine_labels, refinement_plan

    generator = torch.Generator().manual_seed(0)
    plans = set()
    for height, width, count, budgets in [
        (400, 10, 6, (1 << 40, 1 << 22, 1 << 21, 1 << 20)),
        (200, 16, 12, (1 << 22,)),
    ]:
        small = torch.randint(0, count, (height // 10, width // 2), generator=generator)
        labels = torch.nn.functional.interpolate(small[None, None].float(), size=(height, width))[0, 0].long()
        image = torch.rand(1, 3, height, width, generator=generator)
        present = torch.unique(labels)
        at_once = pamr(image, (labels[None] == present[:, None, None]).float()[None]).argmax(dim=1)[0]
        expected = median_filter(at_once.float().numpy(), size=3).astype("int64")
        for budget in budgets:
            plans.add(refinement_plan((height, width), len(present), budget))
            np.testing.assert_array_equal(refine_labels(labels, image, budget=budget).numpy(), expected)
    # Every way of splitting: all at once, label chunks at full height, one label in tiles of rows.
    assert {(400, 6), (400, 3), (400, 1), (200, 4)} <= plans and any(rows < 400 for rows, _ in plans)


def test_pamr_memory_is_bounded_by_its_budget_whatever_the_size_and_segment_count():
    from diffseg.methods.diffcut.pamr import HALO, MEMORY_BUDGET, _PER_LABEL, _WEIGHTS, refinement_plan

    for size, count in [((3000, 4000), 1000), ((1500, 2000), 2), ((6000, 8000), 2), ((128, 128), 30)]:
        rows, chunk = refinement_plan(size, count)
        held = (min(size[0], rows + 2 * HALO) * size[1]) * (_WEIGHTS + chunk * _PER_LABEL) * 4
        assert held <= MEMORY_BUDGET, (size, count, rows, chunk)
    assert refinement_plan((128, 128), 30) == (128, 30)  # the reference's size: every label at once, as before


def test_pamr_refines_labels_towards_image_edges():
    """An image split in two colours and labels whose boundary is off by a few pixels: PAMR moves it to the edge."""
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :, 16:] = 1.0
    features = np.zeros((8, 8, 4), np.float32)
    features[:, :5, 0] = 1  # the features' boundary sits at x = 20 of 32, the image's at 16
    features[:, 5:, 1] = 1
    plain = segment_features(features, output_size=(32, 32))
    refined = segment_features(features, output_size=(32, 32), image=image, pamr=True)
    truth = (np.arange(32) >= 16)[None].repeat(32, 0)
    assert ((refined == refined[0, -1]) == truth).mean() > ((plain == plain[0, -1]) == truth).mean()


def test_a_cut_stops_between_nodes_when_its_caller_says_so_and_runs_whole_otherwise():
    from diffseg.cancel import Cancelled, cancellable

    tokens = torch.nn.functional.normalize(torch.randn(16, 64, generator=torch.Generator().manual_seed(0)), dim=0)
    whole = recursive_ncut(tokens, tau=0.99, alpha=10)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Cancelled), cancellable(stop):
        recursive_ncut(tokens, tau=0.99, alpha=10)
    assert len(asked) == 3 and len(whole) > 2  # asked before each node; the third ask stops it
    with cancellable(lambda: False):
        assert [m.tolist() for m in recursive_ncut(tokens, tau=0.99, alpha=10)] == [m.tolist() for m in whole]


def test_the_fast_assignment_gives_the_reference_products_labels_even_at_near_ties():
    """`_assign` scores with the fast operand order and re-scores near ties with the reference's own
    product: its labels equal those of the reference's product alone, bit for bit, also where two clusters are near
    copies of each other (scores within 1e-7)."""
    import torch.nn.functional as F

    from diffseg.methods.diffcut.segment import _assign

    def reference_labels(feats, clusters, size):  # `generate_masks` steps 2-3 with the reference's product
        _, c, h, w = feats.shape
        onehot = F.one_hot(clusters).T.reshape(-1, 1, 1, h, w)
        weights = onehot / (onehot.sum(dim=(-1, -2), keepdim=True) + 1e-8)
        pooled = torch.stack([torch.einsum("bchw,bqhw->bqc", feats, weight)[0, 0] for weight in weights])
        upsampled = F.interpolate(feats, size=size, mode="bilinear")
        ids = (torch.t(upsampled.reshape(c, -1)) @ torch.t(pooled)).argmax(dim=1).reshape(size)
        return np.unique(ids.numpy(), return_inverse=True)[1].reshape(size)

    generator = torch.Generator().manual_seed(0)
    for case in range(6):
        feats = F.normalize(torch.randn(1, 320, 16, 16, generator=generator), dim=1)
        clusters = torch.randint(0, 6, (256,), generator=generator)
        if case % 2:  # two clusters of near-identical tokens: their scores tie to rounding everywhere
            twin = feats.reshape(320, -1)[:, clusters == 1].mean(dim=1)
            feats.reshape(320, -1)[:, (clusters == 1) | (clusters == 2)] = twin[:, None]
            feats = F.normalize(feats + 1e-7 * torch.randn(feats.shape, generator=generator), dim=1)
        ours = _assign(feats, clusters, (64, 64))
        np.testing.assert_array_equal(ours, reference_labels(feats, clusters, (64, 64)))


def test_cluster_ids_follow_the_references_order_with_many_masks():
    """Ids number the tokens' membership rows in lexicographic order, the latest mask most significant (bytes packed
    eight masks at a time: 37 masks leave a partial byte)."""
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(300, generator=generator) < 0.3 for _ in range(37)]
    membership = torch.stack(masks[::-1], dim=1).numpy()
    _, expected = np.unique(membership, axis=0, return_inverse=True)
    assert torch.equal(assemble_clusters(masks, 300), torch.from_numpy(expected.reshape(-1)))


def _regions(count: int):
    """(y, laplacian, degree, affinity) of `count` regions of 2 to 400 tokens: tight clusters and noise."""
    for seed in range(count):
        features, alpha, _ = _tight_clusters(seed) if seed % 2 else (None, 10.0, None)
        if features is None:
            n = [2, 3, 5, 20, 400][seed // 2 % 5]
            features = np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
        tokens = torch.nn.functional.normalize(torch.from_numpy(features).T, dim=0)
        affinity = affinity_matrix(tokens, alpha)
        degree = affinity.sum(dim=1)
        if bool((degree > 0).all()):
            laplacian = torch.diag(degree) - affinity
            yield fiedler_vector(laplacian, degree), laplacian, degree, affinity


def test_the_shortlisted_bipartition_is_the_one_every_threshold_scored_the_references_way_picks():
    """`best_bipartition` scores the distinct cuts exactly, and only the decisive ones in the reference's float32
    arithmetic; the literal reference (all 100 thresholds, its `min` and `np.argmin`) picks the same cut and cost."""
    from diffseg.methods.diffcut.ncut import best_bipartition

    from naive_diffcut import _cut

    for case, (y, laplacian, degree, affinity) in enumerate(_regions(60)):
        side, cost = best_bipartition(y, laplacian, degree)
        part, expected = _cut(y, affinity, torch.diag(degree))
        assert np.array_equal(side, part.bool().numpy()), case
        assert (cost == expected) or (cost != cost and expected != expected), case


def test_a_cut_decided_against_tau_alone_is_the_references_decision():
    """Given τ, a clear lowest cut far from τ is decided on its exact cost, without the reference's arithmetic: the
    side and the verdict `cost < τ` stay the reference's for every τ, also one at the cut's own cost and within
    rounding of it (which take the reference's arithmetic)."""
    from diffseg.methods.diffcut.ncut import best_bipartition

    from naive_diffcut import _cut

    decided = 0
    for case, (y, laplacian, degree, affinity) in enumerate(_regions(60)):
        part, expected = _cut(y, affinity, torch.diag(degree))
        if expected != expected:
            continue
        for tau in (expected, expected + 1e-7, expected - 1e-7, expected + 1e-3, expected * 0.5, expected * 2, 0.5):
            side, cost = best_bipartition(y, laplacian, degree, tau)
            assert np.array_equal(side, part.bool().numpy()), (case, tau)
            assert (cost < tau) == (expected < tau), (case, tau, cost, expected)
            decided += cost != expected  # decided on the exact cost
    assert decided > 50  # the shortcut is taken, not only the reference's path


def test_pamr_propagates_each_label_only_where_it_can_reach_and_gives_the_same_ids(monkeypatch):
    """Each label's mask is computed on its box grown by PAMR's reach alone, the ids bit-identical to PAMR on every
    one-hot mask over the whole map (the reference's), whole or in tiles of rows, at a fraction of the work (before:
    every label over every pixel; 1,024 segments at 1500×2000 ran past 25 minutes). Some labels are split in two
    pieces far apart, so a box spans both."""
    from scipy.ndimage import median_filter

    from diffseg.methods.diffcut import pamr as module

    generator = torch.Generator().manual_seed(1)
    small = (torch.arange(8)[:, None] // 2) * 4 + torch.arange(8)[None] // 2  # 16 blocks of 2×2 cells
    moved = torch.randint(0, 8, (2, 6), generator=generator)
    small[moved[0], moved[1]] = torch.randint(0, 16, (6,), generator=generator)  # cells given a far label
    labels = torch.nn.functional.interpolate(small[None, None].float(), size=(400, 400))[0, 0].long()
    image = torch.rand(1, 3, 400, 400, generator=generator)
    present = torch.unique(labels)
    at_once = pamr(image, (labels[None] == present[:, None, None]).float()[None]).argmax(dim=1)[0]
    expected = median_filter(at_once.float().numpy(), size=3).astype("int64")
    areas = []
    propagate = module._propagate

    def counted(masks, *rest):
        areas.append(masks[0, 0].numel())
        return propagate(masks, *rest)

    monkeypatch.setattr(module, "_propagate", counted)
    for budget in (1 << 40, 1 << 25):  # one tile; tiles of rows with their halo
        np.testing.assert_array_equal(module.refine_labels(labels, image, budget=budget).numpy(), expected)
        if budget == 1 << 40:
            assert sum(areas) == module.reach(labels)
    assert module.reach(labels) < 0.5 * len(present) * labels.numel()  # the work follows the labels' reach
