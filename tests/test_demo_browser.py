"""The demo in Chromium, as a user meets it: one test per property the page promises.

One server per module (the tiny checkpoint, a 2-entry bundle cache, a 1 MB upload limit) serves every test; each test
opens its own page (its own session) and uploads its own image, so no test depends on another's bundles, and counts
of encodes and segmentations are read from the server's log since the test began (`ServerLog`).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffseg.bundle import AttentionBundle
from diffseg.io.outputs import read_labels

from conftest import quadrants_image

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
DOCS = Path(__file__).resolve().parents[1] / "docs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`); .ci/run installs it"
)
DESKTOP = {"width": 1400, "height": 1000}


# ------------------------------------------------------------------------------------------------ server and browser


@dataclass
class Server:
    url: str
    log: Path
    temp: Path  # its TMPDIR: the app's folder is made there


class ServerLog:
    """What the server reported since this object was made."""

    def __init__(self, server: Server):
        self.path = server.log
        self.start = len(self.path.read_text())

    def text(self) -> str:
        return self.path.read_text()[self.start :]

    def encodes(self) -> int:
        return len(re.findall(r"encode #\d+", self.text()))

    def segmentations(self) -> int:
        return len(re.findall(r"segmentation #\d+", self.text()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(checkpoint, folder: Path, *options):
    """`diffseg app` in a subprocess whose temporary folders live in `folder`; after it exits, none may be left."""
    port = _free_port()
    temp = folder / "server-tmp"
    temp.mkdir()
    log = folder / "app.log"
    command = [sys.executable, "-m", "diffseg.cli", "app", "--model", str(checkpoint), "--device", "cpu"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-upload-mb", "1", *options]
    with open(log, "w") as stderr:
        env = {**os.environ, "TMPDIR": str(temp)}
        process = subprocess.Popen(command, stdout=stderr, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(f"diffseg app exited: {log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.3)
    yield Server(f"http://127.0.0.1:{port}/", log, temp)
    process.terminate()
    process.wait(timeout=30)
    left = [str(f.relative_to(temp)) for f in temp.rglob("*") if f.is_file()]
    assert not left, f"the server left files behind: {left[:5]}"  # Gradio's uploads and served files included


@pytest.fixture(scope="module")
def demo_server(tiny_checkpoint, tmp_path_factory):
    yield from _serve(tiny_checkpoint, tmp_path_factory.mktemp("demo"), "--cache-size", "2")  # small: tests evict


@pytest.fixture(scope="module")
def sdxl_demo_server(tiny_sdxl_checkpoint, tmp_path_factory):
    yield from _serve(tiny_sdxl_checkpoint, tmp_path_factory.mktemp("demo-sdxl"))


@pytest.fixture(scope="module")
def sd3_demo_server(tiny_sd3_checkpoint, tmp_path_factory):
    yield from _serve(tiny_sd3_checkpoint, tmp_path_factory.mktemp("demo-sd3"))


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, with nothing of its own reaching out to the network."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    with playwright.sync_playwright() as p:
        options = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        options += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=options)
        yield browser
        browser.close()


def _open(browser, server: Server, **options):
    """A new page (a new session) on the demo; every request it makes must stay on the server (works offline)."""
    page = browser.new_page(**(options or {"viewport": DESKTOP}))
    external = []
    page.on(
        "request",
        lambda r: external.append(r.url) if not r.url.startswith((server.url, "data:", "blob:")) else None,
    )
    page.goto(server.url)
    return page, external


class User:
    """One person on the demo: their page, and what the server reported since they arrived. Each action that gives
    a result waits for it: the server's log counts one more segmentation and the page has drawn it."""

    def __init__(self, page, server: Server):
        self.page, self.log = page, ServerLog(server)

    def result(self, act) -> str:
        """Do `act`, wait for the segmentation it causes to reach the page; returns the status line."""
        done = self.log.segmentations()
        act()
        deadline = time.time() + 120
        while self.log.segmentations() <= done:
            assert time.time() < deadline, "no result within 120 s"
            time.sleep(0.05)
        _settled(self.page)
        return self.status

    @property
    def status(self) -> str:
        """The status line alone (the element also holds Gradio's progress text while an event runs)."""
        match = re.search(_STATUS_LINE, self.page.inner_text("#status"))
        return match.group(0) if match else ""

    def upload(self, path: Path) -> str:
        return self.result(lambda: self.page.set_input_files("#input-image input[type=file]", str(path)))

    def type(self, elem_id: str, value: str) -> str:
        """A value typed into a control's number box, then Enter."""

        def act():
            box = self.page.locator(f"#{elem_id} input[type=number]")
            box.fill(value)
            box.press("Enter")

        return self.result(act)

    def words(self, text: str) -> str:
        def act():
            box = self.page.locator("#labels textarea, #labels input").first
            box.fill(text)
            box.press("Enter")

        return self.result(act)

    def choose(self, method: str) -> str:
        return self.result(lambda: self.page.get_by_role("radio", name=method).check())


