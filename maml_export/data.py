"""Omniglot for MAML: loading, the meta-train/val/test split and N-way K-shot task sampling.

Everything here follows the evaluation protocol in the dataset's README (shared with the project's
checks), so that an accuracy measured with these tasks can be reproduced by anyone:

- `load_omniglot` gives float32 `[1623, 20, 28, 28]` images in the protocol's character numbering
  (964 background characters in file order, then 659 evaluation characters), ink 1.0, paper 0.0,
  resized with Pillow's LANCZOS. It reads the project's `.npz` archives, the official zips or the
  extracted official folders, and caches the (slow to compute) 28x28 pixels on disk.
- `split_characters` is the MAML paper's split: `RandomState(1).permutation(1623)`, 1100/100/423.
- `TaskSampler` draws tasks whose classes are (character, rotation) pairs, with its own seeded
  generator whose state can be saved and restored so a resumed run sees the identical task stream.

Every failure a user can cause is a one-line `DataError` that says how to fix it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy
import PIL
from PIL import Image

from maml_export.errors import DataError, reason
from maml_export.images import Preprocessing

OFFICIAL_URL = "https://github.com/brendenlake/omniglot/tree/master/python"
# Changing the preprocessing must change this, so old caches are never reused.
PROTOCOL_VERSION = "omniglot-protocol-v1: bool paper mask -> L ink=255 -> LANCZOS 28x28 -> /255"
IMAGE_SIZE = 28
HALVES = ("background", "evaluation")  # this order is the protocol's character numbering
_HINT = (
    f"get images_background.zip and images_evaluation.zip from {OFFICIAL_URL} and pass their "
    "directory with --data (or the OMNIGLOT_DIR environment variable)"
)
# Official member names: images_background/<Alphabet>/characterNN/XXXX_YY.png.
_PNG_NAME = re.compile(r"^(\d+)_(\d+)\.png$", re.IGNORECASE)


def _fail(what: str, error: BaseException | None = None) -> DataError:
    """A one-line DataError: what went wrong (plus the library's reason), then how to fix it."""
    why = f" ({reason(error)})" if error is not None else ""
    return DataError(" ".join(f"{what}{why}; {_HINT}".split()))  # collapse any newlines


# ---------------------------------------------------------------------------------------------
# Pixels: the protocol's preprocessing, shared by every source form so they agree bit for bit.
# ---------------------------------------------------------------------------------------------

OMNIGLOT_PIXELS = Preprocessing(1, IMAGE_SIZE, "ink", "lanczos")  # what maml-predict prepares for these models


def drawing_pixels(paper: numpy.ndarray) -> numpy.ndarray:
    """bool paper mask [H, W] -> uint8 [28, 28] ink-is-255 pixels, exactly as the protocol says: the drawing
    (paper white) through the same preprocessing as any image file (images.Preprocessing)."""
    gray = numpy.where(paper, 255, 0).astype(numpy.uint8)
    return OMNIGLOT_PIXELS.uint8(Image.fromarray(gray, mode="L"))[0]


def _png_paper(data: bytes) -> numpy.ndarray:
    """PNG bytes -> bool paper mask. Official PNGs are 1-bit ('1', white = paper); going through
    'L' with a 128 threshold also accepts grayscale or RGB re-encodings of the same drawings."""
    with Image.open(io.BytesIO(data)) as image:
        return numpy.asarray(image.convert("L")) >= 128


# ---------------------------------------------------------------------------------------------
# Sources: for each half, the first of <half>.npz, <half>.zip, <half>/ found in the directory.
# ---------------------------------------------------------------------------------------------

def find_source(root: Path, half: str) -> tuple[str, Path] | None:
    """Where one half (`HALVES`) of Omniglot is under `root`: ("npz" | "zip" | "dir", path), or None."""
    name = f"images_{half}"
    if (root / f"{name}.npz").is_file():
        return "npz", root / f"{name}.npz"
    if (root / f"{name}.zip").is_file():
        return "zip", root / f"{name}.zip"
    if (root / name).is_dir():
        return "dir", root / name
    return None


def _group_drawings(names: list[str], where: Path) -> list[list[str]]:
    """Member/file names -> [character][drawing] names, characters by XXXX, drawings by YY."""
    characters: dict[int, dict[int, str]] = {}
    for name in names:
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        match = _PNG_NAME.match(base)
        if match is None or name.startswith("__MACOSX/") or base.startswith("._"):
            continue  # directories, macOS resource forks and anything else that is not a drawing
        char, drawing = int(match.group(1)), int(match.group(2))
        if drawing in characters.setdefault(char, {}):
            raise _fail(f"{where}: drawing {base} appears twice")
        characters[char][drawing] = name
    if not characters:
        raise _fail(f"{where}: no XXXX_YY.png drawings found")
    counts = {len(d) for d in characters.values()}
    if len(counts) != 1:
        raise _fail(f"{where}: characters have different numbers of drawings ({sorted(counts)}); "
                    "the file set is incomplete")
    return [[d[y] for y in sorted(d)] for _, d in sorted(characters.items())]


def _dir_pngs(folder: Path) -> list[str]:
    """Relative paths of every .png under folder, '/'-separated (sorted for a stable cache key)."""
    found = []
    for dirpath, _, files in os.walk(folder):
        rel = Path(dirpath).relative_to(folder).as_posix()
        found += [f if rel == "." else f"{rel}/{f}" for f in files if f.lower().endswith(".png")]
    return sorted(found)


def _fingerprint(kind: str, path: Path) -> list:
    """What the cache key depends on: names, sizes and mtimes of the files a source reads."""
    if kind != "dir":
        st = path.stat()
        return [[kind, path.name, st.st_size, st.st_mtime_ns]]
    stats = []
    for name in _dir_pngs(path):  # 32k files: plain strings and os.stat, Path objects cost 3x
        st = os.stat(os.path.join(path, name))
        stats.append([kind, f"{path.name}/{name}", st.st_size, st.st_mtime_ns])
    return stats


def _npz_images(path: Path) -> numpy.ndarray:
    """The 'images' array of an Omniglot .npz. A file numpy can only read as a pickle (not a .npz at all,
    or one holding objects) is refused as what it is, never with numpy's advice to load it unsafely."""
    try:
        archive = numpy.load(path, allow_pickle=False)
    except ValueError:  # numpy: "This file contains pickled (object) data. If you trust the file..."
        raise _fail(f"{path} is not an Omniglot archive (not a .npz: no zip of arrays)") from None
    if not isinstance(archive, numpy.lib.npyio.NpzFile):
        raise _fail(f"{path} is not an Omniglot archive (a single .npy array, not a .npz holding 'images')")
    with archive:
        try:
            return archive["images"]
        except ValueError:  # "Object arrays cannot be loaded when allow_pickle=False"
            raise _fail(f"{path} is not an Omniglot archive ('images' holds Python objects, not booleans)") from None


def drawings(kind: str, path: Path):
    """One half's raw drawings, character by character in the protocol's order: yields, per character, a list
    of bool paper masks [H, W] (True = paper; 105 x 105 in the official data), from the source `find_source`
    named. `drawing_pixels` makes the protocol's 28 x 28 pixels of each; the browser test uploads them as
    drawings."""
    if kind == "npz":
        paper = _npz_images(path)  # bool [C, 20, 105, 105], True = paper
        if paper.dtype != numpy.bool_ or paper.ndim != 4 or 0 in paper.shape:
            raise _fail(f"{path}: 'images' is {paper.dtype} {list(paper.shape)}, "
                        "expected bool [characters, drawings, height, width]")
        yield from (list(char) for char in paper)
    elif kind == "zip":
        with zipfile.ZipFile(path) as archive:
            for char in _group_drawings(archive.namelist(), path):
                yield [_png_paper(archive.read(n)) for n in char]
    else:
        for char in _group_drawings(_dir_pngs(path), path):
            yield [_png_paper((path / n).read_bytes()) for n in char]


def _load_half(kind: str, path: Path) -> numpy.ndarray:
    """One half of Omniglot -> uint8 [characters, drawings, 28, 28] (ink 255)."""
    try:
        return numpy.stack([[drawing_pixels(d) for d in char] for char in drawings(kind, path)])
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - decoders raise a zoo of types (BadZipFile,
        # zlib.error, OSError, KeyError, ValueError, PIL's SyntaxError...); all mean "bad file".
        raise _fail(f"cannot read Omniglot from {path}", error) from error


# ---------------------------------------------------------------------------------------------
# The cache: uint8 pixels (bit-exact, 4x smaller than float32) in one .npy per source state.
# ---------------------------------------------------------------------------------------------

def _default_cache_dir() -> Path:
    return Path(os.environ.get("MAML_EXPORT_CACHE") or Path.home() / ".cache" / "maml-export")


def _read_cache(file: Path) -> numpy.ndarray | None:
    try:
        pixels = numpy.load(file, allow_pickle=False)
    except Exception:  # noqa: BLE001 - missing or damaged: recompute and overwrite
        return None
    ok = pixels.dtype == numpy.uint8 and pixels.ndim == 4 and pixels.shape[2:] == (28, 28)
    return pixels if ok else None


def write_cache_file(file: Path, save) -> None:
    """Write a cache file atomically: `save(f)` writes into a temp file in the same directory, then os.replace
    puts it in place. Silently skipped when the directory cannot be written: a cache only saves time."""
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=file.parent, suffix=".tmp", delete=False) as out:
            tmp = out.name
            save(out)
        os.replace(tmp, file)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _write_cache(file: Path, pixels: numpy.ndarray) -> None:
    write_cache_file(file, lambda out: numpy.save(out, pixels))


def load_omniglot(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
                  ) -> numpy.ndarray:
    """Omniglot as float32 [1623, 20, 28, 28], ink 1.0, paper 0.0, in the protocol's numbering.

    `path` is a directory with, for each of background and evaluation, the first found of
    `images_<half>.npz`, the official `images_<half>.zip`, or the extracted `images_<half>/` folder.
    Rotations are not applied here (the sampler does). The 28x28 pixels are cached in `cache_dir`
    (default: $MAML_EXPORT_CACHE or ~/.cache/maml-export), keyed by the source files' names, sizes
    and mtimes, the protocol version and Pillow's version.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "does not exist"
        raise _fail(f"Omniglot directory {root} {problem}")
    sources = {half: find_source(root, half) for half in HALVES}
    missing = [h for h, s in sources.items() if s is None]
    if missing:
        raise _fail(f"{root} has no images_{missing[0]} data (.npz, .zip or folder)")

    try:
        stamp = [_fingerprint(*sources[h]) for h in HALVES]
    except OSError as error:
        raise _fail(f"cannot read Omniglot from {root}", error) from error
    key = hashlib.sha256(json.dumps([PROTOCOL_VERSION, PIL.__version__, stamp]).encode())
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cache_file = cache.expanduser() / f"omniglot-{key.hexdigest()[:24]}.npy"

    pixels = _read_cache(cache_file)
    if pixels is None:
        halves = [_load_half(*sources[h]) for h in HALVES]
        if halves[0].shape[1] != halves[1].shape[1]:
            raise _fail(f"{root}: background has {halves[0].shape[1]} drawings per character "
                        f"but evaluation has {halves[1].shape[1]}")
        pixels = numpy.concatenate(halves)  # background characters first, then evaluation
        _write_cache(cache_file, pixels)
    # Division in float32 (== the float64 route rounded, checked for all 256 values).
    return pixels.astype(numpy.float32) / numpy.float32(255)


# ---------------------------------------------------------------------------------------------
# The split.
# ---------------------------------------------------------------------------------------------

def split_characters(num_characters: int = 1623) -> dict[str, numpy.ndarray]:
    """Character indices of the "train", "val" and "test" splits.

    For 1623 characters this is the protocol (MAML paper): RandomState(1).permutation(1623), the
    first 1100 train, the next 100 val, the last 423 test. Any other count (tiny test data only)
    gets the same recipe with the same proportions, at least one character in each split.
    """
    if num_characters == 1623:
        num_train, num_val = 1100, 100
    elif num_characters >= 3:
        num_train = max(1, round(num_characters * 1100 / 1623))
        num_val = max(1, round(num_characters * 100 / 1623))
        num_train = min(num_train, num_characters - num_val - 1)  # leave a test character
    else:
        raise DataError(f"cannot split {num_characters} characters into train, val and test; "
                        "Omniglot has 1623")
    order = numpy.random.RandomState(1).permutation(num_characters)  # own RNG, global untouched
    return {"train": order[:num_train], "val": order[num_train:num_train + num_val],
            "test": order[num_train + num_val:]}


# ---------------------------------------------------------------------------------------------
# Tasks.
# ---------------------------------------------------------------------------------------------

class Tasks(NamedTuple):
    """A batch of T tasks; sets are ordered by label (label 0's images first, then label 1's...)."""
    x_spt: numpy.ndarray  # float32 [T, ways*shots, 1, 28, 28]
    y_spt: numpy.ndarray  # int64   [T, ways*shots]
    x_qry: numpy.ndarray  # float32 [T, ways*query, 1, 28, 28]
    y_qry: numpy.ndarray  # int64   [T, ways*query]


def random_shifts(images: numpy.ndarray, shift: int, rng: numpy.random.Generator) -> numpy.ndarray:
    """Each image of `images` [..., C, H, W] shifted by its own random whole number of pixels from -shift to shift
    along each axis, the edges replicated (as `maml.shifted_support` replicates them for its fixed shifts): the
    training data augmentation `--augment-shift` (docs/training.md#augmentation). Draws from `rng`."""
    if shift == 0:
        return images
    C, H, W = images.shape[-3:]
    flat = images.reshape(-1, C, H, W)
    padded = numpy.pad(flat, ((0, 0), (0, 0), (shift, shift), (shift, shift)), mode="edge")  # (B, C, H+2k, W+2k)
    top, left = rng.integers(0, 2 * shift + 1, size=(2, len(flat)))  # each image's window in the padded one
    rows = (top[:, None] + numpy.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = (left[:, None] + numpy.arange(W))[:, None, None, :]  # (B, 1, 1, W)
    batch, channel = numpy.arange(len(flat))[:, None, None, None], numpy.arange(C)[None, :, None, None]
    return padded[batch, channel, rows, cols].reshape(images.shape)


def shift_tasks(tasks: Tasks, shift: int, rng: numpy.random.Generator) -> Tasks:
    """`tasks` with every support and query image randomly shifted (`random_shifts`)."""
    return tasks._replace(x_spt=random_shifts(tasks.x_spt, shift, rng), x_qry=random_shifts(tasks.x_qry, shift, rng))


def synthetic_tasks(num_tasks: int, ways: int, shots: int, query: int, seed: int = 0, size: int = IMAGE_SIZE,
                    channels: int = 1) -> Tasks:
    """Tasks of made-up characters, for checks that must run without Omniglot (`maml-export` and
    `maml-bench` without `--data`). Each class is 2-4 random strokes (polylines of 2-4 points) on a
    105x105 canvas; each drawing of it moves every point by N(0, 3 px) and is drawn 3 px wide, ink 255 on
    0, then resized and scaled as the protocol's pixels (LANCZOS, /255). Anti-aliased strokes on blank
    paper, like the graph's real inputs: on binary noise the SGD steps amplify float32 rounding until no
    two float32 implementations agree to 1e-4 (seen: 3.7e-4 from float64 Paddle on 2 of 32 noise tasks
    with the bundled 5-way weights, while their Omniglot tasks agree to 1e-5).
    """
    from PIL import ImageDraw
    rng = numpy.random.default_rng(seed)

    def draw(strokes) -> numpy.ndarray:
        image = Image.new("L", (105, 105), 0)
        pen = ImageDraw.Draw(image)
        for points in strokes:
            moved = points + rng.normal(0, 3, points.shape)
            pen.line([tuple(p) for p in moved], fill=255, width=3, joint="curve")
        return numpy.asarray(image.resize((size, size), Image.Resampling.LANCZOS), numpy.float32) / 255

    x = numpy.zeros((num_tasks, ways, shots + query, channels, size, size), numpy.float32)
    for t in range(num_tasks):
        for c in range(ways):
            strokes = [rng.uniform(15, 90, (rng.integers(2, 5), 2)) for _ in range(rng.integers(2, 5))]
            for i in range(shots + query):
                x[t, c, i] = draw(strokes)  # broadcast over channels
    labels = numpy.arange(ways, dtype=numpy.int64)
    return Tasks(x_spt=x[:, :, :shots].reshape(num_tasks, ways * shots, channels, size, size),
                 y_spt=numpy.tile(numpy.repeat(labels, shots), (num_tasks, 1)),
                 x_qry=x[:, :, shots:].reshape(num_tasks, ways * query, channels, size, size),
                 y_qry=numpy.tile(numpy.repeat(labels, query), (num_tasks, 1)))


class TaskSampler:
    """N-way K-shot tasks over the (character, rotation) classes of one split, as the protocol says.

    Class c of the split is character `characters[c // 4]` rotated by `numpy.rot90(img, c % 4)`.
    Per task: `ways` distinct classes in random order (the order is the labels), and per class
    `shots + query` distinct drawings of its character: `shots` to the support, `query` to the query.
    """

    def __init__(self, images: numpy.ndarray, characters, ways: int, shots: int, query: int,
                 seed: int, *, split_name: str = "given") -> None:
        images = numpy.asarray(images)
        characters = numpy.asarray(characters)
        if images.ndim != 4 or images.shape[2:] != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"images must be [characters, drawings, 28, 28], got "
                            f"{list(images.shape)}")
        if characters.ndim != 1 or characters.size == 0 or characters.dtype.kind not in "iu":
            raise DataError(f"the {split_name} split must be a non-empty 1-D array of character "
                            "indices")
        if characters.min() < 0 or characters.max() >= len(images):
            raise DataError(f"the {split_name} split names characters outside 0..{len(images) - 1}")
        if len(numpy.unique(characters)) != len(characters):
            raise DataError(f"the {split_name} split lists a character twice")
        for option, value, least in (("--ways", ways, 2), ("--shots", shots, 1), ("--query", query, 1)):
            if int(value) < least:  # --ways: at least 2, as everywhere (MamlConfig, maml-bench --configs)
                raise DataError(f"{option} must be at least {least} (got {value})")
        num_classes, drawings = 4 * len(characters), images.shape[1]
        if ways > num_classes:
            raise DataError(f"--ways {ways} is larger than the {num_classes} classes of the "
                            f"{split_name} split")
        if shots + query > drawings:
            raise DataError(f"--shots {shots} + --query {query} = {shots + query} is above the "
                            f"{drawings} drawings per character")
        self.images = images.astype(numpy.float32, copy=False)
        self.characters = characters.astype(numpy.int64)
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self.num_classes = num_classes
        self.rng = numpy.random.Generator(numpy.random.PCG64(seed))  # never the global RNG

    def draw(self, num_tasks: int) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """Which images `num_tasks` tasks take: characters [T, N] (indices into `images`), their rotations
        [T, N] (quarter turns) and drawings [T, N, K+Q] (K to the support, Q to the query)."""
        if num_tasks < 1:
            raise DataError(f"num_tasks must be at least 1 (got {num_tasks})")
        t, n, k, q = num_tasks, self.ways, self.shots, self.query
        # Classes [T, N]: choice() without replacement returns them in random order, and that
        # order is the label order (label i = classes[:, i]).
        classes = numpy.stack([self.rng.choice(self.num_classes, n, replace=False)
                               for _ in range(t)])
        # Drawings [T, N, K+Q]: the first K+Q of a random permutation of each character's drawings.
        order = self.rng.permuted(numpy.broadcast_to(numpy.arange(self.images.shape[1]),
                                                     (t, n, self.images.shape[1])), axis=-1)
        return self.characters[classes // 4], classes % 4, order[..., :k + q]

    def images_of(self, chars: numpy.ndarray, drawings: numpy.ndarray) -> numpy.ndarray:
        """The unrotated images [T, N, K+Q, 28, 28] of `draw`'s characters and drawings (a fresh copy)."""
        return self.images[chars[..., None], drawings]

    def sample(self, num_tasks: int) -> Tasks:
        """`num_tasks` tasks; a vectorised gather, a few ms for 32 tasks of 5-way 1-shot 15-query."""
        t, n, k, q = num_tasks, self.ways, self.shots, self.query
        chars, rotations, drawings = self.draw(num_tasks)
        batch = self.images_of(chars, drawings)  # [T, N, K+Q, 28, 28]
        for r in (1, 2, 3):  # rotate in place, one gather per rotation
            selected = rotations == r
            if selected.any():
                batch[selected] = numpy.rot90(batch[selected], r, axes=(-2, -1))
        labels = numpy.arange(n, dtype=numpy.int64)
        return Tasks(
            x_spt=numpy.ascontiguousarray(batch[:, :, :k]).reshape(t, n * k, 1, 28, 28),
            y_spt=numpy.broadcast_to(numpy.repeat(labels, k), (t, n * k)).copy(),
            x_qry=numpy.ascontiguousarray(batch[:, :, k:]).reshape(t, n * q, 1, 28, 28),
            y_qry=numpy.broadcast_to(numpy.repeat(labels, q), (t, n * q)).copy(),
        )

    def state_dict(self) -> dict:
        """The generator's state, JSON-serializable (the 128-bit integers as decimal strings)."""
        state = self.rng.bit_generator.state
        return {"bit_generator": state["bit_generator"],
                "state": {name: str(v) for name, v in state["state"].items()},
                "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}

    def load_state_dict(self, state: dict) -> None:
        """Continue the task stream exactly where the sampler that wrote `state` stopped."""
        try:
            if state["bit_generator"] != "PCG64":
                raise ValueError(f"generator {state['bit_generator']!r}, expected 'PCG64'")
            self.rng.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {name: int(v) for name, v in state["state"].items()},
                "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"])}
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataError(f"the saved task-sampler state is invalid ({error})") from error
