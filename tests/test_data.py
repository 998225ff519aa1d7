"""Tests of maml_export.data: Omniglot loading (npz, official zips, extracted folders), the cache,
the protocol's split and the task sampler. Real files written to tmp_path, no mocks."""

import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import DATA
from maml_export.data import TaskSampler, Tasks, load_omniglot, random_shifts, shift_tasks, split_characters
from maml_export.errors import DataError

URL = "https://github.com/brendenlake/omniglot/tree/master/python"
DRAWINGS = 20
# Tiny official layout: alphabet folders whose names sort opposite to the character numbers, and
# characterNN folder numbers that do not follow XXXX either: the order must come from XXXX.
LAYOUT = {
    "background": [("Zeta_script", "character01", 1), ("Zeta_script", "character02", 2),
                   ("Alpha_script", "character01", 3)],
    "evaluation": [("Omega", "character09", 4), ("Beta", "character01", 5)],
}


def protocol_pixels(paper):
    """The README's preprocessing, written independently of the module: float32 [28, 28]."""
    ink = np.zeros(paper.shape, np.uint8)
    ink[~paper] = 255
    small = Image.fromarray(ink, mode="L").resize((28, 28), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float64).astype(np.float32) / np.float32(255)


def random_strokes(rng, size=105):
    """A 1-bit drawing: white paper (1) with a few black strokes (0), as the official PNGs."""
    image = Image.new("1", (size, size), 1)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        points = [tuple(int(v) for v in rng.integers(5, size - 5, 2)) for _ in range(4)]
        draw.line(points, fill=0, width=int(rng.integers(2, 6)))
    return image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Writes the tiny tree as folders, as zips and as npz. Returns (root dirs, bool masks)."""
    base = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    masks = {}
    for half, chars in LAYOUT.items():
        masks[half] = np.zeros((len(chars), DRAWINGS, 105, 105), bool)
        # Drawings written in a shuffled order so directory order cannot stand in for YY.
        for c, (alphabet, folder, number) in enumerate(chars):
            folder_path = base / "dir" / f"images_{half}" / alphabet / folder
            folder_path.mkdir(parents=True)
            for d in rng.permutation(DRAWINGS):
                image = random_strokes(rng)
                masks[half][c, d] = np.asarray(image.convert("L")) >= 128
                image.save(folder_path / f"{number:04d}_{d + 1:02d}.png")
    (base / "zip").mkdir()
    (base / "npz").mkdir()
    for half in LAYOUT:
        with zipfile.ZipFile(base / "zip" / f"images_{half}.zip", "w", zipfile.ZIP_DEFLATED) as z:
            files = sorted((base / "dir").rglob("*"))
            for i in rng.permutation(len(files)):  # member order must not stand in for XXXX/YY
                rel = files[i].relative_to(base / "dir").as_posix()
                if rel.startswith(f"images_{half}"):
                    z.write(files[i], rel)  # directory entries too, as the official zips have
        labels = np.repeat(np.arange(len(masks[half]))[:, None], DRAWINGS, axis=1)
        np.savez_compressed(base / "npz" / f"images_{half}.npz", images=masks[half], labels=labels)
    roots = {form: base / form for form in ("dir", "zip", "npz")}
    return roots, np.concatenate([masks["background"], masks["evaluation"]])


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Loading the tiny tree
# ---------------------------------------------------------------------------------------------

def test_all_forms_agree_with_protocol(tiny, tmp_path):
    roots, masks = tiny
    expected = np.stack([[protocol_pixels(m) for m in char] for char in masks])
    for form, root in roots.items():
        images = load_omniglot(root, cache_dir=tmp_path / form)
        assert images.dtype == np.float32 and images.shape == (5, DRAWINGS, 28, 28), form
        np.testing.assert_array_equal(images, expected, err_msg=form)
    # Character order follows XXXX: character 0003 (alphabet "Alpha_script") comes third.
    assert images[2, 0].sum() > 0 and (images > 0).mean() < 0.5  # ink is 1.0, mostly paper


def test_png_modes_other_than_1bit_decode_the_same(tiny, tmp_path):
    roots, masks = tiny
    tree = tmp_path / "data"
    for half, chars in LAYOUT.items():
        offset = 0 if half == "background" else len(LAYOUT["background"])
        for c, (alphabet, folder, number) in enumerate(chars):
            (tree / f"images_{half}" / alphabet / folder).mkdir(parents=True)
            for d in range(DRAWINGS):
                gray = np.where(masks[offset + c, d], 250, 10).astype(np.uint8)  # 8-bit, not 1-bit
                Image.fromarray(gray).convert("RGB").save(
                    tree / f"images_{half}" / alphabet / folder / f"{number:04d}_{d + 1:02d}.png")
    np.testing.assert_array_equal(load_omniglot(tree, cache_dir=tmp_path / "c"),
                                  load_omniglot(roots["npz"], cache_dir=tmp_path / "c"))


def test_cache_is_written_reused_and_invalidated(tiny, tmp_path):
    roots, _ = tiny
    tree = tmp_path / "data"
    tree.mkdir()
    for half in ("background", "evaluation"):
        (tree / f"images_{half}.zip").write_bytes((roots["zip"] / f"images_{half}.zip").read_bytes())
    cache = tmp_path / "cache"
    first = load_omniglot(tree, cache_dir=cache)
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    # A doctored cache file is what the second call returns: proof that it came from the cache.
    doctored = np.load(files[0])
    doctored[0, 0] = 255
    np.save(files[0], doctored)
    assert (load_omniglot(tree, cache_dir=cache)[0, 0] == 1.0).all()
    # Changing a source file (size and mtime) changes the key: recomputed, equal to the original.
    with zipfile.ZipFile(tree / "images_evaluation.zip", "a") as z:
        z.writestr("images_evaluation/README.txt", "not a drawing")
    np.testing.assert_array_equal(load_omniglot(tree, cache_dir=cache), first)
    assert len(list(cache.glob("*.npy"))) == 2


def test_cache_dir_from_environment_and_unwritable_cache(tiny, tmp_path, monkeypatch):
    roots, _ = tiny
    monkeypatch.setenv("MAML_EXPORT_CACHE", str(tmp_path / "env-cache"))
    load_omniglot(roots["npz"])
    assert len(list((tmp_path / "env-cache").glob("*.npy"))) == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("cache dirs cannot live under a regular file")
    images = load_omniglot(roots["npz"], cache_dir=blocker / "cache")  # no error, no cache
    assert images.shape == (5, DRAWINGS, 28, 28)


def test_unequal_drawing_counts_are_refused(tiny, tmp_path):
    roots, _ = tiny
    tree = tmp_path / "data"
    for half in ("background", "evaluation"):
        with zipfile.ZipFile(roots["zip"] / f"images_{half}.zip") as z:
            z.extractall(tree)
    next(tree.glob("images_background/Alpha_script/*/0003_07.png")).unlink()
    with pytest.raises(DataError, match="different numbers of drawings") as excinfo:
        load_omniglot(tree, cache_dir=tmp_path / "cache")
    assert "images_background" in one_line_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "empty", "bad-zip", "bad-npz", "truncated-npz",
                                  "npz-without-images", "bad-png", "half-missing", "garbage-npz", "object-npz",
                                  "npy-as-npz"])
def test_unusable_data_is_one_clear_data_error(case, tiny, tmp_path):
    roots, _ = tiny
    root = tmp_path / "data"
    if case != "missing":
        root.mkdir()
    if case == "bad-zip":
        for half in ("background", "evaluation"):
            (root / f"images_{half}.zip").write_bytes(os.urandom(2000))
    if case in ("bad-npz", "truncated-npz", "npz-without-images", "garbage-npz", "object-npz", "npy-as-npz"):
        good = (roots["npz"] / "images_background.npz").read_bytes()
        (root / "images_evaluation.npz").write_bytes((roots["npz"] / "images_evaluation.npz")
                                                     .read_bytes())
        if case == "bad-npz":
            broken = b"PK\x03\x04" + os.urandom(3000)
        elif case == "truncated-npz":
            broken = good[: len(good) // 2]
        elif case == "garbage-npz":  # numpy can only try it as a pickle
            broken = b"not an archive at all " + os.urandom(3000)
        elif case == "object-npz":
            np.savez(root / "other.npz", images=np.array([{"a": 1}], dtype=object))
            broken = (root / "other.npz").read_bytes()
        elif case == "npy-as-npz":
            np.save(root / "other.npy", np.zeros((2, 20, 105, 105), bool))
            broken = (root / "other.npy").read_bytes()
        else:
            np.savez(root / "other.npz", labels=np.zeros(3))
            broken = (root / "other.npz").read_bytes()
        (root / "images_background.npz").write_bytes(broken)
    if case == "bad-png":
        for half in ("background", "evaluation"):
            with zipfile.ZipFile(roots["zip"] / f"images_{half}.zip") as z:
                z.extractall(root)
        next(root.glob("images_evaluation/*/*/0005_03.png")).write_bytes(b"\x89PNG garbage")
    if case == "half-missing":
        (root / "images_background.npz").write_bytes(
            (roots["npz"] / "images_background.npz").read_bytes())
    with pytest.raises(DataError) as excinfo:
        load_omniglot(root, cache_dir=tmp_path / "cache")
    message = one_line_error(excinfo)
    assert URL in message and "--data" in message and "OMNIGLOT_DIR" in message
    assert str(root) in message
    assert "unsafe" not in message and "allow_pickle" not in message and "pickle.load" not in message
    if case in ("garbage-npz", "object-npz", "npy-as-npz"):
        assert "images_background.npz is not an Omniglot archive" in message
    if case in ("bad-zip", "bad-npz", "truncated-npz", "npz-without-images", "bad-png"):
        assert ("images_background" if "npz" in case or case == "bad-zip"
                else "images_evaluation") in message  # names the file that is broken


# ---------------------------------------------------------------------------------------------
# The shared full dataset
# ---------------------------------------------------------------------------------------------

SHARED = Path(DATA) if DATA else None


@pytest.fixture(scope="module")
def full(omniglot_dir, tmp_path_factory):
    if not (SHARED / "images_background.npz").is_file():
        pytest.skip(f"the spot check reads images_background.npz; {SHARED} holds another form")
    cache = tmp_path_factory.mktemp("full-cache")
    return load_omniglot(SHARED, cache_dir=cache), cache


def test_full_dataset_shape_range_and_spot_check(full):
    images, _ = full
    assert images.shape == (1623, 20, 28, 28) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert images.mean() < 0.2 and (images == 0).mean() > 0.6  # ink is sparse, paper is 0
    for half, index, char, drawing in (("background", 0, 7, 3), ("evaluation", 964, 658, 19)):
        with np.load(SHARED / f"images_{half}.npz", allow_pickle=False) as archive:
            paper = archive["images"][char, drawing]
        np.testing.assert_array_equal(images[index + char, drawing], protocol_pixels(paper))


def test_full_dataset_second_call_is_fast(full):
    images, cache = full
    start = time.perf_counter()
    again = load_omniglot(SHARED, cache_dir=cache)
    assert time.perf_counter() - start < 1.0
    np.testing.assert_array_equal(again, images)


# ---------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------

def test_split_is_the_protocol():
    split = split_characters()
    order = np.random.RandomState(1).permutation(1623)
    assert [len(split[k]) for k in ("train", "val", "test")] == [1100, 100, 423]
    np.testing.assert_array_equal(split["train"], order[:1100])
    np.testing.assert_array_equal(split["val"], order[1100:1200])
    np.testing.assert_array_equal(split["test"], order[1200:])
    assert sorted(np.concatenate(list(split.values()))) == list(range(1623))


def test_split_of_tiny_data_covers_everything_once():
    split = split_characters(5)
    assert all(len(split[k]) >= 1 for k in ("train", "val", "test"))
    assert sorted(np.concatenate(list(split.values()))) == list(range(5))
    with pytest.raises(DataError):
        split_characters(2)


# ---------------------------------------------------------------------------------------------
# The task sampler (on random images, so every drawing and rotation is unique)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def images():
    return np.random.default_rng(5).random((7, DRAWINGS, 28, 28), dtype=np.float32)


def test_tasks_follow_the_protocol(images):
    characters = np.array([1, 4, 6])
    ways, shots, query = 5, 2, 3
    tasks = TaskSampler(images, characters, ways, shots, query, seed=3).sample(40)
    assert isinstance(tasks, Tasks)
    assert tasks.x_spt.shape == (40, ways * shots, 1, 28, 28) and tasks.x_spt.dtype == np.float32
    assert tasks.x_qry.shape == (40, ways * query, 1, 28, 28) and tasks.x_qry.dtype == np.float32
    assert tasks.y_spt.shape == (40, ways * shots) and tasks.y_spt.dtype == np.int64
    assert tasks.y_qry.shape == (40, ways * query) and tasks.y_qry.dtype == np.int64
    # Where each returned image comes from: (character, drawing, rotation).
    source = {np.rot90(images[c, d], k).tobytes(): (c, d, k)
              for c in characters for d in range(DRAWINGS) for k in range(4)}
    label0_classes, support_after_query = set(), False
    for t in range(40):
        np.testing.assert_array_equal(tasks.y_spt[t], np.repeat(np.arange(ways), shots))
        np.testing.assert_array_equal(tasks.y_qry[t], np.repeat(np.arange(ways), query))
        spt = [source[x[0].tobytes()] for x in tasks.x_spt[t]]
        qry = [source[x[0].tobytes()] for x in tasks.x_qry[t]]
        classes = []
        for label in range(ways):
            mine = spt[label * shots:(label + 1) * shots] + qry[label * query:(label + 1) * query]
            assert len({(c, k) for c, _, k in mine}) == 1  # one character, one rotation
            assert len({d for _, d, _ in mine}) == shots + query  # distinct drawings
            classes.append((mine[0][0], mine[0][2]))
            support_after_query |= max(d for _, d, _ in mine[:shots]) > min(d for _, d, _ in
                                                                           mine[shots:])
        assert len(set(classes)) == ways  # distinct classes
        label0_classes.add(classes[0])
    assert len(label0_classes) > 3  # labels go to classes in a random order
    assert support_after_query  # which drawings go to the support is random too


def test_same_seed_same_tasks_and_global_rng_untouched(images):
    np.random.seed(123)
    before = np.random.get_state()
    a = TaskSampler(images, np.arange(7), 5, 1, 15, seed=9).sample(8)
    b = TaskSampler(images, np.arange(7), 5, 1, 15, seed=9).sample(8)
    c = TaskSampler(images, np.arange(7), 5, 1, 15, seed=10).sample(8)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.x_spt, c.x_spt)


def test_state_dict_resumes_the_identical_stream(images):
    reference = TaskSampler(images, np.arange(7), 3, 1, 2, seed=1)
    stream = [reference.sample(4) for _ in range(3)]
    first = TaskSampler(images, np.arange(7), 3, 1, 2, seed=1)
    first.sample(4)
    saved = json.loads(json.dumps(first.state_dict()))  # survives JSON
    resumed = TaskSampler(images, np.arange(7), 3, 1, 2, seed=999)
    resumed.load_state_dict(saved)
    for expected in stream[1:]:
        got = resumed.sample(4)
        for x, y in zip(expected, got):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(DataError):
        resumed.load_state_dict({"nonsense": 1})


@pytest.mark.parametrize("ways, shots, query, option", [
    (9, 1, 1, "--ways 9 is larger than the 8 classes of the train split"),
    (2, 6, 15, "--shots 6 + --query 15 = 21 is above the 20 drawings per character"),
    (1, 1, 1, "--ways must be at least 2"), (2, 0, 1, "--shots"), (2, 1, 0, "--query"),
])
def test_impossible_tasks_are_refused(images, ways, shots, query, option):
    with pytest.raises(DataError) as excinfo:
        TaskSampler(images, np.array([0, 3]), ways, shots, query, seed=0, split_name="train")
    assert option in one_line_error(excinfo)


# ---------------------------------------------------------------------------------------------
# Made-up characters: the inputs of every check that runs without Omniglot
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_synthetic_tasks_are_drawings_the_bundled_weights_learn():
    """Strokes on blank paper, deterministic per seed, and characters in the graph's domain: the bundled
    5-way weights adapt to them (on binary noise the export's parity check failed: see synthetic_tasks)."""
    import paddle
    from maml_export.checkpoint import default_checkpoint, load_checkpoint
    from maml_export.data import synthetic_tasks
    from maml_export.maml import MAML
    from maml_export.model import Model, to_tensors
    tasks = synthetic_tasks(10, ways=5, shots=1, query=15, seed=0)
    assert isinstance(tasks, Tasks) and tasks.x_spt.shape == (10, 5, 1, 28, 28) and tasks.x_qry.shape == (10, 75, 1, 28, 28)
    assert tasks.x_spt.dtype == np.float32 and tasks.y_spt.dtype == np.int64
    assert (tasks.y_spt == np.arange(5)).all() and (tasks.y_qry == np.repeat(np.arange(5), 15)).all()
    assert tasks.x_qry.min() >= 0 and tasks.x_qry.max() <= 1 and 0.02 < tasks.x_qry.mean() < 0.3  # ink on paper
    assert (tasks.x_qry == 0).mean() > 0.5  # mostly blank paper, as Omniglot's drawings
    again, other = synthetic_tasks(10, 5, 1, 15, seed=0), synthetic_tasks(10, 5, 1, 15, seed=1)
    assert np.array_equal(again.x_qry, tasks.x_qry) and not np.array_equal(other.x_qry, tasks.x_qry)
    assert synthetic_tasks(2, 3, 2, 4, seed=0, size=84, channels=3).x_spt.shape == (2, 6, 3, 84, 84)
    ckpt = load_checkpoint(default_checkpoint())
    maml = MAML(Model.from_specs(ckpt.config.layers), to_tensors(ckpt.params), ckpt.config.inner_lr, 5)
    with paddle.no_grad():
        x_spt, y_spt, x_qry = (paddle.to_tensor(a) for a in tasks[:3])
        logits = maml.predict(maml.adapt(x_spt, y_spt), x_qry).numpy()
    assert (logits.argmax(-1) == tasks.y_qry).mean() > 0.9  # measured: 1.0 (prototype head; with the zero head 0.929; chance: 0.2)


def test_random_shifts_are_edge_replicated_windows_of_every_offset():
    """--augment-shift: each image is the window of its edge-padded self at its own random offset in [-K, K]^2."""
    images = np.random.default_rng(1).random((2, 60, 3, 12, 10)).astype("float32")  # [..., C, H, W], 3 channels
    shifted = random_shifts(images, 2, np.random.default_rng(7))
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    top, left = np.random.default_rng(7).integers(0, 5, size=(2, 120))  # the same draws, in the same order
    flat, out = images.reshape(-1, 3, 12, 10), shifted.reshape(-1, 3, 12, 10)
    for i in range(120):
        padded = np.pad(flat[i], ((0, 0), (2, 2), (2, 2)), mode="edge")
        np.testing.assert_array_equal(out[i], padded[:, top[i]:top[i] + 12, left[i]:left[i] + 10])
    assert len(set(zip(top, left))) == 25  # every one of the 25 offsets was drawn (120 draws)
    assert random_shifts(images, 0, np.random.default_rng(7)) is images


def test_shift_tasks_shifts_the_images_and_keeps_the_labels(images):
    tasks = TaskSampler(images, np.arange(len(images)), 5, 1, 3, seed=0).sample(2)
    shifted = shift_tasks(tasks, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(shifted.y_spt, tasks.y_spt)
    np.testing.assert_array_equal(shifted.y_qry, tasks.y_qry)
    assert shifted.x_spt.shape == tasks.x_spt.shape and shifted.x_qry.shape == tasks.x_qry.shape
    assert not np.array_equal(shifted.x_qry, tasks.x_qry)
