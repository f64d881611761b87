"""Stable Diffusion checkpoints of the real diffusers architectures with random weights.

For tests (a tiny model: same structure, every resolution present, seconds on a CPU) and benchmarks (the full
Stable Diffusion 1.5 sizes from its config: same shapes and cost as the real weights). The checkpoint is written
as a diffusers folder and loaded back through `DiffSegPipeline.from_pretrained`, the path users take.
Segmentations made with random weights are meaningless; only shapes, cost and code paths are real.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import torch

ARCHITECTURES = ("tiny", "sd15")


def _byte_vocab() -> dict[str, int]:
    """A CLIP byte-level BPE vocabulary with no merges: every character is its own token."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def write_tokenizer(folder: str | Path):
    """Write a character-level CLIP tokenizer (vocab.json, merges.txt) and return it loaded with transformers."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers 4: files
        with tempfile.TemporaryDirectory() as raw:
            (Path(raw) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
            (Path(raw) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
            tokenizer = CLIPTokenizer(
                vocab_file=str(Path(raw) / "vocab.json"), merges_file=str(Path(raw) / "merges.txt")
            )
    else:  # transformers 5: the vocabulary itself
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = 77  # CLIP's context length, as Stable Diffusion's tokenizer
    tokenizer.save_pretrained(folder)
    return tokenizer


# Per architecture: UNet, VAE and CLIP text encoder sizes. "sd15" is Stable Diffusion v1.5's published configs
# (unet/, vae/, text_encoder/ config.json); "tiny" keeps its block structure (three cross-attention levels and a mid
# block: 64², 32², 16², 8² attention at 512² input), shrunk in width and depth.
_SIZES = {
    "tiny": {
        "unet": {
            "block_out_channels": (16, 16, 32, 32),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 2,
            "norm_num_groups": 8,
        },
        "vae": {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4},
        "text": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
    },
    "sd15": {
        "unet": {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },  # diffusers' name for the number of heads in SD 1.x UNets
        "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2},
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "hidden_act": "quick_gelu",
            "vocab_size": 49408,
        },
    },
}


def build_components(architecture: str = "tiny", seed: int = 0) -> dict[str, torch.nn.Module]:
    """UNet, VAE, CLIP text encoder and DDPM scheduler of `architecture` ("tiny" or "sd15"), seeded random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if architecture not in ARCHITECTURES:
        raise ValueError(f"`architecture` must be one of {ARCHITECTURES} but is {architecture!r}.")
    sizes = _SIZES[architecture]
    vocab_size = len(_byte_vocab())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **sizes["unet"],
    )
    if architecture == "tiny":
        # Random queries and keys give near-uniform attention and so one segment at any threshold; scaled up, the
        # attention is peaked as a trained model's is, and segment counts react to the threshold as they would.
        for name, module in unet.named_modules():
            if name.endswith("attn1"):
                module.to_q.weight.data.mul_(4.0)
                module.to_k.weight.data.mul_(4.0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
        **sizes["vae"],
    )
    text = CLIPTextConfig(
        **{"vocab_size": vocab_size, **sizes["text"]},
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": CLIPTextModel(text).eval(), "scheduler": scheduler}


def random_pipeline(architecture: str = "tiny", *, seed: int = 0, device="cpu", dtype="auto"):
    """A `DiffSegPipeline` of `architecture` with random weights, built in memory (for benchmarks)."""
    from .pipeline import DiffSegPipeline

    components = build_components(architecture, seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer(folder)
    return DiffSegPipeline(
        **components, tokenizer=tokenizer, model=f"random {architecture}", device=device, dtype=dtype
    )


def save_random_checkpoint(folder: str | Path, architecture: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers-format checkpoint (unet/, vae/, text_encoder/, tokenizer/, scheduler/) with random weights."""
    folder = Path(folder)
    for name, component in build_components(architecture, seed).items():
        component.save_pretrained(folder / name)
    write_tokenizer(folder / "tokenizer")
    return folder


def save_random_blip(folder: str | Path, seed: int = 0) -> Path:
    """A tiny BLIP captioning checkpoint (model, image processor, BERT tokenizer) with random weights.

    Its captions are nonsense made of its 15-word vocabulary; the code path (processor, generate, decode) is real.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = Path(folder)
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "dog",
        "on",
        "the",
        "grass",
        "car",
        "red",
        "sky",
        "photo",
        "of",
    ]
    with tempfile.TemporaryDirectory() as raw:
        (Path(raw) / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer(str(Path(raw) / "vocab.txt"))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(seed)
    small = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = BlipConfig(
        text_config={
            **small,
            "vocab_size": len(words),
            "max_position_embeddings": 64,
            "bos_token_id": 2,
            "sep_token_id": 3,
            "pad_token_id": 0,
            "encoder_hidden_size": 32,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
