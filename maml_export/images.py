"""Image file -> model pixels: the one definition of the preprocessing that training and prediction share.

A `Preprocessing` is built from the config a model was trained with (`MamlConfig.preprocessing`) or from an
export's metadata (`Preprocessing.from_metadata`, which `Adapter` and `maml-predict` use), so a deployed model
prepares its images exactly as its training data was prepared:

  1. decode (any format Pillow reads); transparent pixels are composited on white paper;
  2. to `channels` channels: grayscale ("L") for 1, "RGB" for 3;
  3. `pixels` "ink" (drawings, Omniglot's protocol): the gray value inverted, so that ink is 255 and paper 0;
     "plain" (photos): the values as they are;
  4. resized to image_size x image_size with `resize` (default LANCZOS: Omniglot's protocol; the aspect ratio
     is not kept, as miniImageNet's 84x84 images are made);
  5. divided by 255 in float32 -> [C, size, size] in [0, 1].

Paddle-free (numpy and Pillow only), so an onnxruntime deployment can import it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

PIXELS = {"ink": "[0, 1], ink 1.0, paper 0.0",  # the metadata's input_range of each convention
          "plain": "[0, 1], the image's pixel values / 255"}
RESIZES = ("lanczos", "bilinear", "bicubic", "nearest")
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # what image folders are read for


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model's input [channels, image_size, image_size] float32 in [0, 1]."""

    channels: int = 1
    image_size: int = 28
    pixels: str = "ink"
    resize: str = "lanczos"

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if self.pixels not in PIXELS:
            raise ValueError(f"--pixels must be one of {', '.join(PIXELS)}, got {self.pixels!r}")
        if self.pixels == "ink" and self.channels != 1:
            raise ValueError("--pixels ink (dark ink on light paper, inverted) is for grayscale drawings: "
                             "pass --channels 1, or --pixels plain for colour images")
        if self.resize not in RESIZES:
            raise ValueError(f"--resize must be one of {', '.join(RESIZES)}, got {self.resize!r}")

    @property
    def input_range(self) -> str:
        """The pixels in words, as the ONNX metadata's `input_range` says them (`adapter.pixel_problem` reads it)."""
        return PIXELS[self.pixels]

    def metadata(self) -> dict[str, str]:
        """The ONNX metadata keys that say how to prepare an image for the graph."""
        return {"channels": str(self.channels), "image_size": str(self.image_size), "pixels": self.pixels,
                "resize": self.resize, "input_range": self.input_range}

    @classmethod
    def from_metadata(cls, metadata: dict) -> "Preprocessing":
        """An export's preprocessing; exports written before `pixels` and `resize` existed are Omniglot's."""
        return cls(int(metadata["channels"]), int(metadata["image_size"]), metadata.get("pixels", "ink"),
                   metadata.get("resize", "lanczos"))

    def describe(self) -> str:
        """One line, e.g. for a protocol string: '3x84x84, RGB, LANCZOS, pixel/255'."""
        mode = "grayscale" if self.channels == 1 else "RGB"
        scale = "ink=255-gray, /255" if self.pixels == "ink" else "pixel/255"
        return f"{self.channels}x{self.image_size}x{self.image_size}, {mode}, {self.resize.upper()}, {scale}"

    def uint8(self, image) -> np.ndarray:
        """A PIL image -> uint8 [C, size, size] (steps 1-4; what dataset caches keep)."""
        from PIL import Image
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            # composite on white paper: a transparent background must not turn into ink (or black)
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        if image.mode.startswith("I"):  # 16-bit grayscale: Pillow's convert("L") clips at 255
            a = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(np.uint8(np.clip(np.round(a / 257 if a.max() > 255 else a), 0, 255)))
        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.pixels == "ink":  # the drawing as an 8-bit image with ink 255, then resized (Omniglot's order)
            image = Image.fromarray(255 - np.asarray(image, dtype=np.uint8), mode="L")
        method = getattr(Image.Resampling, self.resize.upper())
        a = np.asarray(image.resize((self.image_size, self.image_size), method), dtype=np.uint8)
        return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))

    def load_uint8(self, path: str | os.PathLike) -> np.ndarray:
        """An image file -> uint8 [C, size, size]; a one-line ValueError for a file Pillow cannot read."""
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as image:
                image.load()
                return self.uint8(image)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:  # SyntaxError: some decoders
            raise ValueError(f"cannot read image {os.fspath(path)} ({type(e).__name__}: {e})") from None

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """An image file -> float32 [C, size, size] in [0, 1]: the model's input."""
        return to_float(self.load_uint8(path))


def to_float(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1]: division in float32 (== the float64 route rounded, for all 256 values)."""
    return pixels.astype(np.float32) / np.float32(255)


def image_files(folder: str | os.PathLike, suffixes=SUFFIXES) -> list:
    """Image files directly in `folder` (pathlib.Path), sorted by name; hidden files and other suffixes skipped."""
    from pathlib import Path
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)
