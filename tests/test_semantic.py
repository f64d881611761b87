import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg import AttentionBundle
from diffseg.backbones.capture import attention_layers, capture_attention
from diffseg.naming.vocabulary import assign_labels, word_scores

from conftest import error_percentile, quadrants_image, relative_error, run_cli, tiny_model


def test_vocabulary_places_every_token_of_every_word(tiny_pipeline):
    vocab = tiny_pipeline.vocabulary("road, traffic light,road ,  sky")
    tok = tiny_pipeline.tokenizer
    assert vocab.words == ("road", "traffic light", "sky")  # duplicates and blanks dropped
    assert len(vocab.input_ids) == tok.model_max_length and vocab.input_ids[0] == tok.bos_token_id
    for word, idx in zip(vocab.words, vocab.token_indices):
        assert [vocab.input_ids[i] for i in idx] == tok(word, add_special_tokens=False).input_ids
    assert len(vocab.token_indices[1]) > 1  # the tiny tokenizer splits words into characters: multi-token words


def test_vocabulary_errors_are_clear(tiny_pipeline):
    with pytest.raises(ValueError, match="vocabulary is empty"):
        tiny_pipeline.vocabulary(" , ,")
    with pytest.raises(ValueError, match="takes .* tokens but the text encoder holds 77"):
        tiny_pipeline.vocabulary(
            ["a very long description of everything"] * 1 + ["and more words here please"] * 1 + ["x" * 40]
        )


def test_cross_attention_capture_leaves_the_unet_output_unchanged(tiny_pipeline):
    unet = tiny_pipeline.unet
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 64, 64, generator=g)
    text = tiny_pipeline.kind.prompt_embedding(tiny_pipeline.vocabulary("sky, road")).hidden.expand(2, -1, -1)
    t = torch.tensor([300, 300])
    with torch.inference_mode():
        plain = unet(latents, t, encoder_hidden_states=text).sample
        with capture_attention(unet, (64, 64), cross=True) as store:
            captured = unet(latents, t, encoder_hidden_states=text).sample
    assert relative_error(captured, plain) < 1e-5  # another kernel order, not another computation
    cross = store.maps("cross")
    assert {g: tuple(m.shape) for g, m in cross.items()} == {
        (64, 64): (2, 4096, 77),
        (32, 32): (2, 1024, 77),
        (16, 16): (2, 256, 77),
        (8, 8): (2, 64, 77),
    }
    torch.testing.assert_close(cross[32].sum(-1), torch.ones(2, 1024), atol=1e-5, rtol=0)
    assert len(attention_layers(unet, "cross")) == 10


