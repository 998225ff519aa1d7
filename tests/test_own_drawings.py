"""Your own drawings: `maml-train --data FOLDER` with its defaults (recipe.py): drawings start from the shipped
weights at their pixels, first-order, a small meta-batch and a time budget; small folders get a split with whole
5-way tasks in val and test (one line), too small ones one error line; training ends with a calibrated bundle,
which `--checkpoint RUN` means; maml-predict says when a model is not calibrated. Real Omniglot test characters
written as PNG and JPEG files (tests/drawings.py), real Paddle, real onnxruntime."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import require_omniglot
from drawings import write_drawings
from maml_export.config import MamlConfig
from maml_export.errors import ConfigError, DataError
from maml_export.folders import open_dataset, parse_split, split_counts
from maml_export.recipe import DRAWINGS_INIT, FROM_SCRATCH, folder_defaults, looks_like_drawings, sample_files
from shapes import write_dataset

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def notices(stderr: str) -> list:
    return [line for line in stderr.splitlines() if line.startswith("notice: ")]


@pytest.fixture(scope="module")
def drawings(tmp_path_factory):
    """20 of Omniglot's test characters, 7 drawings each (1 shot + 5 queries, and one more), PNG and JPEG."""
    base = tmp_path_factory.mktemp("drawings")
    write_drawings(require_omniglot(), base / "draw20", 20, 7)
    return base


def test_small_folders_split_with_whole_tasks_in_val_and_test():
    least = (5, 5, 5)
    assert split_counts(40, (0.7, 0.1, 0.2), least) == (27, 5, 8)  # the worked example's folder
    assert split_counts(20, (0.7, 0.1, 0.2), least) == (10, 5, 5)
    assert split_counts(15, (0.7, 0.1, 0.2), least) == (5, 5, 5)
    assert split_counts(100, (0.7, 0.1, 0.2), least) == (70, 10, 20)  # the fractions, where they suffice
    with pytest.raises(DataError) as error:
        split_counts(14, (0.7, 0.1, 0.2), least)
    assert str(error.value) == ("cannot split 14 classes into train, val and test: at least 15 are needed (5 train, "
                                "5 val, 5 test, for tasks of 5 classes); add classes, or lower --ways")
    assert parse_split("10,5,5") == (10, 5, 5) and parse_split("0.7,0.1,0.2") == (0.7, 0.1, 0.2)


def test_drawings_are_told_from_other_images(tmp_path, drawings):
    folder = drawings / "draw20"
    files = sample_files([sorted(p.iterdir()) for p in sorted(folder.iterdir())])
    assert len(files) == 20 and {f.suffix for f in folder.rglob("*.*")} == {".png", ".jpg"}
    assert looks_like_drawings(files) == (True, "grayscale, dark on light paper")
    write_dataset(tmp_path / "shapes", 6, 1)
    drawn, why = looks_like_drawings(sorted((tmp_path / "shapes").rglob("*.*")))
    assert not drawn and why == "6 of the 6 images looked at are in colour"
    for i, f in enumerate(files[:3]):  # light ink on dark paper: drawings, but not as the shipped weights read them
        with Image.open(f) as image:
            Image.eval(image.convert("L"), lambda v: 255 - v).save(tmp_path / f"inverted{i}.png")
    drawn, why = looks_like_drawings(sorted(tmp_path.glob("inverted*.png")))
    assert not drawn and "mostly dark" in why and "invert them" in why


def test_a_folder_of_drawings_defaults_to_the_shipped_weights_first_order_and_a_budget(drawings, capfd):
    folder = drawings / "draw20"
    dataset, config = open_dataset(folder, MamlConfig(), new_run=True, given={}, cache_dir=drawings / "cache")
    assert (config.init, config.from_scratch) == (DRAWINGS_INIT, False)
    assert config.preprocessing.describe() == "1x28x28, grayscale, LANCZOS, ink=255-gray, /255"  # the bundle's
    assert (config.hidden, config.head_init, config.zero_head, config.query_norm) == (64, "prototypes", True, "support")
    assert (config.first_order, config.meta_batch, config.query, config.minutes) == (True, 4, 5, 5.0)
    assert (config.inner_steps, config.val_steps, config.inner_lr, config.calibration_tasks) == (1, 5, 0.01, 200)
    assert config.name == "draw20-5w1s" and config.split == "10,5,5"
    assert [len(dataset.names[s]) for s in ("train", "val", "test")] == [10, 5, 5]
    lines = notices(capfd.readouterr().err)
    assert len(lines) == 2 and "looks like drawings (grayscale, dark on light paper): meta-fine-tuning " \
        "omniglot-5w1s's weights (1x28x28, ink, first-order, meta-batch 4) for at most 5 minutes" in lines[0]
    assert lines[1] == (f"notice: split 20 classes of {folder}: 10 train, 5 val, 5 test (0.7,0.1,0.2, at least 5 in "
                        "val and test for 5-way tasks; --split to choose)")
    # options given win; --from-scratch and --channels 3 train from random weights
    every = [sorted(p.iterdir()) for p in sorted(folder.iterdir())]
    options, line = folder_defaults(folder, every, MamlConfig(), {"minutes": 2.0, "meta_batch": 8})
    assert options["init"] == DRAWINGS_INIT and "minutes" not in options and "meta_batch" not in options
    options, line = folder_defaults(folder, every, MamlConfig(from_scratch=True), {"from_scratch": True})
    assert "init" not in options and {k: options[k] for k in FROM_SCRATCH} == FROM_SCRATCH
    assert "meta-training from random weights" in line
    options, line = folder_defaults(folder, every, MamlConfig(channels=3), {"channels": 3})
    assert "init" not in options and "--channels given" in line
    for bad, message in (({"minutes": 0}, "--minutes must be positive"),
                         ({"from_scratch": True, "init": DRAWINGS_INIT}, "pass one of them")):
        with pytest.raises(ConfigError, match=message):
            MamlConfig(**bad)