@pytest.fixture
def user(browser, demo_server):
    page, external = _open(browser, demo_server)
    yield User(page, demo_server)
    page.close()
    assert external == [], "the page fetched something from outside the server"


def _photo(folder: Path, name: str, height: int = 240, width: int = 320) -> Path:
    """A four-colour photo whose content is unique to `name`, so the module's shared bundle cache never holds it."""
    shift = sum(name.encode()) % 97 + 1
    path = folder / f"{name}.png"
    Image.fromarray(np.roll(quadrants_image(height, width), shift, axis=1)).save(path)
    return path


# ----------------------------------------------------------------------------------------------- reading the page

_STATUS_LINE = r"\d+ segments? · segmented in [\d.]+ s · [^\n]+"


def _count(status: str) -> int:
    return int(re.search(r"(\d+) segments?", status).group(1))


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


def _largest(page) -> list[dict]:
    return sorted(_viewer(page)["segments"], key=lambda s: -s["area"])


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


def _screenshot(page, name: str) -> None:
    """The README's screenshots are the test's: they always show the page as it is (once Gradio's progress veil
    has faded out)."""
    page.wait_for_function(
        "() => [...document.querySelectorAll('#viewer [data-testid=status-tracker]')]"
        ".every(e => getComputedStyle(e).opacity === '0' || !e.offsetParent)",
        timeout=30_000,
    )
    time.sleep(0.5)
    for folder in (ARTIFACTS, DOCS):
        folder.mkdir(exist_ok=True)
        page.screenshot(path=str(folder / name))


# Visible buttons, images and canvases with no accessible name.
_UNNAMED = """() => [...document.querySelectorAll('button, img, canvas, [role=button]')].filter(e => {
    if (!e.offsetParent || e.closest('[aria-hidden=true]')) return false;
    const labelled = e.getAttribute('aria-labelledby');
    const name = e.getAttribute('aria-label') || e.getAttribute('alt') || e.getAttribute('title')
        || (labelled && document.getElementById(labelled)?.textContent) || e.textContent;
    return !(name && name.trim()); }).map(e => e.outerHTML.slice(0, 120))"""


# ------------------------------------------------------------------------------------------------------ the tests


def test_an_upload_is_encoded_once_and_segmented_once(user, tmp_path):
    assert "encoded in" in user.upload(_photo(tmp_path, "upload")) and user.log.encodes() == 1
    time.sleep(1.0)  # a redundant second run from the cache would show up in the log by now
    assert user.log.segmentations() == 1


def test_the_page_names_everything_for_screen_readers(user, tmp_path):
    user.upload(_photo(tmp_path, "named-page"))
    page = user.page
    assert page.locator("#status[role=status][aria-live=polite]").count() == 1
    page.wait_for_function(f"() => ({_UNNAMED})().length === 0", timeout=5_000)
    assert page.locator("#viewer canvas").get_attribute("aria-label").startswith("named-page: ")
    assert page.locator("#examples .caption").all_inner_texts() == ["Landscape", "Street", "Tabletop"]


