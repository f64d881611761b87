import pytest

from diffseg.naming.captioning import Captioner, nouns
from diffseg.testing.models import save_random_blip

from conftest import quadrants_image, run_cli, tiny_model

nltk = pytest.importorskip("nltk", reason="NLTK is not installed (the caption extra)")

# A few tagged sentences: enough for NLTK's averaged perceptron to learn this test's words.
TRAINING = [
    [("a", "DT"), ("dog", "NN"), ("runs", "VBZ"), ("on", "IN"), ("the", "DT"), ("grass", "NN")],
    [("a", "DT"), ("red", "JJ"), ("car", "NN"), ("parked", "VBN"), ("near", "IN"), ("trees", "NNS")],
    [("the", "DT"), ("sky", "NN"), ("is", "VBZ"), ("blue", "JJ"), ("over", "IN"), ("the", "DT"), ("city", "NN")],
    [("a", "DT"), ("photo", "NN"), ("of", "IN"), ("people", "NNS"), ("on", "IN"), ("a", "DT"), ("street", "NN")],
    [("two", "CD"), ("cats", "NNS"), ("sleep", "VBP"), ("on", "IN"), ("a", "DT"), ("red", "JJ"), ("sofa", "NN")],
]


@pytest.fixture(scope="module")
def tagger():
    from nltk.tag import PerceptronTagger

    tagger = PerceptronTagger(load=False)
    tagger.train([list(s) for s in TRAINING] * 3, nr_iter=10)
    return tagger


def test_nouns_of_fixed_captions(tagger):
    assert nouns("a dog runs on the grass", tagger) == ["dog", "grass"]
    assert nouns("A red car parked near trees, the sky is blue.", tagger) == ["car", "trees", "sky"]
    assert nouns("a photo of people on a street with a dog and a dog", tagger)[:3] == ["photo", "people", "street"]
    assert nouns("", tagger) == []


def test_automatic_path_end_to_end_with_a_tiny_random_blip(tmp_path, tiny_pipeline, tagger):
    blip = save_random_blip(tmp_path / "blip")
    captioner = Captioner(str(blip), max_new_tokens=8, tagger=tagger)
    image = quadrants_image()
    caption, words = captioner.vocabulary(image)
    assert isinstance(caption, str) and caption  # nonsense, but a real generate + decode
    assert set(words) <= set(caption.split())
    bundle = tiny_pipeline.encode(image, labels=words or ["sky"])
    result = tiny_pipeline.segment(bundle, kl_threshold=0.9)
    assert len(result.names) == result.num_segments
    assert {n.label for n in result.names} <= set(words or ["sky"])


def test_missing_tagger_data_names_what_to_install(tmp_path, image_folder, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "no-nltk-data")])
    blip = save_random_blip(tmp_path / "blip")
    code = run_cli(
        "segment",
        image_folder / "photo.jpg",
        "-o",
        tmp_path / "out",
        *tiny_model(tiny_checkpoint),
        "--caption",
        "--caption-model",
        blip,
    )
    err = capsys.readouterr().err
    assert code == 2 and "averaged_perceptron_tagger_eng" in err and "nltk.downloader" in err


def test_missing_caption_model_says_how_to_provide_it(tmp_path, tagger):
    with pytest.raises(FileNotFoundError, match="--caption-model"):
        Captioner(str(tmp_path / "no-blip"), tagger=tagger)
