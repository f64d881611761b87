"""A literal, slow transcription of DiffCut's reference steps 2-3, written from its description, for the tests.

It keeps the reference's mechanics that `methods.diffcut.ncut` replaces: recursion with a full-size "painting" of
explored tokens, the full N×N affinity re-masked at every call, rows with a zero dropped with set arithmetic, 100
separate matrix-vector cut costs, clusters assembled with a growing float32 `max_value`, features upsampled before
the similarity. It runs on the CPU in float32 and, like the reference, may recurse without end on degenerate inputs
(`max_depth` turns that into `RecursionError`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _cut(y, A, D, k=100):
    lo, hi = y.min() * 0.99, y.max() * 0.99
    candidates = [1.0 * (y > t) for t in torch.linspace(lo, hi, k)]
    L = D - A
    total = torch.sum(D)
    degrees = torch.diag(D)
    costs = []
    for part in candidates:
        x = 2 * part - 1
        share = torch.sum(degrees * (x > 0)) / total
        b = share / (1 - share)
        z = (1 + x) - b * (1 - x)
        costs.append(((z @ L @ z) / (z @ D @ z)).item())
    return candidates[int(np.argmin(costs))], min(costs)


def naive_ncut(feats, tau, dims, alpha=10, max_depth=200):
    """feats: (C, N). Returns the accepted (h, w) float masks in order."""
    out = []

    def visit(affinity, painting, mask, level):
        if level > max_depth:
            raise RecursionError("naive_ncut went deeper than max_depth")
        painting = painting + mask.unsqueeze(0)
        painting[painting > 0] = 1
        painting[painting <= 0] = 0
        flat = painting.reshape(1, -1)
        affinity = affinity * (1 - flat.T @ flat)
        n = affinity.shape[0]
        if level == 0:
            keep = list(range(n))
        else:
            zero_rows = set(torch.unique(torch.where(affinity == 0)[0]).tolist())
            keep = sorted(set(range(n)) - zero_rows)
        A = affinity[:, keep][keep, :]
        D = torch.diag(torch.sum(A, dim=1))
        if A.shape[0] <= 1:
            return
        inv = torch.diag(1 / torch.diag(D) ** 0.5)
        _, vecs = torch.linalg.eigh(inv @ (D - A) @ inv)
        y = inv @ vecs[:, 1]
        y = y * torch.sign(y[torch.argmax(torch.abs(y))])
        part, cost = _cut(y, A, D)
        full = torch.zeros(1, n)
        full[:, keep] = part
        full = full.reshape(dims)
        if cost < tau:
            out.append(full)
            visit(affinity, painting, 1 - full, level + 1)
            visit(affinity, painting, full, level + 1)

    feats = F.normalize(feats, p=2, dim=0)
    affinity = torch.t(feats) @ feats
    affinity = ((affinity - affinity.min()) / (affinity.max() - affinity.min())) ** alpha
    visit(affinity, torch.zeros(dims), torch.zeros(dims), 0)
    return out


def naive_segment_features(tokens, h, w, tau=0.5, alpha=10, size=(128, 128), exact=False):
    """tokens: (h·w, C). Returns the (H, W) int label map as the reference computes it; with `exact`, the clusters
    are assembled with Python integers instead of float32 (the same ids wherever float32 is exact)."""
    tokens = torch.as_tensor(tokens, dtype=torch.float32)
    feats = F.normalize(tokens.reshape(1, h, w, -1).permute(0, 3, 1, 2), dim=1)  # (1, C, h, w)
    c = feats.shape[1]
    clusters = naive_ncut(feats.reshape(c, h * w), tau, (h, w), alpha)
    if not clusters:
        clusters = [torch.zeros(h, w)]
    if exact:
        sums, top = [0] * (h * w), 1
        for m in clusters:
            sums = [v + top * int(b) for v, b in zip(sums, m.reshape(-1).tolist())]
            top = max(sums) + 1
        order = {v: i for i, v in enumerate(sorted(set(sums)))}
        total = torch.tensor([order[v] for v in sums], dtype=torch.float64).reshape(h, w)
    else:
        total, top = torch.zeros(h, w), 1
        for m in clusters:
            total += top * m
            top = total.max() + 1
    values = torch.unique(total)
    embeddings = torch.stack([(feats[0] * (total == v)).sum((1, 2)) / ((total == v).sum() + 1e-8) for v in values])
    up = F.interpolate(feats, size=size, mode="bilinear")  # (1, C, H, W)
    scores = up.reshape(c, -1).T @ embeddings.T  # (H·W, K)
    return scores.argmax(dim=1).reshape(size).numpy()


def naive_pamr(image, masks, iterations=10, dilations=(1, 2, 4, 8)):
    """PAMR as shift convolutions (the reference's `LocalAffinity*` kernels): image (B, 3, H, W), masks (B, K, H, W)."""

    def kernels(centre: bool, neighbour: float, with_centre: bool):
        spots = [(i, j) for i in range(3) for j in range(3) if with_centre or (i, j) != (1, 1)]
        weight = torch.zeros(len(spots), 1, 3, 3)
        for n, (i, j) in enumerate(spots):
            if centre:
                weight[n, 0, 1, 1] = 1
            weight[n, 0, i, j] += neighbour
        return weight

    def shifted(x, weight):
        b, k, hh, ww = x.shape
        x = x.reshape(b * k, 1, hh, ww)
        out = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), weight, dilation=d) for d in dilations]
        return torch.cat(out, 1).reshape(b, k, -1, hh, ww)

    std = shifted(image, kernels(False, 1.0, True)).std(2, keepdim=True)
    x = -shifted(image, kernels(True, -1.0, False)).abs() / (1e-8 + 0.1 * std)
    x = x.mean(1, keepdim=True).softmax(2)
    for _ in range(iterations):
        masks = (shifted(masks, kernels(False, 1.0, False)) * x).sum(2)
    return masks