def _dominant_cross(regions: np.ndarray, vocab, strength: float = 0.9) -> dict:
    """Cross-attention where the tokens of word k hold most of the attention inside region k."""
    out = {}
    for r in (64, 32, 16, 8):
        step = 64 // r
        region = torch.from_numpy(regions[step // 2 :: step, step // 2 :: step].reshape(-1))
        probs = torch.full((r * r, 77), (1 - strength) / 77)
        for k, idx in enumerate(vocab.token_indices):
            rows = torch.nonzero(region == k)[:, 0]
            probs[rows[:, None], torch.tensor(idx)[None, :]] += strength / len(idx)
        out[r] = probs / probs.sum(1, keepdim=True)
    return out


@pytest.mark.parametrize("voting", ["majority", "mean"])
def test_each_region_gets_the_word_made_to_dominate_it(tiny_pipeline, voting):
    vocab = tiny_pipeline.vocabulary(["sky", "traffic light", "road", "person"])
    regions = np.zeros((64, 64), np.int64)
    regions[:32, 32:] = 1
    regions[32:, :32] = 2
    regions[32:, 32:] = 3
    cross = _dominant_cross(regions, vocab)
    labels = np.kron(regions, np.ones((8, 8), np.int64))  # the segments, at 512²
    names = assign_labels(labels, word_scores(cross, vocab), vocab.words, voting=voting)
    assert [n.label for n in names] == ["sky", "traffic light", "road", "person"]
    assert all(n.area == pytest.approx(0.25) and 0.5 < n.score <= 1 for n in names)
    threshold = max(n.score for n in names)
    unsure = assign_labels(labels, word_scores(cross, vocab), vocab.words, voting=voting, min_confidence=threshold)
    assert [u.label is None for u in unsure] == [n.score < threshold for n in names]  # below it: unlabelled
    assert unsure[0].label is None or names[0].score == threshold


def test_labels_never_alter_the_label_map_by_default(tiny_pipeline):
    image = quadrants_image()
    plain = tiny_pipeline.encode(image)
    named = tiny_pipeline.encode(image, labels="red, green, blue, yellow")
    for r in plain.attention:  # the unconditional half of one batch: the same attention, to batch rounding
        assert relative_error(named.attention[r], plain.attention[r]) < 2e-2
        assert error_percentile(named.attention[r], plain.attention[r], 99) < 5e-3
    result = tiny_pipeline.segment(named, kl_threshold=0.9)
    np.testing.assert_array_equal(
        result.labels,
        tiny_pipeline.segment(AttentionBundle(named.attention, named.image, named.timestep), kl_threshold=0.9).labels,
    )  # naming on or off: same map
    assert [n.id for n in result.names] == list(range(result.num_segments))
    conditional = tiny_pipeline.encode(image, labels="red, green, blue, yellow", segment_from="conditional")
    finest = next(iter(named.attention))
    assert not torch.allclose(
        conditional.attention[finest], named.attention[finest], atol=1e-4
    )  # text changes self-attention


def test_bundles_keep_their_vocabulary(tiny_pipeline, tmp_path):
    bundle = tiny_pipeline.encode(quadrants_image(), labels=["sky", "road"])
    loaded = AttentionBundle.load(bundle.save(tmp_path / "b.safetensors"))
    assert loaded.vocabulary == bundle.vocabulary
    for r in bundle.cross_attention:
        torch.testing.assert_close(loaded.cross_attention[r], bundle.cross_attention[r], rtol=0, atol=0)
    a, b = tiny_pipeline.segment(bundle, kl_threshold=0.8), tiny_pipeline.segment(loaded, kl_threshold=0.8)
    assert a.names == b.names


def test_cli_writes_names_per_image(tiny_checkpoint, image_folder, tmp_path):
    out = tmp_path / "out"
    (image_folder / "corrupt.jpg").unlink()
    (image_folder / "empty.png").unlink()
    assert (
        run_cli(
            "segment",
            image_folder,
            "-o",
            out,
            *tiny_model(tiny_checkpoint),
            "--words",  # the option's name; --labels (below) is its alias
            "red, green, blue",
            "--kl-threshold",
            "0.9",
            "--voting",
            "mean",
        )
        == 0
    )
    record = json.loads((out / "semantics" / "photo.json").read_text())
    labels = np.asarray(Image.open(out / "labels" / "photo.png"))
    assert record["vocabulary"] == ["red", "green", "blue"] and record["voting"] == "mean"
    assert set(record["segments"]) == {str(i) for i in range(labels.max() + 1)}
    for i, seg in record["segments"].items():
        assert seg["label"] in {"red", "green", "blue"} and 0 <= seg["score"] <= 1
        assert seg["area"] == pytest.approx((labels == int(i)).mean(), abs=1e-5)
    assert run_cli("segment", image_folder, "-o", out, "--model", tiny_checkpoint, "--labels", ", ") == 2


def test_majority_is_the_mode_of_the_votes_not_the_references_median():
    """A segment whose pixels vote 40 % word 0, 35 % word 2, 25 % word 3: the mode is word 0, whatever the word
    order; the reference's median of vote indices would say word 2, and another order would change its answer."""
    words = ["sky", "road", "tree", "car"]
    votes = np.array([0] * 40 + [2] * 35 + [3] * 25)  # best word per pixel, 100 pixels of one segment
    scores = torch.zeros(len(words), 100)
    scores[torch.from_numpy(votes), torch.arange(100)] = 1.0
    labels = np.zeros((10, 10), np.int64)
    (name,) = assign_labels(labels, scores, words, voting="majority", score_size=(10, 10))
    assert name.label == "sky" and name.score == pytest.approx(0.4)
    assert words[int(np.median(votes))] == "tree"  # what the reference's median vote would name it
    order = [3, 2, 1, 0]  # the same votes with the words listed backwards
    reordered = scores[order]
    (again,) = assign_labels(labels, reordered, [words[i] for i in order], voting="majority", score_size=(10, 10))
    assert again.label == "sky"
