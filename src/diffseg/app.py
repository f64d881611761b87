"""`diffseg app`: a Gradio page where sliders re-segment instantly.

The expensive step (VAE + one UNet pass) runs once per (image, method, timestep, words) and its bundle is kept in a
small LRU cache; every other control re-runs only the cheap step on the cached bundle: DiffSeg's aggregation,
merging and labelling, or DiffCut's normalised cut.
The page fetches nothing from outside this server (system fonts, no analytics), so it works offline.
"""

from __future__ import annotations

import atexit
import hashlib
import html
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .bundle import AttentionBundle
from .aggregation import by_size
from .config import ENCODE_DEFAULTS, METHODS, RESOLUTION_PRESETS, AppConfig, DiffCutConfig, SegmentConfig
from .config import preset_weights as preset_grid_weights
from .images import load_image
from .outputs import label_image, save_image
from .segmentation import segment_bundle
from .visualisation import colourise, palette

_SEGMENT = SegmentConfig()
_DIFFCUT = DiffCutConfig()
_APP = AppConfig()
MAX_PIXELS = _APP.max_pixels  # module-level so tests can lower it
MAX_GRIDS = 4  # weight sliders, finest grid first; a model with fewer grids (SDXL: 2) shows fewer


@dataclass
class _Entry:
    bundle: AttentionBundle
    file: Path  # the bundle as safetensors, for download


