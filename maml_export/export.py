"""Export MAML *adaptation* (K SGD steps on a support set, then the query logits) as one graph:

    logits[Q, ways] = predict(adapt(meta_weights, x_spt[S, C, H, W], y_spt[S]), x_qry[Q, C, H, W])

for one task, meta-weights baked in, S and Q dynamic, batch norm on the statistics of the batch at hand.
With `task_batch=T` the graph takes T tasks per call, [T, S, C, H, W], [T, S], [T, Q, C, H, W] ->
[T, Q, ways], adapted at once (one grouped convolution per layer, as in training); T is fixed in the
graph (the task-stacked channel layout needs it statically), S and Q stay dynamic.
`export_model` runs the stages below, each a function, and writes export.json:

  1. trace    `paddle.jit.to_static` + `paddle.jit.save` -> model.json + model.pdiparams (PIR program)
  2. check    every op is one paddle2onnx can convert and none would change the maths (`onnx_convert.py`)
  3. convert  paddle2onnx in a child process; the graph cleaned, named and stamped (`onnx_convert.py`)
  4. parity   eager Paddle vs the static program vs onnxruntime, on Omniglot test tasks or random ones
              (`parity.py`)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import paddle
import paddle2onnx

from . import __version__
from .checkpoint import as_deployed, default_checkpoint, load_checkpoint, resolve_checkpoint
from .errors import CheckpointError, ExportError
from .maml import MAML
from .model import Model
from .onnx_convert import check_ops, convert, finish_onnx, inspect_program, metadata
from .parity import RTOL, parity, parity_line, parity_tasks


# ---------------------------------------------------------------------------------------------
# 1. trace
# ---------------------------------------------------------------------------------------------

class AdaptAndPredict(paddle.nn.Layer):
    """The exported function as a Layer: meta-weights as (frozen) parameters; one task per call, or
    `task_batch` tasks stacked on a leading axis (0: one task, no task axis in the inputs)."""

    def __init__(self, model: Model, params: dict, steps: int, inner_lr: float, task_batch: int = 0):
        super().__init__()
        self.model, self.steps, self.inner_lr, self.task_batch = model, steps, inner_lr, task_batch
        self.names = list(params)
        for i, name in enumerate(self.names):
            p = self.create_parameter(list(params[name].shape), dtype="float32",
                                      default_initializer=paddle.nn.initializer.Assign(params[name]))
            p.stop_gradient = True
            self.add_parameter(f"p{i}", p)  # paddle forbids dots in parameter names

    def forward(self, x_spt, y_spt, x_qry):
        return _adapt_and_predict(self, x_spt, y_spt, x_qry)


@paddle.jit.not_to_static
def _adapt_and_predict(net: AdaptAndPredict, x_spt, y_spt, x_qry):
    # Traced as plain Python, not AST-converted: dy2static would turn `x.shape` into tensors and the
    # layers' `if shape > 0` tests on dynamic dims into cond ops with mismatched branch dtypes.
    # Plain tracing gives -1 for dynamic dims, which layers.py is written for.
    params = {name: getattr(net, f"p{i}") for i, name in enumerate(net.names)}
    maml = MAML(net.model, params, net.inner_lr, net.steps)
    if not net.task_batch:  # one task: T = 1, (S, C, H, W) -> (1, S, C, H, W), (S,) -> (1, S)
        x_spt, y_spt, x_qry = x_spt.unsqueeze(0), y_spt.unsqueeze(0), x_qry.unsqueeze(0)
    logits = maml.predict(maml.adapt(x_spt, y_spt), x_qry)  # (T, Q, ways)
    return logits if net.task_batch else logits[0]


def trace(model: Model, params: dict, config, steps: int, inner_lr: float, prefix: Path, task_batch: int = 0) -> None:
    """Write `prefix`.json (PIR program) and `prefix`.pdiparams; `task_batch` tasks per call (0: one,
    no task axis)."""
    net = AdaptAndPredict(model, params, steps, inner_lr, task_batch)
    net.eval()  # docs/design.md#call-the-traced-layer-in-eval-mode
    lead = [task_batch] if task_batch else []  # T is static; None: S or Q, dynamic
    img = lead + [None, config.channels, config.image_size, config.image_size]
    specs = [paddle.static.InputSpec(img, "float32", "x_spt"), paddle.static.InputSpec(lead + [None], "int64", "y_spt"),
             paddle.static.InputSpec(img, "float32", "x_qry")]
    try:
        static = paddle.jit.to_static(net, input_spec=specs, full_graph=True)
        paddle.jit.save(static, str(prefix), input_spec=specs)
    except Exception as e:  # noqa: BLE001 - Paddle raises RuntimeError, ValueError, TypeError...
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise ExportError(f"tracing the static graph failed: {type(e).__name__}: {reason}") from e


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
                 head_init: str | None = None) -> ExportReport:
    """Trace, check, convert and validate; writes model.json, model.pdiparams, model.onnx, export.json
    into `out`. `task_batch` T: a graph for T tasks per call (None or 0: the single-task graph); parity
    then runs on `tasks` rounded up to a multiple of T. `head_init`, if given, replaces the checkpoint's
    ("meta" or "prototypes", see `as_deployed`). `echo` is print-like (gets `end=` and `flush=`):
    one progress line per stage and one ✓/✗ line per parity comparison. Raises ExportError (after
    writing export.json) on a parity failure."""
    if steps < 1:  # with 0 steps the support inputs would be unused, and jit.save refuses that
        raise ExportError(f"--steps must be at least 1, got {steps}")
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
        ckpt = as_deployed(load_checkpoint(ckpt_path), head_init=head_init)  # a run folder exports as validated
    except CheckpointError as e:
        raise CheckpointError(f"--checkpoint: {e}") from None
    config, params = ckpt.config, ckpt.params
    inner_lr = config.inner_lr if inner_lr is None else float(inner_lr)
    if not inner_lr > 0:
        raise ExportError(f"--inner-lr must be positive, got {inner_lr}")
    model = Model.from_specs(config.layers)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create the directory ({e.strerror})") from None
    prefix, onnx_path = out / "model", out / "model.onnx"
    report = ExportReport(out, {"paddle_program": f"{prefix}.json", "paddle_params": f"{prefix}.pdiparams",
                                "onnx": str(onnx_path), "report": str(out / "export.json")})
    meta = metadata(config, steps, inner_lr, params, opset, task_batch)

    stage = _Stages(echo, 5, report.timings)
    with stage("tracing static graph"):
        trace(model, params, config, steps, inner_lr, prefix, task_batch)
    with stage("checking ops against paddle2onnx"):
        program = inspect_program(prefix)
        check_ops(program.ops)
    with stage(f"converting to ONNX (opset {opset})"):
        convert(prefix, onnx_path, opset)
    with stage("cleaning graph, writing metadata"):
        report.ops = dict(finish_onnx(onnx_path, program, meta).most_common())
    with stage("parity eager / static / onnxruntime"):
        task_list, source = parity_tasks(config, tasks, data)
        report.parity = parity(onnx_path, prefix, model, params, steps, inner_lr, task_list, task_batch)
    for name, r in report.parity.items():
        echo(parity_line(name, r))

    failed = [f"{k} differ by more than {RTOL:.0e} relative on task {', '.join(map(str, r['failed_tasks']))} "
              f"(up to {r['max_rel']:.1e}), and the export is not within {RTOL:.0e} of float64 Paddle either"
              for k, r in report.parity.items() if not r["ok"]]
    import onnxruntime

    doc = {"config": config.to_dict(), "checkpoint": str(ckpt_path), "iteration": ckpt.iteration,
           "checkpoint_sha256": hashlib.sha256(ckpt_path.read_bytes()).hexdigest(),
           "steps": steps, "inner_lr": inner_lr, "opset": opset, "task_batch": task_batch, "metadata": meta,
           "versions": {"maml_export": __version__, "paddle": paddle.__version__,
                        "paddle2onnx": paddle2onnx.__version__, "onnx": onnx.__version__,
                        "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                        "python": sys.version.split()[0]},
           "timings_s": report.timings,
           "parity": {"tasks": tasks, "source": source, "rtol": RTOL, "passed": not failed, "results": report.parity},
           "paddle_ops": dict(program.ops.most_common()), "onnx_ops": report.ops, "files": report.files}
    (out / "export.json").write_text(json.dumps(doc, indent=1))
    if failed:
        raise ExportError(f"the export in {out} does not match eager Paddle: {'; '.join(failed)}. The SGD steps "
                          "amplify float32 rounding on untrained or diverging weights (then try fewer --steps or a "
                          "smaller --inner-lr); figures per task in export.json")
    return report
