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
- The 100 candidate thresholds' cuts are nested, so each distinct cut is scored once, all from one histogram
  (`cut_costs`), instead of 100 matrix-vector products; only the candidates that can decide are scored again with
  the reference's float32 arithmetic (`best_bipartition`).
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
    eigenvector v taken with LAPACK, y = D^-½ v, then multiplied by the sign of its largest-magnitude entry. These
    steps stay in torch: numpy's float32 square root is not torch's to the bit on every CPU.

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
    values = y.cpu().numpy()
    sign = values[np.argmax(np.abs(values))]  # the first largest magnitude, as torch.argmax
    return y if sign > 0 else -y if sign < 0 else y * 0


def rounding_bound(n: int) -> float:
    """How far the reference's float32 cost of a cut of n tokens can lie from its exact value: zᵀ(D − A)z and
    zᵀDz are sums of n products (each off by at most γₙ ≈ n·2⁻²⁴ of Σ|terms|, and |z|ᵀ|D − A||z| ≤ 2 zᵀDz), D's own
    row sums add γₙ more, and b's rounding moves the cost only to second order (the cost is stationary in b at
    b = vol(S)/vol(S̄)): 8·n·2⁻²⁴ covers it, about 5e-4 at 1,024 tokens."""
    return 8 * n * 2.0**-24


def tie(n: int) -> float:
    """Candidates whose exact cost lies this close to the lowest (or to τ) are scored with the reference's own
    float32 arithmetic before a decision: three times `rounding_bound`, so the two orders cannot swap or tie, and at
    least 1e-4."""
    return max(1e-4, 3 * rounding_bound(n))


def reference_cost(side: torch.Tensor, laplacian: torch.Tensor, degree: torch.Tensor, total) -> float:
    """One candidate's cost exactly as the reference's `get_bipartition` computes it, operation for operation.

    `k = sum(diag_D · (x > 0)) / sum(D)`, with `sum(D)` (`total`) summed over the full n×n diagonal matrix: in
    float32 that sum rounds differently from the sum of the diagonal, so a cut that keeps every token has k ≠ 1,
    a finite (near-zero) cost and is a real candidate, where k = 1 exactly would give NaN. The reference's
    `yᵀ D` with its dense diagonal D is the elementwise product z·d (every other term of each sum is an exact 0).
    """
    x = 2 * side.to(laplacian.dtype) - 1  # the reference's `2 * (1. * (y > thresh)) - 1`
    k = torch.sum(degree * (x > 0)) / total
    b = k / (1 - k)
    z = (1 + x) - b * (1 - x)
    return ((z @ laplacian @ z) / ((z * degree) @ z)).item()


