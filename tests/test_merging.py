import numpy as np
import pytest
import torch

from diffseg.methods.diffseg import merging
from diffseg.methods.diffseg.merging import anchor_grid, merge_from_anchors, merge_proposals, symmetric_kl

from naive import kl as naive_kl


def test_anchor_grid_matches_the_reference_positions():
    grid = anchor_grid(16)
    coords = [1 + 4 * k for k in range(16)]  # step 63 // 15 = 4, start (63 - 60) // 2 = 1
    assert grid.shape == (256, 2)
    assert grid[:16, 0].tolist() == [1] * 16 and grid[:16, 1].tolist() == coords  # row-major
    assert sorted(set(grid[:, 0].tolist())) == coords
    assert anchor_grid(8)[:8, 1].tolist() == [0, 9, 18, 27, 36, 45, 54, 63]  # step 9, start 0
    assert anchor_grid(5)[:5, 1].tolist() == [1, 16, 31, 46, 61]  # step 15, start (63 - 60) // 2 = 1
    with pytest.raises(ValueError, match="num_points"):
        anchor_grid(1)


def test_symmetric_kl_is_symmetric_zero_on_the_diagonal_and_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(7, 50, generator=g, dtype=torch.float64).softmax(1)
    q = torch.rand(5, 50, generator=g, dtype=torch.float64).softmax(1)
    d = symmetric_kl(p, q)
    np.testing.assert_allclose(d.numpy(), naive_kl(p.numpy()[:, None], q.numpy()[None]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(symmetric_kl(q, p), d.T)
    assert symmetric_kl(p, p).diagonal().abs().max() < 1e-12
    assert (d > 0).all()


def test_symmetric_kl_guards_log_zero():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.4, 0.4, 0.2]])
    d = symmetric_kl(p, torch.cat([p, q]))
    assert torch.isfinite(d).all()
    assert d[0, 0] == 0 and d[0, 1] == 0  # 0 · log 0 counts as 0
    assert d[0, 2] > 1  # mass where the other has none is heavily penalised


def test_the_anchor_kl_takes_logarithms_a_block_at_a_time_and_is_the_whole_products(monkeypatch):
    """The merge never holds a second (N, D) tensor (1 GiB at 128² tokens): its logarithms are blocks of rows, and the
    blocks' divergences are those of one whole product."""
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(300, 64, generator=g).pow(4).softmax(1)  # (N, D)
    anchors = torch.tensor([0, 17, 150, 299])
    whole = symmetric_kl(maps[anchors], maps)  # (A, N)
    logged = []
    safe_log = merging._safe_log
    monkeypatch.setattr(merging, "_safe_log", lambda p: logged.append(p.numel()) or safe_log(p))
    monkeypatch.setattr(merging, "_LOG_BLOCK", 64 * 70)  # 70 rows: five blocks, the last one short
    blocked = merging.anchor_kl(maps, anchors)
    assert max(logged) <= 64 * 70 and sum(logged) == maps.numel() + len(anchors) * 64  # every row once, anchors once
    assert torch.linalg.norm(blocked - whole) <= 1e-6 * torch.linalg.norm(whole)


def test_first_iteration_averages_every_map_within_threshold_of_each_anchor():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(40, 30, generator=g).pow(3).softmax(1)
    anchors = torch.tensor([0, 7, 21])
    out = merge_from_anchors(maps, anchors, 0.02)
    d = naive_kl(maps[anchors].double().numpy()[:, None], maps.double().numpy()[None])
    for row, members in zip(out, d < 0.02):
        assert members.sum() >= 1
        np.testing.assert_allclose(row.numpy(), maps.numpy()[members].mean(0), rtol=1e-5)


def test_later_iterations_walk_in_order_and_marked_proposals_still_feed_later_means():
    # Three distributions on a line: A close to B, B close to C, A far from C.
    a = torch.tensor([0.70, 0.20, 0.10], dtype=torch.float64)
    c = torch.tensor([0.10, 0.20, 0.70], dtype=torch.float64)
    b = (a + c) / 2
    props = torch.stack([a, b, c])
    kl = symmetric_kl(props, props)
    threshold = float((kl[0, 1] + kl[0, 2]) / 2)
    assert kl[0, 1] < threshold < kl[0, 2] and kl[1, 2] < threshold
    out = merge_proposals(props, threshold)
    # A (unmarked) takes {A, B} and marks B; B is skipped; C (unmarked) takes {B, C}: B feeds two means.
    torch.testing.assert_close(out, torch.stack([(a + b) / 2, (b + c) / 2]))
    # Reversed order: C takes {C, B}, B skipped, A takes {A, B}.
    torch.testing.assert_close(merge_proposals(props.flip(0), threshold), torch.stack([(c + b) / 2, (b + a) / 2]))
