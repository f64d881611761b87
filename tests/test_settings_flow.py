"""Settings flow as config objects made once, through one method table; every option the README shows reaches the
library as the config it names."""

import json
from dataclasses import fields

import numpy as np
import pytest

from diffseg import METHODS, load_bundle
from diffseg.config import DiffCutConfig, EncodeConfig, NamingConfig, SegmentConfig
from diffseg.io.outputs import OutputFolder, read_labels, writers_for
from diffseg.jobs.runner import Job, JobConfig, Outcome, deliver, pending
from diffseg.methods.registry import method_of

from conftest import quadrants_image, run_cli, tiny_model


def test_every_method_row_encodes_its_bundle_type_that_round_trips_and_segments(
    tiny_pipeline, tiny_sd3_pipeline, tmp_path
):
    image = quadrants_image(96, 128)
    sd3 = tiny_sd3_pipeline
    for name, method in METHODS.items():
        pipe = tiny_pipeline if method.runs_on(tiny_pipeline.backbone) else sd3  # a UNet, else an SD3
        words = ["sky", "grass"] if method.concepts else None  # concept maps map words: they need some
        bundle = pipe.encode(image, method=name, resolution=256, labels=words)
        assert type(bundle) is method.bundle and bundle.method == name and method_of(bundle) is method
        again = load_bundle(bundle.save(tmp_path / f"{name}.safetensors"))
        assert type(again) is method.bundle and again.timestep == method.encode_defaults.timestep
        ours = pipe.segment(again, method.config())
        segments = len(words) if method.concepts else len(np.unique(ours.labels))  # a concept may win no pixel
        assert ours.labels.shape == (96, 128) and ours.num_segments == segments
        np.testing.assert_array_equal(ours.labels, pipe.segment(bundle).labels)
    with pytest.raises(ValueError, match="reads image-to-CLIP-text attention, which Stable Diffusion 1.x does not"):
        tiny_pipeline.encode(image, method="seg4diff")


def test_a_bundle_takes_only_its_own_method_settings_named(tiny_pipeline):
    bundle = tiny_pipeline.encode(quadrants_image(64, 64))
    with pytest.raises(ValueError, match="DiffCutConfig"):
        tiny_pipeline.segment(bundle, DiffCutConfig())
    with pytest.raises(ValueError, match=r"\['tau'\] are not settings of diffseg"):
        tiny_pipeline.segment(bundle, tau=0.3)
    with pytest.raises(ValueError, match="`kl_threshold` values must be positive"):
        tiny_pipeline.segment(bundle, kl_threshold=-1.0)  # an override is validated by the config it makes


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EncodeConfig(timestep=1000), "`timestep`"),
        (lambda: EncodeConfig(resolution=10), "`resolution`"),
        (lambda: EncodeConfig(resize="stretch"), "`resize`"),
        (lambda: EncodeConfig(crop="middle"), "`crop`"),
        (lambda: EncodeConfig(noise_seed=1.5), "`noise_seed`"),
        (lambda: NamingConfig(voting="loudest"), "`voting`"),
        (lambda: NamingConfig(min_confidence=float("nan")), "`min_confidence`"),
        (lambda: NamingConfig(min_confidence=2), r"`min_confidence` must lie in \[0, 1\]"),  # before: after encoding
        (lambda: NamingConfig(segment_from="both"), "`segment_from`"),
        (lambda: JobConfig("concepts"), "Concept maps need words"),
        (lambda: JobConfig("diffcut", segment=SegmentConfig()), "DiffCutConfig"),
        (lambda: JobConfig("maskcut"), "`method`"),
    ],
)
def test_settings_are_refused_where_they_are_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_job_config_fills_in_its_methods_defaults():
    cut = JobConfig("diffcut")
    assert cut.encode == METHODS["diffcut"].encode_defaults and cut.segment == DiffCutConfig()
    assert JobConfig().encode.timestep == EncodeConfig().timestep and isinstance(JobConfig().segment, SegmentConfig)


def test_resume_asks_every_sink_and_a_failed_write_is_the_images_failure(tiny_pipeline, tmp_path):
    folder = OutputFolder(tmp_path / "out", tuple(writers_for(overlay=False)))
    job = Job(tiny_pipeline, JobConfig(segment=SegmentConfig(kl_threshold=0.5)))
    items = [("a", "a"), ("b", "b")]
    outcomes = list(job.run(items, [folder], load=lambda source: quadrants_image(64, 64)))
    assert all(o.ok for o in outcomes) and pending(items, [folder]) == []

    class Full:  # a sink whose disk is full
        def done(self, name, source):
            return False

        def write(self, outcome):
            raise OSError("No space left on device")

    assert pending(items, [folder, Full()]) == items
    failed = deliver(Outcome("c", "c", outcomes[0].result, outcomes[0].bundle), [Full()])
    assert not failed.ok and failed.error == "writing failed: No space left on device"


