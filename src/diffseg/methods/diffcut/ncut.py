"""DiffCut step 2: recursive normalised cut of one UNet layer's tokens.

Couairon et al., "DiffCut: Catalyzing Zero-Shot Semantic Segmentation with Diffusion Features and Recursive
Normalized Cut", NeurIPS 2024; reference `diffcut/recursive_normalized_cut.py` (`DiffCut.recursive_ncut`,
`get_bipartition`, `assemble_clusters`). The reference's rules are kept exactly; its mechanics are not:

- Each node of the reference's recursion works on the tokens not yet "painted" (explored). Its children are the
  two halves of the accepted cut, so the recursion is a binary tree over index sets. We walk that tree with an
  explicit stack in the reference's order (a node, then the half above the threshold, then the rest) and track
  index sets directly instead of re-masking the full N×N affinity and rebuilding sets at every call.
- Below the root, the reference drops every token whose affinity row holds an exact 0 (`get_affinity_matrix`
  keeps only rows without zeros; a painted token's row is all zeros, but so is any entry that `** alpha` underflowed
  or the min-max normalisation mapped to 0). We drop the same tokens: `natural_zeros` below.
- The 100 candidate thresholds are scored in one batched product instead of 100 matrix-vector products.
- A cut that puts every token on one side cannot split its branch: the reference accepts it when its cost rounds
  to about 0 and then recurses on the same tokens until Python's recursion limit. We end such a branch.
"""

from __future__ import annotations

import numpy as np
import torch

from ...cancel import checkpoint

# Reference `get_bipartition(..., k=100)`: thresholds between 0.99·min and 0.99·max of the eigenvector.
NUM_THRESHOLDS = 100
THRESHOLD_SPAN = 0.99


def affinity_matrix(tokens: torch.Tensor, alpha: float) -> torch.Tensor:
    """Cosine affinity of L2-normalised tokens, min-max normalised to [0, 1], raised to `alpha` (reference level 0).

    Args:
        tokens: (C, N) float32, one L2-normalised column per token (the reference's `feats`).

    Returns:
        (N, N) float32. Constant tokens (max = min) give NaN, as in the reference; `recursive_ncut` handles that.
    """
    feats = torch.nn.functional.normalize(tokens, p=2, dim=0)  # reference normalises again at level 0
    affinity = torch.t(feats) @ feats  # (N, N), the reference's operand order
    affinity = (affinity - affinity.min()) / (affinity.max() - affinity.min())
    return affinity**alpha


def natural_zeros(affinity: torch.Tensor) -> torch.Tensor:
    """(N,) bool: tokens whose affinity row holds an exact 0; the reference drops them below the root."""
    return (affinity == 0).any(dim=1)


def fiedler_vector(laplacian: torch.Tensor, degree: torch.Tensor) -> torch.Tensor | None:
    """Second smallest generalised eigenvector of (D − A) y = λ D y, sign fixed (reference
    `second_smallest_eigenvector` and `deterministic_vector_sign_flip`).

    D^-½ (D − A) D^-½ is formed elementwise (the reference's products with diagonal matrices, value for value), its
    eigenvector v taken with LAPACK, y = D^-½ v, then multiplied by the sign of its largest-magnitude entry.

    Returns:
        (n,) float32, or None where LAPACK fails (the reference then has no cut either).
    """
    inv_sqrt = 1 / degree**0.5  # (n,)
    normalised = inv_sqrt[:, None] * laplacian * inv_sqrt[None, :]
    try:
        _, vectors = torch.linalg.eigh(normalised)
    except torch.linalg.LinAlgError:
        return None
    y = inv_sqrt * vectors[:, 1]
    return y * torch.sign(y[torch.argmax(torch.abs(y))])


# Candidates whose batched cost lies this close to the lowest (or that put every token on one side, or are NaN) are
# scored again with the reference's own arithmetic before a decision: batched sums round differently, and the
# reference's choices (its NaN rule, a near-free trivial cut against a near-free real one) turn on that rounding.
TIE = 1e-4


