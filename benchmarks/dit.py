"""Diffusion transformers: encode, capture overhead, segment and memory for SD3-medium and Flux.1 (random weights).

    python benchmarks/dit.py [--size 512] [--dtypes float32,bfloat16] [--flux-blocks 1]

Each row runs in its own process (its peak memory is its own). SD3-medium is the full published architecture
(24 joint blocks, 2.0 B parameters); Flux.1-dev has its real width (3072, 24 heads, RoPE) and `--flux-blocks` double-
plus twice as many single-stream blocks, its full depth (19 + 38) scaled on paper from the measured per-block cost.
Text encoders are not built: the empty prompt's conditioning is what a cached checkpoint feeds (random, same shape).

Per row: `encode` (VAE + one transformer step, attention captured: DiffSeg), `plain` (the same transformer forward
without capture), the capture's overhead (captured forward / plain forward − 1), `segment` (DiffSeg on the bundle),
DiffCut's encode (block output hooked, the forward untouched), concept maps of four words (ConceptAttention's stream
through the joint blocks up to its last one: Flux's last four double blocks, SD3 every block; random word tokens of the
text encoders' shape) against the same forward stopped there without them, and the peak RSS of the process. Timings
are one run after one untimed warm-up; `--repeat N` alternates N plain and captured forwards and takes each one's
median.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from common import arguments, peak_rss_gib, report

FLUX_FULL = (19, 38)  # Flux.1-dev's double- and single-stream blocks


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one(architecture: str, size: int, dtype: str, flux_blocks: int, repeat: int = 1) -> dict:
    from diffseg.backbones.capture import stop_after
    from diffseg.backbones.concepts import ConceptTokens, concept_attention, default_blocks
    from diffseg.io.images import to_model_input
    from diffseg.testing.models import random_pipeline

    blocks = flux_blocks if architecture == "flux-dev" else None
    pipe = random_pipeline(architecture, device="cpu", dtype=dtype, blocks=blocks)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    inputs, grid = pipe.kind.step_inputs(to_model_input([image], (size, size)), 300, None)

    def plain():
        with torch.inference_mode():
            pipe.transformer(**inputs)

    def captured():
        with torch.inference_mode(), pipe.kind.capture(grid):
            pipe.transformer(**inputs)

    plain()  # warm-up
    runs = [(timed(plain), timed(captured)) for _ in range(repeat)]  # alternated: drift hits both alike
    plain_s, captured_s = (statistics.median(r[k] for r in runs) for k in (0, 1))
    start = time.perf_counter()
    bundle = pipe.encode(image, resolution=size)
    encode_s = time.perf_counter() - start
    segment_s = timed(lambda: pipe.segment(bundle))
    diffcut_s = timed(lambda: pipe.encode(image, method="diffcut", resolution=size))
    family, transformer = pipe.backbone.family, pipe.transformer
    prefix = 1 if family == "sd3" else 0  # SD3's concept stream starts with CLIP's start token
    width = transformer.config.joint_attention_dim
    tokens = ConceptTokens(("cat", "dog", "grass", "sky"), torch.randn(1, prefix + 4, width), prefix)
    chosen = default_blocks(family, len(transformer.transformer_blocks))
    last = transformer.transformer_blocks[chosen[-1]]

    def to_last():
        with torch.inference_mode(), stop_after(last):
            transformer(**inputs)

    def with_concepts():
        with torch.inference_mode(), concept_attention(transformer, family, tokens, chosen), stop_after(last):
            transformer(**inputs)

    to_last_s, concepts_s = timed(to_last), timed(with_concepts)
    n_blocks = len(pipe.transformer.transformer_blocks) + len(
        getattr(pipe.transformer, "single_transformer_blocks", ())
    )
    row = {
        "model": pipe.backbone.name + ("" if blocks is None else f" ({blocks}+{2 * blocks} blocks)"),
        "dtype": dtype,
        "input": f"{size}x{size}",
        "tokens": f"{grid[0]}x{grid[1]}",
        "blocks": n_blocks,
        "parameters_b": sum(p.numel() for p in pipe.transformer.parameters()) / 1e9,
        "plain_s": plain_s,
        "captured_s": captured_s,
        "overhead_pct": 100 * (captured_s / plain_s - 1),
        "encode_s": encode_s,
        "segment_s": segment_s,
        "diffcut_encode_s": diffcut_s,
        "concepts_s": concepts_s,
        "concepts_overhead_pct": 100 * (concepts_s / to_last_s - 1),
        "peak_rss_gib": peak_rss_gib(),
    }
    if blocks is not None:  # the full depth on paper: per-block costs times the full count (blocks of either kind
        # cost alike at this width: single-stream blocks fuse attention and a 4× MLP, double-stream ones do both
        # streams' MLPs; an estimate, said so in the column name)
        scale = sum(FLUX_FULL) / n_blocks
        row["full_depth_est_captured_s"] = captured_s * scale
        row["full_depth_est_params_b"] = row["parameters_b"] * scale
    return row


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--size", type=int, default=512, help="square input side (1024 is both families' native)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--models", default="sd3-medium,flux-dev")
    parser.add_argument("--flux-blocks", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="plain and captured forwards, alternated (median)")
    parser.add_argument("--one", help="internal: run one row, print it as JSON")
    parser.add_argument("--dtype", default="float32", help="internal: the row's dtype")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.size, args.dtype, args.flux_blocks, args.repeat)))
        return
    rows = []
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            command = [sys.executable, __file__, "--one", model, "--dtype", dtype, "--size", str(args.size)]
            command += ["--flux-blocks", str(args.flux_blocks), "--repeat", str(args.repeat)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                rows.append(
                    {"model": model, "dtype": dtype, "input": f"failed: {done.stderr.strip().splitlines()[-1]}"}
                )
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    columns = [
        "model", "dtype", "input", "tokens", "blocks", "parameters_b", "plain_s", "captured_s", "overhead_pct",
        "encode_s", "segment_s", "diffcut_encode_s", "concepts_s", "concepts_overhead_pct", "peak_rss_gib",
        "full_depth_est_captured_s",
    ]  # fmt: skip
    print(f"diffusion transformers, random weights, CPU, {torch.get_num_threads()} threads\n")
    report(f"dit-cpu-{args.size}" + ("" if args.models == "sd3-medium,flux-dev" else f"-{args.models}"), rows, columns)


if __name__ == "__main__":
    main()
