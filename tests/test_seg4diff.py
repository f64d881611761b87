"""Seg4Diff (`--method seg4diff`): against a literal transcription of its reference (cvlab-kaist/Seg4Diff,
`seg4diff/seg4diff_model_unsup.py`, `sd3_backbone.py` and its patched `JointAttnProcessor2_0`), on random maps and on
a tiny random SD3 saved and loaded the users' way, through the library, the CLI and the demo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffseg import load_bundle
from diffseg.backbones import dit
from diffseg.bundle import TextAttentionBundle
from diffseg.io.images import to_model_input
from diffseg.io.outputs import read_labels
from diffseg.methods.seg4diff import merge_maps, normalise_maps, segment_text_attention
from diffseg.config import ENCODE_DEFAULTS

from conftest import quadrants_image, relative_error, run_cli, tiny_model


# ------------------------------------------------------------------------- the reference, transcribed literally


def reference_att2mask(att, p=1.0):  # the second `att2mask` of `Seg4DiffUnsup`, the one Python keeps
    att = att - att.min(dim=2, keepdim=True)[0]
    att = att / (att.max(dim=2, keepdim=True)[0] + 1e-6)
    return att**p


def reference_kl(x, Y):
    quotient = torch.log(x) - torch.log(Y)
    kl_1 = torch.sum(x * quotient, dim=(-2, -1)) / 2
    kl_2 = -torch.sum(Y * quotient, dim=(-2, -1)) / 2
    return kl_1 + kl_2


def reference_mask_merge(attns, kl_threshold):
    N, H, W = attns.shape
    matched = set()
    new_list = []
    flat = attns.reshape(N, -1)
    probs = torch.softmax(flat, dim=-1)
    attns = probs.view_as(attns)
    for i in range(N):
        if i in matched:
            continue
        matched.add(i)
        anchor = attns[i].unsqueeze(0)
        anchor = anchor.expand(N, -1, -1)
        kl_vals = reference_kl(anchor, attns)
        mask = (kl_vals < kl_threshold).cpu()
        if mask.sum() > 0:
            matched_idx = torch.nonzero(mask.view(-1), as_tuple=False).squeeze().tolist()
            for idx in matched_idx if isinstance(matched_idx, list) else [matched_idx]:
                matched.add(idx)
            group = attns[mask]
            aggregated = group.mean(dim=0)
            new_list.append(aggregated)
    return torch.stack(new_list, dim=0)


def reference_labels(slices_i2t, h, w, kl_threshold, power, size):
    """`forward` from the cached attention on: mean over layers, `att2mask`, (h w) -> maps, `mask_merge`, then
    `sem_seg_postprocess` (bilinear to the output size) and the evaluator's argmax."""
    slices_i2t = reference_att2mask(slices_i2t, p=power)  # (B, h·w, T)
    maps = slices_i2t[0].T.reshape(-1, h, w)  # rearrange "b (h w) l -> b l h w"
    merged = reference_mask_merge(maps, kl_threshold)
    up = F.interpolate(merged[None], size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(dim=0).numpy()


def token_maps(rng: np.random.Generator, tokens: int = 77, side: int = 16) -> torch.Tensor:
    """(1, side², tokens) attention-like maps: a few smooth prototypes, each token a noisy copy of one of them."""
    k = int(rng.integers(2, 7))
    coarse = torch.from_numpy(rng.random((k, 1, 4, 4))).float()
    prototypes = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    owner = rng.integers(0, k, tokens)
    noise = torch.from_numpy(rng.random((tokens, side, side))).float() * float(rng.uniform(0.01, 0.3))
    maps = prototypes[owner] + noise  # (T, side, side)
    return (maps.reshape(tokens, -1).T / 50)[None]  # (1, side², T), small like attention probabilities


# ------------------------------------------------------------------------------------------ the pure steps


def test_the_normalisation_is_per_pixel_over_the_tokens_as_the_reference_runs_it():
    rng = np.random.default_rng(0)
    for power in (1.0, 2.0):
        att = token_maps(rng)
        torch.testing.assert_close(normalise_maps(att[0], power), reference_att2mask(att.clone(), power)[0])


@pytest.mark.parametrize("kl_threshold", [0.1, 0.03, 0.01])
def test_the_merge_equals_the_reference_transcription_on_random_maps(kl_threshold):
    rng = np.random.default_rng(1)
    counts = []
    for _ in range(40):
        maps = reference_att2mask(token_maps(rng))[0].T.reshape(77, 16, 16)
        ours, theirs = merge_maps(maps, kl_threshold), reference_mask_merge(maps, kl_threshold)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)
        counts.append(len(ours))
    assert len(set(counts)) > 3  # the cases span few and many proposals


