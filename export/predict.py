"""`maml-predict`: adapt an exported model to a folder of labelled examples and classify new images.

    maml-predict --model exported --support support/ --query query/ [--json]
    maml-predict --model exported --support support/ --save-task task.npz     # learn the classes once
    maml-predict --model exported --task task.npz --query query/              # classify later

support/ holds one sub-folder per class (the class names; sorted, they are labels 0..n-1, and n must
be the model's ways), each with one or more images; query/ holds the images to classify, flat (no
sub-folders). `maml-train examples` writes such a pair from Omniglot's evaluation set. Images of
any size and mode (PNG, JPEG, ...) are prepared exactly as the model's training images were, from the
export's metadata (`maml_export.images.Preprocessing`): for Omniglot's models grayscale (transparent
pixels count as paper), dark ink on light paper inverted so that ink is 1.0, resized to 28x28 with
LANCZOS, divided by 255; for a model trained on image folders, e.g. RGB resized to 84x84, pixel / 255.
Needs onnxruntime, numpy and Pillow only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from maml_export.cli import run
from maml_export.images import Preprocessing

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """An image file -> float32 [C, H, W], prepared as the model's training images were (its metadata's
    `images.Preprocessing`: Omniglot's drawings ink 1.0 on paper 0.0, photos their pixel values / 255)."""
    return preprocessing.load(path)


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; hidden files and other suffixes are skipped."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def read_support(folder: Path, ways: int, preprocessing: Preprocessing) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Class names (sorted sub-folder names), images [S, C, H, W] and labels [S]."""
    if not folder.is_dir():
        raise ValueError(f"--support {folder} is not a directory")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) != ways:
        found = f"{len(classes)} ({', '.join(classes)})" if classes else "none"
        raise ValueError(f"--support {folder} must hold one sub-folder per class: the model is {ways}-way, "
                         f"found {found}")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = image_files(folder / name)
        if not files:
            raise ValueError(f"--support class folder {folder / name} holds no images")
        images += [load_image(f, preprocessing) for f in files]
        labels += [label] * len(files)
    return classes, np.stack(images), np.array(labels, dtype=np.int64)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", "model_path", type=str, required=True,
              help="The folder maml-export wrote (or the model.onnx in it).")
@click.option("--support", type=str, default=None,
              help="Folder with one sub-folder of example images per class (sorted names = labels 0..n-1): the "
                   "classes to learn.")
@click.option("--task", "task_file", type=str, default=None,
              help="A task saved with --save-task: its classes, learned earlier, instead of --support.")
@click.option("--save-task", "save_file", type=str, default=None,
              help="Save the task learned from --support to this file (.npz), to classify later with --task "
                   "without the support images.")
@click.option("--query", type=str, default=None,
              help="Folder of images to classify, the images themselves in it (flat, no sub-folders).")
@click.option("--unknown-below", type=click.FloatRange(0, 1), default=None,
              help="Answer 'unknown' when the top probability is below this (a calibrated model's probabilities are "
                   "calibrated on validation tasks, and a warning line says when a model's are not; docs/deploy.md "
                   "lists how often right answers fall below each threshold).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads. [default: all cores]")
@click.option("--no-pixel-check", is_flag=True,
              help="Classify images that look blank (one color throughout) or inverted (light ink on a dark "
                   "background: mostly ink once prepared) instead of reporting them.")
