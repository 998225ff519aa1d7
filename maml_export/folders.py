"""Your own images for MAML: image-folder datasets, their split, their task sampler, and `open_dataset`, which
reads a `--data` folder as Omniglot or as one of these.

Layouts of `--data DIR`, the first that matches:

    DIR/train/<class>/*.png ... DIR/val/... DIR/test/...   the split given by folders
    DIR/images/*.jpg + DIR/train.csv, val.csv, test.csv    Ravi & Larochelle's miniImageNet (rows filename,label)
    DIR/<class>/*.png ...                                  classes split by `--split` (default 0.7,0.1,0.2)

Images are .png, .jpg, .jpeg, .bmp or .webp (`images.SUFFIXES`), of any size and mode: each is prepared by the
config's `images.Preprocessing` (the one `maml-predict` uses on the export) and kept as uint8, in a cache like
Omniglot's (`$MAML_EXPORT_CACHE`, keyed by the files' names, sizes and mtimes and the preprocessing). The
`--split` of a class folder is the Omniglot protocol's recipe: a `RandomState(1)` permutation of the sorted
class names, the first fraction train, the next val, the rest test, so that it never depends on `--seed`.
A class with fewer images than a task takes from it (shots + query) is left out, said in one warning line.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import (_HINT, HALVES, OFFICIAL_URL, TaskSampler, Tasks, _default_cache_dir, find_source, load_omniglot,
                   split_characters, write_cache_file)
from .errors import ConfigError, DataError
from .images import SUFFIXES, Preprocessing, to_float

SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "0.7,0.1,0.2"
CACHE_VERSION = "folders-v1"
FOLDER_PROTOCOL = "image folders"  # how a folder-trained config's protocol starts
EVERY_CLASS = "every class"  # the split of a class folder measured by a model trained elsewhere (`open_dataset`)
_LAYOUTS = {"folders": "DIR/{train,val,test}/<class>/", "csv": "DIR/images/ + {train,val,test}.csv",
            "classes": "DIR/<class>/"}


def notice(message: str) -> None:
    """One `notice: ...` line on stderr: what a default chose, and how to choose otherwise."""
    print(f"notice: {' '.join(message.split())}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """One `warning: ...` line on stderr (the CLIs' `error:` lines' sibling)."""
    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Layouts: which files make which class of which split.
# ---------------------------------------------------------------------------------------------

@dataclass
class ClassFiles:
    """One split's classes: names, and each class's image files (sorted)."""
    names: list
    files: list  # [class][image] Path


def is_omniglot(root: Path) -> bool:
    """Whether `root` holds Omniglot: either half as .npz, official .zip or extracted folder (a missing other
    half is then `load_omniglot`'s error to say)."""
    return any(find_source(root, half) is not None for half in HALVES)


def _images_in(folder: Path) -> list:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUFFIXES)


def _class_folders(folder: Path) -> ClassFiles:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return ClassFiles([c.name for c in classes], [_images_in(c) for c in classes])


def layout(root: Path) -> str:
    """'folders', 'csv' or 'classes' (see the module's docstring); a DataError if `root` is none of them."""
    if not root.is_dir():
        raise DataError(f"--data {root} {'is not a directory' if root.exists() else 'does not exist'}; pass Omniglot "
                        f"(images_background.zip and images_evaluation.zip from {OFFICIAL_URL}, or `maml-train "
                        "download`) or a folder of your own images with --data (or OMNIGLOT_DIR)")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if present:
        if len(present) < 3:
            missing = ", ".join(f"{root / s}/" for s in SPLITS if s not in present)
            raise DataError(f"--data {root} has {', '.join(present)}/ but not {missing}: a split given by folders "
                            "needs train/, val/ and test/ (or put every class folder directly in it and use --split)")
        return "folders"
    if (root / "images").is_dir() and any((root / f"{s}.csv").is_file() for s in SPLITS):
        missing = [f"{s}.csv" for s in SPLITS if not (root / f"{s}.csv").is_file()]
        if missing:
            raise DataError(f"--data {root} has images/ but not {', '.join(missing)} (Ravi & Larochelle's layout: "
                            "train.csv, val.csv and test.csv with rows filename,label)")
        return "csv"
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "classes"
    raise DataError(f"--data {root} holds no class folders: expected DIR/<class>/*.png|jpg|jpeg|bmp|webp, "
                    "DIR/{train,val,test}/<class>/..., DIR/images/ with train.csv, val.csv, test.csv, or Omniglot "
                    "(images_background and images_evaluation)")


