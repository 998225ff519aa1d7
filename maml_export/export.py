"""Export MAML *adaptation* (K SGD steps on a support set, then the query logits) as ONNX graphs:

    model.onnx     logits[Q, ways] = predict(adapt(meta_weights, x_spt[S, C, H, W], y_spt[S]), x_qry[Q, C, H, W])
    adapt.onnx     the first half: x_spt, y_spt -> the task's state (fast weights, support statistics)
    predict.onnx   the second half: the task's state, x_qry -> logits (adapt once, predict many)

for one task, meta-weights baked in, S and Q dynamic (names and shapes: `contract.py`, docs/deploy.md).
With `task_batch=T` only model.onnx is written, for T tasks per call, [T, S, C, H, W], [T, S],
[T, Q, C, H, W] -> [T, Q, ways], adapted at once (one grouped convolution per layer, as in training); T is
fixed in the graph (the task-stacked channel layout needs it statically), S and Q stay dynamic.
`export_model` runs the stages below, each a function, and writes export.json:

  1. trace    `paddle.jit.to_static` + `paddle.jit.save` -> NAME.json + NAME.pdiparams (PIR program)
  2. check    every op is one paddle2onnx can convert and none would change the maths (`onnx_convert.py`)
  3. convert  paddle2onnx in a child process; the graph cleaned, named and stamped (`onnx_convert.py`)
  4. parity   eager Paddle vs the static program vs onnxruntime, on Omniglot test tasks or random ones
              (`parity.py`)
  5. split    adapt -> predict equals model.onnx, and each query alone equals its row in a batch
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import paddle
import paddle2onnx

from . import __version__
from .checkpoint import as_deployed, default_checkpoint, load_checkpoint, resolve_checkpoint
from .errors import CheckpointError, ExportError, OutputError
from .folders import trained_on_folders
from .maml import MAML, learned_schedule, predict, split_step_sizes
from .model import Model
from .contract import (ADAPT_FILE, ADAPT_INPUTS, FUSED_INPUTS, LOGITS, MAX_STEPS, MODEL_FILE, PREDICT_FILE,
                       QUERY_IMAGES, RTOL, SPLIT_RTOL, SUPPORT_IMAGES, SUPPORT_LABELS, state_names)
from .layers import BatchNorm
from .onnx_convert import check_ops, convert, finish_onnx, inspect_program, metadata
from .parity import parity, parity_line, parity_tasks, split_parity


# ---------------------------------------------------------------------------------------------
# 1. trace
# ---------------------------------------------------------------------------------------------

class _Graph(paddle.nn.Layer):
    """Meta-weights as (frozen) parameters, and the MAML that adapts with them."""

    def __init__(self, model: Model, params: dict, steps: int, inner_lr: float, task_batch: int = 0,
                 every_step: bool = False):
        super().__init__()
        self.model, self.steps, self.task_batch = model, steps, task_batch
        self.every_step = every_step or bool(task_batch)
        params, step_sizes = split_step_sizes(params)
        # learned step sizes (--learn-inner-lr) are constants of the graph, as a single --inner-lr is
        self.inner_lr = learned_schedule(step_sizes, params, steps, constants=True) if step_sizes else inner_lr
        self.names = list(params)
        for i, name in enumerate(self.names):
            p = self.create_parameter(list(params[name].shape), dtype="float32",
                                      default_initializer=paddle.nn.initializer.Assign(params[name]))
            p.stop_gradient = True
            self.add_parameter(f"p{i}", p)  # paddle forbids dots in parameter names

    def maml(self) -> MAML:
        # one task per call: adaptation stops at a fixed point of its SGD (maml.steps_to_fixed_point, `If`
        # nodes); tasks stacked for GPUs run every step, since a CUDA graph captures no `If`, and so does
        # --every-step (the same work on every task: what a benchmark against a peer that runs every step needs)
        return MAML(self.model, {name: getattr(self, f"p{i}") for i, name in enumerate(self.names)},
                    self.inner_lr, self.steps, stop_at_fixed_point=not self.every_step)


class AdaptAndPredict(_Graph):
    """model.onnx: one task per call, or `task_batch` tasks stacked on a leading axis (0: one task, no task
    axis in the inputs)."""

    def forward(self, x_spt, y_spt, x_qry):
        return _adapt_and_predict(self, x_spt, y_spt, x_qry)


@paddle.jit.not_to_static
def _adapt_and_predict(net: AdaptAndPredict, x_spt, y_spt, x_qry):
    # Traced as plain Python, not AST-converted: dy2static would turn `x.shape` into tensors and the
    # layers' `if shape > 0` tests on dynamic dims into cond ops with mismatched branch dtypes.
    # Plain tracing gives -1 for dynamic dims, which layers.py is written for.
    maml = net.maml()
    if not net.task_batch:  # one task: T = 1, (S, C, H, W) -> (1, S, C, H, W), (S,) -> (1, S)
        x_spt, y_spt, x_qry = x_spt.unsqueeze(0), y_spt.unsqueeze(0), x_qry.unsqueeze(0)
    logits = maml.predict(maml.adapt(x_spt, y_spt), x_qry)  # (T, Q, ways)
    return logits if net.task_batch else logits[0]


class Adapt(_Graph):
    """adapt.onnx: one task's support set -> its adapted state, one tensor per `state_names` entry (no task axis)."""

    def forward(self, x_spt, y_spt):
        return _adapt(self, x_spt, y_spt)


