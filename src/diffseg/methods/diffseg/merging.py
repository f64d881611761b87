"""Step 4 of the method: iterative attention merging by symmetric KL divergence.

Paper §3.2 "Iterative Attention Merging"; reference `DiffSeg.generate_sampling_grid`, `KL`, `mask_merge` and
`generate_masks`. Maps are rows of a (N, D) tensor: N attention maps over D = S² key positions, each a distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def anchor_grid(num_points: int, grid: int | tuple[int, int] = 64) -> torch.Tensor:
    """Anchor positions of the first merge iteration, exactly as the reference places them.

    Reference `generate_sampling_grid`: `step = 63 // (M - 1)`, `start = (63 - step * (M - 1)) // 2`, coordinates
    `start + k * step`, meshgrid with `indexing="ij"` (row-major). On a grid other than 64×64, 63 becomes side − 1.
    A rectangular h×w grid (native aspect ratio) applies the same rule to each axis with its own side: M anchors
    along each axis that has at least M positions, evenly spaced; an axis shorter than M (an elongated image) gets
    one anchor per position; M beyond the longer axis does not fit. On a square grid of side ≥ M that is
    exactly the reference's grid.

    Returns:
        (Mh·Mw, 2) int64 (row, column) pairs, row-major.
    """
    h, w = (grid, grid) if isinstance(grid, int) else grid
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"`num_points` (the anchor grid) must be an integer of at least 2 but is {num_points!r}.")
    if num_points > max(h, w):
        raise ValueError(
            f"`num_points` {num_points} does not fit the {h}×{w} attention grid: pass at most {max(h, w)}."
        )

    def axis(side: int) -> torch.Tensor:
        points = min(num_points, side)
        if points == 1:
            return torch.zeros(1, dtype=torch.int64)
        step = (side - 1) // (points - 1)
        start = (side - 1 - step * (points - 1)) // 2
        return start + step * torch.arange(points)

    rows, cols = torch.meshgrid(axis(h), axis(w), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    # Guard log(0): the reference computes in float16, where an underflowed 0 gives NaN and silently drops the
    # pair. Clamping to the smallest normal float keeps 0·log 0 = 0 and a large, finite penalty for p > 0 = q.
    return p.clamp_min(torch.finfo(p.dtype).tiny).log_()


def symmetric_kl(
    p: torch.Tensor, q: torch.Tensor, log_p: torch.Tensor | None = None, log_q: torch.Tensor | None = None
) -> torch.Tensor:
    """Pairwise symmetric KL divergence, `0.5 * Σ (p − q)(log p − log q)` (reference `KL`).

    Expanded as `0.5 * (Σ p log p + Σ q log q − p·log qᵀ − log p·qᵀ)`, so the cross terms are one matrix product
    instead of an (Np, Nq, D) broadcast.

    Args:
        p: (Np, D) distributions; q: (Nq, D) distributions, same dtype and device.
        log_p, log_q: their logs, if already computed.

    Returns:
        (Np, Nq) divergences, symmetric in its arguments and 0 on identical rows.
    """
    log_p = _safe_log(p) if log_p is None else log_p
    log_q = _safe_log(q) if log_q is None else log_q
    entropy_p = torch.einsum("nd,nd->n", p, log_p)  # (Np,)  Σ p log p, without a (Np, D) temporary
    entropy_q = torch.einsum("nd,nd->n", q, log_q)  # (Nq,)  Σ q log q
    # (Np, Nq)  p·log qᵀ + log p·qᵀ, computed as its transpose: with the many maps (Nq) as the product's rows and
    # the few anchors (Np) as its columns, the CPU's BLAS runs about 25 % faster (benchmarks/segment.py).
    cross = torch.addmm(log_q @ p.T, q, log_p.T).T
    return 0.5 * (entropy_p[:, None] + entropy_q[None, :] - cross)


def float16_underflow(maps: torch.Tensor) -> torch.Tensor:
    """(N,) bool: maps with a value that float16 rounds to 0 (at most 2⁻²⁵ ≈ 3e-8).

    Reference detail: `mask_merge` casts the first iteration to float16, where such a value makes log(0) = -inf and
    the map's KL to anything NaN, so `KL < τ` is False for it, even against itself.
    """
    # float16 rounds to nearest, ties to even: a non-negative value becomes 0 exactly when it is at most 2⁻²⁵.
    return maps.amin(dim=1) <= 2.0**-25  # one reduction, no (N, D) temporary


# Maps whose logarithms are taken at once in `anchor_kl` (elements): 2**23 float32 = 32 MiB, a block of rows.
_LOG_BLOCK = 1 << 23


def anchor_kl(maps: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(A, N) symmetric KL of the anchors' maps to every map (`symmetric_kl`), the maps' logarithms taken a block of
    rows at a time: no second (N, D) tensor beside the maps (1 GiB at 128² tokens), whatever the grid.

    Args:
        maps: (N, D); anchors: (A,) row indices into `maps`.
    """
    p = maps[anchors]  # (A, D)
    log_p = _safe_log(p)
    kl = torch.empty(len(anchors), len(maps), dtype=maps.dtype, device=maps.device)  # (A, N)
    rows = max(1, _LOG_BLOCK // maps.shape[1])
    for start in range(0, len(maps), rows):
        q = maps[start : start + rows]
        kl[:, start : start + rows] = symmetric_kl(p, q, log_p, _safe_log(q))
    return kl


def merge_from_anchors(
    maps: torch.Tensor, anchors: torch.Tensor, threshold: float, reference_float16: bool = True
) -> torch.Tensor:
    """First merge iteration (reference `mask_merge`, `iter == 0`).

    Every map whose symmetric KL to an anchor map is below `threshold` is averaged into that anchor's proposal.
    With `reference_float16`, maps that underflow float16 behave as in the reference (see `float16_underflow`):
    they join no proposal, and an anchor whose map underflows gives none (the reference's NaN proposal, which its
    next iteration drops). If every anchor underflows (where the reference fails), all maps are kept.

    Args:
        maps: (N, D) all attention maps (N = D = S² in the method); anchors: (A,) row indices into `maps`.

    Returns:
        (A', D) proposals, in anchor order; A' = A unless anchors were dropped.
    """
    members = anchor_kl(maps, anchors) < threshold  # (A, N)
    if reference_float16:
        valid = ~float16_underflow(maps)  # (N,)
        if valid[anchors].any():
            members = (members & valid[None, :])[valid[anchors]]  # (A', N)
    members = members.to(maps.dtype)
    # Reference: `matmul(kl_bin, attns) / reduce_sum(kl_bin)`; an anchor is always its own member (KL = 0).
    return (members @ maps) / members.sum(dim=1, keepdim=True).clamp_min(1)  # (A', D)


def merge_proposals(proposals: torch.Tensor, threshold: float) -> torch.Tensor:
    """A later merge iteration (reference `mask_merge`, `iter > 0`), in the reference's greedy order.

    Walk the proposals in order; each one not yet marked is replaced by the mean of *all* proposals within
    `threshold` of it (marked or not, itself included), and those are marked. A proposal may so feed more than one
    mean; the result has one row per unmarked proposal met, in walk order.

    Args:
        proposals: (K, D) distributions.

    Returns:
        (K', D) merged proposals, K' <= K.
    """
    within = symmetric_kl(proposals, proposals) < threshold  # (K, K)
    means = (within.to(proposals.dtype) @ proposals) / within.sum(dim=1, keepdim=True).clamp_min(1)  # (K, D)
    within = within.cpu()
    marked = torch.zeros(len(proposals), dtype=torch.bool)
    keep = []
    for i in range(len(proposals)):  # the greedy walk is sequential by definition; K <= A booleans, no tensors
        if marked[i]:
            continue
        marked[i] = True
        if within[i].any():
            marked |= within[i]
            keep.append(i)
    return means[keep]


def merge(
    maps: torch.Tensor,
    anchors: torch.Tensor,
    thresholds: Sequence[float],
    reference_float16: bool = True,
    later_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """All merge iterations (reference `generate_masks`): anchors first, then greedy merging of proposals.

    Args:
        maps: (N, D) attention maps; anchors: (A,) row indices; thresholds: one per iteration.
        reference_float16: treat maps that underflow float16 as the reference does (see `merge_from_anchors`).
        later_dtype: precision of iterations after the first (the reference runs them in float64).

    Returns:
        (K, D) final proposals.
    """
    proposals = merge_from_anchors(maps, anchors, thresholds[0], reference_float16)
    proposals = proposals.to(later_dtype)
    for threshold in thresholds[1:]:
        proposals = merge_proposals(proposals, threshold)
    return proposals


def refine_kmeans(maps: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """Optional K-means refinement (reference `generate_masks`, `self.refine`).

    scikit-learn's K-means over all maps, initialised at the proposals (one run), then each proposal is replaced by
    the mean of its cluster. Clusters left empty are dropped.

    Args:
        maps: (N, D); proposals: (K, D).

    Returns:
        (K', D) refined proposals, float64, K' <= K.
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as error:  # optional dependency
        raise ImportError(
            "K-means refinement needs scikit-learn: pip install 'diffseg[refine]' (or scikit-learn)."
        ) from error
    x = maps.detach().cpu().double().numpy()
    init = proposals.detach().cpu().double().numpy()
    clusters = KMeans(n_clusters=len(init), init=init, n_init=1).fit(x).labels_
    clusters = torch.from_numpy(clusters)
    x = torch.from_numpy(x)
    present = torch.unique(clusters)  # sorted cluster ids, as the reference's `range(len(set(clusters)))`
    return torch.stack([x[clusters == c].mean(0) for c in present]).to(proposals.device)
