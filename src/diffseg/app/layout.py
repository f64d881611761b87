"""The demo's page: its components, laid out, with each control's range, label and help; no behaviour.

`build_page` makes the components inside a `gr.Blocks` and returns them by name (`Page`); `demo.Demo` wires them to its
handlers. Initial values come from the config objects, so a default is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib import resources

import gradio as gr

from ..backbones.types import Backbone
from ..config import DEFAULT_METHOD, RESOLUTION_PRESETS
from ..config import preset_weights as preset_grid_weights
from ..methods.registry import METHODS
from ..methods.spec import GRID_WEIGHTS, Control, Method

MAX_GRIDS = 4  # weight sliders, finest grid first; a model with fewer grids (SDXL: 2) shows fewer
CUSTOM = "custom"  # the preset's name once a weight slider is moved by hand
OPACITY = 0.5  # the viewer's default overlay opacity (the CLI's overlay uses the same)
_WEB = resources.files("diffseg.app").joinpath("web")


def asset(name: str) -> str:
    """A static file of the page (`web/`): its script, style sheet or viewer."""
    return _WEB.joinpath(name).read_text(encoding="utf-8")


def examples() -> list[str]:
    """The example photos shipped with the demo."""
    folder = resources.files("diffseg.app").joinpath("examples")
    return sorted(str(p) for p in folder.iterdir() if str(p).endswith(".jpg"))


def presets_for(sides: tuple[int, ...]) -> list[str]:
    """The presets that weigh one of a model's grids (SDXL's two grids leave out "third and fourth")."""
    names = []
    for name in RESOLUTION_PRESETS:
        try:
            preset_grid_weights(name, [(s, s) for s in sides])
            names.append(name)
        except ValueError:
            continue
    return names


def preset_weights(name: str, sides: tuple[int, ...] = (64, 32, 16, 8)) -> list[float]:
    """Slider values (finest first, `MAX_GRIDS` of them) for a named preset on a model whose grids have `sides` at
    its native size, as relative weights with the smallest non-zero one 1: "proportional" is the paper's 8:4:2:1
    (r / Σr once normalised), "two finest" 2:1. Short, exact numbers; sliders past the model's grids are 0."""
    weights = preset_grid_weights(name, [(s, s) for s in sides])
    values = list(sides) if weights is None else list(weights.values())
    smallest = min(v for v in values if v > 0)
    return [round(v / smallest, 6) for v in values] + [0.0] * (MAX_GRIDS - len(values))


@dataclass
class Controls:
    """The page's inputs, so that handlers read settings by name (Gradio passes a set of inputs as one dict): the
    ones every method shares, each method's own (made from its `Control`s), and the per-grid weights."""

    image: gr.Image
    method: gr.Radio
    timestep: gr.Slider
    words: gr.Textbox
    blocks: gr.Textbox  # a diffusion transformer's block range (hidden for a UNet)
    declared: dict[str, list[tuple[Control, gr.components.Component]]]  # method -> its controls and components
    preset: gr.Dropdown | None = None  # the `GRID_WEIGHTS` widget: a preset menu and a slider per grid
    weights: list[gr.Slider] = field(default_factory=list)

    def __getitem__(self, name: str):
        """A component by its name: a shared control's (`timestep`), or a method control's element id (`tau`)."""
        if name in {f.name for f in fields(self)} - {"declared", "weights"}:
            return getattr(self, name)
        found = [component for pairs in self.declared.values() for c, component in pairs if c.name == name]
        if not found:
            raise KeyError(name)
        return found[0]

    def own(self) -> list:
        """Each method's components (the grid weights' preset included), in the page's order."""
        return [component for pairs in self.declared.values() for _, component in pairs]

    def numbers(self) -> list[gr.Slider]:
        """The controls with a number box (and so a range to keep to)."""
        return [self.timestep, *(x for x in self.own() if isinstance(x, gr.Slider)), *self.weights]

    def ordered(self) -> list:
        return [self.image, self.method, self.timestep, self.words, self.blocks, *self.own(), *self.weights]


