"""The demo's parts without a browser: the bundle cache, weights and presets, uploads, the segment table and the
viewer's data. The page itself, in Chromium, is tested in `test_demo_browser.py`."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.app.cache import BundleCache, EncodeCancelled
from diffseg.app.demo import preset_weights, presets_for, read_upload, slider_weights
from diffseg.app.view import SMALL_SEGMENT, image_uri, render, segment_rows, segment_table
from diffseg.io.outputs import read_labels
from diffseg.naming.vocabulary import SegmentLabel
from diffseg.segmentation import Segmentation

from conftest import quadrants_image


def test_cache_encodes_once_per_image_and_timestep_and_stays_bounded(tiny_pipeline, tmp_path):
    cache = BundleCache(tiny_pipeline, capacity=2, folder=tmp_path)
    a, b, c = quadrants_image(), quadrants_image()[::-1].copy(), quadrants_image()[:, ::-1].copy()
    first, encoded = cache.get(a, 300)
    assert encoded and cache.encodes == 1
    again, encoded = cache.get(a.copy(), 300)  # same content, another array: a hit
    assert not encoded and again is first and cache.encodes == 1
    _, encoded = cache.get(a, 150)  # new timestep: encodes
    assert encoded and cache.encodes == 2 and len(cache) == 2
    cache.get(b, 300)
    assert len(cache) == 2 and cache.encodes == 3
    assert not first.file.exists()  # (a, 300) was least recently used: evicted with its file
    cache.get(c, 300)
    _, encoded = cache.get(a, 300)
    assert encoded and cache.encodes == 5 and len(cache) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cache_keys_files_by_everything_that_defines_a_bundle(tiny_pipeline, tmp_path):
    """The same image with and without words, and with either method, are four bundles with four files; evicting
    one never removes a file another entry still uses."""
    cache = BundleCache(tiny_pipeline, capacity=3, folder=tmp_path)
    a = quadrants_image(64, 64)
    plain, _ = cache.get(a, 300)
    named, _ = cache.get(a, 300, ("red", "green"))
    cut, _ = cache.get(a, 50, (), "diffcut")
    assert len({plain.file, named.file, cut.file}) == 3 and cut.bundle.method == "diffcut"
    assert plain.bundle.vocabulary is None and named.bundle.vocabulary.words == ("red", "green")
    result = tiny_pipeline.segment(plain.bundle)
    view = render(result, plain.image, tmp_path / plain.file.stem, "photo")
    assert view.label_file.name == "photo-labels.png" and view.label_file.parent == tmp_path / plain.file.stem
    cache.get(quadrants_image(64, 96), 300)  # evicts the plain bundle only, and its downloads
    assert not plain.file.exists() and named.file.exists() and cut.file.exists()
    assert not view.label_file.exists()
    again, encoded = cache.get(a, 300, ("red", "green"))
    assert not encoded and again.file.exists()


def test_presets_and_sliders_give_normalised_weights(tiny_pipeline):
    bundle = tiny_pipeline.encode(quadrants_image())
    # Relative weights, smallest non-zero 1: short in the slider's box and exact (8:4:2:1 is the paper's 64:32:16:8).
    assert preset_weights("proportional") == [8, 4, 2, 1]
    assert preset_weights("third and fourth") == [0, 0, 2, 1]
    # SDXL at 1024² has two grids: the sliders past them are 0, and presets for absent grids are not offered.
    assert preset_weights("proportional", (64, 32)) == [2, 1, 0, 0]
    assert "third and fourth" in presets_for((64, 32, 16, 8)) and "third and fourth" not in presets_for((64, 32))
    grids = list(bundle.attention)  # finest first: (56, 72), (28, 36), (14, 18), (7, 9)
    assert slider_weights(bundle, [1, 1, 0, 0]) == dict(zip(grids, [0.5, 0.5, 0.0, 0.0]))
    assert slider_weights(bundle, preset_weights("proportional")) == pytest.approx(
        dict(zip(grids, [64 / 120, 32 / 120, 16 / 120, 8 / 120]))
    )
    with pytest.raises(ValueError, match="All resolution weights are 0"):
        slider_weights(bundle, [0, 0, 0, 0])


def test_an_encode_reports_its_stages_and_can_be_stopped(tiny_pipeline, tmp_path):
    cache = BundleCache(tiny_pipeline, capacity=2, folder=tmp_path)
    reports = []
    entry, encoded = cache.get(quadrants_image(64, 64), 300, report=lambda *report: reports.append(report))
    stages = [stage for stage, _ in reports]
    assert encoded and list(dict.fromkeys(stages)) == ["Encoding the image (VAE)", "One denoising step (UNet)"]
    # The bar moves through each stage, layer by layer: fractions grow, and the UNet's last block is not one step.
    unet = [fraction for stage, fraction in reports if stage == "One denoising step (UNet)"]
    assert unet == sorted(unet) and unet[0] == 0 and len(set(unet)) > 20 and unet[-1] > 0.95
    calls = []

    def stop() -> bool:  # the user presses "Stop" during the UNet step
        calls.append(1)
        return len(calls) > 6

    with pytest.raises(EncodeCancelled):
        cache.get(quadrants_image(64, 96), 300, stop=stop)
    assert cache.encodes == 1 and len(cache) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    # No hook is left behind: the next encode runs to the end, and the model gives what it gave before.
    again, encoded = BundleCache(tiny_pipeline, folder=tmp_path / "other").get(quadrants_image(64, 64), 300)
    assert encoded and all(
        torch.equal(again.bundle.attention[g], entry.bundle.attention[g]) for g in entry.bundle.attention
    )


def test_upload_errors_are_readable(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="No image"):
        read_upload(None)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="could not be read as an image"):
        read_upload(str(tmp_path / "bad.png"))
    Image.fromarray(quadrants_image(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr("diffseg.app.inputs.MAX_PIXELS", 5000)
    with pytest.raises(ValueError, match="“big.png” is 100×100 pixels .0 megapixels.; the limit"):
        read_upload(str(tmp_path / "big.png"))
    # A PNG too large for Pillow to open at all (30000×30000: a header is enough) is called too large, with its
    # size, not unreadable.
    with pytest.raises(ValueError, match="“huge.png” is 900 megapixels; the limit is 0 megapixels"):
        read_upload(str(huge_png(tmp_path / "huge.png", 30000, 30000)))


def huge_png(path, width: int, height: int):
    """A PNG claiming `width`×`height` with one compressed row of pixel data (what opening it reads is the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(bytes(1 + 3 * width))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b""))
    return path