@paddle.jit.not_to_static
def _adapt(net: Adapt, x_spt, y_spt):
    state = net.maml().adapt(x_spt.unsqueeze(0), y_spt.unsqueeze(0))  # task-stacked, T = 1
    return tuple(state[name][0] for name in graph_state_names(net.model))


class Predict(paddle.nn.Layer):
    """predict.onnx: an adapted state (the inputs named by `state_names`) and queries -> logits. No weights of
    its own: everything it needs is in the state."""

    def __init__(self, model: Model):
        super().__init__()
        self.model = model

    def forward(self, state, x_qry):  # state: a list of tensors (Paddle traces no *args)
        return _predict(self, state, x_qry)


@paddle.jit.not_to_static
def _predict(net: Predict, state, x_qry):
    fast = {name: t.unsqueeze(0) for name, t in zip(graph_state_names(net.model), state)}  # T = 1
    return predict(net.model, fast, x_qry.unsqueeze(0))[0]


def graph_state_names(model: Model) -> list[str]:
    """The adapted state's tensor names for `model` (contract.state_names)."""
    norms = [name for layer, name in zip(model.layers, model.names) if isinstance(layer, BatchNorm)]
    return state_names(model.param_shapes(), norms, model.query_norm)


def state_specs(model: Model) -> list:
    """Input specs of predict's state, shapes without the task axis, in `graph_state_names` order. Paddle
    names cannot hold dots: s0, s1, ...; the ONNX graph gets the contract's names (`clean_graph`)."""
    shapes = dict(model.param_shapes())
    for layer, name in zip(model.layers, model.names):
        if isinstance(layer, BatchNorm):
            shapes.update({f"{name}.mean": (layer.channels,), f"{name}.var": (layer.channels,)})
    return [paddle.static.InputSpec(list(shapes[n]), "float32", f"s{i}") for i, n in enumerate(graph_state_names(model))]


def trace(net: paddle.nn.Layer, specs: list, prefix: Path) -> None:
    """Write `prefix`.json (PIR program) and `prefix`.pdiparams of `net` called on inputs like `specs`."""
    net.eval()  # docs/design.md#call-the-traced-layer-in-eval-mode
    try:
        static = paddle.jit.to_static(net, input_spec=specs, full_graph=True)
        with warnings.catch_warnings():  # predict has no weights, and jit.save warns "no variable in your model"
            warnings.filterwarnings("ignore", message="no variable in your model")
            paddle.jit.save(static, str(prefix), input_spec=specs)
    except Exception as e:  # noqa: BLE001 - Paddle raises RuntimeError, ValueError, TypeError...
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ExportError(f"tracing the static graph {prefix.name} failed: {type(e).__name__}: {reason}") from e


@dataclass
class GraphSpec:
    """One graph of an export: what traces it and how its ONNX inputs, outputs and dims are named."""

    name: str  # file stem: model, adapt, predict
    net: paddle.nn.Layer
    specs: list  # Paddle input specs
    inputs: list  # ONNX input names (contract)
    outputs: list  # ONNX output names (contract)
    dims: dict  # ONNX name -> {axis: dim name or fixed size}
    doc: str