def parse_split(text: str) -> tuple:
    """'0.7,0.1,0.2' -> (0.7, 0.1, 0.2); '27,5,8' (class counts, as a small folder's split is recorded) -> (27, 5,
    8); a ConfigError unless three positive fractions summing to 1 or three whole numbers of classes."""
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) == 3 and min(parts) >= 1 and all(p == int(p) for p in parts):
        return tuple(int(p) for p in parts)
    if len(parts) != 3 or min(parts) <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise ConfigError(f"--split must be three positive fractions train,val,test summing to 1, e.g. "
                          f"{DEFAULT_SPLIT}, or three numbers of classes; got {text!r}")
    return parts


def split_counts(n: int, fractions: tuple, least: tuple = (1, 1, 1)) -> tuple[int, int, int]:
    """How many of `n` classes go to train, val and test: the fractions rounded, each split at least `least`,
    val and test first (they must give whole tasks), train the rest; a DataError if `n` is too few."""
    if n < sum(least):
        raise DataError(f"cannot split {n} classes into train, val and test: "
                        + (f"at least {sum(least)} are needed ({least[0]} train, {least[1]} val, {least[2]} test, "
                           f"for tasks of {least[1]} classes); add classes, or lower --ways"
                           if max(least) > 1 else "--split needs at least 3"))
    val = max(least[1], round(n * fractions[1]))
    test = max(least[2], round(n * fractions[2]))
    while n - val - test < least[0]:  # the fractions ask for more than there is: take back from the larger one
        if test > least[2] and test >= val:
            test -= 1
        else:
            val -= 1
    return n - val - test, val, test


def split_classes(names: list, parts: tuple) -> dict[str, np.ndarray]:
    """Indices into sorted `names` of each split: a RandomState(1) permutation, cut at the fractions (rounded; at
    least one class each) or at the class counts (`parse_split`)."""
    n = len(names)
    if all(isinstance(p, int) for p in parts):
        if sum(parts) != n:
            raise DataError(f"--split {','.join(map(str, parts))} counts {sum(parts)} classes; the folder holds {n} "
                            "(classes added or removed since training?)")
        num_train, num_val = parts[0], parts[1]
    else:
        if n < 3:
            raise DataError(f"cannot split {n} classes into train, val and test (--split needs at least 3)")
        num_train = min(max(1, round(n * parts[0])), n - 2)
        num_val = min(max(1, round(n * parts[1])), n - num_train - 1)
    order = np.random.RandomState(1).permutation(n)  # own RNG; the global one is untouched
    return {"train": order[:num_train], "val": order[num_train:num_train + num_val],
            "test": order[num_train + num_val:]}


def _read_csv(root: Path, split: str) -> ClassFiles:
    by_class: dict[str, list] = {}
    path = root / f"{split}.csv"
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if i == 0 and [c.strip().lower() for c in row[:2]] == ["filename", "label"]:
                continue  # the header
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise DataError(f"{path} line {i + 1}: expected filename,label, got {','.join(row)!r}")
            name, label = (v.strip() for v in row)
            file = root / "images" / name
            if not file.is_file():
                raise DataError(f"{path} line {i + 1}: {file} does not exist")
            by_class.setdefault(label, []).append(file)
    names = sorted(by_class)
    return ClassFiles(names, [sorted(by_class[n]) for n in names])


def class_files(root: Path, kind: str, split: str | None) -> dict[str, ClassFiles]:
    """Each split's classes and files, for the layout `kind` (`split`: the fractions, for 'classes' only;
    EVERY_CLASS: every class in each split)."""
    if kind == "folders":
        return {s: _class_folders(root / s) for s in SPLITS}
    if kind == "csv":
        return {s: _read_csv(root, s) for s in SPLITS}
    every = _class_folders(root)
    if split == EVERY_CLASS:  # a model that never saw the folder: each split is all of it
        return {s: every for s in SPLITS}
    picks = split_classes(every.names, parse_split(split or DEFAULT_SPLIT))
    return {s: ClassFiles([every.names[i] for i in sorted(idx)], [every.files[i] for i in sorted(idx)])
            for s, idx in picks.items()}


# ---------------------------------------------------------------------------------------------
# Pixels, cached.
# ---------------------------------------------------------------------------------------------

def _cache_file(root: Path, splits: dict[str, ClassFiles], pre: Preprocessing, cache_dir) -> Path:
    import PIL
    stamp = []
    for s in SPLITS:
        for name, files in zip(splits[s].names, splits[s].files):
            for f in files:
                st = os.stat(f)
                stamp.append([s, name, os.path.relpath(f, root), st.st_size, st.st_mtime_ns])
    key = hashlib.sha256(json.dumps([CACHE_VERSION, dataclasses.asdict(pre), PIL.__version__, stamp]).encode())
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return folder.expanduser() / f"folders-{key.hexdigest()[:24]}.npz"