def test_segment_table_is_sorted_by_area_with_small_segments_collapsed():
    labels = np.zeros((100, 100), dtype=np.int32)
    labels[:, 60:] = 1  # 40 %
    labels[:10, :10] = 2  # 1 %
    labels[0, 0:3] = 3  # 0.03 %: small
    rows = segment_rows(labels)
    assert [r.id for r in rows] == [0, 1, 2, 3] and rows[0].area == pytest.approx(0.59)
    html = segment_table(rows)
    main, small = html.split("<details")
    assert re.findall(r"data-segment='(\d+)'", main) == ["0", "1", "2"] and "data-segment='3'" in small
    assert "1 small segment (under 0.5 % of the image each)" in small and SMALL_SEGMENT == 0.005
    assert "<th scope='col'>name</th>" not in html
    # Each segment's name anchor lies inside it.
    for r in rows:
        assert labels[int(r.y * 100), int(r.x * 100)] == r.id
    names = [SegmentLabel(0, "sky", 0.9, 0.5), SegmentLabel(1, None, 0.2, 0.4), SegmentLabel(2, "a<b", 0.7, 0.1)]
    html = segment_table(segment_rows(labels, names), named=True)
    assert "<th scope='col'>name</th>" in html and "sky" in html and "unlabelled" in html and "a&lt;b" in html