def graph_specs(model: Model, params: dict, config, steps: int, inner_lr: float, task_batch: int,
                every_step: bool = False) -> list[GraphSpec]:
    """The graphs an export writes: model (fused), and, for one task per call, adapt and predict; with
    `every_step`, adaptation runs all its steps (no `If`), as a task-batched graph always does."""
    lead = [task_batch] if task_batch else []  # T is static; None: S or Q, dynamic
    img = [None, config.channels, config.image_size, config.image_size]
    k = 1 if task_batch else 0  # S and Q follow the task axis
    fixed = {0: task_batch} if task_batch else {}
    fused = GraphSpec(
        "model", AdaptAndPredict(model, params, steps, inner_lr, task_batch, every_step),
        [paddle.static.InputSpec(lead + img, "float32", SUPPORT_IMAGES),
         paddle.static.InputSpec(lead + [None], "int64", SUPPORT_LABELS),
         paddle.static.InputSpec(lead + img, "float32", QUERY_IMAGES)],
        list(FUSED_INPUTS), [LOGITS],
        {SUPPORT_IMAGES: {**fixed, k: "S"}, SUPPORT_LABELS: {**fixed, k: "S"}, QUERY_IMAGES: {**fixed, k: "Q"},
         LOGITS: {**fixed, k: "Q"}},
        "MAML adaptation: SGD on (x_spt, y_spt), then logits of x_qry under the fast weights")
    if task_batch:
        return [fused]
    names = graph_state_names(model)
    adapt = GraphSpec(
        "adapt", Adapt(model, params, steps, inner_lr, every_step=every_step),
        fused.specs[:2], list(ADAPT_INPUTS), names,
        # the state's shapes are static; the prototype head's would read as dynamic in the converted graph
        {SUPPORT_IMAGES: {0: "S"}, SUPPORT_LABELS: {0: "S"},
         **{spec_name: dict(enumerate(spec.shape)) for spec_name, spec in zip(names, state_specs(model))}},
        "MAML adaptation, first half: SGD on (x_spt, y_spt) -> the task's state (fast weights"
        + (", support statistics)" if model.query_norm == "support" else ")"))
    predict = GraphSpec(
        "predict", Predict(model), [state_specs(model), paddle.static.InputSpec(img, "float32", QUERY_IMAGES)],
        names + [QUERY_IMAGES], [LOGITS], {QUERY_IMAGES: {0: "Q"}, LOGITS: {0: "Q"}},
        "MAML adaptation, second half: a task's state (adapt.onnx's outputs, by name) and x_qry -> logits")
    return [fused, adapt, predict]


@contextlib.contextmanager
def staging(out: Path):
    """A fresh folder the export is written into: beside `out` when `out` does not exist yet (renamed to it at the
    end), else inside it (its files then replace same-named ones of `out`, nothing else there is touched). If the
    block raises, the folder goes, and so do the parent folders made for it: a failed export leaves nothing."""
    out = out.absolute()
    existed = out.is_dir()
    made, parent = [], out if existed else out.parent
    while not parent.exists():  # --out a/b/c with only a/: b is made now, and removed again on a failure
        made.append(parent)
        parent = parent.parent
    try:
        (out if existed else out.parent).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out if existed else out.parent))
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the directory ({e.strerror or e})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become --out's mode
        yield work
        if existed:
            for f in sorted(work.iterdir()):
                os.replace(f, out / f.name)
            work.rmdir()
        else:
            os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in made:  # innermost first; one the user filled meanwhile stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise


# ---------------------------------------------------------------------------------------------
# all stages (2 and 3 are in onnx_convert.py)
# ---------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    out: Path
    files: dict  # what -> path
    timings: dict = field(default_factory=dict)  # stage -> seconds
    parity: dict = field(default_factory=dict)  # comparison -> figures (see `parity`)
    ops: dict = field(default_factory=dict)  # ONNX op type -> count, most frequent first


