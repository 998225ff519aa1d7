"""The robustness suite: the protocol's tasks drawn the way people draw, to measure a model off the benchmark.

A person drawing with a mouse or a pen (the `maml-web` page, a phone) tilts a character a little, draws it small
and anywhere on the page, with a thinner or thicker pen, and never twice alike. Each condition redraws every
drawing of a split that way, each drawing with its own random parameters from a fixed seed:

    as-drawn   the protocol's pixels
    tilted     rotated by 10-30 degrees, either way
    small      drawn at 50-80 % of its size with the same pen, placed off-centre (anywhere the whole page
               stays in the frame): the strokes are widened before the drawing is scaled, so that they keep
               their width, as a smaller drawing with the same pen does
    thin       strokes thinned (the ink eroded by a 3x3 cross once)
    thick      strokes thickened (the ink dilated by a 3x3 square twice)
    elastic    a smooth random displacement field (a 4x4 grid of N(0, 3 px) offsets, interpolated)
    all        a pen width (thin, as drawn or thick), then tilted, small and elastic in one warp

The transformations act on Omniglot's full-resolution drawings (105x105), before the protocol's resize to
28x28, so a transformed drawing reaches the model as a person's drawing does through the one preprocessing
(`images.Preprocessing`). Tasks are then drawn as the protocol draws them (`data.TaskSampler`: classes are
(character, rotation) pairs), with the same seed in every condition, so that conditions are paired too.

    >>> import numpy as np
    >>> from maml_export.suite import redraw
    >>> paper = np.ones((105, 105), bool); paper[30:70, 50:54] = False     # one vertical stroke
    >>> redraw(paper, "tilted", np.random.default_rng(0)).shape             # ink in [0, 1] at 28x28
    (28, 28)

Paddle-free (numpy and Pillow); `trainer.evaluate_suite` runs a model on it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data import HALVES, OMNIGLOT_PIXELS, TaskSampler, drawings, find_source, split_characters
from .errors import DataError

CONDITIONS = ("as-drawn", "tilted", "small", "thin", "thick", "elastic", "all")
SUITE_SEED = 4_000_003  # the drawings' random parameters: every run of the suite redraws them identically
TILT = (10.0, 30.0)  # degrees either way, the least and the most the suite tilts (training may go further: --augment-tilt)


def _erode(ink: np.ndarray) -> np.ndarray:
    """bool ink [H, W] eroded by a 3x3 cross: a pixel stays ink where it and its 4 neighbours are ink."""
    out = ink.copy()
    out[1:, :] &= ink[:-1, :]
    out[:-1, :] &= ink[1:, :]
    out[:, 1:] &= ink[:, :-1]
    out[:, :-1] &= ink[:, 1:]
    return out


def _dilate(ink: np.ndarray) -> np.ndarray:
    """bool ink [H, W] dilated by a 3x3 square: a pixel becomes ink where any of its 8 neighbours is."""
    padded = np.pad(ink, 1)
    H, W = ink.shape
    return np.any([padded[dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], axis=0)


def _pen(ink: np.ndarray, width: str) -> np.ndarray:
    """bool ink drawn with a thinner ("thin") or thicker ("thick") pen, or as it is ("as-drawn")."""
    if width == "thin":
        return _erode(ink)
    if width == "thick":
        return _dilate(_dilate(ink))
    return ink


def _elastic(rng: np.random.Generator, size: int, sigma: float = 3.0, grid: int = 4) -> np.ndarray:
    """A smooth displacement field (2, size, size) in pixels: a grid x grid of N(0, sigma) offsets, bicubic."""
    coarse = rng.normal(0.0, sigma, (2, grid, grid)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(c, mode="F").resize((size, size), Image.Resampling.BICUBIC))
                     for c in coarse])


def _sample(ink: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Bilinear samples of float ink [H, W] at the points (ys, xs); paper (0) outside the frame."""
    H, W = ink.shape
    padded = np.pad(ink, 1)  # a ring of paper, so that points just outside blend into it
    ys, xs = np.clip(ys + 1, 0, H + 0.999), np.clip(xs + 1, 0, W + 0.999)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, H + 1), np.minimum(x0 + 1, W + 1)
    fy, fx = ys - y0, xs - x0
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bottom = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


STROKE = 5.6  # Omniglot's median stroke width at 105x105, in pixels: each 3x3-cross erosion keeps (w - 2) / w of
# the ink, measured 64 % and then 30 % (w = 5.6 both times) on 250 drawings of the evaluation set


