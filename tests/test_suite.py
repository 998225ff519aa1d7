"""The robustness suite (maml_export/suite.py) and measuring an Omniglot model on a labelled folder: the redrawn
drawings are what each condition says and the same for a seed; `maml-train evaluate --suite shift` pairs 0 steps
with the deployed steps on the same tasks; `evaluate --data FOLDER` measures a bundle on a user's own classes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maml_export.data import TaskSampler, drawing_pixels, load_omniglot, split_characters
from maml_export.suite import CONDITIONS, RedrawingSampler, redraw, redraw_mix, split_drawings, suite_images

from conftest import DATA, needs_omniglot

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def val_drawings():
    return split_drawings(DATA, "val")


def bbox(image: np.ndarray) -> tuple:
    """(height, width, centre row, centre column) of the ink (> 0.2) of a [28, 28] image."""
    rows, cols = np.nonzero(image > 0.2)
    return np.ptp(rows) + 1, np.ptp(cols) + 1, (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2


@needs_omniglot
def test_as_drawn_is_the_protocol_and_every_condition_is_reproducible(val_drawings):
    characters = val_drawings[:6]
    protocol = load_omniglot(DATA)[split_characters()["val"][:6]]  # the cached protocol pixels
    assert np.array_equal(suite_images(characters, "as-drawn"), protocol)
    for condition in CONDITIONS[1:]:
        once, again = suite_images(characters, condition), suite_images(characters, condition)
        assert np.array_equal(once, again), condition  # the same seed redraws the same pixels
        if condition not in ("thin", "thick"):  # the pen widths are fixed; the others draw their parameters
            assert not np.array_equal(once, suite_images(characters, condition, seed=1)), condition
        assert once.shape == protocol.shape and once.dtype == np.float32 and 0 <= once.min() and once.max() <= 1
        changed = np.abs(once - protocol).reshape(-1, 28 * 28).max(axis=1)
        assert (changed > 0.2).mean() > 0.9, condition  # (nearly) every drawing is redrawn


@needs_omniglot
def test_each_condition_does_what_it_says(val_drawings):
    drawings = [d for char in val_drawings[:10] for d in char[:4]]
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    protocol = np.stack([drawing_pixels(d) / 255 for d in drawings])
    ink = {c: np.stack([redraw(d, c, r) for r in [rng()] for d in drawings]) for c in CONDITIONS}
    mass = {c: ink[c].sum(axis=(1, 2)) / protocol.sum(axis=(1, 2)) for c in CONDITIONS}
    assert np.all(mass["thin"] < 0.95) and np.all(mass["thick"] > 1.3)  # pen width
    assert np.all(mass["thin"] > 0.3)  # thinner strokes, not erased ones
    assert np.median(np.abs(mass["tilted"] - 1)) < 0.1 and np.median(np.abs(mass["elastic"] - 1)) < 0.1
    small = np.array([bbox(i)[:2] for i in ink["small"]]) / np.array([bbox(i)[:2] for i in protocol])
    assert 0.5 <= np.median(small) <= 0.8 and np.all(small < 1)  # 50-80 % of the size (at 28 px, +- a pixel)
    centres = np.array([bbox(i)[2:] for i in ink["small"]]) - np.array([bbox(i)[2:] for i in protocol])
    assert np.abs(centres).max() > 3  # placed off-centre, not only shrunk in place
    # tilted: a rotated copy fits the drawing rotated back better than the drawing as it is
    for image, tilted in zip(protocol[:8], ink["tilted"][:8]):
        best = min(np.abs(np.asarray(Image.fromarray(tilted).rotate(a, Image.Resampling.BILINEAR)) - image).sum()
                   for a in range(-30, 31, 2) if abs(a) >= 10)
        assert best < np.abs(tilted - image).sum()


def test_each_rank_redraws_its_own_tasks_as_one_process_would():
    """--augment-redraw under paddle.distributed: every rank draws the whole meta-batch but redraws only its block.
    The blocks' images are the one-process batch's, bit for bit, and every rank's stream goes on identically."""
    rng = np.random.default_rng(0)
    papers = {c: [rng.random((105, 105)) > 0.02 for _ in range(20)] for c in range(6)}  # specks of ink
    images = rng.random((6, 20, 28, 28)).astype(np.float32)

    def sampler(tasks=slice(None)):
        return RedrawingSampler(TaskSampler(images, np.arange(6), 5, 1, 2, seed=3), papers, 0.5, tasks=tasks)

    whole = sampler()
    first, then = whole.sample(4), whole.sample(4)
    plain = TaskSampler(images, np.arange(6), 5, 1, 2, seed=3).sample(4)
    assert not np.array_equal(first.x_qry, plain.x_qry)  # some images were redrawn
    for block in (slice(0, 1), slice(1, 4)):
        rank = sampler(block)
        mine, next_batch = rank.sample(4), rank.sample(4)
        for field in ("x_spt", "x_qry"):
            np.testing.assert_array_equal(getattr(mine, field)[block], getattr(first, field)[block])
            np.testing.assert_array_equal(getattr(next_batch, field)[block], getattr(then, field)[block])
            others = np.ones(4, bool)
            others[block] = False  # the other ranks' tasks: left as drawn, never redrawn here
            np.testing.assert_array_equal(getattr(mine, field)[others], getattr(plain, field)[others])