def _read_cache(file: Path) -> dict | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - missing or damaged: decode again and overwrite
        return None


def _write_cache(file: Path, arrays: dict) -> None:
    write_cache_file(file, lambda out: np.savez(out, **arrays))


def _decode(files: list, pre: Preprocessing) -> np.ndarray:
    out = np.empty((len(files), pre.channels, pre.image_size, pre.image_size), np.uint8)
    for i, f in enumerate(files):
        try:
            out[i] = pre.load_uint8(f)
        except ValueError as e:  # one unreadable file: named, with how to go on
            raise DataError(f"{e}; remove or replace it") from None
    return out


# ---------------------------------------------------------------------------------------------
# Datasets and the sampler.
# ---------------------------------------------------------------------------------------------

def _classes(pixels: np.ndarray, counts: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pixels and counts of the classes `keep` selects (pixels: the classes' images one after another)."""
    if keep.all():
        return pixels, counts
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rows = [np.arange(a, a + c) for a, c in zip(starts[keep], counts[keep])]
    return pixels[np.concatenate(rows) if rows else np.zeros(0, np.int64)], counts[keep]


class FolderTaskSampler(TaskSampler):
    """N-way K-shot tasks over the classes of one split of an image-folder dataset.

    Per task: `ways` distinct classes in random order (the order is the labels), and per class `shots + query`
    distinct images drawn at random from its own (classes hold any number, at least shots + query). With
    `rotations`, class c is class c // 4 rotated by `numpy.rot90(img, c % 4)`, as Omniglot's. The generator's
    state saves and restores as `TaskSampler`'s, so a resumed run sees the identical task stream.
    """

    def __init__(self, pixels: np.ndarray, counts, ways: int, shots: int, query: int, seed: int, *,
                 rotations: bool = False, split_name: str = "given") -> None:
        counts = np.asarray(counts, dtype=np.int64)
        for option, value, least in (("--ways", ways, 2), ("--shots", shots, 1), ("--query", query, 1)):
            if int(value) < least:
                raise DataError(f"{option} must be at least {least} (got {value})")
        self.pixels, self.counts = pixels, counts  # uint8 [images, C, H, W], images per class
        self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.rotations = bool(rotations)
        self.num_classes = len(counts) * (4 if self.rotations else 1)
        if ways > self.num_classes:
            raise DataError(f"--ways {ways} is larger than the {self.num_classes} classes of the {split_name} split "
                            f"with at least {shots + query} images (--shots {shots} + --query {query}): lower them, "
                            "or give the split more classes")
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self.rng = np.random.Generator(np.random.PCG64(seed))  # never the global RNG

    def sample(self, num_tasks: int) -> Tasks:
        """`num_tasks` tasks, float32 [T, ways*shots, C, H, W] support and [T, ways*query, C, H, W] query."""
        if num_tasks < 1:
            raise DataError(f"num_tasks must be at least 1 (got {num_tasks})")
        t, n, k, q = num_tasks, self.ways, self.shots, self.query
        classes = np.stack([self.rng.choice(self.num_classes, n, replace=False) for _ in range(t)])
        base, rotations = (classes // 4, classes % 4) if self.rotations else (classes, np.zeros_like(classes))
        picks = np.stack([self.offsets[c] + self.rng.choice(self.counts[c], k + q, replace=False)
                          for c in base.reshape(-1)]).reshape(t, n, k + q)
        batch = to_float(self.pixels[picks])  # [T, N, K+Q, C, H, W]
        for r in (1, 2, 3):
            selected = rotations == r
            if selected.any():
                batch[selected] = np.rot90(batch[selected], r, axes=(-2, -1))
        shape = self.pixels.shape[1:]
        labels = np.arange(n, dtype=np.int64)
        return Tasks(x_spt=np.ascontiguousarray(batch[:, :, :k]).reshape(t, n * k, *shape),
                     y_spt=np.broadcast_to(np.repeat(labels, k), (t, n * k)).copy(),
                     x_qry=np.ascontiguousarray(batch[:, :, k:]).reshape(t, n * q, *shape),
                     y_qry=np.broadcast_to(np.repeat(labels, q), (t, n * q)).copy())


class FolderDataset:
    """An image-folder dataset, decoded: for each split, its classes' uint8 pixels (those with at least `need`
    images; the others are in `skipped`)."""

    kind = "folders"

    def __init__(self, root: Path, config, need: int, cache_dir=None):
        self.root, self.config, self.need = root, config, need
        self.layout = layout(root)
        splits = class_files(root, self.layout, config.split)
        pre = config.preprocessing
        cache = _cache_file(root, splits, pre, cache_dir)
        arrays = _read_cache(cache)
        if arrays is None:
            arrays = {}
            for s in SPLITS:
                arrays[f"{s}_pixels"] = _decode([f for files in splits[s].files for f in files], pre)
                arrays[f"{s}_counts"] = np.array([len(files) for files in splits[s].files], np.int64)
            _write_cache(cache, arrays)
        self.names, self.pixels, self.counts, self.skipped = {}, {}, {}, {}
        for s in SPLITS:
            counts = arrays[f"{s}_counts"]
            keep = counts >= need
            self.pixels[s], self.counts[s] = _classes(arrays[f"{s}_pixels"], counts, keep)
            self.names[s] = [n for n, k in zip(splits[s].names, keep) if k]
            self.skipped[s] = [n for n, k in zip(splits[s].names, keep) if not k]

    def sampler(self, split: str, ways: int, shots: int, query: int, seed: int) -> FolderTaskSampler:
        """Tasks of `split`'s classes that hold at least shots + query images."""
        pixels, counts = _classes(self.pixels[split], self.counts[split], self.counts[split] >= shots + query)
        return FolderTaskSampler(pixels, counts, ways, shots, query, seed, rotations=bool(self.config.rotations),
                                 split_name=split)

    def describe(self) -> str:
        """The classes of each split, in words."""
        return ", ".join(f"{s} {len(self.names[s])} classes ({int(self.counts[s].sum())} images)" for s in SPLITS)


class OmniglotDataset:
    """Omniglot by its protocol (data.py): the RandomState(1) 1100/100/423 split, (character, rotation) classes."""

    kind = "omniglot"

    def __init__(self, root: Path):
        self.images = load_omniglot(root)
        self.splits = split_characters(len(self.images))
        self.skipped = {s: [] for s in SPLITS}

    def sampler(self, split: str, ways: int, shots: int, query: int, seed: int) -> TaskSampler:
        """Tasks of the protocol's `split`."""
        return TaskSampler(self.images, self.splits[split], ways, shots, query, seed, split_name=split)


def trained_on_folders(config) -> bool:
    """Whether a config's model was trained on image folders (its `protocol` says so; Omniglot's does not)."""
    return config.protocol.startswith(FOLDER_PROTOCOL)


def folder_protocol(kind: str, config) -> str:
    """What a folder-trained config's `protocol` says: the layout, the split, the classes and the pixels."""
    split = {"folders": "split by train/val/test folders", "csv": "split by train/val/test.csv",
             "classes": f"split {config.split} of a RandomState(1) permutation of the sorted class names"}[kind]
    rotations = ", x4 rotations" if config.rotations else ""
    return f"{FOLDER_PROTOCOL} {_LAYOUTS[kind]}: {split}; classes{rotations}; pixels {config.preprocessing.describe()}"


def _small_folder_split(root: Path, config) -> str:
    """A new run's split of the class folders in `root`: the default fractions, with at least a task's classes in
    each split (validation and test tasks of the deployed ways: 10-30 classes work); recorded as class counts
    where the fractions alone would leave a split short. One notice line says how; too few classes, one error
    line (before any image is decoded) says how many are needed."""
    names = _class_folders(root).names
    n, fractions = len(names), parse_split(DEFAULT_SPLIT)
    least = (config.ways, config.deployed_ways, config.deployed_ways)
    counts = split_counts(n, fractions, least)
    plain = tuple(len(v) for v in split_classes(names, fractions).values()) if n >= 3 else None
    notice(f"split {n} classes of {root}: {counts[0]} train, {counts[1]} val, {counts[2]} test ({DEFAULT_SPLIT}"
           + (f", at least {least[1]} in val and test for {least[1]}-way tasks; --split to choose" if counts != plain
              else "; --split to choose") + ")")
    return DEFAULT_SPLIT if counts == plain else ",".join(map(str, counts))


def open_dataset(data, config, *, new_run: bool = False, given: dict | None = None, need: int | None = None,
                 cache_dir=None, measure: bool = False):
    """The dataset in the folder `data`, and `config` as training on it records it: (dataset, config).

    Omniglot (either half present) takes its protocol's pixels only (1x28x28 ink, LANCZOS; no --split); a new run
    from `--init` there takes that checkpoint's architecture where `given` lacks it (`recipe.omniglot_init_defaults`).
    Otherwise `data` is an image folder. A model trained on one (resume, evaluate, export) reads it as its config
    says; a model trained on Omniglot is refused. A `new_run`'s config gets the folders' defaults: an unset
    `pixels` becomes 'plain' and `split` the default fractions (class-folder layout only); with `given` (the
    options a CLI user gave), the options not in it follow the recipe (`recipe.folder_defaults`: drawings start
    from the shipped weights, at their pixels; a time budget; one notice line) and the split keeps a task's
    classes in val and test (`_small_folder_split`, one notice line); and its `protocol` says how the data was
    read. `need` (default shots + query, or + val_query if more): classes with fewer images are left out, with one
    warning line. With `measure` (evaluation, calibration), a model trained on Omniglot may measure itself on an
    image folder: its classes are all new to the model, so a `DIR/<class>/` folder gives every class to each
    split (the other layouts keep their own split), prepared as the model's own pixels; one notice line says so.
    """
    root = Path(data).expanduser()
    if not root.is_dir() and not trained_on_folders(config):  # said as Omniglot's loader says it, + own images
        problem = "is not a directory" if root.exists() else "does not exist"
        also = (", or a folder of your own images with --data" if new_run else
                ", or a folder of labelled images (one sub-folder per class) to measure the model on" if measure else "")
        raise DataError(f"Omniglot directory {root} {problem}; {_HINT}{also} (`maml-train download` fetches the zips)")
    if root.is_dir() and is_omniglot(root):
        omniglot = Preprocessing()
        if config.preprocessing != omniglot or config.split or trained_on_folders(config):
            what = (f"a model trained on image folders ({config.protocol})" if trained_on_folders(config)
                    else f"{config.preprocessing.describe()}, --split {config.split}")
            raise ConfigError(f"--data {root} is Omniglot, whose protocol is {omniglot.describe()} with its own split; "
                              f"this is {what}: pass the image folder it was trained on, or drop the options")
        if new_run and given is not None and config.init is not None:  # --init's architecture (recipe.py)
            from .recipe import omniglot_init_defaults
            options, line = omniglot_init_defaults(config, given)
            if options:
                notice(line)
                config = dataclasses.replace(config, **options, layers=None)
        return OmniglotDataset(root), config
    kind = layout(root)
    if kind != "classes" and config.split:
        raise ConfigError(f"--split {config.split}: {root} gives its own split ({_LAYOUTS[kind]}); drop --split")
    if not trained_on_folders(config) and measure and not new_run:
        config = dataclasses.replace(config, split=EVERY_CLASS if kind == "classes" else None)
        which = "every class of the folder is" if kind == "classes" else "the folder's own split is"
        print(f"notice: {root} is an image folder ({_LAYOUTS[kind]}) and {config.name} was trained on Omniglot: "
              f"{which} new to it, its images prepared as the model's own ({config.preprocessing.describe()})",
              file=sys.stderr, flush=True)
    elif not trained_on_folders(config):
        if not new_run:
            raise ConfigError(f"--data {root} is an image folder ({_LAYOUTS[kind]}); this model was trained on "
                              f"Omniglot ({config.protocol}): pass Omniglot's folder")
        changes = {}
        if given is not None:  # a CLI user's new run: the recipe (recipe.py) for what they did not give
            from .recipe import folder_defaults
            every = class_files(root, kind, EVERY_CLASS)
            recipe, line = folder_defaults(root, every["train"].files, config, given)  # classes: all of them
            notice(line)
            changes.update(recipe)
            if "name" not in given:  # the folder's name, not Omniglot's
                changes["name"] = f"{root.resolve().name}-{given.get('ways', config.ways)}w{given.get('shots', config.shots)}s"
        changes["pixels"] = changes.get("pixels") or config.pixels or "plain"
        changes["split"] = config.split or (DEFAULT_SPLIT if kind == "classes" else None)
        config = dataclasses.replace(config, **changes, layers=None)  # layers follow channels and image size
        if given is not None and kind == "classes" and "split" not in given:
            config = dataclasses.replace(config, split=_small_folder_split(root, config))
        config = dataclasses.replace(config, protocol=folder_protocol(kind, config))
    need = config.shots + max(config.query, config.val_query or config.query) if need is None else need
    dataset = FolderDataset(root, config, need, cache_dir)
    small = {s: len(v) for s, v in dataset.skipped.items() if v}
    if small:
        examples = ", ".join(n for s in SPLITS for n in dataset.skipped[s][:3])
        warn(f"{sum(small.values())} classes of {root} have fewer than {need} images (what a task takes: shots + "
             f"query) and are left out ({', '.join(f'{s} {n}' for s, n in small.items())}; e.g. {examples})")
    return dataset, config