def _warp(ink: np.ndarray, rng: np.random.Generator, tilt: bool, small: bool, elastic: bool,
          max_tilt: float = TILT[1]) -> np.ndarray:
    """bool ink [H, W] tilted (10 to `max_tilt` degrees, either way), small (50-80 % with the same pen,
    off-centre) and/or elastic, in one resampling: each output pixel reads the input where the inverse of the
    transformation maps it. Returns float ink [H, W] in [0, 1]."""
    H, W = ink.shape
    centre = np.array([(H - 1) / 2, (W - 1) / 2])
    angle = np.deg2rad(rng.uniform(TILT[0], max_tilt) * rng.choice([-1, 1])) if tilt else 0.0
    scale = rng.uniform(0.5, 0.8) if small else 1.0
    # the same pen on a smaller drawing: widen the strokes by what scaling takes off (each dilation adds 2 px)
    for _ in range(round((1 / scale - 1) * STROKE / 2)):
        ink = _dilate(ink)
    ink = ink.astype(np.float64)
    # the page's centre lands anywhere the scaled page stays inside the frame
    placed = centre + (rng.uniform(-1, 1, 2) * (1 - scale) * np.array([H, W]) / 2 if small else 0.0)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    if elastic:
        dy, dx = _elastic(rng, H)
        yy, xx = yy + dy, xx + dx
    y, x = (yy - placed[0]) / scale, (xx - placed[1]) / scale  # undo the placement and the scale
    cos, sin = np.cos(angle), np.sin(angle)
    return _sample(ink, cos * y - sin * x + centre[0], sin * y + cos * x + centre[1])  # undo the rotation


