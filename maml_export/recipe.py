"""What `maml-train --data FOLDER` does by default: a recipe that finishes on a CPU, for your own image folders.

A folder of drawings (grayscale, dark strokes on light paper: symbols, handwriting, glyphs, sketches) starts
from the shipped omniglot-5w1s weights, whose strokes it already knows, and meta-fine-tunes them: the bundle's
preprocessing (1x28x28, ink, LANCZOS), architecture and adaptation, its training recipe (the prototype head,
first-order, one inner step), a small meta-batch and a time budget. Any other folder (colour photos, icons)
trains from random weights with the same cheap recipe at 3x84x84 and 32 filters. Every option the user gives
wins over the recipe's; `--from-scratch` trains drawings from random weights too.

    >>> FOLDER_TRAINING["minutes"], FOLDER_TRAINING["meta_batch"], FOLDER_TRAINING["first_order"]
    (5.0, 4, True)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DRAWINGS_INIT = "omniglot-5w1s"
# every image folder, unless given: first-order, 4 tasks a meta-iteration, 5 queries a class (classes of 6 images
# suffice), a 5-minute budget, validation every 100 iterations, a calibrated bundle at the end
FOLDER_TRAINING = {"first_order": True, "meta_batch": 4, "query": 5, "minutes": 5.0, "val_every": 100,
                   "val_tasks": 100, "calibration_tasks": 200}
# from random weights: the bundles' recipe (the prototype head, one inner step), smaller, at miniImageNet's size
FROM_SCRATCH = {"channels": 3, "image_size": 84, "pixels": "plain", "hidden": 32, "head_init": "prototypes",
                "zero_head": True, "inner_steps": 1, "inner_lr": 0.01, "val_steps": 5, "meta_lr": 1e-3}
# what a start from a checkpoint takes from it: its pixels and architecture (else the weights do not fit); on
# Omniglot the pixels are the protocol's, so only the architecture
PIXELS = ("channels", "image_size", "pixels", "resize")
ARCHITECTURE = ("hidden", "head_init", "zero_head", "query_norm")
INHERITED = PIXELS + ARCHITECTURE
SAMPLE = 24  # images looked at to tell drawings from photos: the first of up to this many classes


def looks_like_drawings(files: list) -> tuple[bool, str]:
    """Whether images look like drawings (every one grayscale, and mostly light paper) and why, in words."""
    from PIL import Image
    gray = light = looked = 0
    for f in files:
        try:
            with Image.open(f) as image:
                image.draft("RGB", (64, 64))  # JPEGs decode small; enough to tell
                rgba = image.convert("RGBA")
        except (OSError, ValueError, SyntaxError):
            continue  # decoding the folder says which file, and how to go on
        looked += 1
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent pixels are paper, as training's
        a = np.asarray(Image.alpha_composite(white, rgba).convert("RGB").resize((64, 64)), dtype=np.int16)
        chroma = np.abs(a - a.mean(axis=-1, keepdims=True)).max(axis=-1)
        gray += np.percentile(chroma, 99) <= 12  # JPEG leaves a little colour noise in gray images
        light += np.median(a) >= 128
    if gray < looked or not looked:
        return False, f"{looked - gray} of the {looked} images looked at are in colour"
    if light < looked:
        return False, (f"grayscale, but {looked - light} of the {looked} images looked at are mostly dark: "
                       "if they are drawings in light ink, invert them (dark ink on light paper)")
    return True, "grayscale, dark on light paper"


def sample_files(classes: list) -> list:
    """The images `looks_like_drawings` looks at: the first of each of up to SAMPLE classes (lists of files)."""
    return [files[0] for files in classes if files][:SAMPLE]


def deployment(init: str) -> dict:
    """How a checkpoint `init` is deployed beyond its weights, for the bundle a fine-tune of it ends with: its
    support shift and feature scale (`checkpoint.as_deployed`), so that it deploys as the checkpoint did."""
    from .checkpoint import load_checkpoint
    source = load_checkpoint(init)
    return {"support_shift": source.config.support_shift, "feature_scale": source.state.get("feature_scale")}


def from_checkpoint(init: str) -> dict:
    """The options a fine-tune of `init` (a bundle or a run) takes from it: its pixels and architecture, and how it
    was trained and deployed: the inner steps and step size it trained with, the ones it deploys with chosen on
    validation, its training augmentation and the meta step size it ended with."""
    from .checkpoint import load_checkpoint
    source = load_checkpoint(init)
    c, state = source.config, source.state
    options = {k: getattr(c, k) for k in INHERITED}
    options["pixels"] = c.preprocessing.pixels  # Omniglot's models leave it to the data: ink
    options.update(inner_steps=state.get("inner_steps_trained", c.inner_steps),
                   inner_lr=state.get("inner_lr_trained", c.inner_lr), val_steps=c.deployed_steps,
                   val_inner_lr=c.deployed_inner_lr, augment_shift=c.augment_shift, meta_lr=c.meta_lr)
    return options


def omniglot_init_defaults(config, given: dict) -> tuple[dict, str]:
    """What a new Omniglot run from `--init` (`config.init`) takes from that checkpoint where the CLI user did not
    give it (`given`): its architecture and head (`ARCHITECTURE`), as a fine-tune on an image folder does; and one
    line saying which ("" where nothing changes). Without it, a run from a prototype-head bundle would silently
    start every task from a zero head (chance with 0 steps)."""
    from .config import flag
    source = from_checkpoint(config.init)
    options = {k: source[k] for k in ARCHITECTURE if k not in given and source[k] != getattr(config, k)}
    line = (f"--init {config.init}: " + ", ".join(flag(k) if v is True else f"{flag(k)} {v}" for k, v in options.items())
            + " as it was trained (give an option to change it)") if options else ""
    return options, line


def folder_defaults(root: Path, classes: list, config, given: dict) -> tuple[dict, str]:
    """The recipe for a new run on the image folder `root` (`classes`: its classes' files): the options to set
    (none the user `given`), and one line saying what it does."""
    drawings, why = looks_like_drawings(sample_files(classes))
    options = dict(FOLDER_TRAINING)
    init = given.get("init")
    if init is None and drawings and not config.from_scratch:
        bundle = from_checkpoint(DRAWINGS_INIT)
        clash = [k for k in INHERITED if k in given and given[k] != bundle[k]]
        if not clash:
            init = DRAWINGS_INIT
            options["init"] = init
        else:  # e.g. --channels 3: the user wants another model than the bundle's
            why += f"; {', '.join('--' + k.replace('_', '-') for k in clash)} given"
    if init is not None:
        options.update(from_checkpoint(init))
        start = f"meta-fine-tuning {init}'s weights"
    else:
        options.update(FROM_SCRATCH)
        start = "meta-training from random weights"
    options = {k: v for k, v in options.items() if k not in given}
    done = {**options, **given}
    pixels = f"{done['channels']}x{done['image_size']}x{done['image_size']}, {done['pixels']}"
    budget = f"at most {done['minutes']:g} minutes" if done.get("minutes") else f"{done.get('iterations', 10000)} iterations"
    hint = "--from-scratch: from random weights" if init is not None else (
        "drawings in dark ink on light paper start from the shipped weights" if not drawings else
        "--init omniglot-5w1s: from the shipped weights")
    line = (f"{root} looks like {'drawings' if drawings else 'other images'} ({why}): {start} ({pixels}, "
            f"{'first-order, ' if done.get('first_order') else ''}meta-batch {done.get('meta_batch', 32)}) for "
            f"{budget}; {hint}")
    return options, line
