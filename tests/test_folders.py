"""Your own images: image-folder layouts, their split, the sampler, too-small classes, the one preprocessing, and a
short real meta-training on generated RGB shapes (tests/shapes.py) -> export -> parity -> maml-predict on JPEGs.
Real files in tmp_path, real Paddle, real onnxruntime; no Omniglot needed."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from maml_export.config import MamlConfig
from maml_export.errors import ConfigError, DataError
from maml_export.folders import DEFAULT_SPLIT, SPLITS, open_dataset, split_classes
from maml_export.images import Preprocessing

from shapes import write_dataset

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(channels=3, image_size=16)  # a tiny model input: the layout and sampler tests decode fast


def colour(k: int) -> tuple:
    """Class k's colour: the class is readable back from any of its pixels after resizing."""
    return (k * 7 % 256, 255 - k * 5 % 256, k * 11 % 256)


def solid(path: Path, k: int, i: int) -> None:
    """Image i of class k: a solid colour (its class), of a size that varies with i, some as JPEG-free PNG/BMP."""
    size = (20 + 3 * i, 30 + i)
    Image.new("RGB", size, colour(k)).save(path.with_suffix([".png", ".bmp", ".webp"][i % 3]), lossless=True)


def class_of(image: np.ndarray, classes: int = 200) -> int:
    """The class whose colour a float [3, H, W] solid image has."""
    rgb = tuple(int(round(v * 255)) for v in image[:, 0, 0])
    return next(k for k in range(classes) if colour(k) == rgb)


