"""The method table: one row per method (`spec.Method`), each declared in its own folder (`<name>/method.py`). The
pipeline, the runner and every front end (CLI options, the demo's controls, the evaluation) read it.

A new method is a folder of `methods/` holding its pure function on tensors and its row, its settings in
`diffseg.config`, and one line below; a method made elsewhere (a plugin, a notebook) joins with `register`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..backbones.types import Backbone
from ..bundle import Bundle
from .concepts.method import METHOD as CONCEPTS
from .diffcut.method import METHOD as DIFFCUT
from .diffseg.method import METHOD as DIFFSEG
from .seg4diff.method import METHOD as SEG4DIFF
from .spec import Control, Method

METHODS: dict[str, Method] = {m.name: m for m in (DIFFSEG, DIFFCUT, SEG4DIFF, CONCEPTS)}


def register(method: Method) -> Method:
    """Add a method to the table (every front end offers it from then on, in this process; a Ray job hands its row
    to its workers). Its bundle type records its name (`bundle.Saved`), so its files load back as its bundles.

    Raises:
        ValueError: another method has its name, or a shared option would be read two ways.
    """
    if METHODS.get(method.name, method) is not method:
        raise ValueError(f"A method called {method.name!r} is registered already.")
    if method.bundle.method != method.name:
        raise ValueError(f"{method.bundle.__name__}.method is {method.bundle.method!r}, not {method.name!r}.")
    for control in method.controls:
        for other in controls():
            if other.option == control.option and other.cli and control.cli and other.parse is not control.parse:
                raise ValueError(f"{control.option} is read with another parse by a registered method.")
    METHODS[method.name] = method
    return method


def controls() -> list[Control]:
    """Every method's controls, in the table's order."""
    return [control for method in METHODS.values() for control in method.controls]


def method_named(name: str) -> Method:
    """The method called `name`; a ValueError listing the others if there is none."""
    if name not in METHODS:
        raise ValueError(f"`method` must be one of {tuple(METHODS)} but is {name!r}.")
    return METHODS[name]


def check_runs_on(method: Method, backbone: Backbone) -> None:
    """A ValueError naming the methods that do run on `backbone`, where `method` does not."""
    if not method.runs_on(backbone):
        others = ", ".join(f"--method {m.name}" for m in METHODS.values() if m.runs_on(backbone))
        lacking = ", ".join(sorted(method.needs - backbone.capabilities))
        raise ValueError(
            f"`--method {method.name}` reads {lacking}, which {backbone.name} does not have. Use {others} with it, "
            "or another checkpoint."
        )


def concept_method() -> Method:
    """The method whose words are what it maps: it also names other methods' segments (`bundle.named_by`)."""
    return next(method for method in METHODS.values() if method.concepts)


def method_of(thing: Bundle | Sequence) -> Method:
    """The method a bundle or a settings object belongs to."""
    for method in METHODS.values():
        if isinstance(thing, (method.bundle, method.config)):
            return method
    raise ValueError(f"{type(thing).__name__} belongs to no method; expected a bundle or a method's settings.")
