"""Settings written as text (command-line options, the demo's boxes) parsed to the values the configs take.

Each raises `argparse.ArgumentTypeError` (a ValueError's kin) with what it expected: the command line prints it after
the option's name."""

from __future__ import annotations

import argparse
import math

from .grids import grid_key


def thresholds(text: str) -> float | tuple[float, ...]:
    """`1.1` or `1.1,1.0,0.9`: one number, or one per merge iteration."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def grid_weights(text: str) -> dict[str, float]:
    """`R:W,...` or `HxW:W,...`: grids as the library names them (`grids.grid_key`), finite weights ≥ 0."""
    weights = {}
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition(":"))
        try:
            grid_key(key)
            weight = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected GRID:WEIGHT pairs such as '64:0.5,32:0.5' or '48x88:1', got {text!r}"
            ) from None
        if not (math.isfinite(weight) and weight >= 0):
            raise argparse.ArgumentTypeError(f"weights must be finite and at least 0, got {value!r} in {text!r}")
        weights[key.lower()] = weight
    if not any(w > 0 for w in weights.values()):
        raise argparse.ArgumentTypeError(f"at least one weight must be above 0, got {text!r}")
    return weights
