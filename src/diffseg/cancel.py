"""Cooperative cancelling of the cheap step: a long computation checks, at points where stopping loses nothing, whether
whoever started it still wants it.

The demo's Stop must end a DiffCut re-cut of hundreds of segments (seconds), not only an encode. Python cannot stop a
thread, so the work stops itself: the caller runs it inside `cancellable(stop)`, and the work calls `checkpoint()`
between units (a node of the cut tree). The check is carried by a context variable, so concurrent sessions, each in
its own thread, never see each other's Stop, and code that runs outside `cancellable` pays one lookup per unit.

    with cancellable(lambda: session.stops != stops):
        result = pipeline.segment(bundle, config)   # raises Cancelled at the next checkpoint once stop() is true
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_STOP: ContextVar[Callable[[], bool] | None] = ContextVar("diffseg_stop", default=None)


class Cancelled(Exception):
    """The work was stopped by whoever started it; nothing it would have returned exists."""


@contextmanager
def cancellable(stop: Callable[[], bool]) -> Iterator[None]:
    """Run the block's work so that its `checkpoint()`s raise `Cancelled` once `stop()` is true."""
    token = _STOP.set(stop)
    try:
        yield
    finally:
        _STOP.reset(token)


def checkpoint() -> None:
    """A point where the running work may stop: raises `Cancelled` if its caller's `stop()` is true."""
    stop = _STOP.get()
    if stop is not None and stop():
        raise Cancelled("Stopped; the page shows its previous result.")
