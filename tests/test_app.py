import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.app.cache import BundleCache, EncodeCancelled
from diffseg.app.demo import (
    preset_weights,
    presets_for,
    read_upload,
    slider_weights,
)
from diffseg.app.view import SMALL_SEGMENT, image_uri, render, segment_rows, segment_table
from diffseg.bundle import AttentionBundle
from diffseg.io.outputs import read_labels
from diffseg.naming.vocabulary import SegmentLabel

from conftest import quadrants_image

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`); .ci/run installs it"
)


def _playwright():
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")


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
    stages = []
    entry, encoded = cache.get(quadrants_image(64, 64), 300, report=lambda stage, fraction: stages.append(stage))
    assert encoded and list(dict.fromkeys(stages)) == ["Encoding the image (VAE)", "One denoising step (UNet)"]
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
    monkeypatch.setattr("diffseg.app.demo.MAX_PIXELS", 5000)
    with pytest.raises(ValueError, match="100×100 pixels; the limit"):
        read_upload(str(tmp_path / "big.png"))


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
    view = render(
        type("Result", (), {"labels": labels.astype(np.int32), "names": None})(), bundle_image, tmp_path, "photo"
    )
    ids = re.search(r"data-ids='data:image/png;base64,([^']+)'", view.viewer).group(1)
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(ids))).convert("RGB")).astype(np.int64)
    assert np.array_equal(rgb[..., 0] + 256 * rgb[..., 1], labels)
    jpeg = Image.open(io.BytesIO(base64.b64decode(bundle_image.split(",", 1)[1])))
    assert jpeg.size == (400, 300)
    assert np.abs(np.asarray(jpeg, dtype=np.int64) - image).mean() < 8  # JPEG at quality 90 of a noisy image
    big = image_uri(np.zeros((3000, 4000, 3), dtype=np.uint8))
    assert Image.open(io.BytesIO(base64.b64decode(big.split(",", 1)[1]))).size == (1024, 768)
    assert read_labels(view.label_file).shape == (300, 400)  # the download stays at full size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_server(tiny_checkpoint, tmp_path):
    yield from _serve(tiny_checkpoint, tmp_path, "--cache-size", "2")  # small: the test evicts on purpose


@pytest.fixture
def sdxl_app_server(tiny_sdxl_checkpoint, tmp_path):
    yield from _serve(tiny_sdxl_checkpoint, tmp_path)


def _serve(tiny_checkpoint, tmp_path, *options):
    port = _free_port()
    temp = tmp_path / "server-tmp"  # the server's temporary folders go here: checked after it exits
    temp.mkdir()
    log = tmp_path / "app.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diffseg.cli",
                "app",
                "--model",
                str(tiny_checkpoint),
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-upload-mb",
                "1",
                *options,
            ],
            stdout=stderr,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(temp)},
        )
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"diffseg app exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.3)
    yield f"http://127.0.0.1:{port}/", log
    process.terminate()
    process.wait(timeout=30)
    assert not list(temp.glob("diffseg-app-*")), "the server left its temporary folders behind"


_STATUS_LINE = r"\d+ segments? · segmented in [\d.]+ s · [^\n]+"


def _status(page) -> str:
    """The status line alone (the element also holds Gradio's progress text while an event runs)."""
    match = re.search(_STATUS_LINE, page.inner_text("#status"))
    return match.group(0) if match else ""


def _launch(playwright):
    """Debian's Chromium, headless, with nothing of its own reaching out to the network."""
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )


def _wait_status(page, previous: str | None = None, timeout: float = 120_000) -> str:
    """Wait until the page shows a finished status line different from `previous`; return it."""
    page.wait_for_function(
        "([pattern, prev]) => { const t = document.querySelector('#status').innerText;"
        " const m = t.match(new RegExp(pattern)); return !/processing|queue/.test(t) && m !== null && m[0] !== prev; }",
        arg=[_STATUS_LINE, previous],
        timeout=timeout,
    )
    return _status(page)


DOCS = Path(__file__).resolve().parents[1] / "docs"


def _settled(page) -> None:
    """Wait until no event is running or queued on the viewer (Gradio's progress veil is off)."""
    page.wait_for_function(
        "() => !document.querySelector('#viewer [data-testid=status-tracker]:not(.hide)')", timeout=60_000
    )
    time.sleep(0.3)


def _viewer(page) -> dict:
    """The viewer's state as the page holds it: segments (from the server's data), selection, opacity, boundaries."""
    return page.evaluate(
        """() => { const v = document.querySelector('#viewer .diffseg-viewer');
        return {segments: JSON.parse(v.dataset.segments), selected: v.dataset.selected, opacity: v.dataset.opacity,
                boundaries: v.dataset.boundaries}; }"""
    )


def _pixel(page, x: float, y: float) -> list[int]:
    """The viewer canvas's RGB at (x, y), fractions of its width and height."""
    return page.evaluate(
        """([x, y]) => { const c = document.querySelector('#viewer canvas');
        return [...c.getContext('2d').getImageData(Math.floor(x * c.width), Math.floor(y * c.height), 1, 1).data]
        .slice(0, 3); }""",
        [x, y],
    )


def _white_pixels(page) -> int:
    return page.evaluate(
        """() => { const c = document.querySelector('#viewer canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] === 255 && d[i + 1] === 255 && d[i + 2] === 255) n++;
        return n; }"""
    )


def _point(page, segment: dict) -> tuple[float, float]:
    """Page coordinates of a segment's name anchor on the viewer canvas."""
    box = page.locator("#viewer canvas").bounding_box()
    return box["x"] + segment["x"] * box["width"], box["y"] + segment["y"] * box["height"]


def _set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


# Visible buttons, images and canvases with no accessible name.
_UNNAMED = """() => [...document.querySelectorAll('button, img, canvas, [role=button]')].filter(e => {
    if (!e.offsetParent || e.closest('[aria-hidden=true]')) return false;
    const labelled = e.getAttribute('aria-labelledby');
    const name = e.getAttribute('aria-label') || e.getAttribute('alt') || e.getAttribute('title')
        || (labelled && document.getElementById(labelled)?.textContent) || e.textContent;
    return !(name && name.trim()); }).map(e => e.outerHTML.slice(0, 120))"""


@needs_chromium
def test_demo_in_a_real_browser(app_server, tmp_path):
    playwright = _playwright()
    url, log = app_server
    image_path = tmp_path / "upload.png"
    Image.fromarray(quadrants_image(240, 320)).save(image_path)
    others = []
    for k in range(2):
        others.append(tmp_path / f"other-{k}.png")
        Image.fromarray(quadrants_image(160 + 32 * k, 160)[:, ::-1].copy()).save(others[-1])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")

    def encodes() -> int:
        return len(re.findall(r"encode #\d+", log.read_text()))

    def segmentations() -> int:
        return len(re.findall(r"segmentation #\d+", log.read_text()))

    def count(text: str) -> int:
        return int(re.search(r"(\d+) segments?", text).group(1))

    external = []
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
        page.goto(url)
        # 1. Upload: one encode and one segmentation (not a second, redundant run from the cache).
        page.set_input_files("#input-image input[type=file]", str(image_path))
        first = _wait_status(page)
        assert "encoded in" in first and encodes() == 1
        time.sleep(1.0)
        assert segmentations() == 1
        # Accessibility: the status is a live region; controls, images and the viewer have names; the examples
        # have captions.
        assert page.locator("#status[role=status][aria-live=polite]").count() == 1
        page.wait_for_function(f"() => ({_UNNAMED})().length === 0", timeout=5_000)
        assert page.locator("#viewer canvas").get_attribute("aria-label").startswith("upload: ")
        assert page.locator("#examples .caption").all_inner_texts() == ["Landscape", "Street", "Tabletop"]
        # 2. The KL slider re-segments from the cache; the table is sorted by area, tiny segments collapsed.
        _set_number(page, "kl-threshold", "0.3")
        moved = _wait_status(page, first)
        assert "from cache" in moved and count(moved) != count(first) and count(moved) >= 3 and encodes() == 1
        page.wait_for_function(
            "n => document.querySelectorAll('#segments tr[data-segment]').length === n", arg=count(moved)
        )
        areas = page.evaluate(
            "sel => [...document.querySelectorAll(sel)].map(td => parseFloat(td.textContent))",
            "#segments table:not(details table) tr[data-segment] td:nth-child(2)",
        )
        small = page.evaluate(
            "sel => [...document.querySelectorAll(sel)].map(td => parseFloat(td.textContent))",
            "#segments details tr[data-segment] td:nth-child(2)",
        )
        assert areas == sorted(areas, reverse=True) and min(areas) >= 0.5 and len(areas) + len(small) == count(moved)
        assert small and all(a <= 0.5 for a in small)  # collapsed under a disclosure (areas shown to 0.1 %)
        # 3. Hover shows a segment's name and area; a click isolates it (the rest dimmed) and selects its row.
        segments = sorted(_viewer(page)["segments"], key=lambda s: -s["area"])
        big, other = segments[0], segments[1]
        page.mouse.move(*_point(page, big))
        tip = page.locator("#viewer .tip")
        tip.wait_for(state="visible")
        assert tip.inner_text().startswith(f"Segment {big['id']} · ") and "% of the image" in tip.inner_text()
        before = _pixel(page, other["x"], other["y"])
        page.mouse.click(*_point(page, big))
        assert _viewer(page)["selected"] == str(big["id"])
        assert page.locator(f"#segments tr[data-segment='{big['id']}']").get_attribute("aria-selected") == "true"
        after = _pixel(page, other["x"], other["y"])
        assert sum(after) < 0.5 * sum(before)  # dimmed
        # ... and clicking a row isolates its segment.
        page.locator(f"#segments tr[data-segment='{other['id']}']").click()
        assert _viewer(page)["selected"] == str(other["id"])
        assert page.locator(f"#segments tr[data-segment='{big['id']}']").get_attribute("aria-selected") == "false"
        page.locator(f"#segments tr[data-segment='{other['id']}']").click()  # again: nothing isolated
        assert _viewer(page)["selected"] == "" and segmentations() == 2  # all of it in the browser
        # 4. See through: opacity 1 shows the label colours, 0 the image; boundaries can be turned off.
        _set_number(page, "opacity", "1")
        page.wait_for_function("document.querySelector('#viewer .diffseg-viewer').dataset.opacity === '1'")
        colour = big["colour"]
        assert _pixel(page, big["x"], big["y"]) == [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
        _set_number(page, "opacity", "0")
        page.wait_for_function("document.querySelector('#viewer .diffseg-viewer').dataset.opacity === '0'")
        original = np.asarray(Image.open(image_path))[int(big["y"] * 240), int(big["x"] * 320)]
        assert np.abs(np.array(_pixel(page, big["x"], big["y"])) - original).max() <= 24  # JPEG
        edges = _white_pixels(page)
        page.locator("#boundaries input").uncheck()
        page.wait_for_function("document.querySelector('#viewer .diffseg-viewer').dataset.boundaries === 'false'")
        assert _white_pixels(page) < edges
        page.locator("#boundaries input").check()
        _set_number(page, "opacity", "0.5")
        assert segmentations() == 2
        # 5. Presets set the weights (short relative numbers); a weight moved by hand makes the preset "custom".
        page.locator("#preset input").click()
        page.get_by_role("option", name="third and fourth").click()
        page.wait_for_function("document.querySelector('#weight-0 input[type=number]').value === '0'")
        preset = _wait_status(page, moved)
        assert "from cache" in preset and encodes() == 1
        assert [page.locator(f"#weight-{k} input[type=number]").input_value() for k in range(4)] == ["0", "0", "2", "1"]
        _set_number(page, "weight-1", "1")
        page.wait_for_function("document.querySelector('#preset input').value === 'custom'")
        custom = _wait_status(page, preset)
        assert "from cache" in custom
        # 6. Download the label map: ids at the image's size, named after the image.
        with page.expect_download() as download:
            page.locator("#label-download a").first.click()
        saved = tmp_path / "labels.png"
        assert download.value.suggested_filename == "upload-labels.png"
        download.value.save_as(saved)
        labels = read_labels(saved)
        assert labels.shape == (240, 320) and labels.max() + 1 == count(custom)
        _settled(page)
        page.evaluate("window.scrollTo(0, 0)")
        page.mouse.move(*_point(page, big))  # a tooltip in the screenshot
        for folder in (ARTIFACTS, DOCS):
            folder.mkdir(exist_ok=True)
            page.screenshot(path=str(folder / "app.png"))
        # 7. The timestep re-encodes on keyboard changes: an arrow key, and a typed value with Enter.
        page.locator("#timestep input[type=range]").focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function("document.querySelector('#status').innerText.includes('encoded in')", timeout=120_000)
        assert "at t=301" in log.read_text() and encodes() == 2
        _set_number(page, "timestep", "250")
        _wait_status(page, _status(page))
        assert "at t=250" in log.read_text() and encodes() == 3
        # ... and one drag is one encode, at the value where the pointer is released.
        track = page.locator("#timestep input[type=range]").bounding_box()
        middle = track["y"] + track["height"] / 2
        page.mouse.move(track["x"] + 0.30 * track["width"], middle)
        page.mouse.down()
        for fraction in (0.32, 0.36, 0.40, 0.45):
            page.mouse.move(track["x"] + fraction * track["width"], middle, steps=3)
        page.mouse.up()
        _wait_status(page, _status(page))
        _settled(page)
        dragged = int(page.locator("#timestep input[type=number]").input_value())
        assert encodes() == 4 and f"at t={dragged} " in log.read_text() and dragged > 400
        # 8. Reset: the papers' settings come back (t=300 was evicted from the 2-entry cache: one encode).
        page.locator("#reset").click()
        page.wait_for_function("document.querySelector('#kl-threshold input[type=number]').value === '1.1'")
        page.wait_for_function(
            "n => { const t = document.querySelector('#status').innerText;"
            " return !/processing|queue/.test(t) && t.includes(n + ' segment'); }",
            arg=str(count(first)),
            timeout=120_000,
        )
        assert page.locator("#preset input").input_value() == "proportional" and encodes() == 5
        # 9. DiffCut: one more encode (its layer's features), then τ re-segments from the cache.
        page.get_by_label("diffcut").check()
        cut = _wait_status(page, _status(page))
        assert "encoded in" in cut and encodes() == 6
        assert page.locator("#tau").is_visible() and not page.locator("#kl-threshold").is_visible()
        _set_number(page, "tau", "0.9")
        assert "from cache" in _wait_status(page, cut) and encodes() == 6
        page.get_by_label("diffseg").check()
        _wait_status(page, _status(page))
        # 10. Names: the same image with words is another bundle; names on the viewer never overlap.
        page.locator("#labels textarea, #labels input").first.fill("red, green, blue, yellow")
        page.locator("#labels textarea, #labels input").first.press("Enter")
        named = _wait_status(page, _status(page))
        assert "encoded in" in named
        with page.expect_download() as download:  # the click right after Enter in the words box is not swallowed
            page.locator("#label-download a").first.click()
        assert download.value.suggested_filename == "upload-labels.png"
        boxes = page.evaluate(
            "() => [...document.querySelectorAll('#viewer .names span')].map(s => {"
            " const r = s.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"
        )
        assert boxes, "no segment name was written on the viewer"
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "two names overlap"
        assert page.locator("#segments th", has_text="name").count() == 1
        # 11. Cache collision: another image evicts the unnamed bundle; the named one keeps its own file, and
        #     its download has the words; the unnamed one re-encodes cleanly.
        runs = segmentations()
        page.set_input_files("#input-image input[type=file]", str(others[0]))
        _wait_status(page, _status(page))
        _settled(page)
        assert segmentations() == runs + 1  # a replaced image is segmented once too
        page.set_input_files("#input-image input[type=file]", str(image_path))
        again = _wait_status(page, _status(page))
        assert "from cache" in again
        with page.expect_download() as download:
            page.locator("#bundle-download a").first.click()
        download.value.save_as(tmp_path / "named.safetensors")
        assert AttentionBundle.load(tmp_path / "named.safetensors").vocabulary.words == (
            "red",
            "green",
            "blue",
            "yellow",
        )
        page.locator("#labels textarea, #labels input").first.fill("")
        page.locator("#labels textarea, #labels input").first.press("Enter")
        plain = _wait_status(page, again)
        assert "encoded in" in plain and "Error" not in log.read_text()
        # 12. Undecodable and oversized uploads: the app's message, once; the page keeps its result.
        kept = count(plain)
        page.set_input_files("#input-image input[type=file]", str(broken))
        page.get_by_text("could not be read as an image").first.wait_for(timeout=30_000)
        time.sleep(1.0)
        assert page.get_by_text("could not be read as an image").count() == 1
        assert "Could not preprocess" not in page.inner_text("body") and "/tmp" not in page.inner_text("body")
        assert count(_status(page)) == kept and page.locator("#viewer canvas").is_visible()
        page.wait_for_function(  # the input shows the result's image again, not a broken one
            "() => { const i = document.querySelector('#input-image img'); return i && i.complete && i.naturalWidth; }"
        )
        big_upload = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(big_upload)
        page.set_input_files("#input-image input[type=file]", str(big_upload))
        page.get_by_text("exceed the maximum allowed size").wait_for(timeout=30_000)
        time.sleep(1.0)
        assert count(_status(page)) == kept and page.locator("#viewer canvas").is_visible()
        # Stop pressed while nothing encodes changes nothing, and the next move runs as usual (on the result's
        # image: the refused upload left the input empty).
        errors = page.inner_text("body").count("Error")
        page.locator("#cancel").click()
        time.sleep(0.5)
        assert count(_status(page)) == kept and page.inner_text("body").count("Error") <= errors  # no new error
        _set_number(page, "kl-threshold", "0.5")
        assert "from cache" in _wait_status(page, _status(page))
        # 13. A phone: the result stays in view while a slider moves, its track is big enough to hold.
        phone = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
        phone.goto(url)
        phone.set_input_files("#input-image input[type=file]", str(image_path))
        _wait_status(phone)
        track = phone.locator("#kl-threshold input[type=range]")
        track.scroll_into_view_if_needed()
        box = track.bounding_box()
        assert box["height"] >= 32 and box["width"] >= 200
        phone.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + box["height"] / 2)
        phone.mouse.down()
        phone.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + box["height"] / 2, steps=5)
        canvas = phone.locator("#viewer canvas").bounding_box()
        assert canvas["y"] >= 0 and canvas["y"] + canvas["height"] <= 844, "the result left the screen"
        assert 0 <= box["y"] and box["y"] + box["height"] <= 844
        phone.mouse.up()
        _wait_status(phone, _status(phone))
        _settled(phone)
        for folder in (ARTIFACTS, DOCS):
            phone.screenshot(path=str(folder / "app-phone.png"))
        phone.locator("#viewer canvas").tap()
        assert _viewer(phone)["selected"] != ""
        browser.close()
    assert external == []  # nothing fetched from outside the server: works offline


@needs_chromium
def test_demo_on_sdxl_shows_only_its_two_grids(sdxl_app_server, tmp_path):
    playwright = _playwright()
    url, _ = sdxl_app_server
    image_path = tmp_path / "wide.png"
    Image.fromarray(quadrants_image(200, 400)).save(image_path)
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.set_input_files("#input-image input[type=file]", str(image_path))
        assert "encoded in" in _wait_status(page)
        assert page.locator("#weight-0").is_visible() and page.locator("#weight-1").is_visible()
        assert not page.locator("#weight-2").is_visible() and not page.locator("#weight-3").is_visible()
        page.locator("#preset input").click()
        options = page.get_by_role("option").all_inner_texts()
        assert "two finest" in options and "third and fourth" not in options
        browser.close()


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
