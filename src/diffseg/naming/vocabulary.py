"""Naming segments: each segment gets the word whose cross-attention it holds most.

The paper's experimental extension (reference `DiffSeg.aggregate_x_weights` and `get_semantics`): run the UNet
step conditioned on a prompt made of the words, capture the cross-attention (`attn2`) of each word's tokens,
aggregate it over layers and resolutions at 512×512, normalise each word's map over space (L2), and give each
segment the word it holds most. The words come from the user (`--labels "road,car,sky"`, offline) or from an
automatic caption (`captioning.py`).

Where we differ from the reference on purpose: its `get_semantics` "majority" takes the *median* of the segment's
per-pixel best-word indices, so the answer depends on the order the words are given in (a segment voting 40 % word
0, 35 % word 2 and 25 % word 3 is named word 2). Ours takes the mode, the word most pixels vote for (word 0), which
does not depend on word order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..config import VOTING, NamingConfig
from ..grids import grid_key
from ..words import Vocabulary, parse_words

SCORE_SIZE = (512, 512)  # reference: cross-attention aggregated at 512 × 512
_NAMING = NamingConfig()


def build_vocabulary(words: Sequence[str] | str, tokenizer) -> Vocabulary:
    """Prompt `"w1, w2, ..."` from `words` (a list or one comma-separated string), tokenised word by word.

    Raises:
        ValueError: no words, a word with no tokens, or more tokens than the text encoder's context holds.
    """
    unique = parse_words(
        words, empty="The vocabulary is empty: pass at least one word, e.g. --labels 'road,car,person,sky'."
    )
    limit = tokenizer.model_max_length
    separator = tokenizer(",", add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id]
    indices = []
    for k, word in enumerate(unique):
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        if not tokens:
            raise ValueError(f"The word {word!r} has no tokens; remove it from the vocabulary.")
        if k:
            ids += separator
        indices.append(tuple(range(len(ids), len(ids) + len(tokens))))
        ids += tokens
    ids.append(tokenizer.eos_token_id)
    if len(ids) > limit:
        shown = ", ".join(unique[:5]) + (f", … ({len(unique)} words)" if len(unique) > 5 else "")
        raise ValueError(
            f"The vocabulary {shown!r} takes {len(ids)} tokens but the text encoder holds {limit} "
            "(start and end included); use fewer or shorter words."
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids += [pad] * (limit - len(ids))
    return Vocabulary(tuple(unique), tuple(ids), tuple(indices))


@torch.inference_mode()
def word_scores(
    cross: Mapping[tuple[int, int], torch.Tensor],
    vocabulary: Vocabulary,
    weights: Mapping[tuple[int, int], float] | None = None,
    size: tuple[int, int] = SCORE_SIZE,
) -> torch.Tensor:
    """Each word's cross-attention over the image, L2-normalised over space.

    Reference `aggregate_x_weights`: per grid, the (h·w, tokens) maps are bilinearly upsampled to 512×512,
    normalised over the token axis and summed with weights (the reference's semantic notebooks weigh resolutions
    equally); `get_semantics` then normalises each word's map by its L2 norm over space. A word's map is the sum of
    its tokens' maps.

    Args:
        cross: (h, w) (or a side r for r×r) -> (h·w, T) float cross-attention probabilities, queries × prompt
            tokens.

    Returns:
        (W, H·W) float32: row w is word w's normalised map, pixels row-major.
    """
    cross = {grid_key(g): m for g, m in cross.items()}
    grids = list(cross)
    weights = {g: 1.0 for g in grids} if weights is None else {g: float(weights.get(g, 0.0)) for g in grids}
    height, width = size
    total = torch.zeros(len(vocabulary.words), height, width)
    for (h, w), maps in cross.items():
        if weights[(h, w)] == 0:
            continue
        maps = maps.float().cpu()  # (h·w, T)
        words = torch.stack([maps[:, list(idx)].sum(1) for idx in vocabulary.token_indices])  # (W, h·w)
        both = torch.cat([words, maps.sum(1, keepdim=True).T])  # (W + 1, h·w): words and the all-token total
        up = F.interpolate(both.reshape(1, -1, h, w), size=size, mode="bilinear", align_corners=False)[0]
        total += weights[(h, w)] * up[:-1] / up[-1:]  # normalised over the token axis, as the reference
    flat = total.reshape(len(vocabulary.words), -1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class SegmentLabel:
    """A segment's name: `label` is None ("unlabelled") when its score is below the confidence asked for."""

    id: int
    label: str | None
    score: float
    area: float


def assign_labels(
    labels: np.ndarray,
    scores: torch.Tensor,
    words: Sequence[str],
    *,
    voting: str = _NAMING.voting,
    min_confidence: float = _NAMING.min_confidence,
    score_size: tuple[int, int] = SCORE_SIZE,
) -> list[SegmentLabel]:
    """Name every segment of `labels` with one of `words`.

    Voting "majority": each pixel votes for its highest-scoring word; the segment takes the most votes (the mode;
    the reference's `get_semantics` takes the median vote index, see the module docstring) and its score
    is the winning share of votes. Voting "mean": the segment takes the word with the highest mean score; its score is
    that mean's share of all words' means. Segments scoring below `min_confidence` are left unlabelled.

    Args:
        labels: (H, W) ids 0..K-1. scores: (W, h·w) from `word_scores` at `score_size` (h, w).
    """
    if voting not in VOTING:
        raise ValueError(f"`voting` must be one of {VOTING} but is {voting!r}.")
    if not 0 <= min_confidence <= 1:
        raise ValueError(f"`min_confidence` must lie in [0, 1] but is {min_confidence}.")
    full = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    k = int(full.max()) + 1
    areas = torch.bincount(full.reshape(-1), minlength=k).double() / full.numel()
    small = F.interpolate(full[None, None].float(), size=score_size, mode="nearest-exact")[0, 0].long().reshape(-1)
    n_words = len(words)
    if voting == "majority":
        votes = torch.bincount(small * n_words + scores.argmax(0), minlength=k * n_words).reshape(k, n_words).double()
        tally = votes / votes.sum(1, keepdim=True).clamp_min(1)
    else:
        sums = torch.zeros(k, n_words, dtype=torch.float64).index_add_(0, small, scores.T.double())
        means = sums / torch.bincount(small, minlength=k).clamp_min(1)[:, None]
        tally = means / means.sum(1, keepdim=True).clamp_min(1e-12)
    result = []
    for segment in range(k):
        best = int(tally[segment].argmax())
        score = float(tally[segment, best])
        name = words[best] if score >= min_confidence and tally[segment].sum() > 0 else None
        result.append(SegmentLabel(segment, name, round(score, 4), round(float(areas[segment]), 6)))
    return result
