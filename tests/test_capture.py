import math

import pytest
import torch

from diffseg.backbones.capture import (
    AttentionStore,
    attention_layers,
    capture_attention,
    last_attention_layer,
)

from conftest import error_percentile, quadrants_image, relative_error


@pytest.fixture(scope="module")
def unet_inputs(tiny_pipeline):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=g)
    text = tiny_pipeline.kind.prompt_embedding().hidden.expand(2, -1, -1)
    return tiny_pipeline.unet, latents, torch.tensor([300, 300]), text


def test_capture_leaves_unet_output_unchanged(unet_inputs):
    unet, latents, t, text = unet_inputs
    with torch.inference_mode():
        plain = unet(latents, t, encoder_hidden_states=text).sample
        with capture_attention(unet, (64, 64)):
            captured = unet(latents, t, encoder_hidden_states=text).sample
    assert relative_error(captured, plain) < 1e-5  # another kernel order, not another computation


def test_an_encode_ends_after_the_last_layer_it_records_with_the_maps_of_the_whole_forward(unet_inputs, tiny_pipeline):
    """DiffSeg reads no UNet output: the forward ends after the recorded layer it runs last (in the forward's order;
    diffusers registers the mid-block after the up-blocks), and the maps are those of the whole forward."""
    unet, latents, t, text = unet_inputs
    ran = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: ran.append(name))
        for name, module in unet.named_modules()
        if name.endswith((".attn1", ".attn2"))
    ]
    try:
        with torch.inference_mode():
            unet(latents, t, encoder_hidden_states=text)
    finally:
        for hook in hooks:
            hook.remove()
    named = dict(unet.named_modules())
    for cross in (False, True):
        last = [name for name in ran if cross or name.endswith(".attn1")][-1]
        assert last_attention_layer(unet, cross=cross) is named[last]
        with torch.inference_mode():
            with capture_attention(unet, (64, 64), cross=cross) as whole:
                unet(latents, t, encoder_hidden_states=text)
            with capture_attention(unet, (64, 64), cross=cross, stop=True) as stopped:  # as `encode` runs it
                unet(latents, t, encoder_hidden_states=text)
        for kind in ("self", "cross") if cross else ("self",):
            assert stopped.layers == whole.layers
            maps, expected = stopped.maps(kind), whole.maps(kind)
            assert list(maps) == list(expected) and all(torch.equal(maps[g], expected[g]) for g in expected)
    outputs = []  # the pipeline's encode never reaches the UNet's output convolution
    hook = unet.conv_out.register_forward_hook(lambda *_: outputs.append(1))
    try:
        bundle = tiny_pipeline.encode(quadrants_image(64, 64), resize="square")
    finally:
        hook.remove()
    assert outputs == [] and len(bundle.attention) == 4


def test_captured_maps_equal_an_independent_softmax_per_layer(unet_inputs):
    unet, latents, t, text = unet_inputs
    inputs = {}
    modules = {name[: -len(".processor")]: None for name in attention_layers(unet, "self")}
    hooks = []
    for name, module in unet.named_modules():
        if name in modules:
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0])))
    try:
        with torch.inference_mode(), capture_attention(unet, (64, 64)) as store:
            unet(latents, t, encoder_hidden_states=text)
    finally:
        for hook in hooks:
            hook.remove()

    expected, counts = {}, {}
    named = dict(unet.named_modules())
    for name, hidden in inputs.items():
        attn = named[name]
        q, k = attn.to_q(hidden), attn.to_k(hidden)  # (B, N, h·d)
        b, n, inner = q.shape
        d = inner // attn.heads
        q = q.view(b, n, attn.heads, d).transpose(1, 2)
        k = k.view(b, n, attn.heads, d).transpose(1, 2)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)  # (B, N, N)
        r = math.isqrt(n)
        expected[r] = expected.get(r, 0) + probs
        counts[r] = counts.get(r, 0) + 1
    maps = store.maps()
    # tiny UNet: 1 down + 2 up layers per level, 1 mid
    assert store.layers == {(r, r): n for r, n in counts.items()} == {(64, 64): 3, (32, 32): 3, (16, 16): 3, (8, 8): 1}
    for (r, _), m in maps.items():
        assert m.shape == (2, r * r, r * r)
        # Another kernel order, not another computation: a relative norm and a high percentile, not the largest of
        # millions of errors (which depends on the CPU's kernels).
        assert relative_error(m, expected[r] / counts[r]) < 1e-5
        assert error_percentile(m, expected[r] / counts[r], 99.9) < 1e-6
        torch.testing.assert_close(m.sum(-1), torch.ones(2, r * r), atol=1e-5, rtol=0)


def test_processors_are_restored_also_when_the_forward_raises(unet_inputs):
    unet, latents, t, text = unet_inputs
    before = unet.attn_processors
    with pytest.raises(RuntimeError):
        with capture_attention(unet, (64, 64)):
            unet(latents[:, :3], t, encoder_hidden_states=text)  # wrong channel count
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_only_self_attention_layers_are_replaced(unet_inputs):
    unet = unet_inputs[0]
    before = unet.attn_processors
    with capture_attention(unet, (64, 64)):
        during = unet.attn_processors
    changed = {name for name in before if during[name] is not before[name]}
    assert changed == set(attention_layers(unet, "self"))
    assert all(name.endswith("attn1.processor") for name in changed) and len(changed) == 10


def test_store_keys_each_layer_by_its_grid_of_the_latent():
    store = AttentionStore((48, 88))  # a 16:9 image at SD 1.x's native size
    grids = [(48, 88), (24, 44), (12, 22), (6, 11)]
    for h, w in grids[::-1]:
        store.add(torch.ones(1, h * w, 5), "cross")
    assert list(store.maps("cross")) == grids  # finest first
    with pytest.raises(RuntimeError, match="already taken"):  # the means are the sums, divided in place
        store.add(torch.ones(1, 6 * 11, 5), "cross")
    store = AttentionStore((25, 33))  # odd sides: a stride-2 convolution gives ceil(n / 2)
    store.add(torch.ones(1, 13 * 17, 13 * 17))
    assert list(store.maps()) == [(13, 17)] and store.layers == {(13, 17): 1}


def test_store_rejects_token_counts_of_no_grid():
    with pytest.raises(ValueError, match="match no grid"):
        AttentionStore((64, 64)).add(torch.ones(1, 12, 12))
    with pytest.raises(ValueError, match="match no grid"):
        AttentionStore((64, 64)).add(torch.ones(1, 1000, 77), "cross")
