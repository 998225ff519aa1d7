"""Run an exported MAML adaptation with onnxruntime: learn a task from its support set once, then classify.

Needs only onnxruntime and numpy (no Paddle), so a deployment installs nothing else:

    >>> from maml_export.adapter import Adapter
    >>> adapter = Adapter("exported")                         # the folder maml-export wrote
    >>> task = adapter.adapt(x_spt, y_spt)                    # adapt.onnx: the K SGD steps, once
    >>> task.predict_proba(x_qry)                             # predict.onnx: [Q, ways], any Q >= 1
    >>> task.save("task.npz"); task = adapter.load_task("task.npz")   # learn once, classify later
    >>> adapter.predict(x_spt, y_spt, x_qry)                  # model.onnx: both in one call, [Q, ways] logits
    >>> adapter.load_images(["a.jpg", "b.png"])               # image files prepared as the training data was

`x_spt` is [S, C, H, W] and `x_qry` [Q, C, H, W] (Omniglot: C=1, H=W=28, ink 1.0, paper 0.0; a model trained on
image folders: its metadata's `channels`, `image_size`, `pixels`, `resize`, read by `preprocessing`), `y_spt`
is [S] labels in 0..ways-1 with every class present. S and Q may be anything >= 1 (e.g. 5-shot support
for a graph meta-trained 1-shot). Inputs are checked first, so that a mistake is a one-line
ValueError, not an onnxruntime shape error or silently meaningless logits.

Under the metadata's query_norm "support" (the default since models are trained that way) each query is
normalised with the support set's statistics: its class and probabilities do not depend on the other
images in `x_qry`, so one image at a time is classified as in any batch. A model exported with
`--query-norm transductive` normalises the queries together (as the MAML paper's code does): classify a
batch of queries, as in the tasks the model was trained on. The logits are divided by a temperature fitted
on validation tasks (metadata `temperature`), so their softmax is a calibrated probability.

A graph exported with `maml-export --task-batch T` (metadata `task_batch` = T; "0" or absent: one
task) adapts T tasks per call in `predict`: x_spt [T, S, C, H, W], y_spt [T, S], x_qry [T, Q, C, H, W] ->
logits [T, Q, ways], T exactly the exported one, every task's support holding every class; it has no
adapt/predict halves.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import onnxruntime as ort

from .calibration import softmax
from .images import Preprocessing
from .contract import (ADAPT_FILE, FUSED_INPUTS, LOGITS, MODEL_FILE, PREDICT_FILE, QUERY_IMAGES,
                       REQUIRED_METADATA, SUPPORT_IMAGES, SUPPORT_LABELS)

TASK_FORMAT = "maml-export-task-v1"


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (`calibration.softmax`), float32 as the logits."""
    return softmax(logits).astype(np.float32)


