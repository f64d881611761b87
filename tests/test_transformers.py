"""Diffusion transformers (SD3 / SD3.5, Flux.1) as backbones: detection, the cached empty prompt, flow-matching noise,
MM-DiT attention captured exactly and invisibly, DiffCut's features, and every front end, on tiny random models of
the real diffusers classes saved and loaded the users' way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffseg import AttentionBundle, DiffSegPipeline, load_bundle
from diffseg.backbones import dit
from diffseg.backbones.families import read_backbone
from diffseg.io.outputs import read_labels

from conftest import error_percentile, matched_agreement, quadrants_image, relative_error, run_cli, tiny_model

FAMILIES = ["tiny_sd3_checkpoint", "tiny_flux_checkpoint"]
SMALL = {"resolution": 256}  # Flux's native 1024² is more than a unit test needs


@pytest.fixture
def pipelines(tiny_sd3_pipeline, tiny_flux_pipeline):
    """float32 pipelines of both tiny families, by checkpoint fixture (the run's, loaded once)."""
    return {"tiny_sd3_checkpoint": tiny_sd3_pipeline, "tiny_flux_checkpoint": tiny_flux_pipeline}


# ------------------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    "config, name, grid, block",
    [
        ({"_class_name": "SD3Transformer2DModel", "in_channels": 16, "num_layers": 24}, "SD3-medium", 64, 9),
        (
            {"_class_name": "SD3Transformer2DModel", "in_channels": 16, "num_layers": 24, "dual_attention_layers": [0]},
            "SD3.5-medium",
            64,
            9,
        ),
        ({"_class_name": "SD3Transformer2DModel", "in_channels": 16, "num_layers": 38}, "SD3.5-large", 64, 14),
        ({"_class_name": "FluxTransformer2DModel", "in_channels": 64, "guidance_embeds": True}, "Flux.1-dev", 64, 18),
        ({"_class_name": "FluxTransformer2DModel", "in_channels": 64}, "Flux.1-schnell", 64, 18),
    ],
)
def test_transformer_families_are_known_from_their_configs(config, name, grid, block):
    backbone = dit.detect_transformer(config)
    assert (backbone.name, backbone.grid_sides, backbone.diffcut_block) == (name, (grid,), block)
    assert backbone.denoiser == "transformer" and backbone.size_multiple == 16 and backbone.native_size == 1024
    assert backbone.text_tokens == (256 if name != "Flux.1-dev" else 512)


@pytest.mark.parametrize(
    "config, index, words",
    [
        ({"_class_name": "FluxTransformer2DModel", "in_channels": 384}, None, "Fill"),
        ({"_class_name": "SD3Transformer2DModel", "in_channels": 16}, {"controlnet": ["x", "y"]}, "ControlNet"),
        ({"_class_name": "PixArtTransformer2DModel", "in_channels": 4}, None, "PixArtTransformer2DModel"),
    ],
)
def test_other_transformer_checkpoints_get_a_one_line_error(config, index, words):
    with pytest.raises(ValueError, match=words) as error:
        dit.detect_transformer(config, index)
    assert "\n" not in str(error.value)


def test_checkpoint_folders_are_detected_without_loading_weights(tiny_sd3_checkpoint, tiny_flux_checkpoint):
    assert read_backbone(tiny_sd3_checkpoint).family == "sd3"
    assert read_backbone(tiny_flux_checkpoint).name == "Flux.1-dev"