class BundleCache:
    """LRU cache of bundles keyed by everything that defines one: image content, model, method, timestep, words.
    Each entry has its own file (named from its whole key), so evicting one never removes another's. Counts the
    encodes it runs."""

    def __init__(self, pipeline, capacity: int = _APP.cache_size, folder: str | Path | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"`capacity` must be at least 1 but is {capacity}.")
        self.pipeline = pipeline
        self.capacity = capacity
        self.encodes = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.folder = Path(folder or tempfile.mkdtemp(prefix="diffseg-app-"))

    @staticmethod
    def key(
        image: np.ndarray, model: str, timestep: int, words: tuple[str, ...] = (), method: str = "diffseg"
    ) -> tuple:
        digest = hashlib.sha256(str(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()
        return digest, model, method, int(timestep), tuple(words)

    def get(
        self, image: np.ndarray, timestep: int, words: tuple[str, ...] = (), method: str = "diffseg"
    ) -> tuple[_Entry, bool]:
        """The bundle of `method` for `image` at `timestep` (with cross-attention for `words`, if any), and whether
        it had to be encoded now."""
        key = self.key(image, self.pipeline.model, timestep, words, method)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key], False
        # Encode outside the lock: cached bundles stay available while a new image is encoded.
        bundle = self.pipeline.encode(image, method=method, timestep=timestep, labels=list(words) or None)
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
        file = bundle.save(self.folder / f"{key[0][:12]}-{method}-t{timestep}-{name}.safetensors")
        entry = _Entry(bundle, file)
        with self._lock:
            self.encodes += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                _, old = self._entries.popitem(last=False)
                old.file.unlink(missing_ok=True)
                shutil.rmtree(self.folder / old.file.stem, ignore_errors=True)  # its downloads (see `render`)
        print(
            f"diffseg app: encoded image {key[0][:12]} with {method} at t={timestep} (encode #{self.encodes})",
            file=sys.stderr,
            flush=True,
        )
        return entry, True

    def __len__(self) -> int:
        return len(self._entries)


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
    its native size; "proportional" is the paper's r / Σr. Sliders past the model's grids are 0."""
    weights = preset_grid_weights(name, [(s, s) for s in sides])
    values = [s / sum(sides) for s in sides] if weights is None else list(weights.values())
    return [float(v) for v in values] + [0.0] * (MAX_GRIDS - len(values))


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


def segment_table(labels: np.ndarray, names=None) -> str:
    """HTML table of segments: id, colour swatch, area % (and label and score when segments are named)."""
    counts = np.bincount(labels.ravel())
    colours = palette(len(counts))
    named = {n.id: n for n in names or []}
    rows = []
    for i, (c, n) in enumerate(zip(colours, counts)):
        hex_colour = f"#{c[0]:02x}{c[1]:02x}{c[2]:02x}"
        cells = [
            str(i),
            f"<span style='display:inline-block;width:1.2em;height:1.2em;background:{hex_colour};"
            f"border:1px solid #888'></span> {hex_colour}",
            f"{100 * n / labels.size:.1f}",
        ]
        if names is not None:
            name = named.get(i)
            cells += [html.escape(name.label or "unlabelled") if name else "", f"{name.score:.2f}" if name else ""]
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    head = ["id", "colour", "area %"] + (["label", "score"] if names is not None else [])
    return (
        "<div style='max-height:22em;overflow-y:auto'><table id='segment-table'><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in head)
        + f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def read_upload(path: str | None) -> np.ndarray:
    """The uploaded image as (H, W, 3) uint8, or a readable error for the page."""
    if not path:
        raise ValueError("No image: upload one or pick an example.")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
    except Exception as error:  # noqa: BLE001 - any decoding failure is the upload's fault
        raise ValueError(f"The upload could not be read as an image ({error}).") from error
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"The image is {width}×{height} pixels; the limit is {MAX_PIXELS / 1e6:.0f} megapixels. Resize it first."
        )
    return np.asarray(load_image(path))


@dataclass
class View:
    """What the page shows for one setting of the sliders."""

    overlay: Image.Image
    label_map: Image.Image
    label_file: Path
    table: str
    num_segments: int
    seconds: float


def render(
    entry: _Entry,
    out_dir: Path,
    kl_threshold,
    iterations,
    num_points,
    refine,
    weights,
    tau=_DIFFCUT.tau,
    alpha=_DIFFCUT.alpha,
    pamr=_DIFFCUT.pamr,
    segment=segment_bundle,
    name: str | None = None,
) -> View:
    """The slider path: cached bundle -> segmentation (its method's) -> overlay, label map, label PNG and table.
    `segment` is the pipeline's, so that on a GPU server slider moves run where the model runs. Downloads are named
    after the image (`name`), in a folder of their own per bundle."""
    start = time.perf_counter()
    if entry.bundle.method == "diffcut":
        settings = {"tau": float(tau), "alpha": float(alpha), "pamr": bool(pamr)}
    else:
        settings = {
            "kl_threshold": float(kl_threshold),
            "iterations": int(iterations),
            "num_points": int(num_points),
            "refine": bool(refine),
            "resolution_weights": slider_weights(entry.bundle, list(weights)),
        }
    result = segment(entry.bundle, **settings)
    folder = Path(out_dir) / entry.file.stem  # one per bundle: two sessions' "photo.jpg" never collide
    label_file = folder / f"{name or entry.file.stem}-labels.png"
    save_image(label_image(result.labels), label_file)
    view = View(
        result.overlay,
        Image.fromarray(colourise(result.labels)),
        label_file,
        segment_table(result.labels, result.names),
        result.num_segments,
        0.0,
    )
    view.seconds = time.perf_counter() - start
    return view


def build_app(pipeline, *, cache_size: int = _APP.cache_size):
    """The Gradio Blocks for `pipeline` (not launched). Returns (blocks, cache)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    cache = BundleCache(pipeline, cache_size)
    out_dir = cache.folder  # downloads live beside their bundle and go with it when it is evicted
    atexit.register(shutil.rmtree, cache.folder, ignore_errors=True)  # hundreds of MB: removed when the server exits
    examples = sorted(
        str(p) for p in resources.files("diffseg").joinpath("examples").iterdir() if str(p).endswith(".jpg")
    )

    sides = pipeline.backbone.grid_sides[:MAX_GRIDS]

    def run(path, method, timestep, words, kl_threshold, iterations, num_points, refine, tau, alpha, pamr, *weights):
        try:
            start = time.perf_counter()
            image = read_upload(path)
            if method == "diffcut" and parse_words(words):
                raise ValueError("Naming segments works with DiffSeg only: clear the words or choose DiffSeg.")
            entry, encoded = cache.get(image, int(timestep), parse_words(words), method)
            encode_seconds = time.perf_counter() - start
            view = render(
                entry,
                out_dir,
                kl_threshold,
                iterations,
                num_points,
                refine,
                weights,
                tau,
                alpha,
                pamr,
                segment=pipeline.segment,  # on a GPU server, slider moves run on the GPU
                name=Path(path).stem,  # Gradio keeps the upload's own file name
            )
            bundle_file = named_copy(entry.file, view.label_file.parent / f"{Path(path).stem}.safetensors")
        except (ValueError, ImportError, OSError) as error:
            raise gr.Error(str(error)) from error
        source = f"encoded in {encode_seconds:.1f} s" if encoded else "from cache"
        count = f"{view.num_segments} segment" + ("" if view.num_segments == 1 else "s")
        status = f"**{count}** · segmented in {view.seconds:.2f} s · {source}"
        return view.overlay, view.label_map, status, str(view.label_file), str(bundle_file), view.table

    def on_image(path, *settings):
        if not path:  # cleared, or an upload refused for its size: the page keeps its result
            return (gr.skip(),) * 6
        return run(path, *settings)

    def apply_preset(name, *settings):
        weights = preset_weights(name, sides)
        return (*weights, *run(*settings[:11], *weights))

    def reset_settings(method, path, words):
        """Every segmentation control back to its paper's default, then a re-run (the timestep's may re-encode)."""
        weights = preset_weights("proportional", sides)
        timestep = ENCODE_DEFAULTS[method].timestep
        defaults = [_SEGMENT.kl_threshold, _SEGMENT.iterations, _SEGMENT.num_points, _SEGMENT.refine]
        defaults += [_DIFFCUT.tau, _DIFFCUT.alpha, _DIFFCUT.pamr]
        outputs = on_image(path, method, timestep, words, *defaults, *weights)
        return (timestep, *defaults[:4], "proportional", *defaults[4:], *weights, *outputs)

    def on_method(method, path, _timestep, *settings):
        timestep = ENCODE_DEFAULTS[method].timestep  # each method's paper's timestep
        outputs = on_image(path, method, timestep, *settings)
        return (
            gr.update(value=timestep),
            gr.update(visible=method == "diffseg"),
            gr.update(visible=method == "diffcut"),
            *outputs,
        )

    def slider(elem_id: str, label: str, span: tuple, value, info: str, **options):
        low, high, step = span
        return gr.Slider(low, high, value=value, step=step, label=label, elem_id=elem_id, info=info, **options)

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # system fonts: the default theme would fetch web fonts from the internet
    with gr.Blocks(title="DiffSeg") as blocks:
        gr.Markdown(
            f"## diffseg — unsupervised zero-shot segmentation with {pipeline.backbone.name}\n"
            "Upload an image: one UNet step captures what the method needs (slow, once per image, method and "
            "timestep); every other control re-segments the cached result at once."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], elem_id="input-image")
                gr.Examples(examples=examples, inputs=image)
                method = gr.Radio(
                    list(METHODS),
                    value="diffseg",
                    label="Method (re-encodes)",
                    elem_id="method",
                    info="DiffSeg: self-attention merged by KL; DiffCut: a layer's features, recursive normalised cut",
                )
                timestep = slider(
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
                    tau = slider(
                        "tau",
                        "Cut threshold τ",
                        (0.05, 1.5, 0.01),
                        _DIFFCUT.tau,
                        "A region is cut while the cut costs less than τ: lower gives fewer segments",
                    )
                    alpha = slider(
                        "alpha",
                        "Affinity exponent α",
                        (1, 20, 0.5),
                        _DIFFCUT.alpha,
                        "Sharpens feature similarity: higher separates more",
                    )
                    pamr = gr.Checkbox(
                        value=_DIFFCUT.pamr,
                        label="PAMR refinement",
                        elem_id="pamr",
                        info="Snaps segment edges to the image's colour edges (slower)",
                    )
                with gr.Group() as diffseg_controls:
                    kl = slider(
                        "kl-threshold",
                        "KL threshold τ",
                        (0.05, 3.0, 0.05),
                        _SEGMENT.kl_threshold,
                        "Attention maps closer than τ merge: higher gives fewer, larger segments",
                    )
                    iterations = slider(
                        "iterations",
                        "Merge iterations",
                        (1, 6, 1),
                        _SEGMENT.iterations,
                        "Rounds of merging the proposals with each other",
                    )
                    points = slider(
                        "num-points",
                        "Anchor grid (M×M)",
                        (2, 32, 1),
                        _SEGMENT.num_points,
                        "Starting points of the first merge: more can find smaller segments",
                    )
                    refine = gr.Checkbox(
                        value=_SEGMENT.refine,
                        label="K-means refinement",
                        elem_id="refine",
                        info="Re-assigns every attention map to its nearest proposal (slower)",
                    )
                    preset = gr.Dropdown(
                        presets_for(sides),
                        value="proportional",
                        label="Resolution preset",
                        elem_id="preset",
                        info="How much each attention grid counts; proportional is the paper's",
                    )
                    sliders = [
                        gr.Slider(
                            0,
                            1,
                            value=w,
                            step=0.01,
                            visible=k < len(sides),
                            label=f"Weight of grid {k + 1} ({sides[k]}² at native size; normalised)"
                            if k < len(sides)
                            else "",
                            elem_id=f"weight-{k}",
                        )
                        for k, w in enumerate(preset_weights("proportional", sides))
                    ]
                reset = gr.Button("Reset to the papers' settings", elem_id="reset", variant="secondary")
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
                with gr.Row():
                    # No "share" button: it works only on Hugging Face Spaces.
                    overlay = gr.Image(
                        label="Overlay",
                        format="png",
                        interactive=False,
                        elem_id="overlay",
                        buttons=["download", "fullscreen"],
                    )
                    label_view = gr.Image(
                        label="Label map",
                        format="png",
                        interactive=False,
                        elem_id="label-map",
                        buttons=["download", "fullscreen"],
                    )
                with gr.Row():
                    label_file = gr.File(label="Label map (PNG of ids)", elem_id="label-download")
                    bundle_file = gr.File(
                        label="Bundle: what the UNet produced (safetensors)", elem_id="bundle-download"
                    )
                table = gr.HTML(elem_id="segments")

        settings = [image, method, timestep, words, kl, iterations, points, refine, tau, alpha, pamr, *sliders]
        outputs = [overlay, label_view, status, label_file, bundle_file, table]
        # Only the image and the timestep can trigger the model; the rest re-use the cached bundle. "always_last":
        # while one segmentation runs, further moves collapse into one run with the latest values.
        image.change(on_image, settings, outputs, trigger_mode="always_last")  # upload, example, clear
        timestep.release(run, settings, outputs, trigger_mode="always_last")
        words.submit(run, settings, outputs, trigger_mode="always_last")
        for control in (kl, iterations, points, tau, alpha, *sliders):
            control.input(run, settings, outputs, trigger_mode="always_last", show_progress="minimal")
        refine.input(run, settings, outputs, trigger_mode="always_last")
        pamr.input(run, settings, outputs, trigger_mode="always_last")
        reset.click(
            reset_settings,
            [method, image, words],
            [timestep, kl, iterations, points, refine, preset, tau, alpha, pamr, *sliders, *outputs],
            trigger_mode="always_last",
        )
        method.input(
            on_method,
            [method, image, timestep, *settings[3:]],
            [timestep, diffseg_controls, diffcut_controls, *outputs],
            trigger_mode="always_last",
        )
        preset.input(apply_preset, [preset, *settings], [*sliders, *outputs], trigger_mode="always_last")
    blocks.diffseg_theme = theme
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
        theme=blocks.diffseg_theme,
        ssr_mode=False,
        footer_links=[],
        show_error=True,
    )
