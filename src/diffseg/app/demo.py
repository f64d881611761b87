"""`diffseg app`: a Gradio page where sliders re-segment instantly and segments can be touched.

The expensive step (VAE + one UNet pass) runs once per (image, model, method, timestep, words) and its bundle is kept
in a small LRU cache; every other control re-runs only the cheap step on the cached bundle: DiffSeg's aggregation,
merging and labelling, or DiffCut's normalised cut. The viewer (`web/viewer.js`) draws the overlay in the browser,
so opacity, boundaries, hovering and isolating a segment need no server at all (`app_view` makes its data).
The page fetches nothing from outside this server (system fonts, no analytics), so it works offline.

Where things are: `cache.BundleCache` (encodes and their files) and `cache.watch_encode` (progress and cancelling of
an encode), `build_app` (the page: layout, then one handler per kind of event), `launch`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from ..bundle import AttentionBundle
from ..config import ENCODE_DEFAULTS, METHODS, RESOLUTION_PRESETS, AppConfig, DiffCutConfig, SegmentConfig
from ..config import preset_weights as preset_grid_weights
from ..io.images import load_image
from ..methods.diffseg.aggregation import by_size
from .cache import BundleCache, EncodeCancelled
from .view import render

_SEGMENT = SegmentConfig()
_DIFFCUT = DiffCutConfig()
_APP = AppConfig()
MAX_PIXELS = _APP.max_pixels  # module-level so tests can lower it
MAX_GRIDS = 4  # weight sliders, finest grid first; a model with fewer grids (SDXL: 2) shows fewer
CUSTOM = "custom"  # the preset's name once a weight slider is moved by hand
OPACITY = 0.5  # the viewer's default overlay opacity (the CLI's overlay uses the same)
_WEB = resources.files("diffseg.app").joinpath("web")


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


def slider_weights(bundle: AttentionBundle, values: list[float]) -> dict[tuple[int, int], float]:
    """Map slider values (finest first) onto the bundle's grids by rank, normalised to sum 1 so that the KL
    threshold keeps its meaning whatever the mix."""
    grids = by_size(bundle.attention)
    weights = {g: float(v) for g, v in zip(grids, values)}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("All resolution weights are 0: give at least one resolution a positive weight.")
    return {r: w / total for r, w in weights.items()}


def named_copy(file: Path, target: Path) -> Path:
    """`file` under the name `target` for a download (a hard link where the file system allows, else a copy)."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copyfile(file, target)
    return target


def parse_words(text: str | None) -> tuple[str, ...]:
    """The demo's vocabulary box: comma-separated words, blanks and repeats dropped."""
    return tuple(dict.fromkeys(w.strip() for w in (text or "").split(",") if w.strip()))


def read_upload(path: str | None) -> np.ndarray:
    """The uploaded image as (H, W, 3) uint8, or a readable error for the page."""
    if not path:
        raise ValueError("No image: upload one or pick an example.")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Exception as error:  # noqa: BLE001 - any decoding failure is the upload's fault
        name = Path(path).name
        raise ValueError(
            f"“{name}” could not be read as an image: upload a PNG, JPEG, WebP, TIFF, BMP or GIF file."
        ) from error
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"The image is {width}×{height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels. Resize it first."
        )
    return np.asarray(load_image(path))


def upload_path(value) -> str | None:
    """The file path in the image input's raw value. The page's events skip Gradio's preprocessing
    (`preprocess=False`), which fails on an undecodable upload with an internal error naming server paths; the file
    is then read once, by `read_upload`, which says what is wrong in the app's words."""
    if value is None or isinstance(value, str):
        return value
    return value.get("path") if isinstance(value, dict) else getattr(value, "path", None)


@dataclass
class Controls:
    """The page's inputs, so that handlers read settings by name (Gradio passes a set of inputs as one dict)."""

    image: gr.Image
    method: gr.Radio
    timestep: gr.Slider
    words: gr.Textbox
    kl: gr.Slider
    iterations: gr.Slider
    points: gr.Slider
    refine: gr.Checkbox
    preset: gr.Dropdown
    tau: gr.Slider
    alpha: gr.Slider
    pamr: gr.Checkbox
    weights: list[gr.Slider]

    def ordered(self) -> list:
        return [v for k, v in vars(self).items() if k != "weights"] + self.weights

    def all(self) -> set:
        return set(self.ordered())