def test_a_transformer_folder_without_its_vae_says_so(tiny_sd3_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "sd3"
    shutil.copytree(tiny_sd3_checkpoint, broken, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match="lacks vae/"):
        DiffSegPipeline.from_pretrained(broken, device="cpu")


# ------------------------------------------------------------------------------------------------ conditioning


@pytest.mark.parametrize("checkpoint", FAMILIES)
def test_a_second_run_reads_the_cached_empty_prompt_and_never_loads_t5(checkpoint, request, monkeypatch, tmp_path):
    """The first load computes the empty prompt with the family's own diffusers pipeline and caches it; the second
    loads no text encoder at all (T5's loader is watched) and gets exactly the same tensors."""
    folder = request.getfixturevalue(checkpoint)
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    loads = _t5_loads(monkeypatch)
    first = DiffSegPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    assert len(loads) == 1 and len(list((tmp_path / "cache" / "prompts").glob("*.safetensors"))) == 1
    second = DiffSegPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    assert len(loads) == 1  # T5 was not loaded again
    for a, b in zip(_conditioning(first), _conditioning(second)):
        assert torch.equal(a, b)
    # A fresh computation by diffusers' pipeline gives the cached tensors.
    backbone = first.backbone
    encoders = dit.load_text_encoders(str(folder), backbone, dtype=torch.float32, local_files_only=True, missing=None)
    fresh = dit.encode_empty_prompt(backbone, encoders, torch.device("cpu"))
    assert torch.equal(fresh.hidden, _conditioning(second)[0]) and torch.equal(fresh.pooled, _conditioning(second)[1])
    assert fresh.hidden.shape[1] == backbone.text_tokens + (77 if backbone.family == "sd3" else 0)


def test_a_hub_checkpoint_read_offline_caches_its_empty_prompt_by_revision(tiny_sd3_checkpoint, tmp_path, monkeypatch):
    """A hub id served from the hub's own cache with the hub unreachable: it loads (the index names its denoiser, so
    the absent unet/ is not taken for an undownloaded one), a second run reads the cached empty prompt, and a new
    revision of the same id (another snapshot commit) computes its own."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny-sd3"
    (repo / "refs").mkdir(parents=True)
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(tiny_sd3_checkpoint, repo / "snapshots" / commit)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path / "cache"))
    loads = _t5_loads(monkeypatch)
    cached = lambda: sorted(p.name for p in (tmp_path / "cache" / "prompts").glob("*.safetensors"))  # noqa: E731

    first = DiffSegPipeline.from_pretrained("someone/tiny-sd3", device="cpu", dtype="float32")
    assert first.backbone.family == "sd3" and len(loads) == 1 and len(cached()) == 1
    DiffSegPipeline.from_pretrained("someone/tiny-sd3", device="cpu", dtype="float32")
    assert len(loads) == 1 and len(cached()) == 1  # the same revision: read from the cache
    (repo / "refs" / "main").write_text("b" * 40)
    DiffSegPipeline.from_pretrained("someone/tiny-sd3", device="cpu", dtype="float32")
    assert len(loads) == 2 and len(cached()) == 2  # a new revision: its own entry


def _t5_loads(monkeypatch) -> list:
    """The calls to T5's loader from now on (it is watched, and still loads)."""
    from transformers import T5EncoderModel

    loads = []
    original = T5EncoderModel.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(counted))
    return loads