def cut_costs(laplacian: np.ndarray, degree: np.ndarray, order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Normalised-cut costs, in float64, of the cuts S = the first m tokens of `order`, for each m in `sizes`.

    cost = zᵀ(D − A)z / zᵀDz at b = vol(S)/vol(S̄), which is cut(S) · (1/vol(S) + 1/vol(S̄)), cut(S) the affinity from
    S to the rest. For every prefix at once: cut(S) = Σ_{i∈S} Σ_{j≠i} A_ij − Σ_{i≠j∈S} A_ij, and a pair lies inside
    the first m tokens once m exceeds both its ranks, so one weighted histogram over the pairs' larger rank gives all
    the inner sums. float64 keeps the difference's error near 1e-16 of vol(S), far below any decision's margin
    (`tie`); no BLAS call (numpy's threads would contend with torch's).

    Args:
        laplacian: (n, n) float32, the region's D − A (its diagonal is not read). degree: (n,) float32, D's diagonal.
        order: (n,) token indices. sizes: (P,) prefix lengths, each 1..n-1.
    """
    n = len(order)
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n)
    affinity = -laplacian.astype(np.float64)  # (n, n) A off the diagonal
    np.fill_diagonal(affinity, 0)
    inner = np.cumsum(np.bincount(np.maximum.outer(rank, rank).ravel(), weights=affinity.ravel(), minlength=n))
    outgoing = np.cumsum(affinity.sum(axis=1)[order])  # (n,) Σ_{i ∈ first m} Σ_j A_ij at m - 1
    volume = np.cumsum(degree[order].astype(np.float64))  # (n,) vol(first m) at m - 1
    inside = volume[sizes - 1]
    cut = outgoing[sizes - 1] - inner[sizes - 1]
    return cut * (1 / inside + 1 / (volume[-1] - inside))  # each side holds a token of degree > 0


def best_bipartition(
    y: torch.Tensor, laplacian: torch.Tensor, degree: torch.Tensor, tau: float | None = None
) -> tuple[np.ndarray, float]:
    """The lowest normalised-cut cost over the reference's 100 thresholds (reference `get_bipartition`).

    For a threshold, x = ±1 by side, k = vol(x > 0) / vol(all), b = k / (1 − k), z = (1 + x) − b (1 − x), cost
    = zᵀ (D − A) z / zᵀ D z. The thresholds' sides are nested (a higher threshold keeps fewer tokens), so the token
    count names a partition: each distinct one is scored once, exactly (`cut_costs`). Only the few that can decide
    the outcome (within `tie` of the lowest, trivial or NaN) are then scored with the reference's float32 arithmetic
    (`reference_cost`). As the reference picks with Python's `min` and `np.argmin`, a NaN first cost is the minimum
    and any NaN is the arg-minimum.

    With `tau`, the caller needs only whether the cost is below it: a lowest cut that no other comes within `tie` of
    and that lies farther than `tie` from `tau` is then decided without the reference's arithmetic, and its exact
    cost is returned.

    Args:
        y: (n,) the Fiedler vector. laplacian: (n, n) the region's D − A. degree: (n,) D's diagonal, all > 0.

    Returns:
        (side, cost): (n,) bool array, the tokens above the chosen threshold, and its cost (NaN when undefined).
    """
    n = len(y)
    values = y.cpu().numpy()
    order = np.argsort(values, kind="stable")  # ascending
    # The reference's `y.min() * 0.99` and `y.max() * 0.99` in float32, then its `torch.linspace` (given the same
    # float32 values as Python floats, so no tensor arithmetic per node).
    span = np.float32(THRESHOLD_SPAN)
    low, high = float(values[order[0]] * span), float(values[order[-1]] * span)
    thresholds = torch.linspace(low, high, NUM_THRESHOLDS).numpy()  # (T,) float32
    counts = n - np.searchsorted(values[order], thresholds, side="right")  # (T,) tokens above, non-increasing
    new = np.empty(NUM_THRESHOLDS, dtype=bool)  # the first threshold of each partition
    new[0], new[1:] = True, counts[1:] != counts[:-1]
    first = np.flatnonzero(new)  # (P,)
    distinct = counts[first]  # (P,) tokens above
    trivial = (distinct == 0) | (distinct == n)
    costs = np.full(len(first), np.nan)
    costs[~trivial] = cut_costs(laplacian.cpu().numpy(), degree.cpu().numpy(), order[::-1], distinct[~trivial])
    finite = np.isfinite(costs)  # not trivial (NaN there), nor a side of no volume
    lowest = costs[finite].min() if finite.any() else np.inf
    near = tie(n)
    decisive = ~finite | (costs <= lowest + near)

    if tau is not None and finite.all() and decisive.sum() == 1 and abs(lowest - tau) > near:
        return values > thresholds[first[np.argmin(costs)]], float(lowest)
    total = torch.sum(torch.diag(degree))  # the reference's `sum_D`, over its full n×n D
    for p in np.flatnonzero(decisive):
        side = torch.from_numpy(values > thresholds[first[p]]).to(y.device)
        costs[p] = reference_cost(side, laplacian, degree, total)
    per_threshold = costs[np.cumsum(new) - 1]  # (T,) in order
    nan = np.flatnonzero(np.isnan(per_threshold))
    if len(nan) and nan[0] == 0:  # Python's `min` keeps a NaN it starts with
        return values > thresholds[0], float("nan")
    cost = float(np.nanmin(per_threshold))  # Python's `min` passes over a later NaN
    best = nan[0] if len(nan) else int(np.argmin(per_threshold))  # np.argmin: the first NaN, else the first minimum
    return values > thresholds[best], cost


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
    device = affinity.device
    keep = ~natural_zeros(affinity).cpu().numpy()  # (N,) tokens that survive below the root
    accepted: list[np.ndarray] = []  # each accepted cut's tokens above its threshold
    stack = [np.arange(n)]  # index sets still to split, ascending; the root keeps every token
    root = True
    while stack:
        checkpoint()  # a caller's Stop ends the cut between nodes (`cancel.cancellable`)
        region = stack.pop()  # (n,) token indices, ascending
        if len(region) < 2:
            continue
        index = torch.from_numpy(region).to(device)
        sub = affinity.index_select(0, index).index_select(1, index)  # (n, n)
        degree = sub.sum(dim=1)  # (n,) the diagonal of the reference's D
        if not (degree.cpu().numpy() > 0).all():  # the reference has no cut here (it errors)
            continue
        laplacian = torch.diag(degree) - sub  # (n, n), its L = D − A
        y = fiedler_vector(laplacian, degree)
        if y is None:  # LAPACK failure: no cut either
            continue
        side, cost = best_bipartition(y, laplacian, degree, tau)
        if not cost < tau:  # strict, as the reference; NaN stops
            continue
        above, rest = region[side], region[~side]
        if len(rest) == 0:  # everything on one side: the reference loops here; we end the branch
            if root and not keep.all():  # except at the root, whose child drops the zero rows first
                stack.append(region[keep[region]])
            root = False
            continue
        root = False
        accepted.append(above)
        # Pre-order, as the reference: the half above the threshold first (pushed last), then the rest.
        stack.append(rest[keep[rest]])
        stack.append(above[keep[above]])
    masks = np.zeros((len(accepted), n), dtype=bool)
    for mask, above in zip(masks, accepted):
        mask[above] = True
    return list(torch.from_numpy(masks).to(device))


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