@dataclass
class Results:
    """The page's outputs of a segmentation."""

    viewer: gr.HTML
    status: gr.Markdown
    label_file: gr.File
    bundle_file: gr.File
    table: gr.HTML

    def all(self) -> list:
        return list(vars(self).values())


def _asset(name: str) -> str:
    return _WEB.joinpath(name).read_text(encoding="utf-8")


def _slider(elem_id: str, label: str, span: tuple, value, info: str, **options) -> gr.Slider:
    low, high, step = span
    return gr.Slider(low, high, value=value, step=step, label=label, elem_id=elem_id, info=info, **options)


def build_app(pipeline, *, cache_size: int = _APP.cache_size):
    """The Gradio Blocks for `pipeline` (not launched). Returns (blocks, cache)."""
    cache = BundleCache(pipeline, cache_size)
    atexit.register(shutil.rmtree, cache.folder, ignore_errors=True)  # hundreds of MB: removed when the server exits
    examples = sorted(
        str(p) for p in resources.files("diffseg.app").joinpath("examples").iterdir() if str(p).endswith(".jpg")
    )
    captions = [Path(p).stem.replace("_", " ").capitalize() for p in examples]
    sides = pipeline.backbone.grid_sides[:MAX_GRIDS]
    stopping: set[str] = set()  # sessions whose running encode should stop
    warned: dict[str, tuple[str, float]] = {}  # session -> its last message and when
    shown: dict[str, tuple] = {}  # session -> the settings its page shows the result of
    shown_images: dict[str, str] = {}  # session -> the image (upload path) of that result
    # Upload path -> (image, digest), as many as the cache holds: a slider move neither decodes nor hashes the image
    # again (0.25 s for a 12-megapixel photo). Gradio names uploads by their content, so a path is one image.
    uploads: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()

    def decoded(path: str) -> tuple[np.ndarray, str]:
        if path not in uploads:
            image = read_upload(path)
            uploads[path] = (image, BundleCache.digest(image))
            while len(uploads) > cache.capacity:
                uploads.popitem(last=False)
        uploads.move_to_end(path)
        return uploads[path]

    segmentations = [0]

    with gr.Blocks(title="DiffSeg", analytics_enabled=False) as blocks:  # nothing leaves the server
        gr.Markdown(
            f"## diffseg — unsupervised zero-shot segmentation with {pipeline.backbone.name}\n"
            "Upload an image: one UNet step captures what the method needs (slow, once per image, method and "
            "timestep); every other control re-segments the cached result at once. Point at a segment for its name "
            "and area; click it (or its table row) to isolate it."
        )
        with gr.Row(elem_id="main"):
            with gr.Column(scale=1, elem_id="controls"):
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="Image",
                    sources=["upload", "clipboard"],
                    elem_id="input-image",
                )
                gr.Examples(examples=examples, inputs=image, elem_id="examples", label="Examples")
                method = gr.Radio(
                    list(METHODS),
                    value="diffseg",
                    label="Method (re-encodes)",
                    elem_id="method",
                    info="DiffSeg: self-attention merged by KL; DiffCut: a layer's features, recursive normalised cut",
                )
                timestep = _slider(
                    "timestep",
                    "Timestep (re-encodes)",
                    (0, 999, 1),
                    ENCODE_DEFAULTS["diffseg"].timestep,
                    "The noise level of the one UNet step (papers: DiffSeg 300, DiffCut 50)",
                )
                words = gr.Textbox(
                    label="Name segments with (comma-separated words, optional; re-encodes)",
                    placeholder="road, car, person, sky",
                    elem_id="labels",
                )
                with gr.Group(visible=False) as diffcut_controls:
                    tau = _slider(
                        "tau",
                        "Cut threshold τ",
                        (0.05, 1.5, 0.01),
                        _DIFFCUT.tau,
                        "A region is cut while the cut costs less than τ: lower gives fewer segments",
                    )
                    alpha = _slider(
                        "alpha", "Affinity exponent α", (1, 20, 0.5), _DIFFCUT.alpha,
                        "Sharpens feature similarity: higher separates more",
                    )  # fmt: skip
                    pamr = gr.Checkbox(
                        value=_DIFFCUT.pamr,
                        label="PAMR refinement",
                        elem_id="pamr",
                        info="Snaps segment edges to the image's colour edges (slower)",
                    )
                with gr.Group() as diffseg_controls:
                    kl = _slider(
                        "kl-threshold",
                        "KL threshold τ",
                        (0.05, 3.0, 0.05),
                        _SEGMENT.kl_threshold,
                        "Attention maps closer than τ merge: higher gives fewer, larger segments",
                    )
                    iterations = _slider(
                        "iterations", "Merge iterations", (1, 6, 1), _SEGMENT.iterations,
                        "Rounds of merging the proposals with each other",
                    )  # fmt: skip
                    points = _slider(
                        "num-points", "Anchor grid (M×M)", (2, 32, 1), _SEGMENT.num_points,
                        "Starting points of the first merge: more can find smaller segments",
                    )  # fmt: skip
                    refine = gr.Checkbox(
                        value=_SEGMENT.refine,
                        label="K-means refinement",
                        elem_id="refine",
                        info="Re-assigns every attention map to its nearest proposal (slower)",
                    )
                    preset = gr.Dropdown(
                        [*presets_for(sides), CUSTOM],
                        value="proportional",
                        label="Resolution preset",
                        elem_id="preset",
                        info="How much each attention grid counts; proportional is the paper's",
                    )
                    weights = [
                        _slider(
                            f"weight-{k}",
                            f"Weight of grid {k + 1}" + (f" ({sides[k]}² at native size)" if k < len(sides) else ""),
                            (0, 8, 0.5),
                            w,
                            "Relative to the other grids' (normalised to sum 1)",
                            visible=k < len(sides),
                        )
                        for k, w in enumerate(preset_weights("proportional", sides))
                    ]
                reset = gr.Button("Reset to the papers' settings", elem_id="reset", variant="secondary")
            with gr.Column(scale=2, elem_id="result"):
                with gr.Row(elem_id="status-row"):
                    status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
                    cancel = gr.Button("Stop encoding", elem_id="cancel", size="sm", variant="secondary", scale=0)
                viewer = gr.HTML(
                    "<p class='viewer-empty'>The segmentation appears here.</p>",
                    elem_id="viewer",
                    js_on_load=_asset("viewer.js"),
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
                with gr.Row(elem_id="downloads"):
                    label_file = gr.File(label="Label map (PNG of ids)", elem_id="label-download")
                    bundle_file = gr.File(
                        label="Bundle: what the UNet produced (safetensors)", elem_id="bundle-download"
                    )
                table = gr.HTML(elem_id="segments")

    controls = Controls(
        image, method, timestep, words, kl, iterations, points, refine, preset, tau, alpha, pamr, weights
    )
    results = Results(viewer, status, label_file, bundle_file, table)

    def keep() -> dict:
        """The outputs of an event that leaves the page as it is (a dict return names what it updates; an empty
        one would read as a single value)."""
        return {results.viewer: gr.skip()}

    def segment(values: dict, request: gr.Request | None, progress) -> dict:
        """The one path from settings to the page's outputs: read the image, get its bundle (an encode, with
        progress and a stop button, only when not cached), segment it with its method, render."""
        c = values  # the settings, by control
        start = time.perf_counter()
        path, method = c[controls.image], c[controls.method]
        session = getattr(request, "session_hash", None) or ""
        stopping.discard(session)
        # Gradio sends a replaced image's change twice; settings the page already shows need no run.
        settings_shown = tuple(repr(c[control]) for control in controls.ordered())
        if shown.get(session) == settings_shown:
            return keep()
        try:
            array, digest = decoded(path)
            words = parse_words(c[controls.words])
            if method == "diffcut" and words:
                raise ValueError("Naming segments works with DiffSeg only: clear the words or choose DiffSeg.")
            entry, encoded = cache.get(
                array,
                int(c[controls.timestep]),
                words,
                method,
                report=lambda stage, fraction: progress(fraction, desc=stage),
                stop=lambda: session in stopping,
                digest=digest,
            )
            encode_seconds = time.perf_counter() - start
            start = time.perf_counter()
            if entry.bundle.method == "diffcut":
                settings = {"tau": c[controls.tau], "alpha": c[controls.alpha], "pamr": c[controls.pamr]}
            else:
                settings = {
                    "kl_threshold": float(c[controls.kl]),
                    "iterations": int(c[controls.iterations]),
                    "num_points": int(c[controls.points]),
                    "refine": bool(c[controls.refine]),
                    "resolution_weights": slider_weights(entry.bundle, [c[w] for w in controls.weights]),
                }
            result = pipeline.segment(entry.bundle, **settings)  # where the model runs: on a GPU server, the GPU
            name = Path(path).stem  # Gradio keeps the upload's own file name
            # Downloads live beside their bundle (one folder each: two sessions' "photo.jpg" never collide) and
            # go with it when it is evicted.
            view = render(result, entry.image, cache.folder / entry.file.stem, name, start)
            bundle_file = named_copy(entry.file, view.label_file.parent / f"{name}.safetensors")
        except EncodeCancelled as stopped:
            gr.Info(str(stopped))
            return keep()
        except (ValueError, ImportError, OSError) as error:
            # A message, and the page keeps its result (an error would mark every output as failed). Gradio sends
            # an undecodable upload's change twice: the same message within seconds is shown once.
            message, now = str(error), time.monotonic()
            if warned.get(session, ("", -1e9))[0] != message or now - warned[session][1] > 5:
                gr.Warning(message)
            warned[session] = (message, now)
            return keep()
        segmentations[0] += 1
        shown[session], shown_images[session] = settings_shown, path
        print(
            f"diffseg app: segmentation #{segmentations[0]} in {view.seconds:.2f} s",
            file=sys.stderr,
            flush=True,
        )
        source = f"encoded in {encode_seconds:.1f} s" if encoded else "from cache"
        count = f"{len(view.rows)} segment" + ("" if len(view.rows) == 1 else "s")
        return {
            results.viewer: view.viewer,
            results.status: f"**{count}** · segmented in {view.seconds:.2f} s · {source}",
            results.label_file: str(view.label_file),
            results.bundle_file: str(bundle_file),
            results.table: view.table,
        }

    # One handler per kind of event. Each takes the page's settings as one dict; those that set controls return
    # them beside the results.

    def on_image(values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """A new image (upload, example). Cleared, or refused for its size: the page keeps its result, and the
        controls go on acting on it. Unreadable: the input shows the result's image again."""
        values = {**values, controls.image: upload_path(values[controls.image])}
        if not values[controls.image]:
            return keep()
        outputs = segment(values, request, progress)
        previous = shown_images.get(getattr(request, "session_hash", None) or "")
        if results.status not in outputs and previous and previous != values[controls.image]:
            outputs[controls.image] = previous
        return outputs

    def on_change(values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """A control that re-segments (or, for the timestep and words, re-encodes) the image the page shows."""
        values = {**values, controls.image: upload_path(values[controls.image])}
        if not values[controls.image]:  # cleared, or refused for its size: act on the result's image, if any
            previous = shown_images.get(getattr(request, "session_hash", None) or "")
            if previous is None:
                return keep()
            values = {**values, controls.image: previous}
        return segment(values, request, progress)

    def on_weight(values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """A weight moved by hand: the preset no longer describes the weights."""
        return {controls.preset: CUSTOM, **on_change(values, request, progress)}

    def on_preset(values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        name = values[controls.preset]
        if name == CUSTOM:
            return keep()
        chosen = dict(zip(controls.weights, preset_weights(name, sides)))
        return {**chosen, **on_change({**values, **chosen}, request, progress)}

    def on_reset(values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """Every segmentation control back to its paper's default, then a re-run (the timestep's may re-encode)."""
        defaults = {
            controls.timestep: ENCODE_DEFAULTS[values[controls.method]].timestep,
            controls.kl: _SEGMENT.kl_threshold,
            controls.iterations: _SEGMENT.iterations,
            controls.points: _SEGMENT.num_points,
            controls.refine: _SEGMENT.refine,
            controls.preset: "proportional",
            controls.tau: _DIFFCUT.tau,
            controls.alpha: _DIFFCUT.alpha,
            controls.pamr: _DIFFCUT.pamr,
            **dict(zip(controls.weights, preset_weights("proportional", sides))),
        }
        return {**defaults, **on_change({**values, **defaults}, request, progress)}

    def on_method(values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """Each method shows its controls and starts at its paper's timestep."""
        method = values[controls.method]
        timestep = ENCODE_DEFAULTS[method].timestep
        return {
            controls.timestep: timestep,
            diffseg_controls: gr.update(visible=method == "diffseg"),
            diffcut_controls: gr.update(visible=method == "diffcut"),
            **on_change({**values, controls.timestep: timestep}, request, progress),
        }

    def on_cancel(request: gr.Request) -> None:
        stopping.add(getattr(request, "session_hash", None) or "")

    with blocks:  # events are wired inside the page
        inputs, outputs = controls.all(), results.all()
        # "always_last": while one segmentation runs, further moves collapse into one run with the latest values.
        # No preprocessing: handlers read the image's path with `upload_path`, so a bad upload gets our message.
        latest = {"trigger_mode": "always_last", "preprocess": False}
        setters = [controls.timestep, controls.preset, *controls.weights]
        # Only the image, the method, the timestep and the words can run the model; the rest re-use the cached bundle.
        encoding = [
            image.change(on_image, inputs, [image, *outputs], **latest),  # upload, example, clear
            timestep.release(on_change, inputs, outputs, **latest),  # pointer, keys (web/page.js)
            words.submit(on_change, inputs, outputs, **latest),
            method.input(
                on_method,
                inputs,
                [controls.timestep, diffseg_controls, diffcut_controls, *outputs],
                **latest,
            ),
            reset.click(
                on_reset,
                inputs,
                [*setters, kl, iterations, points, refine, tau, alpha, pamr, *outputs],
                **latest,
            ),
        ]
        for control in (kl, iterations, points, tau, alpha, refine, pamr):
            control.input(on_change, inputs, outputs, **latest, show_progress="minimal")
        for control in weights:
            control.input(on_weight, inputs, [preset, *outputs], **latest, show_progress="minimal")
        preset.input(on_preset, inputs, [*weights, *outputs], **latest)
        # Stopping: the page drops the running event at once; the server stops its encode at the next block.
        cancel.click(on_cancel, None, None, cancels=encoding, queue=False)

    page_js = _asset("page.js").replace("__CAPTIONS__", json.dumps(captions))
    blocks.diffseg_launch = {
        # System fonts: the default theme would fetch web fonts from the internet.
        "theme": gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
        ),
        "css": _asset("app.css"),
        "js": page_js,
    }
    return blocks, cache


def launch(
    pipeline,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_upload_mb: float = _APP.max_upload_mb,
    cache_size: int = _APP.cache_size,
) -> None:
    """Serve the demo until interrupted."""
    blocks, _ = build_app(pipeline, cache_size=cache_size)
    # A plain `kill` (SIGTERM) exits like Ctrl-C, so the temporary folders are removed (atexit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    blocks.queue(default_concurrency_limit=1)  # one segmentation at a time; the model has its own lock
    blocks.launch(
        server_name=host,
        server_port=port,
        max_file_size=int(max_upload_mb * 1024 * 1024),  # bytes
        ssr_mode=False,
        footer_links=[],
        show_error=True,
        **blocks.diffseg_launch,
    )