def test_redraw_mix_weighs_the_conditions_and_leaves_the_uniform_stream_as_it_was():
    """--augment-redraw-mix: each condition is drawn with its weight, one left out never; without a mix the stream
    is the one runs before the option drew (so that their --resume continues exactly)."""
    images = np.zeros((6, 20, 28, 28), np.float32)

    def sampler(mix):
        return RedrawingSampler(TaskSampler(images, np.arange(6), 5, 1, 2, seed=3), {}, 0.5, mix=mix)

    drawn = sampler(redraw_mix("tilted=3, all=1")).conditions((200, 100))
    share = np.bincount(drawn.ravel(), minlength=len(RedrawingSampler.REDRAWN)) / drawn.size
    names = list(RedrawingSampler.REDRAWN)
    assert abs(share[names.index("tilted")] - 0.75) < 0.01 and abs(share[names.index("all")] - 0.25) < 0.01
    assert share[names.index("tilted")] + share[names.index("all")] == 1  # the others weigh 0: never drawn
    uniform = sampler(None)
    expected = np.random.Generator(np.random.PCG64(3)).integers(len(names), size=(7, 9))
    np.testing.assert_array_equal(uniform.conditions((7, 9)), expected)
    np.testing.assert_allclose(redraw_mix("tilted=9,small=6,thin=2,thick=2,elastic=2,all=9"),
                               np.array([9, 6, 2, 2, 2, 9]) / 30)
    for bad, reason in (("tilt=1", "not a redrawing condition"), ("tilted=x", "needs a weight"),
                        ("tilted=-1", "needs a weight"), ("tilted=0,all=0", "weight 0")):
        with pytest.raises(ValueError, match=reason):
            redraw_mix(bad)


def axis_degrees(image: np.ndarray) -> float:
    """The angle of an image's ink's principal axis from the vertical, in degrees, positive towards +x."""
    ys, xs = np.mgrid[0:28, 0:28]
    w = image / image.sum()
    dy, dx = ys - (w * ys).sum(), xs - (w * xs).sum()
    cyy, cxx, cxy = (w * dy * dy).sum(), (w * dx * dx).sum(), (w * dx * dy).sum()
    return float(np.degrees(0.5 * np.arctan2(2 * cxy, cyy - cxx)))


def test_max_tilt_turns_further_with_the_same_stream():
    """--augment-tilt: training's redrawings turn by 10 to max_tilt degrees either way (the suite's: 10-30), and a
    redrawing draws the same numbers whatever max_tilt, so that a run's stream, and its --resume, stay as they were."""
    paper = np.ones((105, 105), bool)
    paper[20:85, 50:55] = False  # one long vertical stroke: its axis turns with the drawing
    turns = {}
    for max_tilt in (30, 45):
        rngs = [np.random.default_rng(seed) for seed in range(60)]
        turns[max_tilt] = np.abs([axis_degrees(redraw(paper, "tilted", rng, max_tilt=max_tilt)) for rng in rngs])
        if max_tilt == 30:
            after = [rng.random() for rng in rngs]
        else:  # the same numbers drawn: each generator is where it was with the suite's range
            assert [rng.random() for rng in rngs] == after
    assert 9 < turns[30].min() and turns[30].max() < 31
    assert 9 < turns[45].min() and turns[45].max() < 46 and (turns[45] > 35).sum() >= 10
    default = redraw(paper, "tilted", np.random.default_rng(7))
    np.testing.assert_array_equal(default, redraw(paper, "tilted", np.random.default_rng(7), max_tilt=30))


