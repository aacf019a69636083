"""A small preference set the project draws itself, so the offline demo shows learning, not noise.

Each prompt names a colour and a shape ("a red circle"). The preferred image draws exactly that on a clean
background; the other draws the shape in a wrong colour, dimmed (background too), slightly blurred and with
a little pixel noise. The difference lives in what an 8x8 latent carries, brightness and colour: the tiny
base's VAE smooths fine pixel noise away, so a preference marked only by noise would not survive encoding.
The tiny text encoders carry little, so the prompt-independent part of the preference (bright beats dim) is
what a tiny model learns first; the colour part is there for bigger bases.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lora_dpo import files

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((245, 245, 240), (200, 225, 245), (230, 230, 210))
WORDS = ("a", "an", "of", "photo", "drawing", "simple", "on", "background", *COLOURS, *SHAPES)


def draw_shape(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int,
               rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.7) * size
    cx, cy = rng.uniform(extent / 2, size - extent / 2), rng.uniform(extent / 2, size - extent / 2)
    box = (cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Dim, blur a little and add mild noise: what the 'rejected' images of the demo set look like. The dimming
    (and the wrong colour `make_pair` draws them in) is the part a latent carries."""
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32) * rng.uniform(0.45, 0.65)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 12.0, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def make_pair(index: int, size: int, seed: int) -> tuple[str, Image.Image, Image.Image]:
    rng = random.Random(seed * 1_000_003 + index)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    wrong = rng.choice([c for c in COLOURS if c != colour])
    background = rng.choice(BACKGROUNDS)
    prompt = f"a {colour} {shape}"
    chosen = draw_shape(shape, COLOURS[colour], background, size, rng)
    rejected = degrade(draw_shape(shape, COLOURS[wrong], background, size, rng), rng)
    return prompt, chosen, rejected


def write_shapes_dataset(out_dir: Path, n_pairs: int, size: int = 96, seed: int = 0) -> Path:
    """Write `pairs.jsonl` (prompt, chosen, rejected) and its PNGs into `out_dir`; return the JSONL path.
    Deterministic in (n_pairs, size, seed); written to a temporary name first so a crash leaves no half set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    lines = []
    for index in range(n_pairs):
        prompt, chosen, rejected = make_pair(index, size, seed)
        chosen.save(out_dir / "images" / f"{index:05d}_chosen.png")
        rejected.save(out_dir / "images" / f"{index:05d}_rejected.png")
        lines.append(json.dumps({"prompt": prompt, "chosen": f"images/{index:05d}_chosen.png",
                                 "rejected": f"images/{index:05d}_rejected.png"}))
    path = out_dir / "pairs.jsonl"
    files.write_text(path, "\n".join(lines) + "\n")
    return path