@dataclass
class Results:
    """The page's outputs of a segmentation."""

    viewer: gr.HTML
    status: gr.Markdown
    label_file: gr.File
    overlay_file: gr.File
    legend_file: gr.File
    bundle_file: gr.File
    table: gr.HTML

    def all(self) -> list:
        return list(vars(self).values())


@dataclass
class Page:
    """Every component a handler reads or sets."""

    blocks: gr.Blocks
    controls: Controls
    results: Results
    groups: dict[str, gr.Group]  # method name -> the group of its segment controls (methods that have some)
    reset: gr.Button
    cancel: gr.Button
    # Hidden: the Stop presses the page knows of (Stop's handler sets it). Every event carries it as it was when the
    # page sent the event, so the server tells a run sent before the latest Stop (what was stopped) from a later one.
    stops: gr.Number

    def inputs(self) -> list:
        """What every segmenting event sends: each control's value and the page's Stop count."""
        return [*self.controls.ordered(), self.stops]


def _slider(elem_id: str, label: str, span: tuple, value, info: str, **options) -> gr.Slider:
    low, high, step = span
    return gr.Slider(low, high, value=value, step=step, label=label, elem_id=elem_id, info=info, **options)


def build_page(backbone: Backbone) -> Page:
    """The demo's components for a checkpoint: a slider per attention grid of its geometry (finest first), its anchor
    grid within the finest grid, the block-range control where it has blocks (a diffusion transformer), and the
    methods that run on it."""
    with gr.Blocks(title="DiffSeg", analytics_enabled=False) as blocks:  # nothing leaves the server
        gr.Markdown(
            f"# diffseg — unsupervised zero-shot segmentation with {backbone.name}\n"
            "Upload an image: one denoising step captures what the method needs (slow, once per image, method and "
            "timestep); every other control re-segments the cached result at once. Point at a segment for its name "
            "and area; click it (or its table row) to isolate it."
        )
        with gr.Row(elem_id="main"):
            with gr.Column(scale=1, elem_id="controls"):
                controls, groups, reset = _control_column(backbone)
            with gr.Column(scale=2, elem_id="result"):
                results, cancel = _result_column()
        stops = gr.Number(0, precision=0, visible=False, elem_id="stops")
    return Page(blocks, controls, results, groups, reset, cancel, stops)


def _control_column(backbone: Backbone) -> tuple[Controls, dict[str, gr.Group], gr.Button]:
    depth = backbone.depth
    image = gr.Image(
        type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"], elem_id="input-image"
    )
    gr.Examples(examples=examples(), inputs=image, elem_id="examples", label="Examples")
    offered = [m for m in METHODS.values() if m.runs_on(backbone)]
    method = gr.Radio(
        [m.name for m in offered],
        value=DEFAULT_METHOD,
        label="Method (re-encodes)",
        elem_id="method",
        info="; ".join(f"{m.title}: {m.summary}" for m in offered),
    )
    timestep = _slider(
        "timestep",
        "Timestep (re-encodes)",
        (0, 999, 1),
        METHODS[DEFAULT_METHOD].encode_defaults.timestep,
        "The noise level of the one denoising step (the papers': "
        + ", ".join(f"{m.title} {m.encode_defaults.timestep}" for m in offered)
        + ")",
    )
    words = gr.Textbox(
        label="Words: name segments with them, or find them (method “concepts”) (comma-separated; re-encodes)",
        placeholder="road, car, person, sky",
        elem_id="labels",
    )
    with gr.Accordion("Advanced", open=False, visible=depth > 0, elem_id="advanced"):
        blocks = gr.Textbox(
            label="Transformer blocks FIRST:LAST (re-encodes; Enter to apply)",
            placeholder=f"every block, 0:{max(depth - 1, 0)}",
            elem_id="blocks",
            info="DiffSeg averages these blocks' attention; DiffCut reads the image tokens after LAST. Empty: defaults",
        )
    controls = Controls(image, method, timestep, words, blocks, declared={})
    groups = {}
    for m in offered:
        shown = [c for c in m.controls if c.demo]
        if shown:
            with gr.Group(visible=m.name == DEFAULT_METHOD) as groups[m.name]:
                controls.declared[m.name] = [(c, _component(m, c, backbone, controls)) for c in shown]
    reset = gr.Button("Reset to the papers' settings", elem_id="reset", variant="secondary")
    return controls, groups, reset


