"""Stable Diffusion checkpoints of the real diffusers architectures with random weights.

For tests (tiny models of each family: same structure, seconds on a CPU) and benchmarks (the full Stable Diffusion
1.5, 2.1, SDXL and SD3-medium sizes, and Flux.1's width, from their configs: same shapes and cost as the real
weights). The checkpoint is written
as a diffusers folder and loaded back through `DiffSegPipeline.from_pretrained`, the path users take.
Segmentations made with random weights are meaningless; only shapes, cost and code paths are real.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import torch

from ..config import NOISE_SCHEDULE
from .architectures import ARCHITECTURES, DIT_ARCHITECTURES, UNET_ARCHITECTURES


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


def build_components(architecture: str = "tiny", seed: int = 0) -> dict[str, object]:
    """UNet, VAE, text encoder(s) and DDPM scheduler of `architecture` (see `ARCHITECTURES`), seeded random weights.

    Tokenizers are not included (see `write_tokenizer`).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if architecture in DIT_ARCHITECTURES:
        return _build_dit(architecture, seed)
    if architecture not in UNET_ARCHITECTURES:
        raise ValueError(f"`architecture` must be one of {ARCHITECTURES} but is {architecture!r}.")
    spec = UNET_ARCHITECTURES[architecture]
    vocab_size = len(_byte_vocab())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    if architecture.startswith("tiny"):
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
        sample_size=spec["unet"]["sample_size"] * 8,
        **spec["vae"],
    )
    components = {"unet": unet.eval(), "vae": vae.eval()}
    for k, sizes in enumerate(spec["text"]):
        config = CLIPTextConfig(
            **{"vocab_size": vocab_size, **sizes},
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
        model = CLIPTextModelWithProjection(config) if k == 1 else CLIPTextModel(config)
        components["text_encoder" if k == 0 else "text_encoder_2"] = model.eval()
    components["scheduler"] = DDPMScheduler(**NOISE_SCHEDULE, **spec.get("scheduler", {}))
    return components


def _build_dit(architecture: str, seed: int, blocks: int | None = None) -> dict[str, object]:
    """Transformer, VAE, flow-matching scheduler and (tiny ones) text encoders of a diffusion transformer.

    Full-size architectures come without text encoders: their benchmarks pass the empty prompt's conditioning
    (`random_conditioning`), as a cached checkpoint runs. `blocks` shortens Flux to that many double- and twice as
    many single-stream blocks (its real width, a benchmark's depth)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    spec = DIT_ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    config = dict(spec["transformer"])
    if blocks is not None:
        config.update(num_layers=blocks, num_single_layers=2 * blocks)
    kind = SD3Transformer2DModel if spec["family"] == "sd3" else FluxTransformer2DModel
    transformer = kind(**config)
    if architecture.startswith("tiny"):  # peaked attention, as a trained model's (see `build_components`)
        for name, module in transformer.named_modules():
            if name.endswith(".attn"):
                # RMS-normed queries and keys (SD3.5, Flux) are scaled by the norms' weights, the others by q and k
                normed = module.norm_q is not None
                for layer in (module.norm_q, module.norm_k) if normed else (module.to_q, module.to_k):
                    layer.weight.data.mul_(_PEAK_NORMED[spec["family"]] if normed else _PEAK)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **spec["vae"]
    )
    components = {"transformer": transformer.eval(), "vae": vae.eval()}
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    vocab_size = len(_byte_vocab())
    clip = [("text_encoder", "text_encoder_2")[k] for k in range(len(spec.get("text", ())))]
    for name, sizes in zip(clip, spec.get("text", ())):
        text = CLIPTextConfig(
            **{"vocab_size": vocab_size, **sizes},
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
        model = CLIPTextModelWithProjection(text) if spec["family"] == "sd3" else CLIPTextModel(text)
        components[name] = model.eval()
    if "t5" in spec:
        t5 = T5EncoderModel(T5Config(vocab_size=len(_T5_PIECES) + 3, **spec["t5"]))
        components["text_encoder_3" if spec["family"] == "sd3" else "text_encoder_2"] = t5.eval()
    return components


# Factors on q and k (SD3), or on their RMS norms' weights (SD3.5, Flux: its RoPE makes random attention local, so
# less), that give the tiny models a few dozen segments at DiffSeg's thresholds.
_PEAK, _PEAK_NORMED = 8.0, {"sd3": 3.0, "flux": 2.0}
_T5_PIECES = "▁abcdefghijklmnopqrstuvwxyz,.-'0123456789"


def write_t5_tokenizer(folder: str | Path):
    """Write a character-level T5 (Unigram) tokenizer and return it loaded with transformers."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in _T5_PIECES]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def random_conditioning(architecture: str, dtype: torch.dtype = torch.float32):
    """The empty prompt's conditioning shaped as `architecture`'s text encoders give it (random values): what a
    full-size transformer benchmark feeds instead of loading T5-XXL."""
    from ..backbones.families import Conditioning

    config = DIT_ARCHITECTURES[architecture]["transformer"]
    tokens = 77 + 256 if DIT_ARCHITECTURES[architecture]["family"] == "sd3" else 512
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, config["joint_attention_dim"], generator=generator, dtype=dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator, dtype=dtype)
    return Conditioning(hidden, pooled)


def random_pipeline(
    architecture: str = "tiny", *, seed: int = 0, device="cpu", dtype="auto", blocks: int | None = None
):
    """A `DiffSegPipeline` of `architecture` with random weights, built in memory (for benchmarks). A full-size
    transformer gets a random empty-prompt conditioning of its text encoders' shape (`random_conditioning`), as a
    checkpoint whose conditioning is cached runs; `blocks` shortens Flux (see `_build_dit`)."""
    from ..pipeline import DiffSegPipeline

    if architecture in DIT_ARCHITECTURES and "text" not in DIT_ARCHITECTURES[architecture]:
        components = _build_dit(architecture, seed, blocks)
        conditioning = random_conditioning(architecture)
        model = f"random {architecture}"
        return DiffSegPipeline(**components, conditioning=conditioning, model=model, device=device, dtype=dtype)
    components = build_components(architecture, seed)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = write_tokenizer(folder)
    if "text_encoder_2" in components:
        components["tokenizer_2"] = tokenizer
    return DiffSegPipeline(
        **components, tokenizer=tokenizer, model=f"random {architecture}", device=device, dtype=dtype
    )


def save_random_checkpoint(folder: str | Path, architecture: str = "tiny", seed: int = 0) -> Path:
    """Write a diffusers-format checkpoint (unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL family also
    text_encoder_2/, tokenizer_2/) with random weights."""
    folder = Path(folder)
    components = build_components(architecture, seed)
    for name, component in components.items():
        component.save_pretrained(folder / name)
        if name.startswith("text_encoder"):
            tokenizer = folder / name.replace("text_encoder", "tokenizer")
            t5 = type(component).__name__ == "T5EncoderModel"
            write_t5_tokenizer(tokenizer) if t5 else write_tokenizer(tokenizer)
    if architecture in DIT_ARCHITECTURES:  # diffusers' own index: how a hub SD3 / Flux checkpoint names its pipeline
        family = DIT_ARCHITECTURES[architecture]["family"]
        index = {"_class_name": "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"}
        for name, component in components.items():
            index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
            if name.startswith("text_encoder"):
                tokenizer = "T5TokenizerFast" if "T5" in type(component).__name__ else "CLIPTokenizer"
                index[name.replace("text_encoder", "tokenizer")] = ["transformers", tokenizer]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
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