class _Stages:
    """`with stages("tracing"):` prints "[1/5] tracing ... done (2.1 s)" (or "failed") and times it."""

    def __init__(self, echo, total: int, timings: dict):
        self.echo, self.total, self.timings, self.done = echo, total, timings, 0

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.done += 1
        self.echo(f"[{self.done}/{self.total}] {what} ... ", end="", flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.echo("failed")
            raise
        self.timings[what] = round(time.perf_counter() - start, 3)
        self.echo(f"done ({self.timings[what]:.1f} s)")


def _silent(*args, **kwargs):
    pass


def export_model(checkpoint: str | os.PathLike | None = None, out: str | os.PathLike = "exported", steps: int = 5,
                 inner_lr: float | None = None, opset: int = 17, tasks: int = 8,
                 data: str | os.PathLike | None = None, task_batch: int | None = None, echo=_silent,
                 head_init: str | None = None, query_norm: str | None = None,
                 support_shift: int | None = None, every_step: bool = False) -> ExportReport:
    """Trace, check, convert and validate; writes model.json, model.pdiparams, model.onnx, export.json
    into `out`, all at once when complete (`staging`): a failure leaves no partial folder, and --data is read
    before the work. `task_batch` T: a graph for T tasks per call (None or 0: the single-task graph); parity
    then runs on `tasks` rounded up to a multiple of T. `head_init`, if given, replaces the checkpoint's
    ("meta" or "prototypes", see `as_deployed`), as do `query_norm` and `support_shift`. `every_step`: the
    single-task graphs run all `steps` instead of stopping at a fixed point of the SGD (no `If`; the task-batched
    graph always does; metadata `every_step`). `echo` is print-like (gets `end=` and `flush=`):
    one progress line per stage and one ✓/✗ line per parity comparison. Raises ExportError (after
    writing export.json) on a parity failure."""
    if steps < 1:  # with 0 steps the support inputs would be unused, and jit.save refuses that
        raise ExportError(f"--steps must be at least 1, got {steps}")
    if steps > MAX_STEPS:  # each step is traced: see contract.MAX_STEPS
        raise ExportError(f"--steps must be at most {MAX_STEPS} (every step is unrolled into the graph), got {steps}")
    if not 13 <= opset <= 21:  # paddle2onnx needs 13 for this graph; 13, 17, 19 and 21 were tested
        raise ExportError(f"--opset must be between 13 and 21, got {opset}")
    if tasks < 1:
        raise ExportError(f"--tasks must be at least 1, got {tasks}")
    task_batch = task_batch or 0
    if task_batch < 0:
        raise ExportError(f"--task-batch must be at least 1, got {task_batch}")
    tasks = -(-tasks // task_batch) * task_batch if task_batch else tasks  # whole calls of T tasks
    ckpt_path = resolve_checkpoint(checkpoint) if checkpoint is not None else default_checkpoint()
    try:
        # a run folder exports as validated
        ckpt = as_deployed(load_checkpoint(ckpt_path), head_init=head_init, query_norm=query_norm,
                           support_shift=support_shift)
    except CheckpointError as e:
        raise CheckpointError(f"--checkpoint: {e}") from None
    config, params = ckpt.config, ckpt.params
    if config.learn_inner_lr and inner_lr is not None:
        raise ExportError(f"--checkpoint {ckpt_path} learned its step sizes (--learn-inner-lr): leave out --inner-lr")
    if config.learn_inner_lr and steps > config.inner_steps:
        raise ExportError(f"--checkpoint {ckpt_path} learned step sizes for {config.inner_steps} steps: pass --steps "
                          f"{config.inner_steps} or fewer")
    inner_lr = config.inner_lr if inner_lr is None else float(inner_lr)
    if not inner_lr > 0:
        raise ExportError(f"--inner-lr must be positive, got {inner_lr}")
    model = Model.from_specs(config.layers)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    recorded = ckpt.state.get("data")  # a run's (or its bundle's) image folder, where it is still there
    if data is None and trained_on_folders(config) and recorded and os.path.isdir(recorded):
        data = recorded
    # every input is checked before the minutes of work: --data (or $OMNIGLOT_DIR) is read now, not at stage 5
    task_list, source = parity_tasks(config, tasks, data)
    every_step = bool(every_step or task_batch)
    graphs = graph_specs(model, params, config, steps, inner_lr, task_batch, every_step)
    files = {}
    for g in graphs:
        files.update({f"{g.name}.onnx": str(out / f"{g.name}.onnx"), f"{g.name}.json": str(out / f"{g.name}.json"),
                      f"{g.name}.pdiparams": str(out / f"{g.name}.pdiparams")})
    report = ExportReport(out, {**files, "report": str(out / "export.json")})
    meta = metadata(config, steps, inner_lr, params, opset, task_batch, every_step, ckpt.state.get("calibration"))
    which = "1 graph" if task_batch else "3 graphs (model, adapt, predict)"

    stage = _Stages(echo, 6, report.timings)
    with staging(out) as work:  # written beside (or in) --out, moved into it once complete
        with stage(f"tracing {which}"):
            for g in graphs:
                trace(g.net, g.specs, work / g.name)
        report.files = {k: v for k, v in report.files.items() if k == "report" or Path(v).suffix == ".onnx"
                        or (work / Path(v).name).exists()}  # predict has no weights: no predict.pdiparams
        with stage("checking ops against paddle2onnx"):
            programs = {g.name: inspect_program(work / g.name) for g in graphs}
            for program in programs.values():
                check_ops(program.ops)
        with stage(f"converting to ONNX (opset {opset})"):
            for g in graphs:
                convert(work / g.name, work / f"{g.name}.onnx", opset)
        with stage("cleaning graphs, writing metadata"):
            ops = {g.name: finish_onnx(work / f"{g.name}.onnx", {**meta, "graph": g.name}, g.inputs, g.outputs,
                                       g.dims, g.doc) for g in graphs}
            report.ops = dict(ops["model"].most_common())
        with stage("parity eager / static / onnxruntime"):
            report.parity = parity(work / "model.onnx", work / "model", model, params, steps, inner_lr, task_list,
                                   task_batch)
        with stage("split graphs against the fused one"):
            if not task_batch:
                report.parity.update(split_parity(work / MODEL_FILE, work / ADAPT_FILE, work / PREDICT_FILE,
                                                  task_list, independent=model.query_norm == "support"))
        for name, r in report.parity.items():
            echo(parity_line(name, r))
        if task_batch:
            echo("  - adapt.onnx / predict.onnx: not written for a --task-batch export (one task per call only)")
        elif model.query_norm != "support":
            echo("  - each query alone vs in its batch: not checked: --query-norm transductive normalises the "
                 "queries together, so a query's logits depend on its batch-mates")

        failed = [f"{k} differ by more than {r['rtol']:.0e} relative on task {', '.join(map(str, r['failed_tasks']))} "
                  f"(up to {r['max_rel']:.1e})" + (f", and the export is not within {RTOL:.0e} of float64 Paddle "
                                                   "either" if r["rtol"] == RTOL else "")
                  for k, r in report.parity.items() if not r["ok"]]
        import onnxruntime

        doc = {"config": config.to_dict(), "checkpoint": str(ckpt_path), "iteration": ckpt.iteration,
               "checkpoint_sha256": hashlib.sha256(ckpt_path.read_bytes()).hexdigest(),
               "steps": steps, "every_step": every_step, "inner_lr": inner_lr, "opset": opset,
               "task_batch": task_batch, "metadata": meta,
               "versions": {"maml_export": __version__, "paddle": paddle.__version__,
                            "paddle2onnx": paddle2onnx.__version__, "onnx": onnx.__version__,
                            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                            "python": sys.version.split()[0]},
               "timings_s": report.timings,
               "parity": {"tasks": tasks, "source": source, "rtol": RTOL, "split_rtol": SPLIT_RTOL,
                          "passed": not failed, "results": report.parity},
               "paddle_ops": dict(programs["model"].ops.most_common()),
               "onnx_ops": {k: dict(v.most_common()) for k, v in ops.items()}, "files": report.files}
        (work / "export.json").write_text(json.dumps(doc, indent=1))
    # a parity failure is a complete export, kept for its figures (export.json says "passed": false)
    if failed:
        raise ExportError(f"the export in {out} does not match eager Paddle: {'; '.join(failed)}. The SGD steps "
                          "amplify float32 rounding on untrained or diverging weights (then try fewer --steps or a "
                          "smaller --inner-lr); figures per task in export.json")
    return report
