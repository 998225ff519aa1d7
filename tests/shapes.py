"""A made-up RGB image-folder dataset for the tests and the docs' toy run: coloured shapes.

A class is a (shape, colour) pair, e.g. `star-red`: every image of it draws that shape, filled with that colour
(jittered), at a random place, size and angle, on a light random background, on a canvas of random size (48 to
160 px a side, not square). A few images are RGBA with a transparent background; every third is a JPEG. Test
classes are new combinations of shapes and colours seen in training, so a model must tell both apart.

    python tests/shapes.py OUT [--classes 60] [--images 12] [--seed 0]     # OUT/<class>/*.png|jpg
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "pentagon", "star", "cross", "ring", "hexagon", "bar", "crescent")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (230, 200, 20),
           "purple": (150, 40, 180), "cyan": (20, 190, 200), "orange": (240, 130, 20), "black": (20, 20, 20)}


def polygon(n: int, cx: float, cy: float, r: float, angle: float, inner: float | None = None) -> list:
    """The points of a regular n-gon (a star when `inner` is the ratio of its inner radius)."""
    points = []
    for i in range(n * (2 if inner else 1)):
        radius = r * (inner if inner and i % 2 else 1)
        a = angle + math.pi * i / (n if inner else n / 2)
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill,
               background) -> None:
    """One shape of radius about `r` at (cx, cy), turned by `angle`."""
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        pen.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=background)
    elif shape == "crescent":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        dx, dy = r / 2 * math.cos(angle), r / 2 * math.sin(angle)
        pen.ellipse([cx + dx - r * 0.8, cy + dy - r * 0.8, cx + dx + r * 0.8, cy + dy + r * 0.8], fill=background)
    elif shape in ("triangle", "square", "pentagon"):
        pen.polygon(polygon({"triangle": 3, "square": 4, "pentagon": 5}[shape], cx, cy, r, angle), fill=fill)
    elif shape == "hexagon":
        pen.polygon(polygon(6, cx, cy, r, angle), fill=fill)
    elif shape == "star":
        pen.polygon(polygon(5, cx, cy, r, angle, inner=0.45), fill=fill)
    elif shape in ("cross", "bar"):
        arms = (0, math.pi / 2) if shape == "cross" else (0,)
        for a in arms:
            c, s = math.cos(angle + a), math.sin(angle + a)
            w = r / 3
            pen.polygon([(cx + r * c - w * s, cy + r * s + w * c), (cx + r * c + w * s, cy + r * s - w * c),
                         (cx - r * c + w * s, cy - r * s - w * c), (cx - r * c - w * s, cy - r * s + w * c)],
                        fill=fill)
    else:
        raise ValueError(shape)


def image(rng: np.random.Generator, shape: str, colour: tuple, transparent: bool = False) -> Image.Image:
    """One image of the class (shape, colour)."""
    w, h = (int(v) for v in rng.integers(48, 161, 2))
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    canvas = Image.new("RGBA" if transparent else "RGB", (w, h), (*background, 0) if transparent else background)
    pen = ImageDraw.Draw(canvas)
    r = min(w, h) * rng.uniform(0.25, 0.42)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)
    draw_shape(pen, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), fill + ((255,) if transparent else ()),
               (*background, 0) if transparent else background)
    return canvas


def classes(count: int) -> list[tuple[str, str]]:
    """`count` (shape, colour) classes, shapes varying fastest (at most len(SHAPES) * len(COLOURS))."""
    every = [(s, c) for c in COLOURS for s in SHAPES]
    if count > len(every):
        raise ValueError(f"at most {len(every)} classes")
    return every[:count]


def write_dataset(out: Path, count: int = 60, images: int = 12, seed: int = 0, sizes: dict | None = None) -> list:
    """Write OUT/<shape>-<colour>/NN.png|jpg for `count` classes of `images` images each (`sizes`: a class
    name -> another number of images); returns the class names."""
    rng = np.random.default_rng(seed)
    names = []
    for shape, colour in classes(count):
        name = f"{shape}-{colour}"
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range((sizes or {}).get(name, images)):
            transparent = i % 5 == 4
            picture = image(rng, shape, COLOURS[colour], transparent)
            if i % 3 == 2 and not transparent:
                picture.save(folder / f"{i:02d}.jpg", quality=90)
            else:
                picture.save(folder / f"{i:02d}.png")
        names.append(name)
    return names


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=60)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(len(write_dataset(args.out, args.classes, args.images, args.seed)), "classes written to", args.out)