def test_every_control_shows_a_focus_ring_and_downloads_are_named_by_their_file(user, tmp_path):
    """Focus by keyboard changes how each kind of control looks: its surroundings are compared in two screenshots,
    focused and not (a ring one pixel wide all round changes about as many pixels as the control has perimeter)."""
    user.upload(_photo(tmp_path, "keyboard"))
    page = user.page
    changed = {}
    controls = (
        "#kl-threshold input[type=range]",
        "#kl-threshold input[type=number]",
        "#refine input",
        "#method input[value=diffcut]",
        "#reset",
        "#labels textarea, #labels input",
        "#viewer canvas",
    )
    for selector in controls:
        element = page.locator(selector).first
        element.focus()
        page.keyboard.press("Shift+Tab")  # focus by keyboard: what :focus-visible is for
        page.keyboard.press("Tab")
        assert page.evaluate("(e) => e === document.activeElement", element.element_handle()), selector
        box = element.bounding_box()
        clip = {"x": box["x"] - 6, "y": box["y"] - 6, "width": box["width"] + 12, "height": box["height"] + 12}
        focused = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB"), dtype=int)
        page.evaluate("() => document.activeElement.blur()")
        plain = np.asarray(Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB"), dtype=int)
        changed[selector] = int((np.abs(focused - plain).sum(axis=2) > 60).sum()) / (2 * (box["width"] + box["height"]))
    assert min(changed.values()) >= 0.9, changed  # pixels changed per pixel of perimeter: a ring all round
    snapshot = page.locator("#downloads").aria_snapshot()
    for file in ("keyboard-labels.png", "keyboard-overlay.png", "keyboard-legend.json", "keyboard.safetensors"):
        assert f'link "Download {file}' in snapshot, file


def test_the_kl_threshold_resegments_from_the_cache_and_the_table_is_sorted_by_area(user, tmp_path):
    first = user.upload(_photo(tmp_path, "kl"))
    moved = user.type("kl-threshold", "0.3")
    assert "from cache" in moved and _count(moved) != _count(first) and _count(moved) >= 3
    assert user.log.encodes() == 1
    user.page.wait_for_function(
        "n => document.querySelectorAll('#segments tr[data-segment]').length === n", arg=_count(moved)
    )
    areas = user.page.evaluate(
        "sel => [...document.querySelectorAll(sel)].map(td => parseFloat(td.textContent))",
        "#segments table:not(details table) tr[data-segment] td:nth-child(2)",
    )
    small = user.page.evaluate(
        "sel => [...document.querySelectorAll(sel)].map(td => parseFloat(td.textContent))",
        "#segments details tr[data-segment] td:nth-child(2)",
    )
    assert areas == sorted(areas, reverse=True) and min(areas) >= 0.5 and len(areas) + len(small) == _count(moved)
    assert small and all(a <= 0.5 for a in small)  # collapsed under a disclosure (areas shown to 0.1 %)


def test_hover_names_a_segment_and_a_click_or_a_row_isolates_it_without_the_server(user, tmp_path):
    user.upload(_photo(tmp_path, "isolate"))
    user.type("kl-threshold", "0.3")  # several segments
    page = user.page
    big, other = _largest(page)[:2]
    page.mouse.move(*_point(page, big))
    tip = page.locator("#viewer .tip")
    tip.wait_for(state="visible")
    assert tip.inner_text().startswith(f"Segment {big['id']} · ") and "% of the image" in tip.inner_text()
    before = _pixel(page, other["x"], other["y"])
    page.mouse.click(*_point(page, big))
    assert _viewer(page)["selected"] == str(big["id"])
    assert page.locator(f"#segments tr[data-segment='{big['id']}']").get_attribute("aria-selected") == "true"
    assert sum(_pixel(page, other["x"], other["y"])) < 0.5 * sum(before)  # the rest is dimmed
    row = page.locator(f"#segments tr[data-segment='{other['id']}']")
    row.click()
    assert _viewer(page)["selected"] == str(other["id"])
    # On a desktop the table sits beside the viewer: a row clicked keeps the image in view.
    canvas, table = page.locator("#viewer canvas").bounding_box(), page.locator("#segments").bounding_box()
    assert table["x"] >= canvas["x"] + canvas["width"] and 0 <= canvas["y"] and canvas["y"] + canvas["height"] <= 1000
    assert page.locator(f"#segments tr[data-segment='{big['id']}']").get_attribute("aria-selected") == "false"
    row.click()  # again: nothing isolated
    assert _viewer(page)["selected"] == "" and user.log.segmentations() == 2  # the upload and the KL move


def test_the_image_and_the_table_work_from_the_keyboard(user, tmp_path):
    user.upload(_photo(tmp_path, "keys"))
    user.type("kl-threshold", "0.3")
    page = user.page
    order = [s["id"] for s in _largest(page)]
    page.locator("#viewer canvas").focus()
    picked = []
    for key in ("Enter", "ArrowRight", "ArrowLeft"):  # the largest segment, the next, back
        page.keyboard.press(key)
        picked.append(_viewer(page)["selected"])
    assert picked == [str(order[0]), str(order[1]), str(order[0])]
    page.keyboard.press("Escape")
    assert _viewer(page)["selected"] == ""
    row = page.locator(f"#segments tr[data-segment='{order[2]}']")
    row.focus()
    page.keyboard.press("Enter")
    assert _viewer(page)["selected"] == str(order[2])
    page.keyboard.press("Escape")  # released with the focus on its row
    assert _viewer(page)["selected"] == ""
    # Two Tab stops per slider: the track and the box, not Gradio's per-slider reset button.
    resets = page.locator("#main button[data-testid=reset-button]")
    assert resets.count() >= 5 and all(resets.nth(k).get_attribute("tabindex") == "-1" for k in range(resets.count()))


def test_opacity_and_boundaries_are_drawn_in_the_browser(user, tmp_path):
    path = _photo(tmp_path, "see-through")
    user.upload(path)
    user.type("kl-threshold", "0.3")  # segments that follow the colours
    page = user.page
    big = _largest(page)[0]
    viewer = "document.querySelector('#viewer .diffseg-viewer').dataset"
    for value in ("1", "0"):
        box = page.locator("#opacity input[type=number]")
        box.fill(value)
        box.press("Enter")
        page.wait_for_function(f"{viewer}.opacity === '{value}'")
        if value == "1":  # the label colours
            assert _pixel(page, big["x"], big["y"]) == [int(big["colour"][i : i + 2], 16) for i in (1, 3, 5)]
    original = np.asarray(Image.open(path))[int(big["y"] * 240), int(big["x"] * 320)]  # opacity 0: the image
    assert np.abs(np.array(_pixel(page, big["x"], big["y"])) - original).max() <= 24  # JPEG
    edges = _white_pixels(page)
    page.locator("#boundaries input").uncheck()
    page.wait_for_function(f"{viewer}.boundaries === 'false'")
    assert _white_pixels(page) < edges
    page.locator("#boundaries input").check()
    assert user.log.segmentations() == 2  # the upload and the KL move: none for the view


def test_presets_set_the_weights_and_a_weight_moved_by_hand_makes_them_custom(user, tmp_path):
    user.upload(_photo(tmp_path, "presets"))
    page = user.page

    def choose_preset():
        page.locator("#preset input").click()
        page.get_by_role("option", name="third and fourth").click()

    assert "from cache" in user.result(choose_preset) and user.log.encodes() == 1
    time.sleep(1.0)
    assert user.log.segmentations() == 2  # one run for one choice
    # Short relative numbers: 8:4:2:1 is the paper's 64:32:16:8.
    assert [page.locator(f"#weight-{k} input[type=number]").input_value() for k in range(4)] == ["0", "0", "2", "1"]
    assert "from cache" in user.type("weight-1", "1")
    assert page.locator("#preset input").input_value() == "custom"
    page.locator("#preset input").focus()
    page.keyboard.type("xyz")  # typing does not edit a preset's name
    assert page.locator("#preset input").input_value() == "custom"


def test_the_label_download_is_the_id_map_at_the_images_size_named_after_it(user, tmp_path):
    user.upload(_photo(tmp_path, "upload"))
    status = user.type("kl-threshold", "0.3")
    page = user.page
    with page.expect_download() as download:
        page.locator("#label-download a").first.click()
    assert download.value.suggested_filename == "upload-labels.png"
    download.value.save_as(tmp_path / "labels.png")
    labels = read_labels(tmp_path / "labels.png")
    assert labels.shape == (240, 320) and labels.max() + 1 == _count(status)
    page.evaluate("window.scrollTo(0, 0)")
    page.mouse.move(*_point(page, _largest(page)[0]))  # a tooltip in the screenshot
    _screenshot(page, "app.png")


def test_the_timestep_reencodes_on_keys_and_once_per_drag(user, tmp_path):
    user.upload(_photo(tmp_path, "timestep"))
    page = user.page
    page.locator("#timestep input[type=range]").focus()
    user.result(lambda: page.keyboard.press("ArrowRight"))
    assert "at t=301" in user.log.text() and user.log.encodes() == 2
    user.type("timestep", "250")
    assert "at t=250" in user.log.text() and user.log.encodes() == 3
    # One drag is one encode, at the value where the pointer is released.
    track = page.locator("#timestep input[type=range]").bounding_box()
    middle = track["y"] + track["height"] / 2

    def drag():
        page.mouse.move(track["x"] + 0.30 * track["width"], middle)
        page.mouse.down()
        for fraction in (0.32, 0.36, 0.40, 0.45):
            page.mouse.move(track["x"] + fraction * track["width"], middle, steps=3)
        page.mouse.up()

    user.result(drag)
    dragged = int(page.locator("#timestep input[type=number]").input_value())
    assert user.log.encodes() == 4 and f"at t={dragged} " in user.log.text() and dragged > 400


def test_reset_brings_back_the_papers_settings_and_their_result(user, tmp_path):
    first = user.upload(_photo(tmp_path, "reset"))
    user.type("kl-threshold", "0.3")
    user.type("timestep", "250")
    assert user.log.encodes() == 2
    again = user.result(lambda: user.page.locator("#reset").click())
    assert _count(again) == _count(first) and "from cache" in again  # t=300 is still cached
    assert user.log.encodes() == 2
    values = {name: user.page.locator(f"#{name} input").first.input_value() for name in ("kl-threshold", "timestep")}
    assert values == {"kl-threshold": "1.1", "timestep": "300"}
    assert user.page.locator("#preset input").input_value() == "proportional"


def test_diffcut_encodes_its_features_once_and_tau_resegments_from_the_cache(user, tmp_path):
    user.upload(_photo(tmp_path, "cut"))
    cut = user.choose("diffcut")
    assert "encoded in" in cut and user.log.encodes() == 2
    assert user.page.locator("#tau").is_visible() and not user.page.locator("#kl-threshold").is_visible()
    assert "from cache" in user.type("tau", "0.9") and user.log.encodes() == 2
    assert "from cache" in user.choose("diffseg") and user.log.encodes() == 2
    assert user.page.locator("#kl-threshold").is_visible() and not user.page.locator("#tau").is_visible()


def test_on_sd3_seg4diff_is_offered_encodes_once_and_its_threshold_resegments_from_the_cache(
    browser, sd3_demo_server, tmp_path
):
    page, external = _open(browser, sd3_demo_server)
    sd3 = User(page, sd3_demo_server)
    try:
        assert "encoded in" in sd3.upload(_photo(tmp_path, "sd3", 96, 128)) and sd3.log.encodes() == 1
        assert page.locator("#advanced").is_visible()  # the transformer's block range
        merged = sd3.choose("seg4diff")
        assert "encoded in" in merged and sd3.log.encodes() == 2
        assert page.locator("#seg4diff-kl").is_visible() and not page.locator("#kl-threshold").is_visible()
        assert "from cache" in sd3.type("seg4diff-kl", "0.01") and sd3.log.encodes() == 2
        assert "from cache" in sd3.choose("diffseg") and sd3.log.encodes() == 2
    finally:
        page.close()
    assert external == [], "the page fetched something from outside the server"


def test_on_sd3_words_name_segments_and_concept_maps_show_each_words_share(browser, sd3_demo_server, tmp_path):
    """A transformer page: words name DiffSeg's segments through their concept maps (no cross-attention there), and
    the method "concepts" shows ConceptAttention's maps, each word's share under the pointer."""
    page, external = _open(browser, sd3_demo_server)
    sd3 = User(page, sd3_demo_server)
    try:
        sd3.upload(_photo(tmp_path, "sd3-words", 96, 128))
        assert "encoded in" in sd3.words("red, green")
        assert page.locator("#segments th", has_text="name").count() == 1
        names = {s["name"] for s in _viewer(page)["segments"]}
        assert names and names <= {"red", "green", "unlabelled"}
        assert "encoded in" in sd3.choose("concepts")
        segments = _viewer(page)["segments"]
        assert sorted(s["name"] for s in segments) == ["green", "red"]
        page.mouse.move(*_point(page, max(segments, key=lambda s: s["area"])))
        tip = page.locator("#viewer .tip")
        tip.wait_for(state="visible")
        assert {part.rsplit(" ", 2)[0] for part in tip.inner_text().split(" · ")} == {"red", "green"}
    finally:
        page.close()
    assert external == [], "the page fetched something from outside the server"


def test_a_unet_page_does_not_offer_seg4diff(user):
    user.page.get_by_role("radio", name="diffcut").wait_for()
    assert user.page.get_by_role("radio", name="diffcut").count() == 1
    assert user.page.get_by_role("radio", name="seg4diff").count() == 0


def test_named_segments_never_overlap_and_keep_their_own_bundle(user, tmp_path):
    """The same image with words is another bundle: another image evicts the unnamed one (2-entry cache), the named
    one keeps its own file and its download holds the words, and the unnamed one re-encodes cleanly."""
    path = _photo(tmp_path, "named")
    user.upload(path)
    assert "encoded in" in user.words("red, green, blue, yellow")
    page = user.page
    with page.expect_download() as download:  # the click right after Enter in the words box is not swallowed
        page.locator("#label-download a").first.click()
    assert download.value.suggested_filename == "named-labels.png"
    boxes = page.evaluate(
        "() => [...document.querySelectorAll('#viewer .names span')].map(s => {"
        " const r = s.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"
    )
    assert boxes, "no segment name was written on the viewer"
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "two names overlap"
    assert page.locator("#segments th", has_text="name").count() == 1
    runs = user.log.segmentations()
    user.upload(_photo(tmp_path, "named-other"))
    time.sleep(1.0)
    assert user.log.segmentations() == runs + 1  # a replaced image is segmented once too
    assert "from cache" in user.upload(path)
    with page.expect_download() as download:
        page.locator("#bundle-download a").first.click()
    download.value.save_as(tmp_path / "named.safetensors")
    bundle = AttentionBundle.load(tmp_path / "named.safetensors")
    assert bundle.vocabulary.words == ("red", "green", "blue", "yellow")
    assert bundle.model == "tiny-sd"  # the checkpoint's name, not the server's path to it
    assert "encoded in" in user.words("") and "Error" not in user.log.text()


def test_a_long_running_demo_keeps_a_bounded_number_of_files(user, demo_server, tmp_path):
    """Uploads, bundles and downloads all live in the app's folder and leave it with the cache (2 entries here):
    Gradio makes no copy of a download, and the folder does not grow with each image."""
    for k in range(4):
        user.upload(_photo(tmp_path, f"bounded-{k}"))
    (folder,) = demo_server.temp.glob("diffseg-app-*")
    files = [f for f in folder.rglob("*") if f.is_file()]
    uploads = [f for f in files if re.fullmatch(r"bounded-\d\.png", f.name)]
    assert 1 <= len(uploads) <= 2
    assert len([f for f in files if f.suffix == ".safetensors"]) <= 4  # 2 bundles, each with its download link
    assert len([f for f in files if f.name.endswith("-labels.png")]) <= 2  # their label-map downloads
    assert not [f for f in (demo_server.temp / "gradio").rglob("*") if f.is_file()]  # nothing in Gradio's own


def test_a_number_outside_its_controls_range_is_refused_by_the_controls_label(user, tmp_path):
    kept = user.upload(_photo(tmp_path, "ranges"))
    page = user.page
    for elem_id, typed, label, shown in [
        ("kl-threshold", "99", "KL threshold τ goes from 0.05 to 3", "1.1"),
        ("kl-threshold", "-1", "KL threshold τ goes from 0.05 to 3", "1.1"),
        ("timestep", "5000", "Timestep (re-encodes) goes from 0 to 999", "300"),
    ]:
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(typed)
        box.press("Enter")
        page.get_by_text(label).first.wait_for(timeout=30_000)
        toast, status = page.locator(".toast-wrap").bounding_box(), page.locator("#status-row").bounding_box()
        assert toast["y"] >= status["y"] + status["height"], "the message covers the status line and Stop"
        # The box goes back to the value of the result the page shows, and that result stays.
        page.wait_for_function(
            "([id, v]) => document.querySelector(`#${id} input[type=number]`).value === v", arg=[elem_id, shown]
        )
        assert user.status == kept
    assert user.log.encodes() == 1 and user.log.segmentations() == 1  # nothing ran on a refused value


def test_diffcut_chosen_with_words_names_its_segments(user, tmp_path):
    """DiffCut's segments are named by the words' concept maps (cross-attention of each word on a UNet)."""
    user.upload(_photo(tmp_path, "cut-words"))
    assert "encoded in" in user.words("red, green")
    cut = user.choose("diffcut")
    assert "encoded in" in cut and "not used" not in cut
    assert user.page.locator("#tau").is_visible() and user.page.locator("#segments th", has_text="name").count() == 1
    names = user.page.locator("#segments tbody tr").all_inner_texts()
    assert names and all(("red" in row or "green" in row or "unlabelled" in row) for row in names)


def test_concept_maps_show_each_words_share_where_the_pointer_is(user, tmp_path):
    """Method "concepts": the words are what it finds; one segment per word, named; pointing at the image gives every
    word's share there, from the maps the page holds (no server round trip)."""
    user.upload(_photo(tmp_path, "concepts"))
    page = user.page
    page.get_by_role("radio", name="concepts").check()  # no words yet: the page says what to do, keeps its result
    page.get_by_text("Concept maps find words").first.wait_for(timeout=30_000)
    assert "encoded in" in user.words("red, green, blue")
    segments = _viewer(page)["segments"]
    assert sorted(s["name"] for s in segments) == ["blue", "green", "red"]
    assert page.locator("#segments th", has_text="name").count() == 1
    page.mouse.move(*_point(page, max(segments, key=lambda s: s["area"])))
    tip = page.locator("#viewer .tip")
    tip.wait_for(state="visible")
    shares = dict(part.rsplit(" ", 2)[:2] for part in tip.inner_text().split(" · "))
    assert set(shares) == {"red", "green", "blue"} and abs(sum(int(v) for v in shares.values()) - 100) <= 2
    requests = user.log.segmentations()
    page.mouse.move(*_point(page, min(segments, key=lambda s: s["area"])))
    assert user.log.segmentations() == requests  # pointing asks the server nothing
    page.locator(".toast-wrap .toast-close").first.click()  # the earlier message, out of the README's picture
    page.mouse.move(*_point(page, max(segments, key=lambda s: s["area"])))
    _screenshot(page, "app-concepts.png")


def test_one_progress_display_over_the_viewer(user, tmp_path):
    """Gradio draws its progress over every output of an event unless told where: the page has one, on the viewer."""
    user.page.evaluate(
        """() => { window.progressElsewhere = 0; new MutationObserver(() => {
            const shown = [...document.querySelectorAll('[data-testid=status-tracker]:not(.hide)')]
                .filter(e => e.offsetParent && e.closest('.block') && !e.closest('#viewer'));  // on a component
            window.progressElsewhere = Math.max(window.progressElsewhere, shown.length);
            if (shown.length) window.progressWhere = shown.map(e => e.closest('.block').id);
        }).observe(document.body, {childList: true, subtree: true, attributes: true}); }"""
    )
    user.upload(_photo(tmp_path, "progress"))
    user.type("kl-threshold", "0.5")
    assert user.page.evaluate("window.progressElsewhere") == 0, user.page.evaluate("window.progressWhere")


def test_a_file_reference_no_upload_made_is_refused_without_naming_a_server_path(demo_server):
    """Gradio's API takes file references as paths: one the server did not receive is refused, and the answer holds
    no path of the server's (its working folder, its temporary folder)."""
    import json

    import httpx

    config = httpx.get(demo_server.url + "config").json()
    event = next(d for d in config["dependencies"] if d.get("api_name") == "on_change")
    components = {c["id"]: c for c in config["components"]}
    data = [components[i].get("props", {}).get("value") for i in event["inputs"]]
    image = next(k for k, i in enumerate(event["inputs"]) if components[i].get("type") == "image")
    answers = []
    for path in ("file:///etc/passwd", "notes/secret.txt", "/etc/passwd"):
        data[image] = {"path": path, "meta": {"_type": "gradio.FileData"}}
        session = f"bad-file-{len(answers)}"
        payload = {"data": data, "fn_index": event["id"], "session_hash": session, "trigger_id": None}
        httpx.post(demo_server.url + "gradio_api/queue/join", json=payload).raise_for_status()
        url = demo_server.url + f"gradio_api/queue/data?session_hash={session}"
        with httpx.stream("GET", url, timeout=60) as stream:
            for line in stream.iter_lines():
                if "process_completed" in line:
                    answers.append(json.loads(line.removeprefix("data:"))["output"])
                    break
    assert len(answers) == 3 and all(answer.get("error") is None or "/" not in answer["error"] for answer in answers)
    assert os.getcwd() not in json.dumps(answers) and str(demo_server.temp) not in json.dumps(answers)


def test_bad_uploads_get_the_apps_message_once_and_the_page_keeps_its_result(user, tmp_path):
    kept = _count(user.upload(_photo(tmp_path, "kept")))
    page = user.page
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    page.set_input_files("#input-image input[type=file]", str(broken))
    page.get_by_text("could not be read as an image").first.wait_for(timeout=30_000)
    time.sleep(1.0)
    assert page.get_by_text("could not be read as an image").count() == 1
    assert "Could not preprocess" not in page.inner_text("body") and "/tmp" not in page.inner_text("body")
    assert _count(user.status) == kept and page.locator("#viewer canvas").is_visible()
    page.wait_for_function(  # the input shows the result's image again, not a broken one
        "() => { const i = document.querySelector('#input-image img'); return i && i.complete && i.naturalWidth; }"
    )
    big = tmp_path / "big.png"  # over the server's 1 MB upload limit
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(big)
    page.set_input_files("#input-image input[type=file]", str(big))
    page.get_by_text("exceed the maximum allowed size").wait_for(timeout=30_000)
    time.sleep(1.0)
    assert _count(user.status) == kept and page.locator("#viewer canvas").is_visible()
    page.wait_for_function(  # the browser emptied the input; the server puts the result's image back
        "() => { const i = document.querySelector('#input-image img'); return i && i.complete && i.naturalWidth; }",
        timeout=15_000,
    )


def test_stop_is_shown_only_while_something_runs(user, tmp_path):
    page = user.page
    assert not page.locator("#cancel").is_visible()
    page.set_input_files("#input-image input[type=file]", str(_photo(tmp_path, "stop-shown")))
    page.locator("#cancel").wait_for(state="visible", timeout=30_000)  # while the upload is encoded
    _settled(page)
    page.locator("#cancel").wait_for(state="hidden", timeout=10_000)


def _stopped(user, act) -> None:
    """Do `act` and press Stop as soon as it shows (at once: during the encode), then let the page settle."""
    act()
    user.page.locator("#cancel").click(timeout=30_000)
    user.page.locator("#status").get_by_text("Stopped; the page shows its previous result.").wait_for(timeout=30_000)
    try:
        user.page.locator("#cancel").wait_for(state="hidden", timeout=60_000)  # nothing runs any more
    except Exception as error:  # playwright's TimeoutError
        if "Timeout" not in type(error).__name__:
            raise
        raise AssertionError(f"Stop still shown after 60 s; the server's log:\n{user.log.text()[-3000:]}") from None
    _settled(user.page)
    time.sleep(1.0)  # anything the Stop failed to stop would reach the log by now


def test_stop_during_an_encode_keeps_the_page_consistent_and_runs_nothing_more(user, tmp_path):
    user.upload(_photo(tmp_path, "before-stop"))
    shown = user.choose("diffcut")  # DiffCut's encode (1024²) is slow enough to stop on any machine
    page = user.page
    _stopped(user, lambda: page.set_input_files("#input-image input[type=file]", str(_photo(tmp_path, "stopped"))))
    assert user.log.encodes() == 2 and user.log.segmentations() == 2  # the stopped image was neither
    assert shown in user.status and page.locator("#viewer canvas").get_attribute("aria-label").startswith("before-stop")
    # The input shows the image of the result again, and the next move acts on it, from the cache.
    assert "from cache" in user.type("tau", "0.4") and user.log.encodes() == 2
    assert page.locator("#viewer canvas").get_attribute("aria-label").startswith("before-stop")


def test_stop_during_a_method_switch_restores_the_methods_controls(user, tmp_path):
    user.upload(_photo(tmp_path, "switch-stop"))
    page = user.page
    _stopped(user, lambda: page.get_by_role("radio", name="diffcut").check())
    assert page.get_by_role("radio", name="diffseg").is_checked()
    assert page.locator("#timestep input[type=number]").input_value() == "300"
    assert page.locator("#kl-threshold").is_visible() and not page.locator("#tau").is_visible()
    assert "from cache" in user.type("kl-threshold", "0.5")  # DiffSeg at t=300, as the page says
    assert user.log.encodes() == 1 and "with diffcut" not in user.log.text()


def test_on_a_phone_the_result_stays_in_view_while_a_slider_moves(browser, demo_server, tmp_path):
    screen = {"width": 390, "height": 844}
    phone, external = _open(browser, demo_server, viewport=screen, has_touch=True, is_mobile=True)
    user = User(phone, demo_server)
    user.upload(_photo(tmp_path, "my_holiday_photo_at_the_beach_2026"))
    names = phone.evaluate(  # each download's name, whole: wrapped, never cut to "my_… .safetensors"
        """() => [...document.querySelectorAll('#label-download .stem, #bundle-download .stem')]
            .map(s => [s.textContent.trim(), s.scrollWidth <= s.clientWidth + 1])"""
    )
    assert names == [["my_holiday_photo_at_the_beach_2026-labels", True], ["my_holiday_photo_at_the_beach_2026", True]]
    canvas = phone.locator("#viewer canvas").bounding_box()  # a new result is brought into view
    assert canvas["y"] >= 0 and canvas["y"] + canvas["height"] <= 844, "the result is off the screen after an upload"
    track = phone.locator("#kl-threshold input[type=range]")
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    assert box["height"] >= 32 and box["width"] >= 200  # big enough to hold

    def slide():
        phone.mouse.move(box["x"] + 0.3 * box["width"], box["y"] + box["height"] / 2)
        phone.mouse.down()
        phone.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + box["height"] / 2, steps=5)
        canvas = phone.locator("#viewer canvas").bounding_box()
        assert canvas["y"] >= 0 and canvas["y"] + canvas["height"] <= 844, "the result left the screen"
        assert 0 <= box["y"] and box["y"] + box["height"] <= 844
        phone.mouse.up()

    user.result(slide)
    _screenshot(phone, "app-phone.png")
    phone.locator("#viewer canvas").tap()
    assert _viewer(phone)["selected"] != ""
    phone.close()
    assert external == []


def test_on_sdxl_the_page_shows_only_its_two_grids(browser, sdxl_demo_server, tmp_path):
    page, _ = _open(browser, sdxl_demo_server)
    assert "encoded in" in User(page, sdxl_demo_server).upload(_photo(tmp_path, "wide", 200, 400))
    assert page.locator("#weight-0").is_visible() and page.locator("#weight-1").is_visible()
    assert not page.locator("#weight-2").is_visible() and not page.locator("#weight-3").is_visible()
    page.locator("#preset input").click()
    options = page.get_by_role("option").all_inner_texts()
    assert "two finest" in options and "third and fourth" not in options
    page.close()
