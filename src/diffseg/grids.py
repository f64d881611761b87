"""The grid vocabulary every layer shares: an attention or token grid is (h, w) in tokens, named "HxW" or, square, r.

The capture records per grid, the bundle saves per grid, DiffSeg aggregates per grid, the CLI's resolution weights
name grids: they all speak this one module's words.
"""

from __future__ import annotations

import numpy as np

Grid = tuple[int, int]  # (height, width) of an attention grid, in tokens


def grid_key(key) -> Grid:
    """(h, w) from a grid's name: (h, w), "HxW", or an int r for the square r×r grid (the reference's keys)."""
    if isinstance(key, str):
        parts = key.lower().split("x")
        key = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) and all(p.isdigit() for p in parts) else key
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        key = (int(key), int(key))
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(v, (int, np.integer)) and v > 0 for v in key)):
        raise ValueError(f"An attention grid is named by a side r, 'HxW' or (h, w) but got {key!r}.")
    return int(key[0]), int(key[1])


class GridDict(dict):
    """A dict keyed by grids (h, w) whose look-ups also take a side r (for r×r) or "HxW", so that
    `bundle.attention[64]` keeps working for square grids."""

    def __getitem__(self, key):
        return super().__getitem__(grid_key(key))

    def __contains__(self, key) -> bool:
        try:
            return super().__contains__(grid_key(key))
        except ValueError:
            return False

    def get(self, key, default=None):
        return self[key] if key in self else default


def grid_name(grid: Grid) -> str:
    """ "64" for a square grid (the reference's name), else "48x88" (height × width)."""
    h, w = grid
    return str(h) if h == w else f"{h}x{w}"


def by_size(grids) -> list[Grid]:
    """Grids finest first."""
    return sorted(grids, key=lambda g: (g[0] * g[1], g), reverse=True)
