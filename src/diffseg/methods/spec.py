"""What a method is, as the rest of the library sees it: one `Method` row, with its `Control`s.

A method's folder declares its row (`methods/<name>/method.py`); `registry` collects the rows. Everything a front end
shows of a method comes from the row: the CLI's options, help and "option not read by this method" notes
(`cli.options`), the demo's control group, reset and wiring (`app.layout`, `app.demo`), the bundle a file holds
(`bundle.load_bundle`, by the method it records).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backbones.types import Backbone
from ..config import EncodeConfig

FLAG = None  # a `Control.parse` of None: a command-line flag, given = the field's default flipped
GRID_WEIGHTS = "grid weights"  # a `Control.widget`: the page's preset menu and one slider per attention grid


@dataclass(frozen=True)
class Control:
    """One setting of a method's segment step, declared once: its command-line option, its demo control, the note
    when it is given to another method, and the config field it sets. The default is the config's own.

    Attributes:
        field: the field of the method's config it sets.
        label: the demo's label.
        help: one sentence for the CLI's help and the demo's info line.
        span: the demo's slider (low, high, step), integers for an integer field; None: a checkbox (a bool field).
        parse: command-line text -> value (its errors are the parser's); `FLAG`: a flag flipping the default.
        option: the command-line option (default: from the field, `num_points` -> `--num-points`). Methods that
            declare the same option share it (and its `parse`); each reads it into its own config.
        name: the demo's element id (default: the option's name).
        choices: a valued option's choices.
        exclusive: options sharing this mark are mutually exclusive on the command line.
        cli, demo: whether the command line / the demo offers it.
        widget: `GRID_WEIGHTS` for the page's per-grid weights; "" for a slider or a checkbox.
        default_for: the demo's start on a checkpoint, where the config's default (None) depends on it.
        limit: the slider's largest value on a checkpoint (within `span`).
        bound: the largest value a bundle allows, or None (the demo lowers the control to it, and says so).
        requires: (module, message): a module the setting needs when set off its default, and how to install it.
        note: the demo's info line after a result (e.g. what the setting would cost on it).
        default_text: the CLI's words for a default the config leaves to the checkpoint (None).
    """

    field: str
    label: str
    help: str
    span: tuple[float, float, float] | None = None
    parse: Callable[[str], Any] | None = FLAG
    option: str = ""
    name: str = ""
    choices: tuple[str, ...] = ()
    exclusive: str = ""
    cli: bool = True
    demo: bool = True
    widget: str = ""
    default_for: Callable[[Backbone], Any] | None = None
    limit: Callable[[Backbone], float] | None = None
    bound: Callable[[Any], int | None] | None = None
    requires: tuple[str, str] | None = None
    note: Callable[[np.ndarray], str] | None = None
    default_text: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "option", self.option or "--" + self.field.replace("_", "-"))
        object.__setattr__(self, "name", self.name or self.option.lstrip("-"))

    @property
    def dest(self) -> str:
        """The option's attribute on the parsed command line (`--num-points` -> `num_points`)."""
        return self.option.lstrip("-").replace("-", "_")

    @property
    def flag(self) -> bool:
        return self.parse is FLAG and not self.choices

    @property
    def integer(self) -> bool:
        """Whether the slider gives integers (its span is)."""
        return self.span is not None and all(isinstance(v, int) for v in self.span)

    def check_requirement(self) -> None:
        """An ImportError with the install hint, where the setting needs a module that is not installed."""
        if self.requires is not None:
            import importlib

            module, message = self.requires
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ImportError(message) from error


@dataclass(frozen=True)
class Method:
    """One segmentation method as the rest of the library sees it.

    Attributes:
        name: its key ("diffseg"), as the CLI and the bundle's file name it.
        title: its name in help texts and on the page ("DiffSeg").
        summary: what it does, in a few words, for help texts and the demo.
        source: its paper (help texts).
        config: the frozen dataclass of its segment settings (validated where it is made).
        bundle: the type its encode step returns, one per image (`bundle.Saved`; it records the method's name).
        encode_defaults: its paper's or reference's encode settings (`config.ENCODE_DEFAULTS`).
        encode: (pipeline, pixels, images, settings, vocabulary, segment_from) -> one bundle per image.
        segment: (bundle, config, output_size, image at output_size) -> (H, W) int32 ids 0..K-1.
        probabilities: (bundle, output_size) -> ((K, H, W) float32 summing to 1 over K, the K words), for a method
            whose result is each word's probability at each pixel (its label map their argmax); else None.
        controls: its settings as the front ends offer them (`Control`), in the order they show them.
        needs: what it asks of a backbone (`backbones.types` capabilities, which each backbone declares).
        names_segments: whether naming words can ride along its encode (cross-attention of the same UNet pass).
        concepts: whether its words are what it maps (required), not names for its segments.
        joint_blocks: whether `--blocks` counts a transformer's joint (double-stream) blocks alone.
        preflight: (backbone, encode settings, segment settings, device=, num_points=) -> None, raising a
            ValueError for what the checkpoint cannot take, before it loads (`diffseg.preflight`).
    """

    name: str
    title: str
    summary: str
    source: str
    config: type
    bundle: type
    encode_defaults: EncodeConfig
    encode: Callable[..., list]
    segment: Callable[..., np.ndarray]
    controls: tuple[Control, ...] = ()
    probabilities: Callable[..., tuple] | None = None
    needs: frozenset[str] = frozenset()
    names_segments: bool = False
    concepts: bool = False
    joint_blocks: bool = False
    preflight: Callable[..., None] | None = None

    def runs_on(self, backbone: Backbone) -> bool:
        return self.needs <= backbone.capabilities

    def default(self, control: Control, backbone: Backbone | None = None):
        """A control's default: its config's, or where that depends on the checkpoint, the checkpoint's."""
        value = getattr(self.config(), control.field)
        if value is None and control.default_for is not None and backbone is not None:
            return control.default_for(backbone)
        return value


def per_image(bundle: type, tensors, images, settings: EncodeConfig, pipe, **fields) -> list:
    """One bundle of a one-tensor type per image: its slice of the batch's tensor, in float32 on the CPU."""
    family = pipe.backbone.family
    return [
        bundle(t.float().cpu(), image, settings.timestep, pipe.model, family, **fields)
        for t, image in zip(tensors, images)
    ]