def cli(model_path, support, task_file, save_file, query, unknown_below, as_json, threads, no_pixel_check):
    """Learn the classes of a support folder once (the model's SGD steps, in adapt.onnx) and classify
    the query images (predict.onnx), each on its own. Prints each query file with its predicted class
    and probability.

    A query file that cannot be read, or looks blank or inverted, is reported on stderr (one `error:`
    line each; with --json also under "failed"); the other query images are classified all the same,
    and the exit code is then 1. A support image with such a problem stops the command (exit 1).

    \b
    Examples:
      maml-predict --model exported --support support/ --query query/
      maml-predict --model exported --support support/ --save-task task.npz     # learn once
      maml-predict --model exported --task task.npz --query query/              # classify later
    """
    from maml_export.adapter import Adapter, pixel_problem
    from maml_export.cli import fail

    if (support is None) == (task_file is None):
        raise click.UsageError("pass exactly one of --support (classes to learn) and --task (a saved task)")
    if query is None and save_file is None:
        raise click.UsageError("pass --query (images to classify) and/or --save-task (with --support)")
    if save_file is not None and support is None:
        raise click.UsageError("--save-task saves what --support teaches: pass --support")
    try:
        adapter = Adapter(model_path, threads=threads, check_pixels=not no_pixel_check)
    except ValueError as e:
        raise ValueError(f"--model: {e}") from None
    if adapter.task_batch:
        raise ValueError(f"--model {model_path} adapts {adapter.task_batch} tasks per call (exported with "
                         "--task-batch); maml-predict adapts one: export without --task-batch")
    if not adapter.calibrated:  # a top probability of 1.000 can then be a wrong answer
        click.echo(f"warning: {model_path} is not calibrated (temperature {adapter.temperature:g}, no calibration "
                   "recorded): its probabilities are scores, not chances, and --unknown-below means little; `maml-train "
                   "bundle RUN` fits a temperature on validation tasks", err=True)
    check = adapter.input_range if adapter.check_pixels else ""
    # what a refused image should have been: the advice fits the model's pixel convention
    expected = ("maml-predict reads dark ink on light paper" if adapter.preprocessing.pixels == "ink"
                else f"the model takes {adapter.input_range}")
    if support is not None:
        classes, x_spt, y_spt = read_support(Path(support), adapter.ways, adapter.preprocessing)
        problems = ((f, pixel_problem(x, check)) for f, x in zip(
            [f for name in classes for f in image_files(Path(support) / name)], x_spt))  # read_support's order
        for f, problem in problems:
            if problem:
                raise ValueError(f"--support image {f} is {problem}: {expected} "
                                 "(--no-pixel-check classifies it anyway)")
        task = adapter.adapt(x_spt, y_spt, classes=classes)
        if save_file is not None:
            task.save(save_file)
            if not as_json:
                click.echo(f"saved the task ({', '.join(classes)}) to {save_file}", err=query is not None)
    else:
        try:
            task = adapter.load_task(task_file)
        except ValueError as e:
            raise ValueError(f"--task: {e}") from None
        classes = task.classes or [str(i) for i in range(adapter.ways)]
    if query is None:
        if as_json:
            click.echo(json.dumps({"model": os.fspath(model_path), "saved_task": save_file, "classes": classes}))
        return 0
    query_dir = Path(query)
    if not query_dir.is_dir():
        raise ValueError(f"--query {query_dir} is not a directory")
    found = image_files(query_dir)
    if not found:
        folders = [p.name for p in sorted(query_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        if folders:  # one sub-folder per class is --support's layout
            raise ValueError(f"--query {query_dir} holds sub-folders ({', '.join(folders[:3])}"
                             f"{', ...' if len(folders) > 3 else ''}), not images: the query folder must hold the "
                             "images to classify themselves (flat); one sub-folder per class is for --support")
        raise ValueError(f"--query {query_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    files, images, failed = [], [], {}  # a bad file is reported and left out; the others are classified
    for f in found:
        try:
            x = load_image(f, adapter.preprocessing)
            problem = pixel_problem(x, check)
            if problem:
                raise ValueError(f"{f} is {problem}: {expected} (--no-pixel-check classifies it anyway)")
        except ValueError as e:
            failed[f.name] = " ".join(str(e).split())
            fail(failed[f.name], 1)
            continue
        files.append(f)
        images.append(x)
    if not files:
        raise ValueError(f"--query {query_dir}: none of its {len(found)} images can be classified (each said above)")
    proba = task.predict_proba(np.stack(images))  # each image on its own (query_norm "support")
    best = proba.argmax(axis=1)
    names = [classes[k] if unknown_below is None or p[k] >= unknown_below else "unknown" for k, p in zip(best, proba)]
    if as_json:
        doc = {"model": os.fspath(model_path), "ways": adapter.ways, "steps": adapter.steps, "classes": classes,
               "calibrated": adapter.calibrated,
               "task": task_file, "unknown_below": unknown_below,
               "predictions": [{"file": f.name, "class": name, "label": int(k), "probability": float(p[k]),
                                "probabilities": {c: float(v) for c, v in zip(classes, p)}}
                               for f, name, k, p in zip(files, names, best, proba)],
               "failed": [{"file": name, "error": error} for name, error in failed.items()]}
        if support is not None:
            doc["support"] = {c: int((y_spt == i).sum()) for i, c in enumerate(classes)}
        click.echo(json.dumps(doc, indent=1))
        return 1 if failed else 0
    width = max(len(f.name) for f in files)
    cwidth = max(len(c) for c in classes + ["unknown"])
    for f, name, k, p in zip(files, names, best, proba):
        click.echo(f"{f.name:<{width}}  {name:<{cwidth}}  {p[k]:.3f}")
    return 1 if failed else 0


def main(args: list[str] | None = None) -> None:
    run(cli, args, "maml-predict")


if __name__ == "__main__":
    main()