@needs_omniglot
def test_suite_pairs_zero_steps_with_the_deployed_steps(tmp_path):
    done = run("-m", "train", "evaluate", "--suite", "shift", "--split", "val", "--tasks", "3", "--shots", "1",
               "--json", "--data", DATA)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert [r["condition"] for r in result["rows"]] == list(CONDITIONS) and result["steps"] == 5
    for row in result["rows"]:
        assert row["steps_gain"] == pytest.approx(row["accuracy"] - row["accuracy_0_steps"])
        assert 0 <= row["accuracy"] <= 1 and row["shots"] == 1 and row["ways"] == 5
    # the protocol's own tasks: as-drawn is `evaluate` at 0 steps on the same seed
    plain = run("-m", "train", "evaluate", "--split", "val", "--tasks", "3", "--steps", "0", "--json", "--data", DATA)
    assert json.loads(plain.stdout)["accuracy"] == pytest.approx(result["rows"][0]["accuracy_0_steps"])
    bad = run("-m", "train", "evaluate", "--suite", "shift", "--export", str(tmp_path))
    assert bad.returncode == 2 and "--suite" in bad.stderr and "Traceback" not in bad.stderr
    # --conditions: the same cells on the same tasks, only those asked for, and their mean (how checkpoints are chosen)
    some = run("-m", "train", "evaluate", "--suite", "shift", "--split", "val", "--tasks", "3", "--shots", "1",
               "--conditions", "all,tilted", "--json", "--data", DATA)
    assert some.returncode == 0, some.stderr[-2000:]
    some = json.loads(some.stdout)
    assert [r["condition"] for r in some["rows"]] == ["tilted", "all"]
    for row in some["rows"]:
        assert row == next(r for r in result["rows"] if r["condition"] == row["condition"])
    assert some["mean_accuracy_0_steps"] == pytest.approx(np.mean([r["accuracy_0_steps"] for r in some["rows"]]))
    assert some["mean_accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in some["rows"]]))
    bad = run("-m", "train", "evaluate", "--suite", "shift", "--conditions", "tilted,upside-down")
    assert bad.returncode == 2 and "upside-down" in bad.stderr and "Traceback" not in bad.stderr


@needs_omniglot
def test_an_omniglot_bundle_measures_itself_on_a_labelled_folder(tmp_path):
    """A user's own labelled drawings (here: PNGs of Omniglot's test characters, paper white, in a folder per
    class) measured with the bundled model, prepared as its training data was: one notice line, no refusal."""
    folder = tmp_path / "my-drawings"
    for c, drawings in enumerate(split_drawings(DATA, "test")[:8]):
        (folder / f"glyph-{c}").mkdir(parents=True)
        for i, paper in enumerate(drawings[:7]):
            Image.fromarray(np.where(paper, 255, 0).astype(np.uint8)).save(folder / f"glyph-{c}" / f"{i}.png")
    done = run("-m", "train", "evaluate", "--data", str(folder), "--tasks", "10", "--query", "5", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    notices = [line for line in done.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "every class of the folder" in notices[0] and "Traceback" not in done.stderr
    result = json.loads(done.stdout)
    assert result["ways"] == 5 and result["accuracy"] > 0.9
    # training an Omniglot run on it is still refused: only measuring reads a folder with a model trained elsewhere
    export = run("-m", "export", "--data", str(folder), "--out", str(tmp_path / "e"))
    assert export.returncode != 0 and "trained on Omniglot" in export.stderr
    # a folder that is not there: the one line names both things --data takes here
    missing = run("-m", "train", "evaluate", "--data", str(tmp_path / "not-there"))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "does not exist" in missing.stderr and "a folder of labelled images (one sub-folder per class)" in missing.stderr


def per_task_accuracy(ckpt, sampler, tasks: int, steps: int) -> np.ndarray:
    from maml_export.trainer import _deployed_maml, query_logits
    logits, labels = query_logits(_deployed_maml(ckpt), sampler, tasks, steps=steps)
    return (logits.argmax(-1) == labels).mean(axis=1)


@pytest.mark.slow
@needs_omniglot
def test_the_shipped_steps_never_lower_a_task_where_they_run(val_drawings):
    """The shipped bundle's deployed steps against no step, paired on 5-way 5-shot validation tasks redrawn under
    every condition at once ("all"), where the support loss is not saturated and every step runs: no task loses
    more than two of its 75 queries (a task's answers move by a query or two either way with harmless steps: -2 to
    +4 on these 8 tasks for the bundles of 2026-12-06 and 2026-12-07; the latter's steps move its seven 5-shot
    validation cells of 100 tasks by -0.03 to +0.08 points). The same weights deployed as bundles were until 2026-12-06 (features x16,
    support shifts of 2, inner lr 0.01: on the 9 shifted views the loss does not saturate, and the steps act on
    logits x256) lose 25 to 53 queries on some of the same tasks: the check can fail. (Tilted tasks served until
    the redraw-trained bundles, whose x16 support loss saturates on them: no step runs there.)"""
    from maml_export.checkpoint import as_deployed, load_checkpoint
    from maml_export.data import TaskSampler
    images = suite_images(val_drawings, "all")
    sampler = lambda: TaskSampler(images, np.arange(len(images)), 5, 5, 15, seed=7)  # noqa: E731
    shipped = as_deployed(load_checkpoint("omniglot-5w1s"))
    steps = shipped.config.inner_steps
    zero, stepped = per_task_accuracy(shipped, sampler(), 8, 0), per_task_accuracy(shipped, sampler(), 8, steps)
    assert np.all(stepped >= zero - 2 / 75 - 1e-6), (zero, stepped)
    scaled = as_deployed(shipped, feature_scale=16, support_shift=2, inner_lr=0.01)
    lost = per_task_accuracy(scaled, sampler(), 8, 0) - per_task_accuracy(scaled, sampler(), 8, steps)
    assert lost.max() > 10 / 75, lost
