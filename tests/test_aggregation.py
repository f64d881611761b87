import numpy as np
import pytest
import torch

from diffseg.aggregation import aggregate, as_attention_maps, resolution_weights
from diffseg.synthetic import attention_from_segmentation, blocks_segmentation

from naive import tf_bilinear


@pytest.fixture(scope="module")
def attn():
    return attention_from_segmentation(blocks_segmentation(64, 2, 3), heads=3, seed=1)


def test_heads_are_averaged_and_shapes_checked(attn):
    maps = as_attention_maps(attn)
    torch.testing.assert_close(maps[32], attn[32].mean(0))
    assert set(maps) == {64, 32, 16, 8}
    with pytest.raises(ValueError, match=r"attn\[16\]"):
        as_attention_maps({16: torch.rand(2, 256, 255)})
    with pytest.raises(ValueError, match="non-empty mapping"):
        as_attention_maps({})


def test_default_weights_are_proportional_to_side_over_resolutions_present():
    assert resolution_weights([64, 32, 16, 8]) == pytest.approx({64: 64 / 120, 32: 32 / 120, 16: 16 / 120, 8: 8 / 120})
    assert resolution_weights([32, 16]) == pytest.approx({32: 2 / 3, 16: 1 / 3})
    assert resolution_weights([64, 32], {64: 1.0}) == {64: 1.0, 32: 0.0}
    with pytest.raises(ValueError, match="not all zero"):
        resolution_weights([64, 32], {64: 0.0, 32: 0.0})
    with pytest.raises(ValueError, match=r"\[128\]"):
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
