"""Automatic vocabularies: caption the image with BLIP, keep the caption's nouns (the paper's extension).

The caption model comes through transformers (default: BLIP's large captioning checkpoint, or any compatible folder
or hub id) and the nouns through NLTK: its regular-expression tokenizer (no data needed) and its averaged-perceptron
part-of-speech tagger (data installed once with `python -m nltk.downloader averaged_perceptron_tagger_eng`).
Both are the optional `caption` extra.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-large"
TAGGER_DATA = "averaged_perceptron_tagger_eng"


def default_tagger():
    """NLTK's pretrained English tagger, with an actionable error when its data is not installed."""
    try:
        from nltk.tag import PerceptronTagger
    except ImportError as error:
        raise ImportError("Noun extraction needs NLTK: pip install 'diffseg[caption]' (or nltk).") from error
    try:
        return PerceptronTagger()
    except LookupError as error:
        raise FileNotFoundError(
            f"NLTK's part-of-speech tagger data ({TAGGER_DATA}) is not installed. Install it once with "
            f"`python -m nltk.downloader {TAGGER_DATA}` (offline: copy an nltk_data folder holding "
            f"taggers/{TAGGER_DATA} and set NLTK_DATA to it), or pass the words yourself with --labels."
        ) from error


def nouns(caption: str, tagger=None) -> list[str]:
    """The distinct nouns of a caption, lower-cased, in order (reference: `nltk.pos_tag`, tags starting with NN).

    Args:
        tagger: an object with NLTK's `tag(tokens) -> [(token, tag)]`; NLTK's pretrained tagger by default.
    """
    from nltk.tokenize import wordpunct_tokenize

    tagger = tagger or default_tagger()
    tokens = [t for t in wordpunct_tokenize(caption) if any(c.isalpha() for c in t)]
    found = [word.lower() for word, tag in tagger.tag(tokens) if tag.startswith("NN")]
    return list(dict.fromkeys(found))


def _fetch_it_elsewhere(model: str, reason) -> str:
    return (
        f"Could not load the captioning model {model!r}: {reason}. Without access to the Hugging Face hub, download it "
        f"elsewhere (`hf download {DEFAULT_CAPTION_MODEL} --local-dir blip`) and pass the folder with "
        "--caption-model ./blip, or pass the words yourself with --labels."
    )


def check_caption_model(model: str) -> bool:
    """Fail at once, naming the fix, for a caption model folder that does not exist or a hub id that cannot be had
    (the hub unreachable and the model not cached): without this the hub client retries for minutes.

    Returns:
        Whether to load from the local cache only (the hub is unreachable but the model is cached).
    """
    from pathlib import Path

    from ..hub import HUB_ID, UNREACHABLE, hub_reachable

    if Path(model).expanduser().is_dir():
        return False
    if not HUB_ID.match(model):
        raise FileNotFoundError(
            f"Caption model folder `{model}` does not exist; pass a BLIP captioning folder with --caption-model "
            f"(or a hub id such as {DEFAULT_CAPTION_MODEL!r}), or the words yourself with --labels."
        )
    if hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "config.json"), str):
        raise FileNotFoundError(_fetch_it_elsewhere(model, UNREACHABLE))
    return True


class Captioner:
    """BLIP image captioning through transformers."""

    def __init__(
        self, model: str = DEFAULT_CAPTION_MODEL, *, device="cpu", max_new_tokens: int = 30, tagger=None
    ) -> None:
        try:
            from transformers import BlipForConditionalGeneration, BlipProcessor
        except ImportError as error:  # pragma: no cover - transformers is a core dependency
            raise ImportError("Captioning needs transformers with BLIP support.") from error
        offline = check_caption_model(model)
        try:
            self.processor = BlipProcessor.from_pretrained(model, local_files_only=offline)
            self.model = BlipForConditionalGeneration.from_pretrained(model, local_files_only=offline)
            self.model = self.model.to(device).eval()
        except (OSError, ValueError) as error:
            from ..hub import UNREACHABLE

            raise FileNotFoundError(_fetch_it_elsewhere(model, UNREACHABLE if offline else error)) from None
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.tagger = tagger

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """One caption per (H, W, 3) uint8 image."""
        import torch

        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [text.strip() for text in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def vocabulary(self, image: np.ndarray) -> tuple[str, list[str]]:
        """(caption, its nouns) for one image."""
        caption = self.caption([image])[0]
        return caption, nouns(caption, self.tagger)
