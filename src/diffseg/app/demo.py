"""`diffseg app`: a Gradio page where sliders re-segment instantly and segments can be touched.

The expensive step (VAE + one denoiser pass) runs once per (image, model, method, timestep, words, transformer blocks)
and its bundle is kept in a small LRU cache; every other control re-runs only the cheap step on the cached bundle:
DiffSeg's aggregation, merging and labelling, or DiffCut's normalised cut. The viewer (`web/viewer.js`) draws the
overlay in the browser, so opacity, boundaries, hovering and isolating a segment need no server at all (`view` makes its
data). The page fetches nothing from outside this server (system fonts, no analytics), so it works offline.

Where things are: `layout.build_page` (the components, each method's made from its controls), `cache.BundleCache`
(encodes and their files) and `cache.watch_encode` (progress and cancelling of an encode), `inputs` (what the page
sends, checked), `Demo` (per-session state and one handler per kind of event), `build_app` (the page wired to a
`Demo`), `launch`.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np

from ..bundle import Bundle
from ..cancel import Cancelled, cancellable
from ..config import AppConfig
from ..words import parse_words
from ..methods.registry import method_named
from .cache import BundleCache, EncodeCancelled
from ..methods.spec import GRID_WEIGHTS
from .layout import CUSTOM, MAX_GRIDS, Page, asset, build_page, examples, preset_weights, presets_for
from .inputs import OutOfRange, Refused, file_digest, named_copy, parse_blocks, read_upload, slider_weights, upload_path
from .view import render

__all__ = ["build_app", "launch", "preset_weights", "presets_for", "read_upload", "slider_weights"]

_APP = AppConfig()
FAILED = (
    "This segmentation needs more memory or time than the server has: lower τ or untick PAMR (DiffCut), or use a "
    "smaller image. The page keeps its result."
)


@dataclass
class Session:
    """One browser session's state: its Stop presses, its last message, and what its page shows."""

    stops: int = 0  # Stop presses so far: a run stops when this changes after the page sent it (`Page.stops`)
    warned: tuple[str, float] = ("", -1e9)  # the last message and when it was shown
    values: dict = field(default_factory=dict)  # control -> value of the result the page shows (the upload path
    # for the image): what Stop and refusals return to
    status: str = ""  # that result's status line


