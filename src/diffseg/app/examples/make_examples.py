"""Draw the example images shipped with diffseg (made by the project; no third-party content).

    python src/diffseg/app/examples/make_examples.py

Simple scenes with a few distinct regions, textured so that they are not flat colour: a landscape, a table top and a
street. Used by the demo's example gallery and the README's quick start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).parent


def _texture(image: Image.Image, seed: int, strength: float = 12.0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.asarray(image).astype(np.float32)
    noise = rng.normal(0, strength, array.shape[:2])[:, :, None]
    return Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8))


def _gradient(size, top, bottom) -> Image.Image:
    w, h = size
    t = np.linspace(0, 1, h)[:, None, None]
    rows = (1 - t) * np.array(top) + t * np.array(bottom)
    return Image.fromarray(np.repeat(rows, w, axis=1).astype(np.uint8))


def landscape() -> Image.Image:
    image = _gradient((512, 384), (90, 150, 230), (200, 225, 250))
    d = ImageDraw.Draw(image)
    d.ellipse((380, 40, 450, 110), fill=(255, 225, 120))
    d.polygon([(0, 250), (110, 120), (210, 230), (320, 100), (512, 260), (512, 384), (0, 384)], fill=(110, 100, 120))
    d.rectangle((0, 270, 512, 384), fill=(60, 140, 60))
    d.polygon([(140, 300), (380, 290), (430, 340), (120, 350)], fill=(50, 110, 190))
    return _texture(image, 0)


def tabletop() -> Image.Image:
    image = _gradient((512, 384), (215, 200, 170), (190, 175, 150))
    d = ImageDraw.Draw(image)
    d.rectangle((0, 230, 512, 384), fill=(120, 75, 40))
    d.ellipse((150, 190, 370, 280), fill=(235, 235, 240))
    d.ellipse((185, 160, 255, 230), fill=(210, 40, 40))
    d.ellipse((245, 150, 320, 225), fill=(250, 160, 30))
    d.rectangle((400, 120, 450, 260), fill=(40, 90, 60))
    return _texture(image, 1)


def street() -> Image.Image:
    image = _gradient((512, 384), (150, 190, 235), (210, 225, 240))
    d = ImageDraw.Draw(image)
    d.rectangle((20, 60, 170, 280), fill=(170, 90, 70))
    d.rectangle((330, 90, 500, 280), fill=(120, 130, 150))
    for x in range(40, 160, 40):
        for y in range(80, 260, 50):
            d.rectangle((x, y, x + 20, y + 30), fill=(60, 70, 90))
    d.rectangle((0, 280, 512, 384), fill=(70, 70, 75))
    d.rectangle((0, 328, 512, 334), fill=(230, 230, 230))
    d.rounded_rectangle((190, 250, 330, 320), radius=18, fill=(30, 90, 200))
    d.ellipse((205, 300, 240, 335), fill=(20, 20, 20))
    d.ellipse((280, 300, 315, 335), fill=(20, 20, 20))
    return _texture(image, 2)


if __name__ == "__main__":
    for name, draw in [("landscape", landscape), ("tabletop", tabletop), ("street", street)]:
        draw().save(HERE / f"{name}.jpg", quality=90)
        print(f"wrote {HERE / f'{name}.jpg'}")