def test_viewer_data_round_trips_the_ids_and_the_image(tmp_path):
    """The viewer draws from a PNG of ids (red + 256·green) and a JPEG of the image: both must decode to what the
    server segmented, even past 256 segments and for images larger than the viewer."""
    import base64
    import io

    labels = np.arange(300 * 400).reshape(300, 400) % 700  # 700 ids
    image = quadrants_image(300, 400)
    bundle_image = image_uri(image)
    view = render(Segmentation(labels.astype(np.int32), 700, image), bundle_image, tmp_path, "photo")
    ids = re.search(r"data-ids='data:image/png;base64,([^']+)'", view.viewer).group(1)
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(ids))).convert("RGB")).astype(np.int64)
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1], labels)
    jpeg = Image.open(io.BytesIO(base64.b64decode(bundle_image.split(",", 1)[1])))
    assert jpeg.size == (400, 300)
    assert np.abs(np.asarray(jpeg, dtype=np.int64) - image).mean() < 8  # JPEG at quality 90 of a noisy image
    big = image_uri(np.zeros((3000, 4000, 3), dtype=np.uint8))
    assert Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))).size == (1024, 768)
    assert read_labels(view.label_file).shape == (300, 400)  # the download stays at full size
    assert "data-shares" not in view.viewer
    # Concept maps: the K maps stacked top to bottom in one grey PNG, each at most 256 on a side.
    shares = np.random.default_rng(0).dirichlet(np.ones(3), size=(300, 400)).transpose(2, 0, 1).astype(np.float32)
    concepts = Segmentation(shares.argmax(0).astype(np.int32), 3, image, words=("a", "b", "c"), probabilities=shares)
    grey = re.search(
        r"data-shares='data:image/png;base64,([^']+)'", render(concepts, bundle_image, tmp_path, "c").viewer
    )
    stacked = np.asarray(Image.open(io.BytesIO(base64.b64decode(grey.group(1))))).reshape(3, -1, 200) / 255
    assert stacked.shape == (3, 150, 200) and np.abs(stacked - shares[:, 1::2, 1::2]).max() <= 0.5 / 255 + 1e-6


def test_names_are_anchored_inside_their_segments_and_never_overlap():
    """The rule the written overlay (`visualisation.overlay`) and the demo's viewer share: a name goes at its segment's
    deepest pixel; names are kept largest segment first, skipping any that would overlap one already kept."""
    from diffseg.io.visualisation import label_anchors, overlay, placed_first

    labels = np.zeros((120, 200), dtype=np.int64)
    labels[:, 100:] = 1
    labels[40:80, 20:60] = 2  # a square inside segment 0: segment 0's anchor must avoid it
    anchors = label_anchors(labels)
    assert [labels[y, x] for x, y in anchors] == [0, 1, 2]
    assert tuple(anchors[2]) in {(39, 59), (40, 59), (39, 60), (40, 60)}  # the square's centre
    assert tuple(anchors[1]) in {(149, 59), (150, 59), (149, 60), (150, 60)}
    assert np.array_equal(label_anchors(labels, max_side=50)[1], [150, 58])  # sampled: a full-size pixel of 1
    # Boxes 0 and 2 overlap: the larger segment (0) keeps its name; 1 is clear of both.
    boxes = [(10, 10, 50, 20), (150, 10, 190, 20), (40, 15, 80, 25)]
    assert placed_first(np.array([50, 30, 20]), boxes) == [0, 1]
    assert placed_first(np.array([10, 30, 20]), boxes) == [1, 2]
    image = np.full((120, 200, 3), 90, dtype=np.uint8)
    plain = overlay(image, labels)
    named = overlay(image, labels, names={0: "sky", 1: "sea", 2: "boat"})
    assert not np.array_equal(plain, named)  # names were written