class Demo:
    """The demo's behaviour: the pipeline, the cache of encodes, each session's state, and one handler per kind of
    event. Each handler takes the page's settings as one dict (by control); those that set controls return them
    beside the results."""

    def __init__(self, pipeline, page: Page, cache: BundleCache, folder: Path) -> None:
        self.pipeline, self.page, self.cache, self.folder = pipeline, page, cache, folder.resolve()
        self.controls, self.results = page.controls, page.results
        self.sides = pipeline.backbone.grid_sides[:MAX_GRIDS]
        self.sessions: dict[str, Session] = {}
        # Upload path -> (image, digest), as many as the cache holds: a slider move neither decodes nor hashes the
        # image again (0.25 s for a 12-megapixel photo). Gradio names uploads by their content, so a path is one image.
        self.uploads: OrderedDict[str, tuple[np.ndarray, str]] = OrderedDict()
        self.segmentations = 0
        # The shipped examples' contents: Gradio serves an example from a copy in the app's folder, which the upload
        # cache must never delete (the thumbnail and the example would break for every later visitor).
        self.examples = {file_digest(path) for path in examples()}

    def session(self, request: gr.Request | None) -> Session:
        return self.sessions.setdefault(getattr(request, "session_hash", None) or "", Session())

    def decoded(self, path: str) -> tuple[np.ndarray, str]:
        """The upload's image and digest. Uploads live in the app's folder (Gradio's temporary folder, see
        `build_app`): one dropped from this cache is deleted, so a long-running demo keeps a bounded number."""
        if path not in self.uploads:
            if not Path(path).exists():
                raise ValueError("This image is no longer on the server (it keeps the latest few): upload it again.")
            image = read_upload(path)
            self.uploads[path] = (image, BundleCache.digest(image))
            while len(self.uploads) > self.cache.capacity:
                old, _ = self.uploads.popitem(last=False)
                if self.deletable(Path(old)):
                    Path(old).unlink(missing_ok=True)
        self.uploads.move_to_end(path)
        return self.uploads[path]

    def deletable(self, path: Path) -> bool:
        """Whether a file dropped from the upload cache is removed: an upload in the app's folder, never an example
        (the shipped file, or Gradio's copy of it)."""
        if not path.resolve().is_relative_to(self.folder) or not path.exists():
            return False
        return file_digest(path) not in self.examples

    def keep(self) -> dict:
        """The outputs of an event that leaves the page as it is (a dict return names what it updates; an empty
        one would read as a single value)."""
        return {self.results.viewer: gr.skip()}

    # ------------------------------------------------------------------ the one path from settings to the page

    def check_ranges(self, values: dict) -> None:
        """Refuse, by the control's label, a number typed outside its control's range."""
        for control in self.controls.numbers():
            value = values[control]
            try:
                inside = math.isfinite(float(value)) and control.minimum <= float(value) <= control.maximum
            except (TypeError, ValueError):
                inside = False
            if not inside:
                raise OutOfRange(control, value)

    def method_settings(self, values: dict, bundle: Bundle):
        """The bundle's method's settings object, from its controls (each within the image's limit, see `fit`)."""
        method, fields = method_named(bundle.method), {}
        for control, component in self.controls.declared.get(bundle.method, []):
            value = values[component]
            if control.widget == GRID_WEIGHTS:
                value = slider_weights(bundle, [values[w] for w in self.controls.weights])
            elif control.span is None:
                value = bool(value)
            else:
                value = int(value) if control.integer else float(value)
            fields[control.field] = value
        return method.config(**fields)

    def fit(self, values: dict, bundle: Bundle, notes: list[str], adjusted: dict) -> dict:
        """The values with each control a bundle bounds (DiffSeg's anchor grid: the image's finest grid) lowered to
        its bound, said in `notes`; the controls' ranges follow the image in `adjusted`. The defaults give a result on
        any image."""
        for control, component in self.controls.declared.get(bundle.method, []):
            limit = None if control.bound is None else control.bound(bundle)
            if limit is None:
                continue
            if values[component] > limit:
                notes.append(f"{control.label.lower()} {limit}: at most {limit} on this image")
                values = {**values, component: limit}
            adjusted[component] = gr.update(maximum=min(limit, component.maximum), value=values[component])
        return values

    def segment(self, values: dict, request: gr.Request | None, progress) -> dict:
        """Read the image, get its bundle (an encode, with progress and a stop button, only when not cached),
        segment it with its method, render."""
        c, session = self.controls, self.session(request)
        start = time.perf_counter()
        path, method = values[c.image], values[c.method]
        stops = session.stops
        if values[self.page.stops] != stops:  # sent before the latest Stop: part of what was stopped
            return self.keep()
        # Gradio sends a replaced image's change twice; settings the page already shows need no run.
        if session.values and self.settings(session.values) == self.settings(values):
            return self.keep()
        notes, adjusted = [], {}
        try:
            self.check_ranges(values)
            array, digest = self.decoded(path)
            words = parse_words(values[c.words] or "", empty=None)  # every method names its segments with them
            if not words and method_named(method).concepts:
                raise ValueError("Concept maps find words: type them in “Words” (for example: sky, grass, dog).")
            entry, encoded = self.cache.get(
                array,
                int(values[c.timestep]),
                words,
                method,
                report=lambda stage, fraction: progress(fraction, desc=stage),
                stop=lambda: session.stops != stops,
                digest=digest,
                blocks=self.blocks(values),
            )
            encode_seconds, start = time.perf_counter() - start, time.perf_counter()
            values = self.fit(values, entry.bundle, notes, adjusted)
            # Where the model runs: on a GPU server, the GPU. Stop ends a long cut at its next node.
            with cancellable(lambda: session.stops != stops):
                result = self.pipeline.segment(entry.bundle, self.method_settings(values, entry.bundle))
            for control, component in c.declared.get(method, []):  # e.g. PAMR's cost on this result, before it runs
                if control.note is not None:
                    adjusted[component] = gr.update(info=control.note(result.labels))
            name = Path(path).stem  # Gradio keeps the upload's own file name
            # Downloads live beside their bundle (one folder each: two sessions' "photo.jpg" never collide) and
            # go with it when it is evicted.
            view = render(result, entry.image, self.cache.folder / entry.file.stem, name, start)
            bundle_file = named_copy(entry.file, view.label_file.parent / f"{name}.safetensors")
        except (EncodeCancelled, Cancelled) as stopped:
            print(f"diffseg app: stopped after {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
            gr.Info(str(stopped))
            return self.keep()
        except Refused as refused:  # the control goes back to the value of the result the page shows
            shown = session.values.get(refused.control, refused.control.value)
            return {**self.warn(session, str(refused)), refused.control: shown}
        except (ValueError, ImportError, OSError) as error:
            return self.warn(session, str(error))
        except (RuntimeError, MemoryError) as error:  # the model or a refinement beyond this server: never raw
            print(f"diffseg app: segmentation failed: {error!r}", file=sys.stderr, flush=True)
            return self.warn(session, FAILED)
        source = f"encoded in {encode_seconds:.1f} s" if encoded else "from cache"
        return {**adjusted, **self.shown(session, values, view, bundle_file, [source, *notes])}

    def blocks(self, values: dict) -> tuple[int, int] | None:
        """The block-range box's blocks; a range the model does not have is refused (the box goes back)."""
        try:
            return parse_blocks(values[self.controls.blocks], self.pipeline.backbone.depth)
        except ValueError as error:
            raise Refused(self.controls.blocks, str(error)) from None

    def settings(self, values: dict) -> tuple:
        """What a run is defined by: every control's value, compared by its text (as the page shows it)."""
        return tuple(repr(values[control]) for control in self.controls.ordered())

    def groups(self, method: str) -> dict:
        """The method's controls shown, the other methods' hidden."""
        return {group: gr.update(visible=name == method) for name, group in self.page.groups.items()}

    def shown(self, session: Session, values: dict, view, bundle_file: Path, notes: list[str]) -> dict:
        """A result on the page: the session remembers its settings (what Stop and refusals go back to)."""
        c = self.controls
        self.segmentations += 1
        session.values = {control: values[control] for control in c.ordered()}
        print(f"diffseg app: segmentation #{self.segmentations} in {view.seconds:.2f} s", file=sys.stderr, flush=True)
        count = f"{len(view.rows)} segment" + ("" if len(view.rows) == 1 else "s")
        session.status = " · ".join([f"**{count}**", f"segmented in {view.seconds:.2f} s", *notes])
        return {
            self.results.viewer: view.viewer,
            self.results.status: session.status,
            self.results.label_file: str(view.label_file),
            self.results.overlay_file: str(view.overlay_file),
            self.results.legend_file: str(view.legend_file),
            self.results.bundle_file: str(bundle_file),
            self.results.table: view.table,
        }

    def warn(self, session: Session, message: str) -> dict:
        """A message, and the page keeps its result (an error would mark every output as failed). Gradio sends an
        undecodable upload's change twice: the same message within seconds is shown once."""
        now = time.monotonic()
        if session.warned[0] != message or now - session.warned[1] > 5:
            gr.Warning(message)
        session.warned = (message, now)
        return self.keep()

    # ------------------------------------------------------------------ handlers, one per kind of event

    def setting(self, controls: dict, values: dict, request, progress, extra: dict | None = None) -> dict:
        """Re-segment with `controls` set to new values, and set them on the page, with `extra` updates, unless Stop
        was pressed meanwhile (Stop has put the page back as the result shows it)."""
        session = self.session(request)
        stops = session.stops
        outputs = self.on_change({**values, **controls}, request, progress)
        if session.stops != stops:
            return self.keep()
        return {**controls, **(extra or {}), **outputs}

    def on_image(self, values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """A new image (upload, example). Cleared, refused for its size (the browser empties the input) or
        unreadable: the page keeps its result, and the input shows the result's image again."""
        image = self.controls.image
        values = {**values, image: upload_path(values[image])}
        outputs = self.segment(values, request, progress) if values[image] else self.keep()
        previous = self.session(request).values.get(image)
        if self.results.status not in outputs and previous and previous != values[image] and Path(previous).exists():
            outputs[image] = previous
        return outputs

    def on_change(self, values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """A control that re-segments (or, for the timestep and words, re-encodes) the image the page shows."""
        image = self.controls.image
        values = {**values, image: upload_path(values[image])}
        if not values[image]:  # cleared, or refused for its size: act on the result's image, if any
            previous = self.session(request).values.get(image)
            if previous is None:
                return self.keep()
            values = {**values, image: previous}
        return self.segment(values, request, progress)

    def on_weight(self, values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """A weight moved by hand: the preset no longer describes the weights."""
        return {self.controls.preset: CUSTOM, **self.on_change(values, request, progress)}

    def on_preset(self, values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        name = values[self.controls.preset]
        if name == CUSTOM:
            return self.keep()
        chosen = dict(zip(self.controls.weights, preset_weights(name, self.sides)))
        return self.setting(chosen, values, request, progress)

    def on_reset(self, values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """Every segmentation control back to its paper's default, then a re-run (the timestep's may re-encode)."""
        c, backbone = self.controls, self.pipeline.backbone
        defaults = {c.timestep: method_named(values[c.method]).encode_defaults.timestep, c.blocks: ""}
        for name, pairs in c.declared.items():
            for control, component in pairs:
                defaults[component] = method_named(name).default(control, backbone)
        if c.preset is not None:
            defaults.update(
                {c.preset: "proportional", **dict(zip(c.weights, preset_weights("proportional", self.sides)))}
            )
        return self.setting(defaults, values, request, progress)

    def on_method(self, values: dict, request: gr.Request, progress=gr.Progress()) -> dict:
        """Each method shows its controls and starts at its paper's timestep."""
        method = values[self.controls.method]
        timestep = method_named(method).encode_defaults.timestep
        return self.setting({self.controls.timestep: timestep}, values, request, progress, self.groups(method))

    def on_cancel(self, request: gr.Request) -> dict:
        """Stop: the running run ends at its next block or node (`watch_encode`, `cancel.checkpoint`) and returns
        nothing, runs the page sent before are dropped (`Page.stops`), and every control, the input image and the
        method's controls go back to what the viewer shows, which the status line says."""
        c, session = self.controls, self.session(request)
        session.stops += 1
        count = {self.page.stops: session.stops}
        if not session.values:  # nothing shown yet: the input empties
            return {c.image: None, self.results.status: "Stopped. Upload an image or pick an example.", **count}
        status = f"Stopped; the page shows its previous result. {session.status}"
        values = dict(session.values)
        if not Path(values[c.image]).exists():  # an upload dropped with the cache: the input keeps what it has
            del values[c.image]
        return {**values, **self.groups(session.values[c.method]), self.results.status: status, **count}

    # ------------------------------------------------------------------ wiring

    def wire(self) -> None:
        """Connect the page's events to the handlers (inside the page's Blocks)."""
        c, page = self.controls, self.page
        inputs = set(page.inputs())  # as one dict, by component

        # Every segmenting event may set the numbers (a refused value goes back; the anchor grid follows the image)
        # besides the results; each event names what else it sets.
        noted = [component for pairs in c.declared.values() for control, component in pairs if control.note]

        def outputs(*more):
            return list(dict.fromkeys([*more, *self.results.all(), *c.numbers(), *noted]))

        # "always_last": while one segmentation runs, further moves collapse into one run with the latest values.
        # No preprocessing: handlers read the image's path with `upload_path`, so a bad upload gets our message.
        # One progress display, over the viewer (Gradio would draw one over every output).
        latest = {"trigger_mode": "always_last", "preprocess": False, "show_progress_on": self.results.viewer}
        instant = {**latest, "show_progress": "minimal"}
        groups = list(page.groups.values())
        # Only the image, the method, the timestep, the words and the blocks run the model; the rest re-use the bundle.
        c.image.change(self.on_image, inputs, outputs(c.image), **latest)  # upload, example, clear
        c.timestep.release(self.on_change, inputs, outputs(), **latest)  # pointer, keys (web/page.js)
        c.words.submit(self.on_change, inputs, outputs(), **latest)
        c.blocks.submit(self.on_change, inputs, outputs(), **latest)
        c.method.input(self.on_method, inputs, outputs(*groups), **latest)
        page.reset.click(self.on_reset, inputs, outputs(*c.own(), c.blocks), **latest)
        for component in c.own():
            if component is not c.preset:
                component.input(self.on_change, inputs, outputs(), **instant)
        for component in c.weights:
            component.input(self.on_weight, inputs, outputs(c.preset), **instant)
        if c.preset is not None:
            c.preset.input(self.on_preset, inputs, outputs(), **latest)
        # Stopping is the server's: the running event ends at its next block and returns nothing, so the page sees
        # an ordinary completion. Gradio's `cancels=` is not used: its cancelling races the event's own end in the
        # page, which then shows "Error" over the viewer, and it drops only one of two events a replaced image sends.
        page.cancel.click(
            self.on_cancel, None, outputs(*c.ordered(), *groups, page.stops), queue=False, show_progress="hidden"
        )


def build_app(pipeline, *, cache_size: int = _APP.cache_size):
    """The Gradio Blocks for `pipeline` (not launched), wired to a `Demo`. Returns (blocks, cache).

    Every file the page uses lives in one folder of the app's own, removed when the server exits: the bundles and
    their downloads (`cache.folder`, evicted with the cache) and Gradio's uploads and served files (the folder is
    Gradio's temporary folder, so a download already there is served without a copy)."""
    folder = Path(tempfile.mkdtemp(prefix="diffseg-app-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # hundreds of MB: removed when the server exits
    os.environ["GRADIO_TEMP_DIR"] = str(folder)  # read by each component as it is made, and by the upload route
    cache = BundleCache(pipeline, cache_size, folder=folder / "bundles")
    backbone = pipeline.backbone
    page = build_page(backbone)
    with page.blocks:  # events are wired inside the page
        Demo(pipeline, page, cache, folder).wire()
    return page.blocks, cache


def launch_options() -> dict:
    """`Blocks.launch` keywords of the page: its theme, style sheet and script."""
    captions = [Path(p).stem.replace("_", " ").capitalize() for p in examples()]
    return {
        # System fonts: the default theme would fetch web fonts from the internet.
        "theme": gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
        ),
        "css": asset("app.css"),
        "js": asset("page.js").replace("__CAPTIONS__", json.dumps(captions)),
    }


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
        # Gradio's own errors (a file reference no upload made, say) name server paths: the page gets none of their
        # text. Every failure of a handler is the app's own message (`Demo.warn`).
        show_error=False,
        **launch_options(),
    )
