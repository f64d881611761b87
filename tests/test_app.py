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
from PIL import Image

from diffseg.app import (
    BundleCache,
    preset_weights,
    presets_for,
    read_upload,
    render,
    segment_table,
    slider_weights,
)
from diffseg.outputs import read_labels
from diffseg.semantic import SegmentLabel

from conftest import quadrants_image

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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
    view = render(plain, tmp_path, 1.1, 3, 16, False, [1, 1, 1, 1], name="photo")
    assert view.label_file.name == "photo-labels.png" and view.label_file.parent == tmp_path / plain.file.stem
    cache.get(quadrants_image(64, 96), 300)  # evicts the plain bundle only, and its downloads
    assert not plain.file.exists() and named.file.exists() and cut.file.exists()
    assert not view.label_file.exists()
    again, encoded = cache.get(a, 300, ("red", "green"))
    assert not encoded and again.file.exists()


def test_presets_and_sliders_give_normalised_weights(tiny_pipeline):
    bundle = tiny_pipeline.encode(quadrants_image())
    assert preset_weights("proportional") == pytest.approx([64 / 120, 32 / 120, 16 / 120, 8 / 120])
    assert preset_weights("third and fourth") == pytest.approx([0, 0, 2 / 3, 1 / 3])
    # SDXL at 1024² has two grids: the sliders past them are 0, and presets for absent grids are not offered.
    assert preset_weights("proportional", (64, 32)) == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert "third and fourth" in presets_for((64, 32, 16, 8)) and "third and fourth" not in presets_for((64, 32))
    grids = list(bundle.attention)  # finest first: (56, 72), (28, 36), (14, 18), (7, 9)
    assert slider_weights(bundle, [1, 1, 0, 0]) == dict(zip(grids, [0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="All resolution weights are 0"):
        slider_weights(bundle, [0, 0, 0, 0])


def test_upload_errors_are_readable(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="No image"):
        read_upload(None)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="could not be read as an image"):
        read_upload(str(tmp_path / "bad.png"))
    Image.fromarray(quadrants_image(100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr("diffseg.app.MAX_PIXELS", 5000)
    with pytest.raises(ValueError, match="100×100 pixels; the limit"):
        read_upload(str(tmp_path / "big.png"))


def test_segment_table_lists_every_segment_with_its_area_and_name():
    labels = np.array([[0, 0, 1, 2]])
    html = segment_table(labels)
    assert html.count("<tr>") == 4 and "50.0" in html and "25.0" in html and "<th>label</th>" not in html
    names = [SegmentLabel(0, "sky", 0.9, 0.5), SegmentLabel(1, None, 0.2, 0.25), SegmentLabel(2, "a<b", 0.7, 0.25)]
    html = segment_table(labels, names)
    assert "<th>label</th>" in html and "sky" in html and "unlabelled" in html and "a&lt;b" in html


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_server(tiny_checkpoint, tmp_path):
    yield from _serve(tiny_checkpoint, tmp_path)


@pytest.fixture
def sdxl_app_server(tiny_sdxl_checkpoint, tmp_path):
    yield from _serve(tiny_sdxl_checkpoint, tmp_path)


def _serve(tiny_checkpoint, tmp_path):
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
                "--port",
                str(port),
                "--max-upload-mb",
                "1",
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


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`); .ci/run installs it"
)
def test_demo_in_a_real_browser(app_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    url, log = app_server
    image_path = tmp_path / "upload.png"
    Image.fromarray(quadrants_image(240, 320)).save(image_path)
    external = []
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith((url, "data:", "blob:")) else None)
        page.goto(url)
        # 1. Upload and segment: one encode.
        page.set_input_files("#input-image input[type=file]", str(image_path))
        first = _wait_status(page)
        assert "encoded in" in first

        def encodes() -> int:
            return len(re.findall(r"encode #\d+", log.read_text()))

        def count(text: str) -> int:
            return int(re.search(r"(\d+) segments?", text).group(1))

        assert encodes() == 1
        # 2. Move the KL slider: the segmentation changes, the model does not run.
        box = page.locator("#kl-threshold input[type=number]")
        box.fill("0.3")
        box.press("Enter")
        moved = _wait_status(page, first)
        assert "from cache" in moved and count(moved) != count(first)
        assert encodes() == 1
        # 3. Switch the resolution preset: the weight sliders follow and it re-segments from the cache.
        page.locator("#preset input").click()
        page.get_by_role("option", name="third and fourth").click()
        page.wait_for_function("document.querySelector('#weight-0 input[type=number]').value === '0'")
        preset = _wait_status(page, moved)
        assert "from cache" in preset and encodes() == 1
        assert page.locator("#weight-2 input[type=number]").input_value().startswith("0.6")
        assert "closer than τ merge" in page.locator("#kl-threshold").inner_text()  # each control says what it does
        # 4. Download the label map: ids at the image's size.
        with page.expect_download() as download:
            page.locator("#label-download a").first.click()
        saved = tmp_path / "labels.png"
        assert download.value.suggested_filename == "upload-labels.png"  # named after the image, not a hash
        download.value.save_as(saved)
        labels = read_labels(saved)
        assert labels.shape == (240, 320) and labels.max() + 1 == count(preset)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app.png"))
        # Reset: the paper's settings come back, from the cache; then the preset again for the steps below.
        page.locator("#reset").click()
        page.wait_for_function("document.querySelector('#kl-threshold input[type=number]').value === '1.1'")
        page.wait_for_function(
            "n => { const t = document.querySelector('#status').innerText;"
            " return !/processing|queue/.test(t) && t.includes(n + ' segment'); }",
            arg=str(count(first)),
            timeout=120_000,
        )
        reset = _status(page)
        assert "from cache" in reset and count(reset) == count(first) and encodes() == 1
        # 5. Switch to DiffCut: one more encode (its layer's features), then τ re-segments from the cache.
        page.get_by_label("diffcut").check()
        cut = _wait_status(page, _status(page))
        assert "encoded in" in cut and encodes() == 2
        assert page.locator("#tau").is_visible() and not page.locator("#kl-threshold").is_visible()
        box = page.locator("#tau input[type=number]")
        box.fill("0.9")
        box.press("Enter")
        recut = _wait_status(page, cut)
        assert "from cache" in recut and encodes() == 2
        # 6. An upload over the limit (1 MB here) is refused with a message; the page keeps its result.
        big = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(big)
        page.set_input_files("#input-image input[type=file]", str(big))
        page.get_by_text("exceed the maximum allowed size").wait_for(timeout=30_000)
        assert count(_status(page)) == count(recut) and encodes() == 2
        time.sleep(1.0)  # any clearing of the result would have happened by now
        assert page.locator("#overlay img").first.is_visible() and count(_status(page)) == count(recut)
        browser.close()
    assert external == []  # nothing fetched from outside the server: works offline


@pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`); .ci/run installs it"
)
def test_demo_on_sdxl_shows_only_its_two_grids(sdxl_app_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
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