def test_a_failure_beyond_the_server_gets_the_apps_message_and_keeps_the_result(tiny_pipeline, tmp_path, monkeypatch):
    """PAMR or a huge cut running out of memory: the page shows the app's message, never PyTorch's, and keeps what
    it shows. (The failure is injected into the segmentation step; the encode is the real model's.)"""
    import gradio as gr

    from diffseg.app.demo import FAILED

    demo, page, values, _ = _demo_showing(tiny_pipeline, tmp_path, (64, 64))

    def no_progress(*_, **__):
        return None

    def out_of_memory(*_, **__):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate 89128960000 bytes")

    monkeypatch.setattr(tiny_pipeline, "segment", out_of_memory)
    monkeypatch.setattr(gr, "Warning", lambda message: None)
    kept = demo.segment({**values, page.controls["kl-threshold"]: 0.5}, None, no_progress)
    assert kept == demo.keep() and demo.session(None).warned[0] == FAILED
    assert (
        "alloc" not in FAILED
        and demo.session(None).values[page.controls["kl-threshold"]] == values[page.controls["kl-threshold"]]
    )


def test_stop_ends_a_long_cut_at_its_next_node_and_the_page_keeps_its_result(tiny_pipeline, tmp_path, monkeypatch):
    """A DiffCut re-cut of many segments is stopped between two nodes of its cut tree, not run to its end."""
    import gradio as gr

    from diffseg.methods.diffcut import ncut

    demo, page, values, _ = _demo_showing(tiny_pipeline, tmp_path, (96, 128), method="diffcut", timestep=50, tau=0.3)
    c = page.controls
    nodes = []
    real = ncut.best_bipartition

    def counted(*args):
        nodes.append(1)
        return real(*args)

    monkeypatch.setattr(ncut, "best_bipartition", counted)
    demo.segment({**values, c["tau"]: 0.95}, None, lambda *_, **__: None)  # the whole cut, for its node count
    full, nodes[:] = len(nodes), []
    assert full > 3

    def stopped_at_the_second(*args):
        if len(nodes) == 1:
            demo.on_cancel(None)  # Stop pressed while the cut runs
        return counted(*args)

    monkeypatch.setattr(ncut, "best_bipartition", stopped_at_the_second)
    monkeypatch.setattr(gr, "Info", lambda message: None)
    kept = demo.segment({**values, c["tau"]: 0.9}, None, lambda *_, **__: None)
    assert kept == demo.keep() and len(nodes) == 2 < full  # ended at the node after Stop
    assert demo.session(None).values[c["tau"]] == 0.95  # the page's result is the one before


def test_a_run_the_page_sent_before_stop_is_dropped_and_one_sent_after_runs(tiny_pipeline, tmp_path):
    """Stop's count on the page tells the runs apart: one sent before the latest Stop (queued behind the stopped run,
    such as the second change event of a replaced image) does nothing, one sent after it runs, whenever each starts."""
    demo, page, values, _ = _demo_showing(tiny_pipeline, tmp_path, (64, 64))
    c = page.controls
    assert values[c["kl-threshold"]] != 0.5
    stopped = demo.on_cancel(None)
    assert (
        stopped[page.stops] == 1 and stopped[c["kl-threshold"]] == values[c["kl-threshold"]]
    )  # the page learns the count, controls go back
    before = demo.segment(
        {**values, c["kl-threshold"]: 0.5}, None, lambda *_, **__: None
    )  # sent with the count before Stop
    assert before == demo.keep() and demo.session(None).values[c["kl-threshold"]] == values[c["kl-threshold"]]
    after = demo.segment({**values, c["kl-threshold"]: 0.5, page.stops: 1}, None, lambda *_, **__: None)
    assert page.results.status in after and demo.session(None).values[c["kl-threshold"]] == 0.5


def test_a_diffcut_result_tells_what_pamr_would_cost_on_it_and_stop_ends_pamr(tiny_pipeline, tmp_path):
    """The PAMR box states, before it is ticked, about how long refining the result shown takes here (this machine's
    measured rates × its segments and pixels); a refinement stops between label chunks when asked."""
    from diffseg.cancel import Cancelled, cancellable
    from diffseg.methods.diffcut.pamr import estimated_seconds, refine_labels

    assert 0 < estimated_seconds((128, 128), 3) < estimated_seconds((512, 512), 3) < estimated_seconds((512, 512), 30)
    assert estimated_seconds((512, 512), 30, reached=30 * 100**2) < estimated_seconds((512, 512), 30)  # local labels
    demo, page, _, shown = _demo_showing(tiny_pipeline, tmp_path, (96, 128), method="diffcut", timestep=50, tau=0.9)
    c = page.controls
    segments = int(re.search(r"\*\*(\d+) segment", demo.session(None).status).group(1))
    info = shown[c["pamr"]]["info"]
    assert f"{segments} segments at 128×96" in info and "about" in info
    labels = torch.randint(0, 4, (64, 64))
    with pytest.raises(Cancelled), cancellable(lambda: True):
        refine_labels(labels, torch.rand(1, 3, 64, 64))