def run(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error_line(done) -> str:
    """The one error line of a failed command (the notice lines of a folder's defaults aside)."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("notice: ")]
    assert "Traceback" not in done.stderr and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# --- layouts and splits -----------------------------------------------------------------------------------------

def test_splits_from_train_val_test_folders_and_tasks_of_their_classes(tmp_path):
    k = 0
    given = {}
    for split, count in zip(SPLITS, (8, 6, 6)):
        given[split] = set()
        for _ in range(count):
            folder = tmp_path / split / f"class{k:02d}"
            folder.mkdir(parents=True)
            for i in range(5):
                solid(folder / f"{i}", k, i)
            given[split].add(k)
            k += 1
    dataset, config = open_dataset(tmp_path, MamlConfig(**SMALL, query=3), new_run=True, cache_dir=tmp_path / "cache")
    assert dataset.layout == "folders" and config.split is None and config.pixels == "plain"
    assert config.protocol.startswith("image folders DIR/{train,val,test}/<class>/: split by train/val/test folders")
    for split in SPLITS:
        tasks = dataset.sampler(split, 5, 1, 3, seed=0).sample(4)
        assert tasks.x_spt.shape == (4, 5, 3, 16, 16) and tasks.x_qry.shape == (4, 15, 3, 16, 16)
        for t in range(4):
            support = [class_of(x) for x in tasks.x_spt[t]]
            assert len(set(support)) == 5 and set(support) <= given[split]  # 5 classes of this split only
            assert [class_of(x) for x in tasks.x_qry[t]] == list(np.repeat(support, 3))  # queries by label
    with pytest.raises(ConfigError, match="drop --split"):
        open_dataset(tmp_path, MamlConfig(**SMALL, split="0.5,0.25,0.25"), new_run=True, cache_dir=tmp_path / "cache")
    (tmp_path / "val").rename(tmp_path / "valid")
    with pytest.raises(DataError, match=r"has train, test/ but not .*val/"):
        open_dataset(tmp_path, MamlConfig(**SMALL), new_run=True, cache_dir=tmp_path / "cache")


def test_split_fractions_are_a_seeded_class_permutation_recorded_in_the_config(tmp_path):
    names = [f"c{k:02d}" for k in range(20)]
    data, cache = tmp_path / "data", tmp_path / "cache"
    for k, name in enumerate(names):
        (data / name).mkdir(parents=True)
        for i in range(4):
            solid(data / name / f"{i}", k, i)
    (data / ".hidden").mkdir()  # skipped
    dataset, config = open_dataset(data, MamlConfig(query=3), given={"query": 3}, new_run=True, cache_dir=cache)
    # a CLI user who gave no sizes gets miniImageNet's for colour images (recipe.py), and the split is recorded:
    # 0.7,0.1,0.2 would leave 2 val and 4 test classes, so 5-way tasks get 5 each, recorded as counts
    assert (config.channels, config.image_size, config.pixels, config.split) == (3, 84, "plain", "10,5,5")
    assert config.layers[0]["in_channels"] == 3 and config.layers[-1]["in_features"] == 32 * 5 * 5
    order = np.random.RandomState(1).permutation(20)  # the recipe, written independently
    expected = {"train": order[:10], "val": order[10:15], "test": order[15:]}
    for split in SPLITS:
        assert dataset.names[split] == [names[i] for i in sorted(expected[split])]
    # the same split every time (no --seed in it), another one for other fractions
    again, same = open_dataset(data, config, cache_dir=cache)  # as evaluate and export read it
    assert again.names == dataset.names and same == config
    with pytest.raises(ConfigError, match="this model was trained on Omniglot"):
        open_dataset(data, MamlConfig(query=3), cache_dir=cache)  # not a new run: an Omniglot model
    other, other_config = open_dataset(data, MamlConfig(**SMALL, query=3, split="0.5,0.25,0.25"),
                                       new_run=True, cache_dir=cache)
    assert [len(other.names[s]) for s in SPLITS] == [10, 5, 5] and other_config.split == "0.5,0.25,0.25"
    assert sorted(sum(other.names.values(), [])) == names
    # the library's own config is taken as it is (given=None): 16 px
    assert other.pixels["train"].shape == (10 * 4, 3, 16, 16)
    for bad in ("0.5,0.5", "0.8,0.3,-0.1", "a,b,c", "0.6,0.2,0.1", "10,5,0"):
        with pytest.raises(ConfigError, match="--split must be three positive fractions"):
            open_dataset(data, MamlConfig(**SMALL, split=bad), new_run=True, cache_dir=cache)
    assert {len(v) for v in split_classes(list(range(3)), (0.98, 0.01, 0.01)).values()} == {1}  # one class each


def test_ravi_larochelle_csv_layout(tmp_path):
    (tmp_path / "images").mkdir()
    for split, labels in zip(SPLITS, (range(0, 6), range(6, 11), range(11, 16))):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["filename", "label"])
            for k in labels:
                for i in range(4):
                    name = f"n{k:08d}{i:08d}.jpg"
                    Image.new("RGB", (84, 84), colour(k)).save(tmp_path / "images" / name, quality=100)
                    rows.writerow([name, f"n{k:08d}"])
    dataset, config = open_dataset(tmp_path, MamlConfig(**SMALL, query=2), new_run=True, cache_dir=tmp_path / "cache")
    assert dataset.layout == "csv" and config.split is None
    assert dataset.names["val"] == [f"n{k:08d}" for k in range(6, 11)] and dataset.counts["test"].tolist() == [4] * 5
    tasks = dataset.sampler("test", 5, 2, 2, seed=3).sample(2)
    assert tasks.x_spt.shape == (2, 10, 3, 16, 16)
    # a row naming a file that is not there: one line, with the file and line
    with open(tmp_path / "test.csv", "a") as f:
        f.write("missing.jpg,n00000099\n")
    with pytest.raises(DataError, match=r"test.csv line 22: .*missing.jpg does not exist") as error:
        open_dataset(tmp_path, MamlConfig(**SMALL), new_run=True, cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)


def test_too_small_classes_are_left_out_with_one_warning_line(tmp_path, capfd):
    write_dataset(tmp_path / "shapes", 20, 6, sizes={"circle-red": 3, "star-red": 5, "ring-green": 0})
    dataset, _ = open_dataset(tmp_path / "shapes", MamlConfig(**SMALL, query=5),
                              new_run=True, cache_dir=tmp_path / "cache")
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: 3 classes of "), lines
    assert "fewer than 6 images" in lines[0]
    every = sum(dataset.names.values(), []) + sum(dataset.skipped.values(), [])
    assert len(every) == 20 and {"circle-red", "star-red", "ring-green"} == set(sum(dataset.skipped.values(), []))
    # too few classes left in a split for the task: the error says which split and what to lower
    with pytest.raises(DataError, match=r"--ways 5 is larger than the \d classes of the val split with at least 6"):
        dataset.sampler("val", 5, 1, 5, seed=0)


def test_rotations_stay_omniglot_only_by_default_and_omniglot_keeps_its_protocol(tmp_path):
    write_dataset(tmp_path / "shapes", 20, 4)
    config = MamlConfig(**SMALL, query=3)
    plain, _ = open_dataset(tmp_path / "shapes", config, new_run=True, cache_dir=tmp_path / "cache")
    assert plain.sampler("train", 5, 1, 3, seed=0).num_classes == len(plain.names["train"])
    rotated, config = open_dataset(tmp_path / "shapes", MamlConfig(**SMALL, query=3, rotations=True),
                                   new_run=True, cache_dir=tmp_path / "cache")
    sampler = rotated.sampler("train", 5, 1, 3, seed=0)
    assert sampler.num_classes == 4 * len(rotated.names["train"]) and "x4 rotations" in config.protocol
    tasks = sampler.sample(8)  # some classes are rotations: their images are rotated copies of the class's
    assert tasks.x_spt.shape == (8, 5, 3, 16, 16)
    # an Omniglot folder (both halves present) takes only its protocol's 1x28x28 ink pixels
    omniglot = tmp_path / "omniglot"
    for half in ("background", "evaluation"):
        (omniglot / f"images_{half}").mkdir(parents=True)
    for options in ({"channels": 3, "pixels": "plain"}, {"image_size": 84}, {"split": "0.7,0.1,0.2"}):
        with pytest.raises(ConfigError, match="is Omniglot, whose protocol is 1x28x28"):
            open_dataset(omniglot, MamlConfig(**options))


# --- the one preprocessing ------------------------------------------------------------------------------------------

def test_the_preprocessing_is_one_definition_carried_by_config_and_metadata(tmp_path):
    from maml_export.data import drawing_pixels
    rng = np.random.default_rng(0)
    paper = rng.random((105, 105)) > 0.1
    drawing = tmp_path / "drawing.png"
    Image.fromarray(np.where(paper, 255, 0).astype(np.uint8), "L").save(drawing)
    omniglot = MamlConfig().preprocessing  # a config without pixels is Omniglot's
    assert omniglot == Preprocessing(1, 28, "ink", "lanczos")
    assert np.array_equal(omniglot.load_uint8(drawing)[0], drawing_pixels(paper))  # the protocol's pixels, bit for bit
    rgb = Preprocessing(3, 16, "plain")
    Image.new("RGBA", (40, 30), (10, 20, 30, 0)).save(tmp_path / "clear.png")  # transparent: white, not black
    assert (rgb.load(tmp_path / "clear.png") == 1.0).all()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "solid.png")
    x = rgb.load(tmp_path / "solid.png")
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert np.array_equal(x[:, 0, 0], np.float32([10, 20, 30]) / np.float32(255))
    assert Preprocessing.from_metadata(rgb.metadata()) == rgb
    assert Preprocessing.from_metadata({"channels": "1", "image_size": "28"}) == omniglot  # exports before pixels
    for bad, message in (({"channels": 3, "pixels": "ink"}, "--pixels ink .* is for grayscale"),
                         ({"channels": 2}, "--channels must be 1 or 3"), ({"resize": "cubic"}, "--resize must be one of"),
                         ({"image_size": 8}, "--image-size must be at least 16")):
        with pytest.raises(ConfigError, match=message):
            MamlConfig(**bad)
    with pytest.raises(ValueError, match=r"cannot read image .*broken.jpg"):
        (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
        rgb.load(tmp_path / "broken.jpg")


def test_cli_bad_folder_input_is_one_line(tmp_path):
    write_dataset(tmp_path / "shapes", 16, 6)
    line = one_error_line(run("-m", "train", "--data", str(tmp_path / "shapes"), "--channels", "2", "--out",
                              str(tmp_path / "run")))
    assert "--channels must be 1 or 3" in line
    # too few classes for 5-way val and test tasks: one line says what is needed, before any image is decoded
    write_dataset(tmp_path / "few", 14, 6)
    (tmp_path / "few" / "bar-red" / "00.png").write_bytes(b"not an image")  # never read
    done = run("-m", "train", "--data", str(tmp_path / "few"), "--out", str(tmp_path / "run"),
               env={"MAML_EXPORT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 1 and one_error_line(done) == (
        "error: cannot split 14 classes into train, val and test: at least 15 are needed (5 train, 5 val, 5 test, "
        "for tasks of 5 classes); add classes, or lower --ways")
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    (tmp_path / "shapes" / "bar-red" / "07.jpg").write_bytes(b"not an image")
    done = run("-m", "train", "--data", str(tmp_path / "shapes"), "--out", str(tmp_path / "run"),
               env={"MAML_EXPORT_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 1 and "07.jpg" in one_error_line(done) and "remove or replace it" in done.stderr


# --- a short real meta-training on RGB images, exported and used ----------------------------------------------------

@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """60 classes of coloured shapes (12 images each, a third JPEG, sizes 48-160 px), meta-trained by the CLI
    at its image-folder defaults (3x84x84), 32 filters, the prototype head, first-order: a toy-sized run."""
    base = tmp_path_factory.mktemp("shapes")
    write_dataset(base / "shapes", 60, 12)
    env = {"MAML_EXPORT_CACHE": str(base / "cache")}
    done = run("-m", "train", "--data", str(base / "shapes"), "--hidden", "32", "--first-order", "--meta-batch", "4",
               "--query", "3", "--inner-steps", "1", "--inner-lr", "0.01", "--head-init", "prototypes", "--zero-head",
               "--iterations", "24", "--val-every", "12", "--val-tasks", "20", "--val-query", "5",
               "--calibration-tasks", "10", "--name", "shapes-5w1s",
               "--out", str(base / "run"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return base, env


def test_a_short_meta_training_on_rgb_images_learns(shapes_run):
    from maml_export.checkpoint import load_checkpoint
    base, env = shapes_run
    config = load_checkpoint(base / "run" / "best.npz").config
    assert (config.channels, config.image_size, config.pixels, config.split) == (3, 84, "plain", DEFAULT_SPLIT)
    assert config.hidden == 32 and config.layers[-1]["in_features"] == 32 * 5 * 5  # flatten follows the size
    rows = [json.loads(line) for line in open(base / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 24 and np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    # meta-test accuracy on the test split's classes (never seen in training), the run's data found by itself
    done = run("-m", "train", "evaluate", "--checkpoint", str(base / "run"), "--tasks", "20", "--query", "5",
               "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["split"] == "test" and report["ways"] == 5 and report["query"] == 5
    # chance is 0.2; seen: 0.80-0.90 after 24 iterations
    assert report["accuracy"] - report["ci95"] > 0.4, report
    # shipped with a temperature fitted on the run's own validation classes (12 images each: 5 queries, not 15)
    done = run("-m", "train", "bundle", str(base / "run"), "--out", str(base / "shapes.npz"), "--calibration-tasks",
               "10", "--calibration-query", "5", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    calibration = load_checkpoint(base / "shapes.npz").state["calibration"]
    assert calibration["query"] == 5 and calibration["tasks"] == 10 and calibration["temperature"] > 0


def test_the_export_validates_and_maml_predict_classifies_rgb_jpegs(shapes_run, tmp_path):
    from maml_export.adapter import Adapter
    from maml_export.checkpoint import load_checkpoint
    from maml_export.folders import class_files
    base, env = shapes_run
    out = tmp_path / "exported"
    done = run("-m", "export", "--checkpoint", str(base / "run"), "--data", str(base / "shapes"), "--tasks", "4",
               "--out", str(out), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("✓") == 5 and "✗" not in done.stdout and "image-folder test tasks" in \
        json.loads((out / "export.json").read_text())["parity"]["source"]
    meta = {p.key: p.value for p in onnx.load(str(out / "predict.onnx")).metadata_props}
    assert (meta["channels"], meta["image_size"], meta["pixels"], meta["resize"]) == ("3", "84", "plain", "lanczos")
    assert meta["input_range"] == "[0, 1], the image's pixel values / 255"
    assert meta["protocol"].startswith("image folders DIR/<class>/: split 0.7,0.1,0.2")

    # the export as a deployment runs it, on the folder's test tasks: evaluate reads the preprocessing and the
    # split from the export's config
    done = run("-m", "train", "evaluate", "--export", str(out), "--data", str(base / "shapes"), "--tasks", "4",
               "--query", "5", "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["answers"] == report["same_class_alone_and_in_batch"] == 4 * 5 * 5 and report["accuracy"] > 0.4

    # maml-bench on an image folder's test tasks (20 images a class: 1 shot + 15 queries), prepared as the model
    # says: every runtime predicts eager Paddle's classes, and meta-test accuracy is measured there
    write_dataset(base / "shapes-20", 60, 20, seed=1)
    done = run("-m", "bench", "--model", str(out), "--data", str(base / "shapes-20"), "--configs", "5w1s",
               "--runs", "1", "--max-seconds", "0", "--tasks", "3", "--json", str(tmp_path / "bench.json"), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["settings"]["inputs"] == f"test tasks from {base / 'shapes-20'}"
    rows = {r["runtime"]: r for r in bench["results"]}
    assert rows["onnxruntime"]["queries"] == 75 and not any(r["flagged"] for r in bench["results"]), rows
    (accuracy,) = bench["accuracy"]
    assert accuracy["tasks"] == 3 and accuracy["same_class"] == accuracy["queries"] == 3 * 75, accuracy

    # a support folder (one PNG per class) and a query folder of JPEGs, of five test classes
    config = load_checkpoint(base / "run" / "best.npz").config
    test = class_files(base / "shapes", "classes", config.split)["test"]
    truth = {}
    for name, files in list(zip(test.names, test.files))[:5]:
        (tmp_path / "support" / name).mkdir(parents=True)
        (tmp_path / "support" / name / files[0].name).write_bytes(files[0].read_bytes())
        (tmp_path / "query").mkdir(exist_ok=True)
        for f in files[1:]:
            if f.suffix == ".jpg":
                (tmp_path / "query" / f"{name}_{f.name}").write_bytes(f.read_bytes())
                truth[f"{name}_{f.name}"] = name
    done = run("-m", "export.predict", "--model", str(out), "--support", str(tmp_path / "support"), "--query",
               str(tmp_path / "query"), "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = {p["file"]: p["class"] for p in json.loads(done.stdout)["predictions"]}
    assert answers.keys() == truth.keys() and len(truth) == 20
    right = sum(answers[f] == truth[f] for f in truth)
    assert right >= 14, (right, answers)  # chance: 4 of 20; seen: 18-20

    # the images maml-predict reads are the training data's pixels, bit for bit (one preprocessing)
    from maml_export.folders import FolderDataset
    dataset = FolderDataset(base / "shapes", config, 1, cache_dir=base / "cache")
    adapter = Adapter(out)
    first = dataset.names["test"].index(test.names[0])
    start = int(dataset.counts["test"][:first].sum())
    expected = dataset.pixels["test"][start:start + len(test.files[0])].astype(np.float32) / np.float32(255)
    assert np.array_equal(adapter.load_images(test.files[0]), expected)


def test_a_new_omniglot_run_from_init_keeps_its_head_unless_given(omniglot_dir, capsys):
    """`--init omniglot-5w1s` on Omniglot starts every task from the prototypes, as the bundle was trained (not from
    a zero head, which is chance with 0 steps), and says so in one line; an option given wins."""
    _, config = open_dataset(omniglot_dir, MamlConfig(init="omniglot-5w1s"), new_run=True, given={"init": "omniglot-5w1s"})
    assert (config.head_init, config.zero_head, config.layers[-1]["init"]) == ("prototypes", True, "prototypes")
    assert "--head-init prototypes" in capsys.readouterr().err
    given = {"init": "omniglot-5w1s", "head_init": "meta"}
    _, config = open_dataset(omniglot_dir, MamlConfig(init="omniglot-5w1s", head_init="meta"), new_run=True, given=given)
    assert config.head_init == "meta" and config.zero_head
    _, config = open_dataset(omniglot_dir, MamlConfig(init="omniglot-5w1s"), new_run=False, given=None)  # resume
    assert config.head_init == "meta"