def test_the_label_map_is_the_references_argmax_of_the_upsampled_proposals():
    rng = np.random.default_rng(2)
    for size in ((64, 64), (48, 80)):
        att = token_maps(rng)
        ours = segment_text_attention(att[0].reshape(16, 16, 77), kl_threshold=0.1, output_size=size)
        theirs = reference_labels(att.clone(), 16, 16, 0.1, 1.0, size)
        assert np.array_equal(ours, np.unique(theirs, return_inverse=True)[1].reshape(size))


def test_the_noise_goes_where_the_reference_puts_it():
    """`scheduler.scale_noise(latent, timesteps[-8], noise)` after `set_timesteps(28)`, on SD3-medium's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sigma = dit.schedule_sigma(scheduler, 28, 8)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(28)
    x0, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    expected = reference.scale_noise(x0, reference.timesteps[-8].unsqueeze(0), noise)
    torch.testing.assert_close((1 - sigma) * x0 + sigma * noise, expected)
    assert sigma == pytest.approx(0.5151, abs=1e-4)


# ------------------------------------------------------------------------------------------ the tiny SD3


@pytest.fixture
def pipe(tiny_sd3_pipeline):
    return tiny_sd3_pipeline


class ReferenceProcessor:
    """Seg4Diff's patched `JointAttnProcessor2_0` (`softmax: True`, `keep_head: False`), transcribed: joint scores,
    softmax over all keys, mean over heads, image queries over the first 77 text keys. Its 4096 is the image's
    token count here (the reference runs 1024² only)."""

    def __init__(self, image_tokens: int):
        self.n = image_tokens
        self.attn_cache = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        q2, k2, v2 = (
            p(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            q2, k2 = attn.norm_added_q(q2), attn.norm_added_k(k2)
        query, key, value = torch.cat([query, q2], 2), torch.cat([key, k2], 2), torch.cat([value, v2], 2)
        attn_scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
        attn_scores = attn_scores.softmax(dim=-1)
        self.attn_cache = attn_scores.mean(dim=1)[:, : self.n, self.n : self.n + 77]
        out = (
            F.scaled_dot_product_attention(query, key, value)
            .transpose(1, 2)
            .reshape(batch_size, -1, attn.heads * head_dim)
        )
        out, text = out[:, : hidden_states.shape[1]], out[:, hidden_states.shape[1] :]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, text


def test_the_captured_maps_are_the_reference_processors_and_the_image_stream_is_untouched(pipe):
    image = quadrants_image(96, 128)
    pixels = to_model_input([image], (128, 176))
    ours = pipe.kind.text_attention(pixels, **ENCODE_DEFAULTS["seg4diff"].step)  # (1, 8, 11, 77)
    assert ours.shape == (1, 8, 11, 77)
    block = dit.blocks(pipe.transformer)[dit.seg4diff_block(pipe.backbone)]
    conditioning = dit.seg4diff_conditioning(pipe.kind.prompt_embedding())
    inputs, grid = pipe.kind.step_inputs(pixels, 261, 0, schedule=(28, 8), conditioning=conditioning)
    with torch.inference_mode():
        plain = pipe.transformer(**inputs)[0]
        original, block.attn.processor = block.attn.processor, ReferenceProcessor(grid[0] * grid[1])
        try:
            patched = pipe.transformer(**inputs)[0]
            expected = block.attn.processor.attn_cache
        finally:
            block.attn.processor = original
    assert relative_error(ours.reshape(1, -1, 77), expected) < 1e-4
    assert relative_error(patched, plain) < 1e-5  # the transcription computes what the model computes
    assert conditioning.hidden.shape[1] == 154 and not conditioning.hidden[:, 77:].any()  # T5 zeros, as the reference
    torch.testing.assert_close(conditioning.hidden[:, :77], pipe.kind.prompt_embedding().hidden[:, :77])


def test_seg4diff_through_python_and_a_saved_bundle(pipe, tmp_path):
    bundle = pipe.encode(quadrants_image(96, 128), method="seg4diff", resolution=256, resize="square")
    assert isinstance(bundle, TextAttentionBundle) and bundle.text_attention.shape == (16, 16, 77)
    assert bundle.timestep == 261 and bundle.family == "sd3"
    loose, strict = pipe.segment(bundle, kl_threshold=0.01), pipe.segment(bundle, kl_threshold=0.0001)
    assert loose.labels.shape == (96, 128) and strict.num_segments >= loose.num_segments
    again = load_bundle(bundle.save(tmp_path / "b.safetensors"))
    assert isinstance(again, TextAttentionBundle)
    assert np.array_equal(pipe.segment(again, kl_threshold=0.0001).labels, strict.labels)


def test_seg4diff_through_the_cli(tiny_sd3_checkpoint, tmp_path):
    from PIL import Image

    Image.fromarray(quadrants_image(72, 128)).save(tmp_path / "photo.png")
    argv = ("segment", tmp_path / "photo.png", "-o", tmp_path / "out", *tiny_model(tiny_sd3_checkpoint))
    assert run_cli(*argv, "--method", "seg4diff", "--kl-threshold", "0.001", "--resolution", "256") == 0
    assert read_labels(tmp_path / "out" / "labels" / "photo.png").shape == (72, 128)


@pytest.mark.parametrize("checkpoint", ["tiny_flux_checkpoint", "tiny_checkpoint"])
def test_seg4diff_elsewhere_is_refused_before_the_model_loads(checkpoint, request, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(quadrants_image(64, 64)).save(tmp_path / "photo.png")
    path = request.getfixturevalue(checkpoint)
    argv = ("segment", tmp_path / "photo.png", "-o", tmp_path / "out", *tiny_model(path), "--method", "seg4diff")
    assert run_cli(*argv) == 2
    assert "`--method seg4diff` reads image-to-CLIP-text attention" in capsys.readouterr().err


def test_the_demo_offers_seg4diff_on_sd3_only_and_its_threshold_re_segments_from_the_cache(
    pipe, tiny_pipeline, tmp_path
):
    from PIL import Image

    from diffseg.app.cache import BundleCache
    from diffseg.app.demo import Demo
    from diffseg.app.layout import build_page

    unet_page = build_page(tiny_pipeline.backbone)
    assert "seg4diff" not in [choice[1] for choice in unet_page.controls.method.choices]
    page = build_page(pipe.backbone)
    assert "seg4diff" in [choice[1] for choice in page.controls.method.choices]
    cache = BundleCache(pipe, folder=tmp_path / "bundles")
    demo = Demo(pipe, page, cache, tmp_path)
    photo = tmp_path / "photo.png"
    Image.fromarray(quadrants_image(72, 128)).save(photo)
    c = page.controls
    values = {control: control.value for control in page.inputs()}
    values.update({c.image: str(photo), c.method: "seg4diff", c.timestep: 261, c["seg4diff-kl"]: 0.01})
    demo.segment(values, None, lambda *_, **__: None)
    assert cache.encodes == 1 and demo.session(None).values[c.method] == "seg4diff"
    demo.segment({**values, c["seg4diff-kl"]: 0.5}, None, lambda *_, **__: None)
    assert cache.encodes == 1 and demo.session(None).values[c["seg4diff-kl"]] == 0.5


def test_the_square_path_pads_to_a_multiple_of_32_first_as_the_reference(pipe):
    """Reference `Seg4DiffUnsup.forward`: `ImageList.from_tensors(images / 255, 32)` (black at the bottom and right),
    then a bilinear 1024² resize; its labels cover that padded frame (`sem_seg_postprocess` keeps the whole 64² maps).
    Before: a 100×90 image went to the square unpadded (a 1000² image agreed 70 % with the reference)."""
    image = quadrants_image(100, 90)  # neither side a multiple of 32
    bundle = pipe.encode(image, method="seg4diff", resize="square", resolution=256)
    padded = np.zeros((128, 96, 3), np.uint8)
    padded[:100, :90] = image
    x = torch.tensor(padded).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False) * 2 - 1
    expected = pipe.kind.text_attention(x, **ENCODE_DEFAULTS["seg4diff"].step)[0]
    assert relative_error(bundle.text_attention, expected) < 1e-5
    labels = pipe.segment(bundle).labels
    assert labels.shape == (100, 90)
    native = pipe.encode(image, method="seg4diff", resolution=256)  # native sizing keeps the image unpadded
    assert native.text_attention.shape[:2] != bundle.text_attention.shape[:2] or not torch.allclose(
        native.text_attention, bundle.text_attention
    )
