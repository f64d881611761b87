"""Words as every layer takes them: one parser for comma-separated words, and the `Vocabulary` a UNet prompt is built
into (`naming.vocabulary.build_vocabulary`). The bundle, the naming step, the concept maps and the front ends all
read words through here, so a list and a comma-separated string mean the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def parse_words(
    words: Sequence[str] | str,
    *,
    empty: str | None = "No words given: pass at least one, e.g. --concepts 'cat, dog, sky'.",
) -> tuple[str, ...]:
    """The distinct words of a list or a comma-separated string, stripped, in the order given (duplicates once).

    Raises:
        ValueError: no word (the message `empty`; with `empty=None` no word gives an empty tuple).
    """
    if isinstance(words, str):
        words = words.split(",")
    unique = tuple(dict.fromkeys(w.strip() for w in words if w and w.strip()))
    if not unique and empty is not None:
        raise ValueError(empty)
    return unique


@dataclass(frozen=True)
class Vocabulary:
    """Words, the prompt built from them, and where each word's tokens sit in it.

    Attributes:
        words: the distinct words, in the order given.
        input_ids: the prompt's token ids, padded to the text encoder's length (start and end tokens included).
        token_indices: per word, its token positions in `input_ids` (a word the tokenizer splits has several).
    """

    words: tuple[str, ...]
    input_ids: tuple[int, ...]
    token_indices: tuple[tuple[int, ...], ...]

    @property
    def prompt(self) -> str:
        return ", ".join(self.words)