def reference_cost(side: torch.Tensor, laplacian: torch.Tensor, degree_matrix: torch.Tensor, total) -> float:
    """One candidate's cost exactly as the reference's `get_bipartition` computes it, operation for operation.

    `k = sum(diag_D · (x > 0)) / sum(D)`, with `sum(D)` (`total`) summed over the full n×n diagonal matrix: in
    float32 that sum rounds differently from the sum of the diagonal, so a cut that keeps every token has k ≠ 1,
    a finite (near-zero) cost and is a real candidate, where k = 1 exactly would give NaN.
    """
    x = 2 * side.to(laplacian.dtype) - 1  # the reference's `2 * (1. * (y > thresh)) - 1`
    k = torch.sum(torch.diagonal(degree_matrix) * (x > 0)) / total
    b = k / (1 - k)
    z = (1 + x) - b * (1 - x)
    return ((z @ laplacian @ z) / (z @ degree_matrix @ z)).item()


def best_bipartition(
    y: torch.Tensor, laplacian: torch.Tensor, degree_matrix: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The lowest normalised-cut cost over the reference's 100 thresholds (reference `get_bipartition`).

    For a threshold, x = ±1 by side, k = vol(x > 0) / vol(all), b = k / (1 − k), z = (1 + x) − b (1 − x), cost
    = zᵀ (D − A) z / zᵀ D z. The thresholds' sides are nested (a higher threshold keeps fewer tokens), so the token
    count names a partition: each distinct one is scored once, all in one float32 product. Only the few that decide
    the outcome (within `TIE` of the lowest, trivial or NaN) are then scored with the reference's float32 arithmetic
    (`reference_cost`). As the reference picks with Python's `min` and `np.argmin`, a NaN first cost is the minimum
    and any NaN is the arg-minimum.

    Returns:
        (side, cost): (n,) bool, the tokens above the chosen threshold, and its cost (NaN when undefined).
    """
    n = len(y)
    low, high = y.aminmax()
    thresholds = torch.linspace(low * THRESHOLD_SPAN, high * THRESHOLD_SPAN, NUM_THRESHOLDS).to(y.device)
    sides = (y[:, None] > thresholds[None, :]).cpu().numpy()  # (n, T) bool
    counts = sides.sum(axis=0)  # (T,), non-increasing
    new = np.concatenate(([True], counts[1:] != counts[:-1]))  # (T,) the first threshold of each partition
    first, column = np.flatnonzero(new), np.cumsum(new) - 1  # (P,) and (T,): each threshold's partition
    distinct, s = counts[first], sides[:, first]  # (P,) tokens above, (n, P) sides
    # The shortlist: each distinct cut's cost in the form zᵀ(D − A)z / zᵀDz expands to, cut(S) · (1/vol(S) + 1/vol(S̄))
    # with cut(S) the affinity from S to the rest: sums of terms of one sign, so float32 needs no cancellation (the
    # expanded form's sums cancel to about b² times the result). One product for all of them, with torch's BLAS
    # (numpy's would contend with torch's threads).
    above = torch.from_numpy(s).to(y.device, laplacian.dtype)  # (n, P)
    degree = torch.diagonal(degree_matrix)  # (n,)
    volume = degree @ above  # (P,) vol(S)
    cut = -((laplacian @ (1 - above)) * above).sum(dim=0)  # (P,): −L's entries from S to S̄ are A's
    costs = (cut * (1 / volume + 1 / (degree.sum() - volume))).cpu().numpy()  # NaN where a side is empty
    trivial = (distinct == 0) | (distinct == n)
    plain = np.isfinite(costs) & ~trivial
    lowest = costs[plain].min() if plain.any() else np.inf
    decisive = trivial | ~np.isfinite(costs) | (costs <= lowest + TIE)
    total = torch.sum(degree_matrix)  # the reference's `sum_D`
    exact = costs.tolist()
    for p in np.flatnonzero(decisive).tolist():
        exact[p] = reference_cost(torch.from_numpy(s[:, p]).to(y.device), laplacian, degree_matrix, total)
    costs = [exact[p] for p in column.tolist()]  # (T,) per threshold, in order
    nan = [j for j, c in enumerate(costs) if c != c]
    if nan and nan[0] == 0:  # Python's `min` keeps a NaN it starts with
        return torch.from_numpy(sides[:, 0]).to(y.device), float("nan")
    cost = min(costs)
    best = nan[0] if nan else min(range(len(costs)), key=costs.__getitem__)  # first minimum, as np.argmin
    return torch.from_numpy(sides[:, best]).to(y.device), cost


def recursive_ncut(tokens: torch.Tensor, *, tau: float, alpha: float) -> list[torch.Tensor]:
    """Accepted cuts of the recursive normalised cut (reference `recursive_ncut`), in the reference's order.

    Args:
        tokens: (C, N) float32, L2-normalised columns.
        tau: a cut is accepted (and both halves explored) while its cost is below `tau`.
        alpha: affinity exponent.

    Returns:
        The accepted masks, each (N,) bool over all tokens, in the order the reference appends them.
    """
    n = tokens.shape[1]
    affinity = affinity_matrix(tokens, alpha)  # (N, N)
    if not torch.isfinite(affinity).all():  # constant tokens: no cut is defined
        return []
    keep = ~natural_zeros(affinity)  # (N,) tokens that survive below the root
    accepted: list[torch.Tensor] = []
    stack = [torch.arange(n, device=affinity.device)]  # index sets still to split; the root keeps every token
    root = True
    while stack:
        checkpoint()  # a caller's Stop ends the cut between nodes (`cancel.cancellable`)
        region = stack.pop()  # (n,) token indices, ascending
        if len(region) < 2:
            continue
        sub = affinity[region[:, None], region]  # (n, n), one gather
        degree = sub.sum(dim=1)  # (n,)
        if not bool((degree > 0).all()):  # the reference has no cut here (it errors)
            continue
        degree_matrix = torch.diag(degree)  # (n, n), the reference's D
        laplacian = degree_matrix - sub  # (n, n), its L = D − A
        y = fiedler_vector(laplacian, degree)
        if y is None:  # LAPACK failure: no cut either
            continue
        side, cost = best_bipartition(y, laplacian, degree_matrix)
        if not cost < tau:  # strict, as the reference; NaN stops
            continue
        above, rest = region[side], region[~side]
        if len(rest) == 0:  # everything on one side: the reference loops here; we end the branch
            if root and not keep.all():  # except at the root, whose child drops the zero rows first
                stack.append(region[keep[region]])
            root = False
            continue
        root = False
        mask = torch.zeros(n, dtype=torch.bool, device=affinity.device)
        mask[above] = True
        accepted.append(mask)
        # Pre-order, as the reference: the half above the threshold first (pushed last), then the rest.
        stack.append(rest[keep[rest]])
        stack.append(above[keep[above]])
    return accepted


def assemble_clusters(masks: list[torch.Tensor], n: int) -> torch.Tensor:
    """One cluster id per token: tokens in the same accepted masks share an id (reference `assemble_clusters`).

    The reference adds each mask times a growing float32 `max_value` and numbers the distinct sums in ascending
    order, so a token's sum orders tokens by membership, the latest mask most significant. We sort those
    membership vectors directly: the same ids wherever the reference's float32 sums are exact, and still exact where
    they are not (past 2²⁴ they collide, past 2¹²⁸ they overflow).

    Returns:
        (n,) int64 ids 0..K-1 on the masks' device (all zeros without masks).
    """
    if not masks:
        return torch.zeros(n, dtype=torch.int64)
    membership = torch.stack(masks[::-1], dim=1).cpu().numpy()  # (n, M), latest mask first
    # Each row packed into bytes (first mask in the most significant bit) and compared as one byte string: the same
    # lexicographic order as `np.unique(membership, axis=0)`, about 100x faster with hundreds of masks.
    packed = np.packbits(membership, axis=1)  # (n, ceil(M / 8)) uint8
    rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).reshape(-1)
    _, ids = np.unique(rows, return_inverse=True)
    return torch.from_numpy(ids.reshape(-1).astype(np.int64)).to(masks[0].device)
