"""Concept maps: words to pixels. ConceptAttention on SD3 and Flux against transcriptions of its references; the
properties a user relies on (the image stream untouched, order invariance, a distribution per pixel); cross-attention
on the UNets; every front end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffseg import DiffSegPipeline
from diffseg.backbones import dit
from diffseg.backbones.concepts import concept_attention, default_blocks, word_starts
from diffseg.bundle import ConceptBundle, load_bundle
from diffseg.cli import main
from diffseg.io.images import to_model_input
from diffseg.io.outputs import read_labels

from reference_concept_attention import (
    flux_concept_maps,
    flux_embed_concepts,
    sd3_concept_maps,
    sd3_encode_concepts,
)
from diffseg.config import ENCODE_DEFAULTS

CONCEPTS = ENCODE_DEFAULTS["concepts"].step  # where the concept maps' step puts its noise


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def photo(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2] = (40, 90, 220)  # a sky
    image[height // 2 :] = (40, 160, 40)  # a field
    image[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = (200, 60, 40)  # a thing
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def flux(tiny_flux_pipeline):
    return tiny_flux_pipeline


@pytest.fixture
def sd3(tiny_sd3_pipeline):
    return tiny_sd3_pipeline


WORDS = ("cat", "dog", "grass", "sky")


# ------------------------------------------------------------------------------------------ exact to the references


def reference_inputs(pipe, pixels):
    """The transformer's inputs as the reference's `encode_image` makes them: σ at step 2 of 4, Flux's pooled vector
    and guidance zero."""
    conditioning = pipe.kind.prompt_embedding()
    if pipe.backbone.family == "flux":
        conditioning = type(conditioning)(conditioning.hidden, torch.zeros_like(conditioning.pooled))
    inputs, grid = pipe.kind.step_inputs(pixels, 300, 0, schedule=(4, 2), conditioning=conditioning)
    if "guidance" in inputs:
        inputs["guidance"] = torch.zeros_like(inputs["guidance"])
    return inputs, grid


def test_flux_maps_equal_the_reference_transcription(flux):
    pixels = to_model_input([photo()], (96, 128))
    ours = flux.kind.concept_maps(pixels, WORDS, **CONCEPTS)  # (1, K, h, w)
    inputs, grid = reference_inputs(flux, pixels)
    t5, tokenizer = flux.text_encoder_2, flux.tokenizer_2
    with torch.inference_mode():
        embeddings = flux_embed_concepts(t5, tokenizer, WORDS, flux.backbone.text_tokens)
        chosen = default_blocks("flux", len(flux.transformer.transformer_blocks))
        expected = flux_concept_maps(flux.transformer, inputs, embeddings, chosen)
    assert ours.shape == (1, len(WORDS), *grid)
    assert relative_error(ours.reshape(expected.shape), expected) < 1e-5
    # The tokens are the reference's: each word's first T5 token, each word alone.
    torch.testing.assert_close(flux.kind.concept_tokens(WORDS).hidden, embeddings)


def test_flux_single_blocks_chosen_by_index_as_the_reference_layer_indices(flux):
    pixels = to_model_input([photo()], (96, 128))
    ours = flux.kind.concept_maps(pixels, WORDS, **CONCEPTS, blocks=(1, 1))
    inputs, _ = reference_inputs(flux, pixels)
    with torch.inference_mode():
        embeddings = flux_embed_concepts(flux.text_encoder_2, flux.tokenizer_2, WORDS, flux.backbone.text_tokens)
        expected = flux_concept_maps(flux.transformer, inputs, embeddings, [1])
    assert relative_error(ours.reshape(expected.shape), expected) < 1e-5
    with pytest.raises(ValueError, match="joint"):
        flux.kind.concept_maps(pixels, WORDS, **CONCEPTS, blocks=(1, 2))  # a single-stream block has no text stream


def test_sd3_maps_equal_the_reference_transcription(sd3):
    pixels = to_model_input([photo()], (96, 128))
    ours = sd3.kind.concept_maps(pixels, WORDS, **CONCEPTS)
    inputs, grid = reference_inputs(sd3, pixels)
    tokens = sd3.kind.concept_tokens(WORDS)
    with torch.inference_mode():
        expected = sd3_concept_maps(sd3.transformer, inputs, tokens.hidden)
    assert ours.shape == (1, len(WORDS), *grid)
    assert relative_error(ours.reshape(expected.shape), expected) < 1e-5


def test_sd3_tokens_are_the_references_for_one_concept(sd3):
    """The reference joins the concepts into one prompt; ours encodes each alone. For one concept they are the same
    tokens (start token, then the concept's first)."""
    width = sd3.transformer.config.joint_attention_dim
    with torch.inference_mode():
        expected = sd3_encode_concepts(sd3.text_encoder, sd3.text_encoder_2, sd3.tokenizer, ["grass"], width)
    torch.testing.assert_close(sd3.kind.concept_tokens(["grass"]).hidden, expected)
    # With several, each concept's token does not depend on the others (CLIP reads left to right): not the reference's
    # joint prompt, whose later tokens would be the first word's.
    many = sd3.kind.concept_tokens(["sky", "grass"]).hidden
    torch.testing.assert_close(many[:, 2:], expected[:, 1:])


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_the_image_stream_is_identical_with_and_without_concepts(family, request):
    pipe = request.getfixturevalue(family)
    pixels = to_model_input([photo()], (96, 128))
    inputs, _ = reference_inputs(pipe, pixels)
    tokens = pipe.kind.concept_tokens(WORDS)
    joint = len(pipe.transformer.transformer_blocks)
    with torch.inference_mode():
        plain = pipe.transformer(**inputs)[0]
        with concept_attention(pipe.transformer, family, tokens, range(joint)) as record:
            alongside = pipe.transformer(**inputs)[0]
    assert torch.equal(plain, alongside)
    assert record.blocks == joint


@pytest.mark.parametrize("family", ["flux", "sd3", "unet"])
def test_permuting_the_concepts_permutes_the_maps_and_nothing_else(family, request):
    pipe = request.getfixturevalue(family if family != "unet" else "tiny_pipeline")
    pixels = to_model_input([photo()], (96, 128) if family != "unet" else (64, 64))
    ours = pipe.kind.concept_maps(pixels, WORDS, **CONCEPTS)[0]
    order = [2, 0, 3, 1]
    permuted = pipe.kind.concept_maps(pixels, [WORDS[i] for i in order], **CONCEPTS)[0]
    assert relative_error(permuted, ours[order]) < 1e-5
    # A distribution over the concepts at every token.
    assert torch.allclose(ours.sum(0), torch.ones(ours.shape[1:]), atol=1e-5)
    assert bool((ours >= 0).all())


def test_a_multi_word_concept_is_its_words_first_tokens_and_a_word_is_unchanged(flux):
    tokenizer = flux.tokenizer_2
    assert word_starts(tokenizer, "sky", 0) == [0]
    starts = word_starts(tokenizer, "green grass", 0)
    assert starts == [0, len(tokenizer("green", add_special_tokens=False).input_ids)]
    alone = flux.kind.concept_tokens(["sky"]).hidden
    together = flux.kind.concept_tokens(["sky", "green grass"]).hidden
    torch.testing.assert_close(together[:, :1], alone)
    with torch.inference_mode():
        phrase = flux_embed_concepts(flux.text_encoder_2, tokenizer, ["green grass"], flux.backbone.text_tokens)
        full = flux.text_encoder_2(
            input_ids=tokenizer(
                "green grass", padding="max_length", max_length=flux.backbone.text_tokens, return_tensors="pt"
            ).input_ids
        )[0]
    torch.testing.assert_close(together[:, 1], full[:, starts].mean(1))
    assert not torch.allclose(together[:, 1], phrase[:, 0])  # not only the first token


def test_the_noise_is_the_references_step(flux, sd3):
    """Flux `get_schedule(4)[2]` (shifted for the token count on dev), SD3 `set_timesteps(4)`, `timesteps[-2]`."""
    import math

    tokens = 4096
    config = flux.scheduler.config
    mu = (config.max_shift - config.base_shift) / (4096 - 256) * (tokens - 256) + config.base_shift
    expected = math.exp(mu) / (math.exp(mu) + (1 / 0.5 - 1))  # BFL `time_shift(mu, 1.0, 0.5)`
    assert dit.schedule_sigma(flux.scheduler, 4, 2, family="flux", tokens=tokens) == pytest.approx(expected, rel=1e-5)
    scheduler = type(sd3.scheduler).from_config(sd3.scheduler.config)
    scheduler.set_timesteps(4)
    assert dit.schedule_sigma(sd3.scheduler, 4, 2) == pytest.approx(float(scheduler.sigmas[2]))


# ------------------------------------------------------------------------------------------ front ends


def test_concepts_through_python_and_a_saved_bundle(flux, tmp_path):
    bundle = flux.encode(photo(), method="concepts", labels="sky, grass, a red thing")
    assert isinstance(bundle, ConceptBundle) and bundle.words == ("sky", "grass", "a red thing")
    result = flux.segment(bundle)
    assert result.probabilities.shape == (3, 96, 128)
    np.testing.assert_allclose(result.probabilities.sum(0), 1, atol=1e-5)
    assert np.array_equal(result.labels, result.probabilities.argmax(0))
    assert [n.label for n in result.names] == list(bundle.words)
    assert result.overlay.size[1] > 96  # the legend below the image
    again = load_bundle(bundle.save(tmp_path / "b.safetensors"))
    assert isinstance(again, ConceptBundle) and again.words == bundle.words
    assert np.array_equal(flux.segment(again).labels, result.labels)


@pytest.mark.parametrize(
    "checkpoint",
    ["tiny_flux_checkpoint", "tiny_sd3_checkpoint", "tiny_checkpoint", "tiny_sd2_checkpoint", "tiny_sdxl_checkpoint"],
)
def test_concepts_through_the_cli(checkpoint, request, tmp_path):
    from PIL import Image

    Image.fromarray(photo()).save(tmp_path / "photo.png")
    model = request.getfixturevalue(checkpoint)
    out = tmp_path / "out"
    code = main(
        ["segment", str(tmp_path / "photo.png"), "-o", str(out), "--model", str(model), "--device", "cpu",
         "--concepts", "sky, grass, thing", "--npy"]
    )  # fmt: skip
    assert code == 0
    labels = read_labels(out / "concepts" / "photo.png")
    maps = np.load(out / "concept-maps" / "photo.npy")
    assert labels.shape == (96, 128) and maps.shape == (3, 96, 128)
    assert np.array_equal(labels, maps.argmax(0))
    words = json.loads((out / "concepts" / "photo.json").read_text())["vocabulary"]
    assert words == ["sky", "grass", "thing"]
    assert (out / "concept-overlays" / "photo.png").is_file()


def test_concepts_are_refused_with_another_method_or_no_words(tiny_checkpoint, tmp_path, capsys):
    args = ["segment", "x.png", "-o", str(tmp_path), "--model", str(tiny_checkpoint), "--device", "cpu"]
    assert main(args + ["--concepts", "a", "--method", "diffcut"]) != 0
    assert "--concepts is a method of its own" in capsys.readouterr().err
    assert main(args + ["--method", "concepts"]) != 0
    assert "pass them with --concepts" in capsys.readouterr().err
    assert main(args + ["--concepts", " , "]) != 0
    assert "No concepts given" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ concepts name segments


@pytest.mark.parametrize(
    "family, method", [("flux", "diffseg"), ("flux", "diffcut"), ("sd3", "seg4diff"), ("unet", "diffcut")]
)
def test_words_name_any_methods_segments_through_their_concept_maps(family, method, request, tmp_path):
    pipe = request.getfixturevalue(family if family != "unet" else "tiny_pipeline")
    image = photo()
    plain = pipe.encode(image, method=method, resolution=256)
    named = pipe.encode(image, method=method, resolution=256, labels="sky, grass, thing")
    assert named.named_by.words == ("sky", "grass", "thing")
    ours, without = pipe.segment(named), pipe.segment(plain)
    assert np.array_equal(ours.labels, without.labels)  # naming never changes the label map
    # Each segment's name is the word most of its tokens prefer in the concept maps (the label map read on their
    # grid, as the naming step reads it).
    maps = named.named_by.concept_maps
    grid = torch.from_numpy(ours.labels)[None, None].float()
    small = torch.nn.functional.interpolate(grid, size=tuple(maps.shape[-2:]), mode="nearest-exact")[0, 0].long()
    preferred = maps.argmax(0)
    for name in ours.names:
        votes = np.bincount(preferred[small == name.id].numpy(), minlength=3)
        if votes.sum():
            assert name.label == ("sky", "grass", "thing")[int(votes.argmax())]
    again = load_bundle(named.save(tmp_path / "named.safetensors"))
    assert again.named_by.words == named.named_by.words
    assert [n.label for n in pipe.segment(again).names] == [n.label for n in ours.names]


def test_the_cli_names_a_transformers_segments(tiny_sd3_checkpoint, tmp_path):
    from PIL import Image

    Image.fromarray(photo()).save(tmp_path / "photo.png")
    code = main(
        ["segment", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--model", str(tiny_sd3_checkpoint),
         "--device", "cpu", "--words", "sky, grass", "--resolution", "256"]
    )  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "out" / "semantics" / "photo.json").read_text())
    assert record["vocabulary"] == ["sky", "grass"] and record["voting"] == "majority"
    assert {s["label"] for s in record["segments"].values()} <= {"sky", "grass", None}


@pytest.mark.parametrize("dtype, bound", [("float16", 1e-2), ("bfloat16", 3e-2)])
def test_half_precision_concept_maps_stay_close_to_float32(flux, tiny_flux_checkpoint, dtype, bound):
    """A relative norm, not a largest error: what half precision can promise on any CPU."""
    half = DiffSegPipeline.from_pretrained(tiny_flux_checkpoint, device="cpu", dtype=dtype)
    pixels = to_model_input([photo()], (96, 128))
    ours, full = half.kind.concept_maps(pixels, WORDS, **CONCEPTS), flux.kind.concept_maps(pixels, WORDS, **CONCEPTS)
    assert ours.dtype == torch.float32 and relative_error(ours, full) < bound


def test_a_concept_the_text_encoder_cannot_hold_is_refused_by_name(sd3):
    with pytest.raises(ValueError, match="'a very long concept.*takes .* tokens; the text encoder holds 77"):
        sd3.kind.concept_tokens(["sky", "a very long concept " + "word " * 20])  # 77 CLIP tokens (one per letter here)
