"""Run an exported MAML adaptation graph with onnxruntime: support set in, query logits out.

Needs only onnxruntime and numpy (no Paddle), so a deployment installs nothing else:

    >>> from maml_export.adapter import Adapter
    >>> adapter = Adapter("exported/model.onnx")
    >>> logits = adapter.predict(x_spt, y_spt, x_qry)        # [Q, ways]

`x_spt` is [S, C, H, W] and `x_qry` [Q, C, H, W] (Omniglot: C=1, H=W=28, ink 1.0, paper 0.0), `y_spt`
is [S] labels in 0..ways-1 with every class present. S and Q may be anything >= 1 (e.g. 5-shot support
for a graph meta-trained 1-shot). Inputs are checked first, so that a mistake is a one-line
ValueError, not an onnxruntime shape error or silently meaningless logits.

A graph exported with `maml-export --task-batch T` (metadata `task_batch` = T; "0" or absent: one
task) adapts T tasks per call: x_spt [T, S, C, H, W], y_spt [T, S], x_qry [T, Q, C, H, W] -> logits
[T, Q, ways], T exactly the exported one, every task's support holding every class.

Batch norm uses the statistics of the batch at hand, as MAML does at test time: the query images are
normalised together, so one image's logits depend on the others in `x_qry` (classify a batch of
queries, as in the tasks the model was trained on, rather than one image at a time).
"""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

_REQUIRED = ("ways", "steps", "inner_lr", "image_size", "channels")


class Adapter:
    """An exported `model.onnx` and its metadata.

    Args:
        model_path: the `model.onnx` written by `maml-export`.
        providers: onnxruntime execution providers, default `["CPUExecutionProvider"]` (a CUDA
            provider that cannot load falls back to CPU with only a warning: check `.providers`).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice, one per core).
        check_pixels: refuse images clearly outside the metadata's `input_range` (inverted, blank, not in
            [0, 1]: see `check_input_pixels`); False classifies them anyway.
    """

    def __init__(self, model_path: str | os.PathLike, providers: list | None = None, threads: int | None = None,
                 check_pixels: bool = True):
        self.path, self.check_pixels = os.fspath(model_path), check_pixels
        if not os.path.isfile(self.path):
            raise ValueError(f"model {self.path} does not exist (write one with maml-export)")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only; a clean export loads without warnings
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(self.path, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception zoo
            raise ValueError(f"model {self.path} cannot be loaded by onnxruntime: {' '.join(str(e).split())}") from None
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        names = [i.name for i in self.session.get_inputs()]
        missing = [k for k in _REQUIRED if k not in self.metadata]
        if names != ["x_spt", "y_spt", "x_qry"] or missing:
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
        xs, xq = self._images("x_spt", x_spt), self._images("x_qry", x_qry)
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
        return xs, y.astype(np.int64), xq

    def predict(self, x_spt, y_spt, x_qry) -> np.ndarray:
        """Adapt to (x_spt, y_spt) with `steps` SGD steps, then query logits, float32 [Q, ways] ([T, Q, ways]
        for a batched graph)."""
        xs, ys, xq = self.check(x_spt, y_spt, x_qry)
        return self.session.run(["logits"], {"x_spt": xs, "y_spt": ys, "x_qry": xq})[0]

    def predict_proba(self, x_spt, y_spt, x_qry) -> np.ndarray:
        """Class probabilities (softmax of `predict`), float32 [Q, ways] ([T, Q, ways] for a batched graph)."""
        logits = self.predict(x_spt, y_spt, x_qry)
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


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