def test_sd3_without_t5_conditions_on_zeros_in_its_place(tiny_sd3_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "sd3-no-t5"
    shutil.copytree(tiny_sd3_checkpoint, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    pipe = DiffSegPipeline.from_pretrained(folder, device="cpu", dtype="float32")
    hidden = _conditioning(pipe)[0]
    assert hidden.shape[1] == 77 + 256 and torch.count_nonzero(hidden[:, 77:]) == 0
    assert pipe.encode(quadrants_image(64, 64)).attention


def _conditioning(pipe):
    empty = pipe.kind.prompt_embedding()
    return empty.hidden, empty.pooled


# ------------------------------------------------------------------------------------------------ flow matching


def test_timesteps_are_the_schedulers_own_sigmas(pipelines):
    """SD3: the static shift of the training grid (`scheduler.sigmas`); Flux.1-dev: the resolution-dependent shift
    its pipeline applies (FluxPipeline's `calculate_shift` and the scheduler's `set_timesteps(mu=...)`)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sd3 = pipelines["tiny_sd3_checkpoint"]
    grid = sd3.scheduler.sigmas  # sigmas of timesteps 1000, 999, ..., 1
    for t in (1, 50, 300, 999):
        assert dit.sigma(sd3.backbone, sd3.scheduler, t, 4096) == pytest.approx(float(grid[1000 - t]), rel=1e-5)
    assert dit.sigma(sd3.backbone, sd3.scheduler, 300, 4096) == pytest.approx(0.5625)  # 3u / (1 + 2u)
    flux = pipelines["tiny_flux_checkpoint"]
    scheduler = type(flux.scheduler).from_config(flux.scheduler.config)
    config = scheduler.config
    for tokens in (256, 1024, 4096):
        mu = calculate_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        scheduler.set_timesteps(sigmas=[0.3, 0.05], mu=mu)
        ours = [dit.sigma(flux.backbone, flux.scheduler, t, tokens) for t in (300, 50)]
        np.testing.assert_allclose(ours, scheduler.sigmas[:2].numpy(), rtol=1e-5)


def test_noise_follows_the_flow_matching_interpolation(pipelines):
    """x_σ = (1 − σ)·x₀ + σ·ε with x₀ = (mean − shift) × scale: at σ = 0 the clean latent, and the seeded noise is
    the same draw whatever σ (so x_σ is linear in σ)."""
    pipe = pipelines["tiny_sd3_checkpoint"]
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        mean = pipe.vae.encode(pixels).latent_dist.mean
        x0 = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        clean = dit.latents(pipe.vae, pixels, 0.0, 42)
        half, full = dit.latents(pipe.vae, pixels, 0.5, 42), dit.latents(pipe.vae, pixels, 1.0, 42)
    assert relative_error(clean, x0) < 1e-6 and relative_error(half, (x0 + full) / 2) < 1e-5
    assert relative_error(dit.latents(pipe.vae, pixels, 0.5, None), x0) < 1e-6  # no seed: the clean latent


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("checkpoint", FAMILIES)
def test_capture_leaves_the_transformers_output_unchanged(checkpoint, pipelines):
    pipe = pipelines[checkpoint]
    pixels = torch.rand(1, 3, 96, 160) * 2 - 1
    inputs, grid = pipe.kind.step_inputs(pixels, 300, 42)
    with torch.inference_mode():
        plain = pipe.transformer(**inputs).sample
        with pipe.kind.capture(grid) as store:
            captured = pipe.transformer(**inputs).sample
        again = pipe.transformer(**inputs).sample  # processors restored
    assert relative_error(captured, plain) < 1e-5 and torch.equal(again, plain)
    assert store.layers[grid] == len(dit.blocks(pipe.transformer))


@pytest.mark.parametrize("checkpoint", FAMILIES)
def test_the_bundles_map_is_the_image_to_image_attention_recomputed_from_each_blocks_inputs(checkpoint, pipelines):
    """Every block's attention inputs are recorded on a plain forward (no capture); softmax(q_img k_imgᵀ/√d) is then
    recomputed from them with the modules' own weights (norms, Flux's RoPE), averaged over heads and blocks, and
    must equal the bundle's map; a 16:9 image gives a 16:9 token grid."""
    from diffusers.models.embeddings import apply_rotary_emb

    pipe = pipelines[checkpoint]
    image = quadrants_image(144, 256)
    bundle = pipe.encode(image, **SMALL)
    (grid,) = bundle.attention
    assert grid == (12, 21)  # 192×336 pixels at 256² for a 16:9 image: 16 px per token
    n = grid[0] * grid[1]
    recorded = []

    def record(module, args, kwargs):
        recorded.append((module, args, kwargs))

    modules = [block.attn for block in dit.blocks(pipe.transformer)]
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        from diffseg.io.images import to_model_input

        inputs, _ = pipe.kind.step_inputs(to_model_input([image], (192, 336)), 300, None)
        with torch.inference_mode():
            pipe.transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    with torch.inference_mode():
        for attn, args, kwargs in recorded:
            x = kwargs.get("hidden_states", args[0] if args else None)
            q, k = attn.to_q(x), attn.to_k(x)
            heads = attn.heads
            q, k = (t.unflatten(-1, (heads, -1)) for t in (q, k))  # (B, N, h, d)
            if attn.norm_q is not None:
                q, k = attn.norm_q(q), attn.norm_k(k)
            rope = kwargs.get("image_rotary_emb")
            if pipe.backbone.family == "flux":
                cos, sin = rope
                q, k = (apply_rotary_emb(t, (cos[-t.shape[1] :], sin[-t.shape[1] :]), sequence_dim=1) for t in (q, k))
                q, k = q[:, -n:], k[:, -n:]  # single-stream blocks see [text; image]
            else:
                q, k = q[:, :n], k[:, :n]
            scores = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) / q.shape[-1] ** 0.5
            maps.append(scores.softmax(-1).mean(1))
    expected = torch.stack(maps).mean(0)[0]
    assert len(maps) == len(modules)
    assert relative_error(bundle.attention[grid], expected) < 1e-4
    torch.testing.assert_close(bundle.attention[grid].sum(-1), torch.ones(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("checkpoint", FAMILIES)
def test_both_methods_give_label_maps_at_the_images_size(checkpoint, pipelines, tmp_path):
    pipe = pipelines[checkpoint]
    image = quadrants_image(90, 160)
    bundle = pipe.encode(image, **SMALL)
    labels = pipe.segment(bundle, kl_threshold=0.5).labels
    assert labels.shape == (90, 160) and labels.max() > 0
    bundle.save(tmp_path / "a.safetensors")
    loaded = load_bundle(tmp_path / "a.safetensors")
    assert isinstance(loaded, AttentionBundle) and torch.equal(loaded.attention[(12, 21)], bundle.attention[(12, 21)])
    assert loaded.family == pipe.backbone.family
    assert np.array_equal(pipe.segment(loaded, kl_threshold=0.5).labels, labels)
    cut = pipe.encode(image, method="diffcut", **SMALL)
    assert cut.features.shape[:2] == (12, 21)
    assert pipe.segment(cut).labels.shape == (90, 160)


@pytest.mark.parametrize("checkpoint", FAMILIES)
@pytest.mark.parametrize(
    "dtype, relative, p99, agreement", [("float16", 0.05, 5e-3, 0.9), ("bfloat16", 0.5, 5e-2, 0.6)]
)
def test_half_precision_agrees_with_float32(checkpoint, request, pipelines, dtype, relative, p99, agreement):
    half = DiffSegPipeline.from_pretrained(request.getfixturevalue(checkpoint), device="cpu", dtype=dtype)
    assert half.transformer.dtype == getattr(torch, dtype) and half.vae.dtype == torch.float32
    full = pipelines[checkpoint]
    image = quadrants_image(96, 160)
    ours, reference = half.encode(image, **SMALL), full.encode(image, **SMALL)
    (grid,) = reference.attention
    assert relative_error(ours.attention[grid], reference.attention[grid]) <= relative
    assert error_percentile(ours.attention[grid], reference.attention[grid], 99) <= p99
    a, b = half.segment(ours, kl_threshold=0.5).labels, full.segment(reference, kl_threshold=0.5).labels
    assert b.max() > 0 and matched_agreement(a, b) >= agreement


# ------------------------------------------------------------------------------------------------ front ends


@pytest.mark.parametrize("checkpoint", FAMILIES)
@pytest.mark.parametrize("method", ["diffseg", "diffcut"])
def test_the_cli_segments_with_a_transformer_checkpoint(checkpoint, method, request, tmp_path):
    from PIL import Image

    Image.fromarray(quadrants_image(72, 128)).save(tmp_path / "wide.png")
    model = tiny_model(request.getfixturevalue(checkpoint))
    code = run_cli(
        "segment", tmp_path / "wide.png", "-o", tmp_path / "out", *model, "--method", method, "--resolution", "256"
    )
    assert code == 0
    assert read_labels(tmp_path / "out" / "labels" / "wide.png").shape == (72, 128)


def test_evaluate_scores_a_transformer_checkpoint_under_both_protocols(pipelines, tmp_path):
    from diffseg import DiffCutConfig, SegmentConfig
    from diffseg.evaluation.harness import evaluate

    from test_evaluate import make_cityscapes

    make_cityscapes(tmp_path / "cs")
    pipe = pipelines["tiny_sd3_checkpoint"]
    for protocol, config in (("diffseg", SegmentConfig(kl_threshold=0.5)), ("diffcut", DiffCutConfig())):
        summary = evaluate(
            "cityscapes",
            tmp_path / "cs",
            tmp_path / protocol,
            pipeline=pipe,
            progress=False,
            config=config,
            protocol=protocol,
            limit=1,
        )
        assert summary.images == 1 and 0 <= summary.miou <= 1


def test_the_demo_segments_with_a_transformer_and_re_segments_from_its_cache(pipelines, tmp_path):
    """One attention grid: nothing to weigh, so no resolution preset or weight slider is shown; a KL move runs from
    the cached bundle; a block range the model does not have is refused and the box goes back to the result's."""
    from PIL import Image

    from diffseg.app.cache import BundleCache
    from diffseg.app.demo import Demo
    from diffseg.app.layout import build_page

    pipe = pipelines["tiny_sd3_checkpoint"]
    page = build_page(pipe.backbone)
    assert not page.controls.preset.visible and not any(w.visible for w in page.controls.weights)
    cache = BundleCache(pipe, folder=tmp_path / "bundles")
    demo = Demo(pipe, page, cache, tmp_path)
    photo = tmp_path / "photo.png"
    Image.fromarray(quadrants_image(72, 128)).save(photo)
    values = {control: control.value for control in page.inputs()}
    values[page.controls.image] = str(photo)
    first = demo.segment(values, None, lambda *_, **__: None)
    assert page.results.status in first and cache.encodes == 1
    demo.segment({**values, page.controls["kl-threshold"]: 0.7}, None, lambda *_, **__: None)
    assert cache.encodes == 1 and demo.session(None).values[page.controls["kl-threshold"]] == 0.7
    # The advanced block range re-encodes; a range the model does not have is answered in the control's words.
    demo.segment({**values, page.controls.blocks: "0:1"}, None, lambda *_, **__: None)
    assert cache.encodes == 2 and demo.session(None).values[page.controls.blocks] == "0:1"
    kept = demo.segment({**values, page.controls.blocks: "2:9"}, None, lambda *_, **__: None)
    assert kept[page.controls.blocks] == "0:1" and page.results.status not in kept
    assert "Transformer blocks must lie from 0 to 2" in demo.session(None).warned[0]


def test_a_block_range_averages_those_blocks_and_chooses_diffcuts_block(pipelines):
    """`blocks=(k, k)` is block k's own map; the default is the mean of every block's (attention is linear in the
    blocks averaged); DiffCut reads after the range's last block; a range past the model or on a UNet is refused."""
    pipe = pipelines["tiny_flux_checkpoint"]
    image = quadrants_image(64, 64)
    count = len(dit.blocks(pipe.transformer))
    assert count == pipe.backbone.depth

    def attention(**keywords):
        return next(iter(pipe.encode(image, **keywords, **SMALL).attention.values()))

    each = [attention(blocks=(k, k)) for k in range(count)]
    assert relative_error(attention(), torch.stack(each).mean(0)) < 1e-5
    assert relative_error(attention(blocks=(1, 2)), (each[1] + each[2]) / 2) < 1e-5
    first, last = (pipe.encode(image, method="diffcut", blocks=(0, k), **SMALL).features for k in (0, count - 1))
    assert not torch.equal(first, last)
    with pytest.raises(ValueError, match="does not fit"):
        pipe.encode(image, blocks=(0, count), **SMALL)


def test_the_cli_refuses_a_bad_block_range_naming_the_option(tiny_flux_checkpoint, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(quadrants_image(64, 64)).save(tmp_path / "a.png")
    model = tiny_model(tiny_flux_checkpoint)
    for blocks in ("3:1", "0:4"):  # reversed; past the tiny Flux's 4 blocks (known from its config)
        assert run_cli("segment", tmp_path / "a.png", "-o", tmp_path / "o", *model, "--blocks", blocks) != 0
        assert "`--blocks" in capsys.readouterr().err
    assert not (tmp_path / "o" / "labels").exists()  # refused before any image


def test_offloading_runs_the_same_model_a_block_at_a_time(tiny_sd3_checkpoint, pipelines):
    """`offload=True` (diffusers' block-level group offloading; on the CPU the hooks run and move nothing) captures
    the same attention and features."""
    offloaded = DiffSegPipeline.from_pretrained(tiny_sd3_checkpoint, device="cpu", dtype="float32", offload=True)
    assert any("group_offloading" in str(getattr(m, "_diffusers_hook", "")) for m in offloaded.transformer.modules())
    image = quadrants_image(64, 64)
    pipe = pipelines["tiny_sd3_checkpoint"]
    (grid,) = pipe.encode(image).attention
    assert relative_error(offloaded.encode(image).attention[grid], pipe.encode(image).attention[grid]) < 1e-6
    assert (
        relative_error(
            offloaded.encode(image, method="diffcut").features, pipe.encode(image, method="diffcut").features
        )
        < 1e-6
    )


def test_sd35_medium_reads_the_joint_attention_of_every_block_not_its_dual_image_attention(tmp_path):
    """SD3.5-medium's first blocks also have `attn2` (image-only self-attention, no text): the map is the joint
    `attn` of every block, as on SD3; capture leaves the output unchanged there too."""
    from diffseg.testing.models import save_random_checkpoint

    pipe = DiffSegPipeline.from_pretrained(save_random_checkpoint(tmp_path / "sd35", "tiny-sd35"), device="cpu")
    assert pipe.backbone.name == "SD3.5-medium"
    inputs, grid = pipe.kind.step_inputs(torch.rand(1, 3, 64, 96) * 2 - 1, 300, None)
    with torch.inference_mode():
        plain = pipe.transformer(**inputs).sample
        with pipe.kind.capture(grid) as store:
            captured = pipe.transformer(**inputs).sample
    assert store.layers[grid] == pipe.backbone.depth == 3 and relative_error(captured, plain) < 1e-5
    assert pipe.segment(pipe.encode(quadrants_image(64, 96)), kl_threshold=0.5).labels.shape == (64, 96)