def redraw(paper: np.ndarray, condition: str, rng: np.random.Generator, max_tilt: float = TILT[1]) -> np.ndarray:
    """One drawing (bool paper mask [H, W], True = paper, as Omniglot's) redrawn under `condition`, through the
    protocol's preprocessing: float32 ink [28, 28] in [0, 1]. Draws its parameters from `rng`, the same number
    whatever `max_tilt` (the most degrees "tilted" and "all" turn; the suite's is `TILT`'s)."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown suite condition {condition!r}: one of {', '.join(CONDITIONS)}")
    ink = ~np.asarray(paper, bool)
    if condition in ("thin", "thick"):
        ink = _pen(ink, condition)
    elif condition == "all":
        ink = _pen(ink, ("thin", "as-drawn", "thick")[rng.integers(3)])
    if condition in ("tilted", "small", "elastic", "all"):
        ink = _warp(ink, rng, tilt=condition in ("tilted", "all"), small=condition in ("small", "all"),
                    elastic=condition in ("elastic", "all"), max_tilt=max_tilt)
    ink = ink.astype(np.float64)
    gray = np.round(255 * (1 - ink)).astype(np.uint8)  # paper white, as a drawing file: the preprocessing inverts it
    return OMNIGLOT_PIXELS.uint8(Image.fromarray(gray, mode="L"))[0].astype(np.float32) / np.float32(255)


def raw_drawings(root: str, characters) -> dict:
    """The raw drawings of `characters` (the protocol's numbering) of Omniglot in `root`: character -> its list
    of bool paper masks [105, 105]."""
    wanted, found, start = set(int(c) for c in characters), {}, 0
    for half in HALVES:
        source = find_source(Path(root), half)
        if source is None:
            raise DataError(f"{root} has no images_{half} data (.npz, .zip or folder): the suite redraws "
                            f"Omniglot's own drawings, pass Omniglot's folder with --data")
        for index, char in enumerate(drawings(*source), start):
            if index in wanted:
                found[index] = char
        start = index + 1
    return found


def split_drawings(root: str, split: str) -> list:
    """The raw drawings of one split of Omniglot in `root`: per character of the split (the protocol's order of
    `split_characters`), its list of bool paper masks."""
    wanted = split_characters()[split]
    found = raw_drawings(root, wanted)
    return [found[c] for c in wanted]


def suite_images(characters: list, condition: str, seed: int = SUITE_SEED) -> np.ndarray:
    """Every drawing of `characters` (`split_drawings`) redrawn under `condition`: float32 [C, D, 28, 28], the
    images a `data.TaskSampler` draws tasks from. Deterministic for a seed (each condition its own stream)."""
    rng = np.random.default_rng([seed, CONDITIONS.index(condition)])
    return np.stack([[redraw(d, condition, rng) for d in char] for char in characters])


def redraw_mix(text: str | None) -> np.ndarray | None:
    """`--augment-redraw-mix`, e.g. "tilted=3,small=2,all=3,thin=1,thick=1,elastic=1": the weight of each redrawing
    condition (`RedrawingSampler.REDRAWN` order; one left out weighs 0) as probabilities, or None (uniform) for
    None. Raises ValueError with the reason."""
    if text is None:
        return None
    weights = dict.fromkeys(RedrawingSampler.REDRAWN, 0.0)
    for item in str(text).split(","):
        name, _, value = item.strip().partition("=")
        if name not in weights:
            raise ValueError(f"{name!r} is not a redrawing condition (one of {', '.join(RedrawingSampler.REDRAWN)}), "
                             f"in {text!r}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} needs a weight, a number >= 0 (e.g. {name}=2), in {text!r}") from None
        if not 0 <= weights[name] < float("inf"):
            raise ValueError(f"{name}={value} needs a weight, a number >= 0, in {text!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"{text!r} gives every condition weight 0")
    return np.array(list(weights.values())) / total


class RedrawingSampler(TaskSampler):
    """Training's data augmentation `--augment-redraw P`: a task sampler of whose images each is, with probability
    P, redrawn under one of the suite's conditions (tilted ... all, chosen per image, uniformly or with the
    probabilities `mix` of `redraw_mix`) from its full-resolution drawing, tilted by up to `max_tilt` degrees
    (`--augment-tilt`; by default the suite's 30). Which images, their conditions and each redrawing's seed come
    from the task stream's generator, a fixed amount per batch, so `--resume` continues it exactly.

    Takes over `sampler`'s characters, sizes and generator; `drawings` maps each of its characters to its raw
    drawings (`raw_drawings`). `tasks`: the tasks of each sampled batch that are redrawn (a rank's own block under
    paddle.distributed: every rank draws the whole meta-batch but adapts only its block, and a redrawing costs
    milliseconds, so each rank redraws only its own); the others' images are left as drawn, unused.

    Example:
        >>> import numpy as np
        >>> from maml_export.data import TaskSampler
        >>> paper = np.ones((105, 105), bool); paper[30:70, 50:55] = False          # one vertical stroke
        >>> plain = TaskSampler(np.zeros((2, 20, 28, 28), np.float32), np.arange(2), 2, 1, 1, seed=0)
        >>> sampler = RedrawingSampler(plain, {0: [paper] * 20, 1: [paper] * 20}, p=1.0)
        >>> float(sampler.sample(4).x_spt.max()) > 0                              # ink where there was none
        True
    """

    REDRAWN = CONDITIONS[1:]

    def __init__(self, sampler: TaskSampler, drawings: dict, p: float, tasks: slice = slice(None),
                 mix: np.ndarray | None = None, max_tilt: float = TILT[1]):
        self.__dict__.update(vars(sampler))
        self.drawings, self.p, self.tasks, self.mix, self.max_tilt = drawings, p, tasks, mix, max_tilt

    def conditions(self, shape: tuple) -> np.ndarray:
        """Indices into REDRAWN, one per image of `shape`, drawn from the stream: uniform, or `mix`'s weights."""
        if self.mix is None:  # the stream of runs before --augment-redraw-mix, unchanged
            return self.rng.integers(len(self.REDRAWN), size=shape)
        # side="right": a condition of weight 0 is never drawn, even for a uniform draw of exactly 0
        return np.minimum(np.searchsorted(np.cumsum(self.mix), self.rng.random(shape), side="right"),
                          len(self.REDRAWN) - 1)

    def images_of(self, chars: np.ndarray, drawings: np.ndarray) -> np.ndarray:
        batch = super().images_of(chars, drawings)  # [T, N, K+Q, 28, 28]
        redrawn = self.rng.random(drawings.shape) < self.p
        conditions = self.conditions(drawings.shape)
        seeds = self.rng.integers(2 ** 63, size=drawings.shape)  # one per image: a task's redrawings need no other's
        kept = np.zeros(len(drawings), bool)
        kept[self.tasks] = True
        for t, n, i in zip(*np.nonzero(redrawn & kept[:, None, None])):
            paper = self.drawings[int(chars[t, n])][int(drawings[t, n, i])]
            batch[t, n, i] = redraw(paper, self.REDRAWN[conditions[t, n, i]], np.random.default_rng(seeds[t, n, i]),
                                    self.max_tilt)
        return batch