def _demo_showing(pipeline, folder, size: tuple[int, int], **settings):
    """A demo (no browser) showing the result for a quadrants photo of `size` with `settings` (control names):
    (demo, page, the values shown, the outputs)."""
    from diffseg.app.demo import Demo
    from diffseg.app.layout import build_page

    page = build_page(pipeline.backbone)
    demo = Demo(pipeline, page, BundleCache(pipeline, folder=folder / "bundles"), folder)
    photo = folder / "photo.png"
    Image.fromarray(quadrants_image(*size)).save(photo)
    c = page.controls
    values = {control: control.value for control in page.inputs()}
    values.update({c.image: str(photo), **{c[name]: value for name, value in settings.items()}})
    shown = demo.segment(values, None, lambda *_, **__: None)
    assert page.results.status in shown  # a result
    return demo, page, values, shown


def test_a_shipped_example_is_never_deleted_by_the_upload_cache(tiny_pipeline, tmp_path):
    """Gradio serves an example from a copy in the app's folder: uploads past the cache's size delete the oldest
    upload, never that copy (before: "Street" became a broken thumbnail after four uploads)."""
    import shutil

    from diffseg.app.demo import Demo
    from diffseg.app.layout import build_page, examples

    demo = Demo(tiny_pipeline, build_page(tiny_pipeline.backbone), BundleCache(tiny_pipeline, 1, folder=tmp_path / "b"),
                tmp_path)  # fmt: skip
    (tmp_path / "cached").mkdir()
    example = tmp_path / "cached" / Path(examples()[0]).name
    shutil.copy(examples()[0], example)  # where Gradio keeps the example it serves
    uploads = []
    for k in range(3):
        uploads.append(tmp_path / f"upload{k}.png")
        Image.fromarray(quadrants_image(32 + k, 32)).save(uploads[-1])
    for path in (example, *uploads):
        demo.decoded(str(path))
    assert not uploads[0].exists() and not uploads[1].exists() and uploads[2].exists()  # uploads: the latest kept
    assert example.exists() and demo.decoded(str(example))[0].shape[2] == 3  # still served, still readable


def test_the_downloads_a_person_can_open_hold_the_viewers_colours_and_names(tiny_checkpoint, tiny_pipeline, tmp_path):
    """Beside the PNG of ids: an overlay PNG and a legend (id, name, area, colour), the colours the viewer draws; the
    CLI's `--legend` writes the same legend."""
    import json

    from conftest import run_cli, tiny_model

    photo = tmp_path / "photo.png"
    Image.fromarray(quadrants_image(64, 96)).save(photo)
    result = tiny_pipeline.segment(tiny_pipeline.encode(str(photo), labels="red, green"), kl_threshold=0.5)
    view = render(result, image_uri(result.image), tmp_path / "view", "photo")
    legend = json.loads(view.legend_file.read_text())["segments"]
    rows = {row.id: row for row in view.rows}
    assert [s["id"] for s in legend] == list(range(result.num_segments))
    for segment in legend:
        row = rows[segment["id"]]
        assert segment["colour"] == row.colour and segment["name"] == row.name
        assert abs(segment["area"] - row.area) < 1e-6
    with Image.open(view.overlay_file) as overlay:
        np.testing.assert_array_equal(np.asarray(overlay.convert("RGB")), np.asarray(result.overlay))
    options = ("--words", "red, green", "--kl-threshold", "0.5", "--legend")
    assert run_cli("segment", photo, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), *options) == 0
    assert json.loads((tmp_path / "out" / "legends" / "photo.json").read_text())["segments"] == legend
