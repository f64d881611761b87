"""`diffseg app`: a Gradio page where sliders re-segment instantly.

The expensive step (VAE + one UNet pass) runs once per (image, model, timestep) and its attention bundle is kept in
a small LRU cache; every other control re-runs only aggregation, merging and labelling on the cached bundle.
The page fetches nothing from outside this server (system fonts, no analytics), so it works offline.
"""

from __future__ import annotations

import hashlib
import html
import os
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
from .config import RESOLUTION_PRESETS, AppConfig, EncodeConfig, SegmentConfig
from .images import load_image
from .outputs import label_image, save_image
from .pipeline import segment_bundle
from .visualisation import colourise, palette

_ENCODE = EncodeConfig()
_SEGMENT = SegmentConfig()
_APP = AppConfig()
MAX_PIXELS = _APP.max_pixels  # module-level so tests can lower it
SD_SIDES = (64, 32, 16, 8)  # the weight sliders, finest first; other models' resolutions map onto them by rank


@dataclass
class _Entry:
    bundle: AttentionBundle
    file: Path  # the bundle as safetensors, for download


class BundleCache:
    """LRU cache of attention bundles keyed by (image content, model, timestep). Counts the encodes it runs."""

    def __init__(self, pipeline, capacity: int = _APP.cache_size, folder: str | Path | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"`capacity` must be at least 1 but is {capacity}.")
        self.pipeline = pipeline
        self.capacity = capacity
        self.encodes = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._folder = Path(folder or tempfile.mkdtemp(prefix="diffseg-app-"))

    @staticmethod
    def key(image: np.ndarray, model: str, timestep: int, words: tuple[str, ...] = ()) -> tuple:
        digest = hashlib.sha256(str(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()
        return digest, model, int(timestep), words

    def get(self, image: np.ndarray, timestep: int, words: tuple[str, ...] = ()) -> tuple[_Entry, bool]:
        """The bundle for `image` at `timestep` (with cross-attention for `words`, if any), and whether it had to be
        encoded now."""
        key = self.key(image, self.pipeline.model, timestep, words)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key], False
        # Encode outside the lock: cached bundles stay available while a new image is encoded.
        bundle = self.pipeline.encode(image, timestep=timestep, labels=list(words) or None)
        file = bundle.save(self._folder / f"{key[0][:16]}-t{timestep}.safetensors")
        entry = _Entry(bundle, file)
        with self._lock:
            self.encodes += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                _, old = self._entries.popitem(last=False)
                old.file.unlink(missing_ok=True)
        print(
            f"diffseg app: encoded image {key[0][:12]} at t={timestep} (encode #{self.encodes})",
            file=sys.stderr,
            flush=True,
        )
        return entry, True

    def __len__(self) -> int:
        return len(self._entries)


def preset_weights(name: str) -> list[float]:
    """Slider values (finest first) for a named preset; "proportional" is the paper's r / Σr."""
    weights = RESOLUTION_PRESETS[name]
    if weights is None:
        return [r / sum(SD_SIDES) for r in SD_SIDES]
    return [float(weights.get(r, 0.0)) for r in SD_SIDES]


def slider_weights(bundle: AttentionBundle, values: list[float]) -> dict[int, float]:
    """Map slider values (finest first) onto the bundle's resolutions by rank, normalised to sum 1 so that the KL
    threshold keeps its meaning whatever the mix."""
    sides = sorted(bundle.attention, reverse=True)
    weights = {r: float(v) for r, v in zip(sides, values)}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("All resolution weights are 0: give at least one resolution a positive weight.")
    return {r: w / total for r, w in weights.items()}


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


def render(entry: _Entry, out_dir: Path, kl_threshold, iterations, num_points, refine, weights) -> View:
    """The slider path: cached bundle -> segmentation -> overlay, label map, label PNG and segment table."""
    start = time.perf_counter()
    result = segment_bundle(
        entry.bundle,
        kl_threshold=float(kl_threshold),
        iterations=int(iterations),
        num_points=int(num_points),
        refine=bool(refine),
        resolution_weights=slider_weights(entry.bundle, list(weights)),
    )
    label_file = Path(out_dir) / f"{entry.file.stem}-labels.png"
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
    out_dir = Path(tempfile.mkdtemp(prefix="diffseg-app-labels-"))
    examples = sorted(
        str(p) for p in resources.files("diffseg").joinpath("examples").iterdir() if str(p).endswith(".jpg")
    )

    def run(path, timestep, words, kl_threshold, iterations, num_points, refine, *weights):
        try:
            start = time.perf_counter()
            image = read_upload(path)
            entry, encoded = cache.get(image, int(timestep), parse_words(words))
            encode_seconds = time.perf_counter() - start
            view = render(entry, out_dir, kl_threshold, iterations, num_points, refine, weights)
        except (ValueError, ImportError, OSError) as error:
            raise gr.Error(str(error)) from error
        source = f"encoded in {encode_seconds:.1f} s" if encoded else "attention from cache"
        status = f"**{view.num_segments} segments** · segmented in {view.seconds:.2f} s · {source}"
        return view.overlay, view.label_map, status, str(view.label_file), str(entry.file), view.table

    def on_image(path, *settings):
        if not path:  # cleared: reset the outputs quietly
            return None, None, "Upload an image or pick an example.", None, None, ""
        return run(path, *settings)

    def apply_preset(name, *settings):
        weights = preset_weights(name)
        return (*weights, *run(*settings[:7], *weights))

    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )  # system fonts: the default theme would fetch web fonts from the internet
    with gr.Blocks(title="DiffSeg") as blocks:
        gr.Markdown(
            "## DiffSeg — unsupervised zero-shot segmentation with Stable Diffusion\n"
            "Upload an image: one UNet step captures its self-attention (slow, once per image and timestep); "
            "every other control re-segments the cached attention at once."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], elem_id="input-image")
                gr.Examples(examples=examples, inputs=image)
                timestep = gr.Slider(
                    0, 999, value=_ENCODE.timestep, step=1, label="Timestep (re-encodes)", elem_id="timestep"
                )
                words = gr.Textbox(
                    label="Name segments with (comma-separated words, optional; re-encodes)",
                    placeholder="road, car, person, sky",
                    elem_id="labels",
                )
                kl = gr.Slider(
                    0.05, 3.0, value=_SEGMENT.kl_threshold, step=0.05, label="KL threshold τ", elem_id="kl-threshold"
                )
                iterations = gr.Slider(
                    1, 6, value=_SEGMENT.iterations, step=1, label="Merge iterations", elem_id="iterations"
                )
                points = gr.Slider(
                    2, 32, value=_SEGMENT.num_points, step=1, label="Anchor grid (M×M)", elem_id="num-points"
                )
                refine = gr.Checkbox(value=_SEGMENT.refine, label="K-means refinement", elem_id="refine")
                preset = gr.Dropdown(
                    list(RESOLUTION_PRESETS), value="proportional", label="Resolution preset", elem_id="preset"
                )
                sliders = [
                    gr.Slider(0, 1, value=w, step=0.01, label=f"Weight {r}² (normalised)", elem_id=f"weight-{r}")
                    for r, w in zip(SD_SIDES, preset_weights("proportional"))
                ]
            with gr.Column(scale=2):
                status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
                with gr.Row():
                    overlay = gr.Image(label="Overlay", format="png", interactive=False, elem_id="overlay")
                    label_view = gr.Image(label="Label map", format="png", interactive=False, elem_id="label-map")
                with gr.Row():
                    label_file = gr.File(label="Label map (PNG of ids)", elem_id="label-download")
                    bundle_file = gr.File(label="Attention bundle (safetensors)", elem_id="bundle-download")
                table = gr.HTML(elem_id="segments")

        settings = [image, timestep, words, kl, iterations, points, refine, *sliders]
        outputs = [overlay, label_view, status, label_file, bundle_file, table]
        # Only the image and the timestep can trigger the model; the rest re-use the cached bundle. "always_last":
        # while one segmentation runs, further moves collapse into one run with the latest values.
        image.change(on_image, settings, outputs, trigger_mode="always_last")  # upload, example, clear
        timestep.release(run, settings, outputs, trigger_mode="always_last")
        words.submit(run, settings, outputs, trigger_mode="always_last")
        words.blur(run, settings, outputs, trigger_mode="always_last")
        for control in (kl, iterations, points, *sliders):
            control.input(run, settings, outputs, trigger_mode="always_last", show_progress="minimal")
        refine.input(run, settings, outputs, trigger_mode="always_last")
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
