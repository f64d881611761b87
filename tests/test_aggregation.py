import numpy as np
import pytest
import torch

from diffseg.methods.diffseg.aggregation import aggregate, as_attention_maps, resolution_weights
from diffseg.testing.synthetic import attention_from_segmentation, blocks_segmentation

from naive import tf_bilinear


@pytest.fixture(scope="module")
def attn():
    return attention_from_segmentation(blocks_segmentation(64, 2, 3), heads=3, seed=1)


def test_heads_are_averaged_and_shapes_checked(attn):
    maps = as_attention_maps(attn)
    torch.testing.assert_close(maps[32], attn[32].mean(0))
    assert list(maps) == [(64, 64), (32, 32), (16, 16), (8, 8)]  # finest first; 64 looks up (64, 64)
    with pytest.raises(ValueError, match=r"attn\[16\]"):
        as_attention_maps({16: torch.rand(2, 256, 255)})
    with pytest.raises(ValueError, match="non-empty mapping"):
        as_attention_maps({})


def test_default_weights_are_proportional_to_side_over_resolutions_present():
    expected = {(64, 64): 64 / 120, (32, 32): 32 / 120, (16, 16): 16 / 120, (8, 8): 8 / 120}
    assert resolution_weights([64, 32, 16, 8]) == pytest.approx(expected)
    assert resolution_weights([32, 16]) == pytest.approx({(32, 32): 2 / 3, (16, 16): 1 / 3})
    assert resolution_weights([64, 32], {64: 1.0}) == {(64, 64): 1.0, (32, 32): 0.0}
    # Rectangular grids (a 16:9 latent): weights ∝ √(h·w), the same 8:4:2:1 as the square case.
    rect = resolution_weights([(48, 88), (24, 44), (12, 22), (6, 11)])
    assert list(rect.values()) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert resolution_weights([(48, 88), (24, 44)], {"48x88": 1.0}) == {(48, 88): 1.0, (24, 44): 0.0}
    with pytest.raises(ValueError, match="not all zero"):
        resolution_weights([64, 32], {64: 0.0, 32: 0.0})
    with pytest.raises(ValueError, match=r"\['128'\]"):
        resolution_weights([64, 32], {128: 1.0})


def test_aggregated_rows_sum_to_the_total_weight(attn):
    out = aggregate(as_attention_maps(attn))
    assert out.shape == (4096, 4096)
    torch.testing.assert_close(out.sum(1), torch.ones(4096), atol=1e-5, rtol=0)
    out = aggregate(as_attention_maps(attn), {64: 0.5, 8: 1.5})  # weights used as given, as the reference does
    torch.testing.assert_close(out.sum(1), torch.full((4096,), 2.0), atol=1e-5, rtol=0)


def test_key_axis_is_upsampled_like_tensorflow_and_query_axis_tiled(attn):
    """Single resolution 16: every 64² query in a 4×4 cell carries its 16² query's TF-bilinear map."""
    maps = as_attention_maps({64: attn[64], 16: attn[16]})
    out = aggregate(maps, {64: 0.0, 16: 1.0}).reshape(64, 64, 64, 64).double()
    low = maps[16].double().numpy()
    for qy, qx in [(0, 0), (5, 9), (15, 15)]:
        expected = tf_bilinear(low[qy * 16 + qx].reshape(16, 16), 64, 64)
        expected /= expected.sum()
        for dy, dx in [(0, 0), (3, 1), (2, 3)]:
            np.testing.assert_allclose(out[qy * 4 + dy, qx * 4 + dx].numpy(), expected, atol=1e-7)


def test_aggregate_equals_the_weighted_sum_of_separately_tiled_resolutions(attn):
    maps = as_attention_maps(attn)
    weights = {64: 0.1, 32: 0.2, 16: 0.3, 8: 0.4}
    total = sum(w * aggregate({64: maps[64], r: maps[r]}, {64: 0.0, r: 1.0}) for r, w in weights.items() if r != 64)
    total = total + 0.1 * maps[64] / maps[64].sum(1, keepdim=True)
    torch.testing.assert_close(aggregate(maps, weights), total, atol=1e-6, rtol=1e-5)


def test_a_resolution_of_weight_zero_is_dropped(attn):
    maps = as_attention_maps(attn)
    without_8 = aggregate({r: maps[r] for r in (64, 32, 16)}, {64: 0.5, 32: 0.3, 16: 0.2})
    torch.testing.assert_close(aggregate(maps, {64: 0.5, 32: 0.3, 16: 0.2, 8: 0.0}), without_8)


def test_rectangular_grids_upsample_keys_and_tile_queries_per_axis():
    """A 4×6 grid aggregated onto 8×12: each query's map is TF-bilinear upsampled on its own aspect ratio and
    repeated over its 2×2 block of fine queries."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.dirichlet(np.ones(24), size=24)).float()  # (24, 24) rows sum to 1
    fine = torch.from_numpy(rng.dirichlet(np.ones(96), size=96)).float()
    out = aggregate({(8, 12): fine, (4, 6): coarse}, {(8, 12): 0.0, (4, 6): 1.0}).reshape(8, 12, 8, 12).double()
    for qy, qx in [(0, 0), (1, 4), (3, 5)]:
        expected = tf_bilinear(coarse[qy * 6 + qx].double().numpy().reshape(4, 6), 8, 12)
        expected /= expected.sum()
        for dy, dx in [(0, 0), (1, 1), (0, 1)]:
            np.testing.assert_allclose(out[qy * 2 + dy, qx * 2 + dx].numpy(), expected, atol=1e-7)
    with pytest.raises(ValueError, match="do not tile"):
        aggregate({(8, 12): fine, (3, 6): torch.ones(18, 18) / 18})
