"""Time one 512² encode with the Stable Diffusion 1.5 architecture at random weights: capture on vs plain UNet.

    python benchmarks/encode.py [--repeat 3] [--device cpu] [--dtype float32]

Same shapes and cost as the real weights; no download. Rows: the plain UNet forward (diffusers' default attention
processors), the same forward with self-attention captured as `encode` runs it (ending after the last self-attention
layer: DiffSeg reads no UNet output), and the whole `encode` (VAE + capture). Targets on 2 CPU cores: capture adds
under 10 % to the plain forward; peak memory <= 8 GiB in float32.
"""

from __future__ import annotations


import numpy as np
import torch

from common import arguments, peak_rss_gib, report, timeit, timeit_in_turns
from diffseg.backbones.capture import capture_attention
from diffseg.testing.models import random_pipeline


def main() -> None:
    args = arguments(__doc__, repeat=3, model=True, dtype="float32").parse_args()

    pipe = random_pipeline("sd15", device=args.device, dtype=args.dtype)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(pipe.device, pipe.dtype)
    t = torch.tensor([300], device=pipe.device)
    text = pipe.kind.prompt_embedding().hidden

    @torch.inference_mode()
    def plain():
        pipe.unet(latents, t, encoder_hidden_states=text)
        sync()

    @torch.inference_mode()
    def captured():
        with capture_attention(pipe.unet, (64, 64), stop=True):
            pipe.unet(latents, t, encoder_hidden_states=text)
        sync()

    def encode():
        pipe.encode(image, resize="square")
        sync()

    # The plain and the captured forward in turns (their ratio is the capture's cost), then the whole encode.
    timings = timeit_in_turns({"UNet forward, plain": plain, "UNet forward, capture": captured}, args.repeat)
    peaks = dict.fromkeys(timings, peak_rss_gib())  # the peak so far, after each phase
    timings["encode (VAE + capture)"] = timeit(encode, repeat=args.repeat)
    peaks["encode (VAE + capture)"] = peak_rss_gib()
    base = timings["UNet forward, plain"]["median_s"]
    rows = [
        {
            "step": name,
            "median_s": timing["median_s"],
            "min_s": timing["min_s"],
            "vs_plain": timing["median_s"] / base,
            "peak_rss_gib": peaks[name],
        }
        for name, timing in timings.items()
    ]
    if pipe.device.type == "cuda":
        for row in rows:
            row["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"SD 1.5 architecture, random weights, 512², {pipe.device} {pipe.dtype}, {torch.get_num_threads()} threads\n")
    columns = ["step", "median_s", "min_s", "vs_plain", "peak_rss_gib"] + (
        ["peak_cuda_gib"] if pipe.device.type == "cuda" else []
    )
    report(f"encode-{pipe.device.type}-{args.dtype}", rows, columns)


if __name__ == "__main__":
    main()
