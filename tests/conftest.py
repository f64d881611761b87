"""Shared fixtures: one tiny random Stable Diffusion checkpoint per test run, saved and loaded the users' way."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from diffseg import DiffSegPipeline
from diffseg.cli import main
from diffseg.testing.models import save_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) of the tiny random architecture."""
    return save_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-sd", "tiny", seed=0)


@pytest.fixture(scope="session", autouse=True)
def prompt_cache(tmp_path_factory):
    """The user cache (empty prompts of diffusion transformers) in a folder of this test run, not the home folder;
    also for the CLI subprocesses tests start."""
    folder = tmp_path_factory.mktemp("diffseg-cache")
    previous = os.environ.get("DIFFSEG_CACHE")
    os.environ["DIFFSEG_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("DIFFSEG_CACHE", None)
    else:
        os.environ["DIFFSEG_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_sd3_checkpoint(tmp_path_factory):
    """Tiny SD3 (joint MM-DiT blocks, two CLIPs and T5, static flow-matching shift 3)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-sd3", "tiny-sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_checkpoint(tmp_path_factory):
    """Tiny Flux.1-dev (double- and single-stream blocks, RoPE, CLIP and T5, guidance, resolution-dependent shift)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-flux", "tiny-flux", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    return DiffSegPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sd2_checkpoint(tmp_path_factory):
    """Tiny SD 2.x (1024-wide OpenCLIP-style text states, linear projections, v-prediction schedule)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-sd2", "tiny-sd2", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_checkpoint(tmp_path_factory):
    """Tiny SDXL (two CLIP text encoders, `text_time` added embedding, no attention in the first block)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "tiny-sdxl", "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_pipeline(tiny_sdxl_checkpoint):
    return DiffSegPipeline.from_pretrained(tiny_sdxl_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tiny_sd3_checkpoint):
    """The tiny SD3, float32 on the CPU, loaded once for the run (tests read it; none changes it)."""
    return DiffSegPipeline.from_pretrained(tiny_sd3_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_flux_pipeline(tiny_flux_checkpoint):
    """The tiny Flux, float32 on the CPU, loaded once for the run."""
    return DiffSegPipeline.from_pretrained(tiny_flux_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance for one test module (2 CPUs, no dashboard)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (the ray extra)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def matched_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels on which two label maps agree once their ids are matched one-to-one (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    k = int(max(a.max(), b.max())) + 1
    hist = np.bincount(a.ravel().astype(np.int64) * k + b.ravel(), minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(hist, maximize=True)
    return float(hist[rows, cols].sum() / a.size)


def relative_error(ours, reference) -> float:
    """‖ours − reference‖ / ‖reference‖ (Frobenius): what reduced precision or another kernel order can promise over
    millions of elements, where the largest single error depends on the machine's kernels."""
    import torch

    ours, reference = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(reference, dtype=torch.float64)
    return float(torch.linalg.vector_norm(ours - reference) / torch.linalg.vector_norm(reference))


def error_percentile(ours, reference, q: float = 99.0) -> float:
    """The q-th percentile of |ours − reference| (a high percentile, not the maximum, is stable across CPUs)."""
    import torch

    error = (torch.as_tensor(ours, dtype=torch.float64) - torch.as_tensor(reference, dtype=torch.float64)).abs()
    return float(np.percentile(error.reshape(-1).numpy(), q))


def run_cli(*argv) -> int:
    """Run `diffseg ARGV...` in this process (paths and numbers as they are); returns the exit status."""
    return main([str(a) for a in argv])


def kill_mid_run(argv, started, seed: int | None = None, *, group: bool = False, timeout: float = 240, env=None):
    """The one kill harness: run `diffseg ARGV...` in a subprocess, and SIGKILL it (with `group`, its whole process
    group: a Ray job's own processes too) once `started()` holds, at once or, with `seed`, a seeded random moment of
    up to a second later. Returns the killed process."""
    command = [sys.executable, "-m", "diffseg.cli", *map(str, argv)]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=group, env=env
    )
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not started():
        time.sleep(0.02)
    if seed is not None:
        time.sleep(random.Random(seed).uniform(0.0, 0.8))
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        process.send_signal(signal.SIGKILL)
    process.wait()
    return process


def tiny_model(checkpoint) -> tuple:
    """The command-line options that select the tiny test checkpoint on the CPU."""
    return ("--model", checkpoint, "--device", "cpu")


def quadrants_image(height: int = 256, width: int = 320) -> np.ndarray:
    """(H, W, 3) uint8: four flat colours, a little texture."""
    rng = np.random.default_rng(0)
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (220, 40, 40)
    image[: height // 2, width // 2 :] = (40, 200, 60)
    image[height // 2 :, : width // 2] = (40, 60, 220)
    image[height // 2 :, width // 2 :] = (230, 220, 60)
    return np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """A folder of good and bad inputs: JPEG, PNG with alpha, grayscale (in a subfolder), corrupt, empty."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(quadrants_image(240, 320)).save(folder / "photo.jpg", quality=95)
    rgba = np.dstack([quadrants_image(200, 200), np.full((200, 200), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(quadrants_image(128, 96)[:, :, 0], "L").save(folder / "sub" / "gray.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff this is not really a JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder


# ---------------------------------------------------------------------------------------------- the slow marker

# Tests that start a browser, a Ray instance or a killed subprocess: `pytest -m "not slow"` leaves them out for a fast
# inner loop; CI (`.ci/run`) runs everything.
# A test that kills a subprocess says so with `@pytest.mark.slow`; one that uses these fixtures is marked here.
SLOW_FIXTURES = {"local_ray", "browser", "demo_server", "sdxl_demo_server", "user"}


def pytest_collection_modifyitems(items):
    for item in items:
        if set(getattr(item, "fixturenames", ())) & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