def _component(method: Method, control: Control, backbone: Backbone, controls: Controls):
    """A method control's component: a slider (its span, within the checkpoint's limit), a checkbox, or the per-grid
    weights (a preset menu, kept as the control's component, and `MAX_GRIDS` sliders on `controls`)."""
    value = method.default(control, backbone)
    if control.widget == GRID_WEIGHTS:
        sides = backbone.grid_sides[:MAX_GRIDS]
        several = len(sides) > 1  # one grid (an SD3 / Flux model's tokens): nothing to weigh, nothing shown
        controls.preset = gr.Dropdown(
            [*presets_for(sides), CUSTOM],
            value="proportional",
            label=control.label,
            elem_id=control.name,
            info=control.help,
            filterable=False,  # a choice, not a text box: typing must not append to the preset's name
            visible=several,
        )
        controls.weights = [
            _slider(
                f"weight-{k}",
                f"Weight of grid {k + 1}" + (f" ({sides[k]}² at native size)" if k < len(sides) else ""),
                (0, 8, 0.5),
                w,
                "Relative to the other grids' (normalised to sum 1)",
                visible=several and k < len(sides),
            )
            for k, w in enumerate(preset_weights("proportional", sides))
        ]
        return controls.preset
    if control.span is None:
        return gr.Checkbox(value=bool(value), label=control.label, elem_id=control.name, info=control.help)
    low, high, step = control.span
    if control.limit is not None:
        high = min(high, control.limit(backbone))
    return _slider(control.name, control.label, (low, high, step), value, control.help)


def _result_column() -> tuple[Results, gr.Button]:
    with gr.Row(elem_id="status-row"):
        status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
        # Shown only while something runs (web/page.js): an encode, or a slow re-segmentation.
        cancel = gr.Button("Stop", elem_id="cancel", size="sm", variant="stop", scale=0)
    # Desktop: the segment table beside the viewer, so a row clicked keeps the image in view (web/app.css unfolds
    # this row on a phone).
    with gr.Row(elem_id="view-row", equal_height=False):
        with gr.Column(scale=3, min_width=320, elem_id="view-column"):
            viewer = gr.HTML(
                "<p class='viewer-empty'>The segmentation appears here.</p>",
                elem_id="viewer",
                js_on_load=asset("viewer.js"),
            )
            with gr.Row(elem_id="view-controls"):  # read by the viewer in the browser: no server event
                _slider(
                    "opacity", "Overlay opacity", (0, 1, 0.05), OPACITY, "0 shows the image, 1 the label map",
                    interactive=True,  # no server event: Gradio would otherwise disable it
                )  # fmt: skip
                gr.Checkbox(
                    value=True,
                    label="Boundaries",
                    elem_id="boundaries",
                    info="White lines between segments",
                    interactive=True,
                )
        with gr.Column(scale=2, min_width=240, elem_id="table-column"):
            table = gr.HTML(elem_id="segments")
    with gr.Row(elem_id="downloads"):
        label_file = gr.File(label="Label map (PNG of ids)", elem_id="label-download")
        overlay_file = gr.File(label="Overlay (PNG, the viewer's colours)", elem_id="overlay-download")
        legend_file = gr.File(label="Legend (JSON: id, name, area, colour)", elem_id="legend-download")
        bundle_file = gr.File(label="Bundle: what the model produced (safetensors)", elem_id="bundle-download")
    return Results(viewer, status, label_file, overlay_file, legend_file, bundle_file, table), cancel
