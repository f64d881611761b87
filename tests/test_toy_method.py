"""A method is one row: a toy method registered through the table alone runs through the library, the CLI (its own
option), the job runner, the Ray worker and a demo handler, with no edit to any front end.

The toy reads the tiny UNet's DiffCut layer (the FEATURES capability) and cuts its first channel into `bins` equal
quantile bins: simple enough to compute here by hand, and its labels depend on its one setting."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from diffseg.backbones.types import FEATURES
from diffseg.bundle import BUNDLE_TYPES, OneTensorBundle, load_bundle
from diffseg.config import EncodeConfig
from diffseg.io.outputs import read_labels
from diffseg.methods.registry import METHODS, register
from diffseg.methods.spec import Control, Method, per_image

from conftest import quadrants_image, run_cli, tiny_model


@dataclass(frozen=True)
class ToyConfig:
    bins: int = 2

    def __post_init__(self) -> None:
        if not 2 <= self.bins <= 8:
            raise ValueError(f"`bins` must be from 2 to 8 but is {self.bins!r}.")


@dataclass
class ToyBundle(OneTensorBundle):
    method: ClassVar[str] = "toy"
    tensor: ClassVar[str] = "toy_features"

    toy_features: torch.Tensor
    image: np.ndarray
    timestep: int
    model: str = ""
    family: str = ""
    named_by: object = None


def _encode(pipe, pixels, images, settings, vocabulary, segment_from):
    return per_image(
        ToyBundle, pipe.kind.features(pixels, **settings.step, blocks=settings.blocks), images, settings, pipe
    )


def _segment(bundle, config: ToyConfig, size, image) -> np.ndarray:
    return toy_labels(bundle.toy_features, config.bins, size)


def toy_labels(features: torch.Tensor, bins: int, size) -> np.ndarray:
    """The first channel cut at its quantiles, nearest-resized."""
    channel = features[..., 0].double()
    edges = torch.quantile(channel.flatten(), torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
    ids = torch.bucketize(channel, edges).numpy().astype(np.int32)
    ids = np.asarray(Image.fromarray(ids).resize((size[1], size[0]), Image.NEAREST))
    return np.unique(ids, return_inverse=True)[1].reshape(ids.shape).astype(np.int32)  # ids 0..K-1, every one present


TOY = Method(
    "toy",
    "Toy",
    "the first feature channel cut into quantile bins",
    "a test's method",
    ToyConfig,
    ToyBundle,
    EncodeConfig(timestep=100, noise_seed=0),
    _encode,
    _segment,
    (Control("bins", "Bins", "Quantile bins of the first channel", (2, 8, 1), int),),
    needs=frozenset({FEATURES}),
)


@pytest.fixture
def toy():
    """The toy method in the table for one test (and its rows travel to Ray workers by value)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    register(TOY)
    yield TOY
    METHODS.pop("toy", None)


def _photo(folder, name="photo.png", size=(96, 128)):
    folder.mkdir(exist_ok=True)
    Image.fromarray(quadrants_image(*size)).save(folder / name)
    return folder / name


def test_a_method_registered_through_the_table_alone_runs_in_the_library_and_its_bundle_loads_back(
    toy, tiny_pipeline, tmp_path
):
    bundle = tiny_pipeline.encode(str(_photo(tmp_path)), method="toy")
    assert isinstance(bundle, ToyBundle)
    for bins in (2, 3):
        labels = tiny_pipeline.segment(bundle, bins=bins).labels
        np.testing.assert_array_equal(labels, toy_labels(bundle.toy_features, bins, (96, 128)))
        assert labels.max() + 1 == bins
    loaded = load_bundle(bundle.save(tmp_path / "toy.safetensors"))  # by the method the file records
    assert isinstance(loaded, ToyBundle) and torch.equal(loaded.toy_features, bundle.toy_features)
    assert BUNDLE_TYPES["toy"] is ToyBundle


def test_a_registered_method_gets_its_cli_option_and_runs_through_the_job_runner(
    toy, tiny_checkpoint, tiny_pipeline, tmp_path, capsys
):
    photo = _photo(tmp_path / "in")
    out = tmp_path / "out"
    assert run_cli("segment", photo, "-o", out, *tiny_model(tiny_checkpoint), "--method", "toy", "--bins", "3") == 0
    expected = tiny_pipeline.segment(tiny_pipeline.encode(str(photo), method="toy"), bins=3).labels
    np.testing.assert_array_equal(read_labels(out / "labels" / "photo.png"), expected)
    # Its option is its own: refused by its config, by name; noted as unread by another method.
    assert run_cli("segment", photo, "-o", tmp_path / "bad", *tiny_model(tiny_checkpoint), "--method", "toy",
                   "--bins", "9") == 2  # fmt: skip
    assert "`--bins` must be from 2 to 8" in capsys.readouterr().err
    assert run_cli("segment", photo, "-o", tmp_path / "other", *tiny_model(tiny_checkpoint), "--bins", "3") == 0
    assert "--method diffseg does not read --bins (--method toy does)" in capsys.readouterr().err


def test_a_registered_method_runs_on_the_ray_workers(toy, local_ray, tiny_checkpoint, tiny_pipeline, tmp_path):
    """The driver hands the method's row to its workers (`SegmentWorker`), which do not import it."""
    folder = tmp_path / "in"
    _photo(folder)
    out = tmp_path / "job"
    argv = ("segment-dataset", folder, "-o", out, *tiny_model(tiny_checkpoint), "--method", "toy", "--bins", "3")
    assert run_cli(*argv, "--ray-address", "local", "--concurrency", "1", "--num-gpus-per-worker", "0") == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray's workers: float reductions depend on the thread count
    try:
        expected = tiny_pipeline.segment(tiny_pipeline.encode(str(folder / "photo.png"), method="toy"), bins=3)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(read_labels(out / "labels" / "photo.png"), expected.labels)


def test_a_registered_method_gets_its_demo_controls_and_handler(toy, tiny_pipeline, tmp_path):
    from diffseg.app.cache import BundleCache
    from diffseg.app.demo import Demo
    from diffseg.app.layout import build_page

    page = build_page(tiny_pipeline.backbone)
    assert "toy" in page.controls.method.choices[-1] and "toy" in page.groups
    demo = Demo(tiny_pipeline, page, BundleCache(tiny_pipeline, 2, folder=tmp_path / "bundles"), tmp_path)
    c = page.controls
    values = {component: component.value for component in page.inputs()}
    values.update({c.image: str(_photo(tmp_path / "in")), c.method: "toy", c.timestep: 100, c["bins"]: 3})
    shown = demo.segment(values, None, lambda *_, **__: None)
    assert "**3 segments**" in shown[page.results.status]
    shown = demo.segment({**values, c["bins"]: 2}, None, lambda *_, **__: None)
    assert "**2 segments**" in shown[page.results.status] and "from cache" in shown[page.results.status]
    assert demo.on_reset(values, None, lambda *_, **__: None)[c["bins"]] == 2  # its config's default
