"""A folder of drawings for the tests and the docs' worked example: Omniglot's test characters as a user's own
classes, DIR/<class>/*.png|jpg.

A class is one character of the protocol's *test* split (`suite.split_drawings(DATA, "test")`, which no shipped
model trained on), its images some of its 20 raw 105x105 drawings, each saved at its own size (56 to 160 px a
side, not square, drawn dark on white as a scan or a phone would), every third as a JPEG. Nothing is committed:
the folder is written where it is asked for.

    python tests/drawings.py OUT [--classes 40] [--images 12] [--seed 0] [--data $OMNIGLOT_DIR]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_drawings(data: str | os.PathLike, out: Path, count: int = 40, images: int = 12, seed: int = 0) -> list:
    """Write OUT/char<NNN>/NN.png|jpg: `images` drawings of each of `count` test characters (spread over the split);
    returns the class names."""
    from maml_export.suite import split_drawings
    characters = split_drawings(str(data), "test")
    if not 1 <= count <= len(characters) or not 1 <= images <= 20:
        raise ValueError(f"at most {len(characters)} classes of at most 20 drawings")
    rng = np.random.default_rng(seed)
    picks = np.linspace(0, len(characters) - 1, count).round().astype(int)  # alphabets across the split
    names = []
    for c in picks:
        name = f"char{c:03d}"
        (out / name).mkdir(parents=True, exist_ok=True)
        for i, d in enumerate(rng.choice(20, images, replace=False)):
            gray = Image.fromarray(np.where(characters[c][d], 255, 0).astype(np.uint8), "L")
            size = tuple(int(v) for v in rng.integers(56, 161, 2))
            picture = gray.resize(size, Image.Resampling.BILINEAR)  # grey edges, as a scan has
            if i % 3 == 2:
                picture.save(out / name / f"{i:02d}.jpg", quality=90)
            else:
                picture.save(out / name / f"{i:02d}.png")
        names.append(name)
    return names


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=os.environ.get("OMNIGLOT_DIR"), help="Omniglot [default: $OMNIGLOT_DIR]")
    args = parser.parse_args()
    print(len(write_drawings(args.data, args.out, args.classes, args.images, args.seed)), "classes written to",
          args.out)