class Adapter:
    """An export (`model.onnx`, with `adapt.onnx` and `predict.onnx` beside it) and its metadata.

    Args:
        model_path: the folder `maml-export` wrote, or the `model.onnx` in it.
        providers: onnxruntime execution providers, default `["CPUExecutionProvider"]` (a CUDA
            provider that cannot load falls back to CPU with only a warning: check `.providers`).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, one per core).
        check_pixels: refuse images clearly outside the metadata's `input_range` (inverted, blank, not in
            [0, 1]: see `check_input_pixels`); False classifies them anyway.
    """

    def __init__(self, model_path: str | os.PathLike, providers: list | None = None, threads: int | None = None,
                 check_pixels: bool = True):
        self.path, self.check_pixels = os.fspath(model_path), check_pixels
        if os.path.isdir(self.path):
            self.path = os.path.join(self.path, MODEL_FILE)
        if not os.path.isfile(self.path):
            raise ValueError(f"model {self.path} does not exist (write one with maml-export)")
        self._options = ort.SessionOptions()
        self._options.log_severity_level = 3  # errors only; a clean export loads without warnings
        if threads is not None:
            self._options.intra_op_num_threads = int(threads)
        self._providers = providers or ["CPUExecutionProvider"]
        self.session = self._load(self.path)
        self._halves = None  # (adapt, predict) sessions, loaded on first use
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in self.session.get_inputs()]
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if tuple(names) != FUSED_INPUTS or missing:
            raise ValueError(f"model {self.path} is not a maml-export adaptation graph "
                             f"(inputs {names}, missing metadata {missing})")
        self.ways = int(self.metadata["ways"])
        self.steps = int(self.metadata["steps"])
        self.inner_lr = float(self.metadata["inner_lr"])
        self.image_size = int(self.metadata["image_size"])
        self.channels = int(self.metadata["channels"])
        self.task_batch = int(self.metadata.get("task_batch") or 0)  # 0: one task per call, no task axis
        self.head_init = self.metadata.get("head_init", "meta")  # "prototypes": the head starts from the support
        self.config_name = self.metadata.get("config_name", "")
        self.input_range = self.metadata.get("input_range", "")
        self.query_norm = self.metadata.get("query_norm", "transductive")  # exports before it: transductive
        self.temperature = float(self.metadata.get("temperature", 1.0))
        # whether the probabilities mean what they say: a temperature fitted on validation tasks, recorded (exports
        # before the record: any temperature but 1 was fitted)
        recorded = self.metadata.get("calibration")
        self.calibrated = recorded != "none" if recorded is not None else self.temperature != 1.0
        self.weights_sha256 = self.metadata.get("weights_sha256", "")
        try:
            self.preprocessing = Preprocessing.from_metadata(self.metadata)  # how the training images were prepared
        except ValueError as e:
            raise ValueError(f"model {self.path} has an unknown preprocessing in its metadata ({e})") from None

    def _load(self, path: str):
        try:
            return ort.InferenceSession(path, self._options, providers=self._providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception zoo
            raise ValueError(f"model {path} cannot be loaded by onnxruntime: {' '.join(str(e).split())}") from None

    def load_images(self, paths) -> np.ndarray:
        """Image files -> float32 [N, C, H, W], prepared exactly as the model's training images were
        (`images.Preprocessing`, from the metadata; needs Pillow). A one-line ValueError for a file that cannot
        be read."""
        return np.stack([self.preprocessing.load(p) for p in paths])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __repr__(self) -> str:
        batch = f", task_batch={self.task_batch}" if self.task_batch else ""
        return (f"Adapter({self.path!r}, ways={self.ways}, steps={self.steps}, inner_lr={self.inner_lr}, "
                f"head_init={self.head_init!r}, "
                f"image_shape={self.image_shape}{batch}, config={self.config_name!r})")

    @property
    def _lead(self) -> tuple[int, ...]:
        """The task axis the inputs start with: (T,) for a batched graph, () for one task."""
        return (self.task_batch,) if self.task_batch else ()

    def _images(self, name: str, x) -> np.ndarray:
        try:
            a = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - ragged lists and the like
            raise ValueError(f"{name} is not an array ({e})") from None
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{name} must hold numbers, got dtype {a.dtype}")
        lead, k = self._lead, len(self._lead)
        if a.ndim != k + 4 or a.shape[:k] != lead or a.shape[k + 1:] != self.image_shape:
            want = "[" + ", ".join(map(str, lead + ("N",) + self.image_shape)) + "]"
            what = "tasks, " * k + "images, channels, height, width"
            batch = f"; the model adapts {self.task_batch} tasks per call" if k else ""
            raise ValueError(f"{name} must have shape {want} ({what}{batch}), got {list(a.shape)}")
        if a.shape[k] < 1:
            raise ValueError(f"{name} holds no images")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        check_input_pixels(name, a, self.input_range if self.check_pixels else "", k)  # "": no check
        return np.ascontiguousarray(a)

    def check(self, x_spt, y_spt, x_qry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The inputs as float32/int64 arrays, or a one-line ValueError saying what is wrong."""
        xs, y = self.check_support(x_spt, y_spt)
        return xs, y, self._images("x_qry", x_qry)

    def check_support(self, x_spt, y_spt) -> tuple[np.ndarray, np.ndarray]:
        """The support set as float32/int64 arrays, or a one-line ValueError saying what is wrong."""
        xs = self._images("x_spt", x_spt)
        y = np.asarray(y_spt)
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)  # 1.0 is a fine label; 1.5 is not
        if y.dtype.kind not in "iu":
            raise ValueError(f"y_spt must hold integer labels 0..{self.ways - 1}, got dtype {y.dtype}")
        k = len(self._lead)
        if y.shape != xs.shape[:k + 1]:
            raise ValueError(f"y_spt must have shape {list(xs.shape[:k + 1])} (one label per x_spt image), "
                             f"got {list(y.shape)}")
        bad = y[(y < 0) | (y >= self.ways)]
        if bad.size:
            raise ValueError(f"y_spt holds label {bad[0]}, outside 0..{self.ways - 1} (the model is {self.ways}-way)")
        for t, labels in enumerate(y.reshape(-1, y.shape[-1])):  # one row per task
            absent = sorted(set(range(self.ways)) - set(labels.tolist()))
            if absent:
                where = f"task {t}'s support set" if k else "the support set"
                raise ValueError(f"{where} has no image of class {', '.join(map(str, absent))}: "
                                 f"a {self.ways}-way model needs every class 0..{self.ways - 1} in y_spt")
        return xs, y.astype(np.int64)

    def predict(self, x_spt, y_spt, x_qry) -> np.ndarray:
        """Adapt to (x_spt, y_spt) with `steps` SGD steps, then query logits, float32 [Q, ways] ([T, Q, ways]
        for a batched graph), in one call of model.onnx."""
        xs, ys, xq = self.check(x_spt, y_spt, x_qry)
        return self.session.run([LOGITS], dict(zip(FUSED_INPUTS, (xs, ys, xq))))[0]

    def predict_proba(self, x_spt, y_spt, x_qry) -> np.ndarray:
        """Class probabilities (softmax of `predict`), float32 [Q, ways] ([T, Q, ways] for a batched graph)."""
        return probabilities(self.predict(x_spt, y_spt, x_qry))

    # -- adapt once, predict many (adapt.onnx, predict.onnx) ------------------------------------------------

    def halves(self):
        """The (adapt, predict) onnxruntime sessions beside model.onnx, loaded and checked once: both exported
        from model.onnx's weights. A one-line ValueError for a --task-batch export or a folder without them."""
        if self._halves is None:
            if self.task_batch:
                raise ValueError(f"model {self.path} adapts {self.task_batch} tasks per call (--task-batch) and has "
                                 "no adapt/predict halves: export without --task-batch")
            folder = os.path.dirname(self.path)
            paths = [os.path.join(folder, f) for f in (ADAPT_FILE, PREDICT_FILE)]
            absent = [p for p in paths if not os.path.isfile(p)]
            if absent:
                raise ValueError(f"{' and '.join(absent)} not found beside {self.path}: export again with this "
                                 f"maml-export, which writes them")
            adapt, predict = (self._load(p) for p in paths)
            for path, session in zip(paths, (adapt, predict)):
                sha = session.get_modelmeta().custom_metadata_map.get("weights_sha256", "")
                if sha != self.weights_sha256:
                    raise ValueError(f"{path} was exported from other weights than {self.path}: export again")
            self._halves = adapt, predict
            self.state_names = [o.name for o in adapt.get_outputs()]
            self.state_shapes = {i.name: list(i.shape) for i in predict.get_inputs() if i.name != QUERY_IMAGES}
        return self._halves

    def adapt(self, x_spt, y_spt, classes: list[str] | None = None) -> "Task":
        """Learn a task from its support set (adapt.onnx: the `steps` SGD steps, once) -> a `Task` that
        classifies any number of images later. `classes`, optional: a name per label, kept with the task."""
        adapt, _ = self.halves()
        xs, ys = self.check_support(x_spt, y_spt)
        state = dict(zip(self.state_names, adapt.run(None, {SUPPORT_IMAGES: xs, SUPPORT_LABELS: ys})))
        return Task(self, state, classes, support_size=len(ys))

    def load_task(self, path: str | os.PathLike) -> "Task":
        """A task saved by `Task.save`; refused (ValueError, one line) unless it was learned by this model."""
        path = os.fspath(path)
        self.halves()
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(str(arrays.pop("meta")))
        except FileNotFoundError:
            raise ValueError(f"task file {path} does not exist (write one with Task.save or maml-predict "
                             f"--save-task)") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is not a task file saved by maml-export ({type(e).__name__})") from None
        if not isinstance(meta, dict) or meta.get("format") != TASK_FORMAT:
            raise ValueError(f"{path} is not a task file saved by maml-export")
        if meta.get("weights_sha256") != self.weights_sha256:
            raise ValueError(f"task {path} was learned by another model ({meta.get('config_name', '?')}, weights "
                             f"{str(meta.get('weights_sha256'))[:12]}) than {self.path} (weights "
                             f"{self.weights_sha256[:12]}): learn it again with this model")
        state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
        wrong = [k for k in self.state_names if k not in state or list(state[k].shape) != self.state_shapes[k]]
        if wrong or len(state) != len(self.state_names):
            raise ValueError(f"task {path} does not hold this model's state (missing or misshapen: {wrong[:3]})")
        return Task(self, {k: state[k].astype(np.float32) for k in self.state_names}, meta.get("classes"),
                    meta.get("support_size"))


class Task:
    """A task learned by `Adapter.adapt`: its adapted state (fast weights and, under query_norm "support",
    the support set's batch-norm statistics), named as predict.onnx's inputs. Classifies images without the
    support set; `save` keeps it for later (numpy .npz, no pickle).

    Example:
        >>> task = Adapter("exported").adapt(x_spt, y_spt, classes=["a", "b", "c", "d", "e"])
        >>> task.predict_proba(x_qry[:1])       # one image: the same answer as in any batch
    """

    def __init__(self, adapter: Adapter, state: dict, classes: list[str] | None = None,
                 support_size: int | None = None):
        self.adapter, self.state, self.support_size = adapter, state, support_size
        if classes is not None and len(classes) != adapter.ways:
            raise ValueError(f"classes must name {adapter.ways} classes, got {len(classes)}")
        self.classes = list(classes) if classes is not None else None

    def predict(self, x_qry) -> np.ndarray:
        """Logits float32 [Q, ways] of images [Q, C, H, W] (predict.onnx)."""
        _, predict = self.adapter.halves()
        xq = self.adapter._images("x_qry", x_qry)
        return predict.run([LOGITS], {**self.state, QUERY_IMAGES: xq})[0]

    def predict_proba(self, x_qry) -> np.ndarray:
        """Class probabilities float32 [Q, ways]: the softmax of `predict` (calibrated by the temperature)."""
        return probabilities(self.predict(x_qry))

    def save(self, path: str | os.PathLike) -> None:
        """Write the task to `path` (.npz: the state and a JSON "meta" with the model's weights hash, so that
        `Adapter.load_task` refuses it for another model)."""
        meta = {"format": TASK_FORMAT, "weights_sha256": self.adapter.weights_sha256,
                "config_name": self.adapter.config_name, "ways": self.adapter.ways, "classes": self.classes,
                "support_size": self.support_size, "query_norm": self.adapter.query_norm}
        arrays = {f"state/{k}": v for k, v in self.state.items()}
        try:
            with open(path, "wb") as f:
                np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
        except OSError as e:
            raise ValueError(f"cannot write the task to {os.fspath(path)} ({e.strerror})") from None

    def __repr__(self) -> str:
        return f"Task(ways={self.adapter.ways}, classes={self.classes}, model={self.adapter.config_name!r})"


# What `check_input_pixels` calls clearly outside "[0, 1], ink 1.0, paper 0.0" (the metadata's `input_range`): most
# pixels of an Omniglot drawing are paper, 0.0 (a few percent are ink), while most pixels of an inverted one
# (dark ink on light paper read as it is, or light ink on a dark background inverted) are near 1.0.
RANGE_SLACK = 0.01  # resampling overshoot (LANCZOS) of pixels already in [0, 1] stays well inside this
INKED = 0.75  # an image with more of its pixels at or above 0.5 than this is not ink on paper
BLANK = 0.05  # an image whose pixels span less than this holds no drawing


def pixel_problem(image: np.ndarray, input_range: str) -> str | None:
    """What is clearly wrong with one image [C, H, W] for a model taking `input_range`, as words that follow
    "is" ("blank (...)"), or None. Only the protocol's "[0, 1], ink 1.0, paper 0.0" is checked: values outside
    [0, 1] (0-255 pixels, standardised ones), a blank image (one value throughout: all paper, all ink), an
    inverted one (mostly ink). Each would be classified silently and meaninglessly."""
    if "[0, 1]" not in input_range:
        return None
    low, high = float(image.min()), float(image.max())
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        return f"outside [0, 1] (values {low:g} to {high:g}{'; divide 0-255 pixels by 255' if high > 2 else ''})"
    if "paper 0" not in input_range:
        return None
    if high - low < BLANK:
        return f"blank (every pixel {low:.2f}: {'nothing drawn' if low < 0.5 else 'all ink'})"
    inked = float((image >= 0.5).mean())
    if inked > INKED:
        return f"inverted ({100 * inked:.0f}% of its pixels are ink, >= 0.5, where a drawing is mostly paper, 0.0)"
    return None


def check_input_pixels(name: str, a: np.ndarray, input_range: str, lead: int = 0) -> None:
    """One-line ValueError if an image of `a` [..., N, C, H, W] (`lead` task axes before N) has a
    `pixel_problem`; nothing if `input_range` is empty (not checked)."""
    if not input_range:
        return
    images = a.reshape((-1,) + a.shape[lead + 1:])
    problems = [(i, p) for i, p in enumerate(pixel_problem(x, input_range) for x in images) if p]
    if problems:
        (i, problem), more = problems[0], len(problems) - 1
        *task, image = np.unravel_index(i, a.shape[:lead + 1])
        where = f"task {', '.join(map(str, task))} image {image}" if task else f"image {image}"
        raise ValueError(f"{name} {where} is {problem}{f' (and {more} more of {len(images)})' if more else ''}: "
                         f"the model takes {input_range} (check_pixels=False classifies such images anyway)")