def test_options_the_readme_shows_reach_the_library_as_the_configs_they_name(
    tiny_checkpoint, tiny_pipeline, tmp_path, capsys
):
    """Each command line's label map is the library's for the configs its options name."""
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.fromarray(quadrants_image(96, 128)).save(image)
    cases = [
        (
            ["--iterations", "2", "--num-points", "8", "--float32-merge", "--resolution-preset", "two finest"],
            {},
            SegmentConfig(iterations=2, num_points=8, reference_float16=False, resolution_weights="two finest"),
        ),
        (["--refine", "--kl-threshold", "0.6"], {}, SegmentConfig(kl_threshold=0.6, refine=True)),
        (
            ["--resize", "square", "--noise-seed", "3", "--timestep", "200", "--resolution", "128"],
            {"resize": "square", "noise_seed": 3, "timestep": 200, "resolution": 128},
            SegmentConfig(),
        ),
        (
            ["--method", "diffcut", "--tau", "0.3", "--alpha", "5"],
            {"method": "diffcut"},
            DiffCutConfig(tau=0.3, alpha=5),
        ),
        (
            ["--resolution-weights", "28x36:1,14x18:0.5"],
            {},
            SegmentConfig(resolution_weights={"28x36": 1, "14x18": 0.5}),
        ),
    ]
    for k, (options, encode, config) in enumerate(cases):
        out = tmp_path / f"out{k}"
        assert run_cli("segment", image, "-o", out, *tiny_model(tiny_checkpoint), *options) == 0, options
        expected = tiny_pipeline.segment(tiny_pipeline.encode(str(image), **encode), config).labels
        np.testing.assert_array_equal(read_labels(out / "labels" / "photo.png"), expected, err_msg=str(options))


def test_naming_options_reach_the_naming_config(tiny_checkpoint, tiny_pipeline, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.fromarray(quadrants_image(96, 128)).save(image)
    options = [
        "--words",
        "red, green, blue",
        "--voting",
        "mean",
        "--min-confidence",
        "0.4",
        "--segment-from",
        "conditional",
    ]
    assert run_cli("segment", image, "-o", tmp_path / "out", *tiny_model(tiny_checkpoint), *options) == 0
    written = json.loads((tmp_path / "out" / "semantics" / "photo.json").read_text())
    bundle = tiny_pipeline.encode(str(image), labels="red, green, blue", segment_from="conditional")
    result = tiny_pipeline.segment(bundle, naming=NamingConfig(voting="mean", min_confidence=0.4))
    np.testing.assert_array_equal(read_labels(tmp_path / "out" / "labels" / "photo.png"), result.labels)
    assert written["voting"] == "mean"
    assert {k: v["label"] for k, v in written["segments"].items()} == {str(n.id): n.label for n in result.names}


def test_every_config_field_has_one_default_that_the_cli_reads(capsys):
    """The CLI's help shows each method default as the config holds it (written once, in `diffseg.config`)."""
    with pytest.raises(SystemExit):
        run_cli("segment", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for config, names in ((SegmentConfig(), ("iterations",)), (DiffCutConfig(), ("tau", "alpha"))):
        for name in names:
            assert name in {f.name for f in fields(config)}
            assert f"default: {getattr(config, name)}" in text, name
    # The anchor grid's default depends on the model's grids (`config.anchor_points`): both numbers are shown.
    from diffseg.config import NUM_POINTS, NUM_POINTS_SINGLE_GRID, anchor_points

    assert SegmentConfig().num_points is None and (anchor_points(4), anchor_points(1)) == (16, 8)
    assert f"default: {NUM_POINTS}, the paper's; {NUM_POINTS_SINGLE_GRID} on an SD3 / Flux" in text


def test_a_method_option_given_to_a_method_that_does_not_read_it_is_named(capsys):
    """Each method-specific option is named by the note exactly when the method's config ignores it (the note's table
    checked against what each config really takes); a naming option, exactly when nothing is named."""
    from diffseg.cli import build_parser
    from diffseg.cli.options import method_config, warn_unread_options

    given = {
        "--kl-threshold": ["0.5"],
        "--iterations": ["2"],
        "--num-points": ["8"],
        "--refine": [],
        "--float32-merge": [],
        "--resolution-weights": ["64:1"],
        "--resolution-preset": ["finest"],
        "--tau": ["0.3"],
        "--alpha": ["5"],
        "--pamr": [],
        "--power": ["2"],
    }
    parser = build_parser()
    for method in METHODS:
        plain = method_config(parser.parse_args(["segment", "x.png", "-o", "out", "--method", method]))
        for option, value in given.items():
            args = parser.parse_args(["segment", "x.png", "-o", "out", "--method", method, option, *value])
            read = method_config(args) != plain
            assert (warn_unread_options(args) == [option]) is not read, (method, option)
            assert (option in capsys.readouterr().err) is not read
    for option, value in (("--voting", "mean"), ("--min-confidence", "0.5"), ("--segment-from", "conditional")):
        alone = parser.parse_args(["segment", "x.png", "-o", "out", option, value])
        assert warn_unread_options(alone) == [option] and "nothing is named" in capsys.readouterr().err
        named = parser.parse_args(["segment", "x.png", "-o", "out", option, value, "--words", "sky, grass"])
        assert warn_unread_options(named) == [] and capsys.readouterr().err == ""
