"""The demo's cache of encodes: `BundleCache` keeps the expensive step (VAE + one denoiser pass) of recent images, in
memory and as files; `watch_encode` reports an encode's stages and stops it when asked."""

import dataclasses
import hashlib
import shutil
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..hub import public_name
from ..bundle import Bundle
from ..config import DEFAULT_METHOD, AppConfig
from .view import image_uri

_APP = AppConfig()


class EncodeCancelled(Exception):
    """The user stopped an encode; the page shows its previous result."""


# The parts of the VAE encoder and the UNet an encode's progress counts: fine enough that the bar moves through the
# UNet's last, highest-resolution block (a whole block was 1/9 of the UNet step and most of its time).
# A diffusion transformer's blocks (SD3's joint blocks; Flux's double- and single-stream blocks) count one each.
_STEPS = (
    "ResnetBlock2D",
    "Transformer2DModel",
    "Attention",
    "Downsample2D",
    "Upsample2D",
    "JointTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
)


@contextmanager
def watch_encode(pipeline, report: Callable[[str, float], None], stop: Callable[[], bool]):
    """Progress and cancelling for encodes run by this thread: before each resnet, transformer, attention and
    resampling layer of the VAE encoder and of the UNet, `report(stage, fraction of that stage done)`, and raise
    `EncodeCancelled` once `stop()` is true. Fractions count the layers run so far, so they only grow. Other threads'
    forwards are left alone; the hooks are removed on exit."""
    owner = threading.get_ident()
    step = f"One denoising step ({pipeline.kind.label})"
    stages = {"Encoding the image (VAE)": pipeline.vae.encoder, step: pipeline.denoiser}
    handles = []
    for stage, model in stages.items():
        steps = [m for m in model.modules() if type(m).__name__ in _STEPS]
        total, done = len(steps), [0]

        def before(_module, _inputs, stage=stage, total=total, done=done):
            if threading.get_ident() != owner:
                return
            if stop():
                raise EncodeCancelled("Encoding stopped; the page shows its previous result.")
            report(stage, min(done[0] / total, 1.0))
            done[0] += 1

        handles += [step.register_forward_pre_hook(before) for step in steps]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Entry:
    bundle: Bundle  # the method's: AttentionBundle or FeatureBundle
    file: Path  # the bundle as safetensors, for download
    image: str = ""  # the image at the viewer's size (`app_view.image_uri`), made once per bundle


class BundleCache:
    """LRU cache of bundles keyed by everything that defines one: image content, model, method, timestep, words,
    transformer blocks.
    Each entry has its own file (named from its whole key), so evicting one never removes another's. Counts the
    encodes it runs."""

    def __init__(self, pipeline, capacity: int = _APP.cache_size, folder: str | Path | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"`capacity` must be at least 1 but is {capacity}.")
        self.pipeline = pipeline
        self.capacity = capacity
        self.encodes = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.folder = Path(folder or tempfile.mkdtemp(prefix="diffseg-app-"))
        self.folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def digest(image: np.ndarray) -> str:
        """The image's content, as the first part of its key."""
        return hashlib.sha256(str(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()

    def get(
        self,
        image: np.ndarray,
        timestep: int,
        words: tuple[str, ...] = (),
        method: str = DEFAULT_METHOD,
        *,
        report: Callable[[str, float], None] | None = None,
        stop: Callable[[], bool] | None = None,
        digest: str | None = None,
        blocks: tuple[int, int] | None = None,
    ) -> tuple[_Entry, bool]:
        """The bundle of `method` for `image` at `timestep` (with cross-attention for `words`, if any), and whether
        it had to be encoded now. An encode reports its stages to `report` and ends with `EncodeCancelled` when
        `stop()` turns true (see `watch_encode`); nothing is cached then. `digest`: the image's `digest`, if known;
        `blocks`: a diffusion transformer's block range (`EncodeConfig.blocks`)."""
        key = (digest or self.digest(image), self.pipeline.model, method, int(timestep), tuple(words), blocks)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key], False
        # Encode outside the lock: cached bundles stay available while a new image is encoded.
        watching = watch_encode(self.pipeline, report or (lambda *_: None), stop or (lambda: False))
        with watching if (report or stop) else nullcontext():
            labels = list(words) or None
            bundle = self.pipeline.encode(image, method=method, timestep=timestep, labels=labels, blocks=blocks)
        # Bundles are downloaded by others: they name the checkpoint, not the server's path to it.
        bundle = dataclasses.replace(bundle, model=public_name(self.pipeline.model))
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:20]
        file = bundle.save(self.folder / f"{key[0][:12]}-{method}-t{timestep}-{name}.safetensors")
        entry = _Entry(bundle, file, image_uri(bundle.image))
        with self._lock:
            self.encodes += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                _, old = self._entries.popitem(last=False)
                old.file.unlink(missing_ok=True)
                shutil.rmtree(self.folder / old.file.stem, ignore_errors=True)  # its downloads (see `Demo.segment`)
        print(
            f"diffseg app: encoded image {key[0][:12]} with {method} at t={timestep}"
            + (f", words {', '.join(words)}" if words else "")
            + f" (encode #{self.encodes})",
            file=sys.stderr,
            flush=True,
        )
        return entry, True

    def __len__(self) -> int:
        return len(self._entries)