@pytest.mark.slow
def test_training_on_20_drawings_stops_at_its_budget_and_ends_calibrated(drawings, tmp_path):
    """The CLI with its defaults but a 20-second budget and fewer tasks: starts from the bundle (its feature scale
    undone for training), first-order, stops at the budget with a last validation, and ends with RUN/bundle.npz,
    calibrated on the validation classes and deployed as the shipped bundle is; `--checkpoint RUN` means it.
    maml-predict warns about the uncalibrated best.npz's export and not about the bundle's."""
    from maml_export.checkpoint import load_checkpoint, scale_features
    from maml_export.cli import checkpoint_argument
    env = {"MAML_EXPORT_CACHE": str(drawings / "cache")}
    run_dir, folder = tmp_path / "run", drawings / "draw20"
    began = time.perf_counter()
    done = run("-m", "train", "--data", str(folder), "--minutes", "0.33", "--val-tasks", "10", "--calibration-tasks",
               "20", "--threads", "1", "--out", str(run_dir), env=env)
    wall = time.perf_counter() - began
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split(":")[0] for line in notices(done.stderr)] == ["notice", "notice"]
    assert "split 20 classes" in notices(done.stderr)[1] and "10 train, 5 val, 5 test" in notices(done.stderr)[1]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < summary["iterations"] < 10000 and summary["bundle"] == str(run_dir / "bundle.npz")
    assert 20 <= summary["wall_seconds"] < wall
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    start = rows[0]
    shipped = load_checkpoint(DRAWINGS_INIT)  # the fine-tune deploys as the bundle it starts from does
    scale = shipped.state.get("feature_scale")  # a feature scale is undone for training and put back at the end
    assert start["weights"]["init"] == DRAWINGS_INIT and start["weights"].get("feature_scale_undone") == scale
    assert start["config"]["first_order"] and start["config"]["meta_batch"] == 4 and start["config"]["minutes"] == 0.33
    validations = [r["iteration"] for r in rows if r.get("event") == "validation"]
    assert validations[0] == 0 and validations[-1] == summary["iterations"]  # the start, and the budget's end

    bundle, best = load_checkpoint(run_dir / "bundle.npz"), load_checkpoint(run_dir / "best.npz")
    assert checkpoint_argument(str(run_dir)) == str(run_dir / "bundle.npz")
    calibration = bundle.state["calibration"]
    assert calibration["tasks"] == 20 and calibration["query"] == 6 and calibration["split"] == "val"
    assert bundle.config.temperature == calibration["temperature"] > 0
    assert bundle.config.name == "draw20-5w1s" and bundle.state["data"] == str(folder)
    assert (bundle.config.support_shift, bundle.state.get("feature_scale")) == (shipped.config.support_shift, scale)
    expected = scale_features(best.config, best.params, scale) if scale else best.params
    assert all(np.array_equal(bundle.params[k], expected[k]) for k in bundle.params)

    # exported: the bundle says it is calibrated, best.npz that it is not; maml-predict warns about the latter only
    support, query = tmp_path / "support", tmp_path / "query"
    for name in sorted(os.listdir(folder))[:5]:
        (support / name).mkdir(parents=True)
        files = sorted((folder / name).iterdir())
        (support / name / files[0].name).write_bytes(files[0].read_bytes())
        query.mkdir(exist_ok=True)
        (query / f"{name}-{files[1].name}").write_bytes(files[1].read_bytes())
    for checkpoint, calibrated in ((run_dir, True), (run_dir / "best.npz", False)):
        out = tmp_path / f"exported-{calibrated}"
        done = run("-m", "export", "--checkpoint", str(checkpoint), "--steps", "1", "--tasks", "2", "--out", str(out),
                   env=env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        meta = {p.key: p.value for p in onnx.load(str(out / "predict.onnx")).metadata_props}
        assert (meta["calibration"] != "none") == calibrated
        done = run("-m", "export.predict", "--model", str(out), "--support", str(support), "--query", str(query),
                   "--json", env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["calibrated"] == calibrated
        warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
        assert warnings == ([] if calibrated else [
            f"warning: {out} is not calibrated (temperature 1, no calibration recorded): its probabilities are "
            "scores, not chances, and --unknown-below means little; `maml-train bundle RUN` fits a temperature on "
            "validation tasks"])
