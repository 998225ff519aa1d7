"""The export's validation: eager Paddle, the saved static program and onnxruntime compared on real tasks.

`parity` runs the three on the same tasks and compares their logits pairwise, per task, as
max|a - b| / max|reference| within `RTOL`; a task beyond it is re-checked against eager Paddle in
float64 (`contract.compare_settled`). `parity_line` prints one ✓/✗ line per comparison, Hugging Face optimum style.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import paddle

from .contract import (FUSED_INPUTS, LOGITS, QUERY_IMAGES, RTOL, SPLIT_RTOL, SUPPORT_IMAGES, SUPPORT_LABELS,
                       compare_logits, compare_settled)
from .maml import MAML
from .model import Model, to_tensors


def parity_tasks(config, tasks: int, data: str | os.PathLike | None, seed: int = 0):
    """[(x_spt, y_spt, x_qry)] * tasks and where they came from: test tasks of `data`, the data the model was
    trained on (Omniglot, where $OMNIGLOT_DIR stands in for it, or image folders: `config.query` queries per
    class), else tasks of made-up characters at the model's image shape (`data.synthetic_tasks`)."""
    from .data import synthetic_tasks
    from .folders import open_dataset, trained_on_folders
    omniglot = not trained_on_folders(config)
    data = data or (os.environ.get("OMNIGLOT_DIR") if omniglot else None)
    if data:
        query = 15 if omniglot else config.query
        dataset, _ = open_dataset(data, config, need=config.shots + query)
        t = dataset.sampler("test", config.ways, config.shots, query, seed).sample(tasks)
        source = f"{'Omniglot' if omniglot else 'image-folder'} test tasks from {data}"
    else:
        t = synthetic_tasks(tasks, config.ways, config.shots, 15, seed, config.image_size, config.channels)
        source = "synthetic drawings (no data: pass --data or set OMNIGLOT_DIR)"
    return [(t.x_spt[i], t.y_spt[i], t.x_qry[i]) for i in range(tasks)], source


PAIRS = {"static vs eager": ("static", "eager"), "onnxruntime vs eager": ("onnx", "eager"),
         "onnxruntime vs static": ("onnx", "static")}  # (export side, reference side)


def parity(onnx_path: Path, prefix: Path, model: Model, params: dict, steps: int, inner_lr: float,
           tasks: list, task_batch: int = 0) -> dict:
    """Logits of eager Paddle (MAML.adapt/predict), the saved static program (paddle.jit.load, in eval
    mode: docs/design.md#call-the-traced-layer-in-eval-mode) and onnxruntime, compared pairwise on every task. The tasks go in calls of
    `task_batch` (a multiple of it long; 0: one task per call, no task axis), eager Paddle adapting the
    same T tasks at once; the figures are per task either way.

    A task passes when the export side matches the reference within RTOL. Where it does not, eager
    Paddle in float64 decides: a max-pool window whose two largest values differ by less than float32
    rounding (seen: 0.5143917 vs 0.5143926) sends the gradient to a different pixel in one
    implementation than in the other, and the SGD steps carry that to the logits (seen: eager float32
    5e-1 from float64 on an untrained net, 4e-5 on trained weights, while onnxruntime stayed within
    2e-6). Such a task passes when the export matches float64 within RTOL: it computes Paddle's
    function, rounded differently than Paddle's float32 kernels."""
    def eager(dtype):  # MAML.adapt/predict on task-stacked inputs: (T, Q, ways)
        maml = MAML(model, to_tensors(params, dtype), inner_lr, steps)
        return lambda xs, ys, xq: maml.predict(maml.adapt(xs.astype(dtype), ys), xq.astype(dtype)).numpy()

    eager32, eager64 = eager("float32"), eager("float64")
    static = paddle.jit.load(str(prefix))
    static.eval()
    session = _session(onnx_path)
    per_task, T = {k: [] for k in PAIRS}, task_batch or 1
    if len(tasks) % T:
        raise ValueError(f"parity needs a multiple of {T} tasks, got {len(tasks)}")
    for first in range(0, len(tasks), T):
        arrays = [np.stack(a) for a in zip(*tasks[first:first + T])]  # (T, S, C, H, W), (T, S), (T, Q, C, H, W)
        xs, ys, xq = (paddle.to_tensor(a) for a in arrays)
        feeds = arrays if task_batch else [a[0] for a in arrays]  # the graph's inputs: no task axis for one task
        with paddle.no_grad():
            static_out = static(*(paddle.to_tensor(a) for a in feeds)).numpy()
            onnx_out = session.run([LOGITS], dict(zip(FUSED_INPUTS, feeds)))[0]
            out = {"eager": eager32(xs, ys, xq), "static": static_out if task_batch else static_out[None],
                   "onnx": onnx_out if task_batch else onnx_out[None]}  # every one (T, Q, ways)
            def float64(i):  # float64 decides (see above); computed once per call, only when needed
                if "f64" not in out:
                    out["f64"] = eager64(xs, ys, xq)
                return out["f64"][i]

            for i in range(T):
                for k, (a, b) in PAIRS.items():
                    c = compare_settled(out[a][i], out[b][i], lambda i=i: float64(i))
                    per_task[k].append(dict(c, task=first + i))
    return {k: _summary(cs) for k, cs in per_task.items()}


def split_parity(model_onnx: Path, adapt_onnx: Path, predict_onnx: Path, tasks: list, independent: bool) -> dict:
    """The split graphs against the fused one, in onnxruntime, on every task: adapt.onnx's outputs fed by name
    into predict.onnx give model.onnx's logits; and (`independent`, i.e. query_norm "support") each query
    predicted alone gives its row of the batch's logits. Both within SPLIT_RTOL."""
    sessions = [_session(p) for p in (model_onnx, adapt_onnx, predict_onnx)]
    fused, adapt, predict = sessions
    per_task: dict = {"adapt → predict vs model.onnx": []}
    if independent:
        per_task["each query alone vs in its batch"] = []
    for i, (xs, ys, xq) in enumerate(tasks):
        want = fused.run([LOGITS], {SUPPORT_IMAGES: xs, SUPPORT_LABELS: ys, QUERY_IMAGES: xq})[0]
        state = dict(zip([o.name for o in adapt.get_outputs()], adapt.run(None, {SUPPORT_IMAGES: xs, SUPPORT_LABELS: ys})))
        batch = predict.run([LOGITS], {**state, QUERY_IMAGES: xq})[0]
        per_task["adapt → predict vs model.onnx"].append(dict(compare_logits(batch, want, SPLIT_RTOL), task=i))
        if independent:
            alone = np.concatenate([predict.run([LOGITS], {**state, QUERY_IMAGES: xq[q:q + 1]})[0]
                                    for q in range(len(xq))])
            per_task["each query alone vs in its batch"].append(dict(compare_logits(alone, batch, SPLIT_RTOL), task=i))
    return {k: _summary(cs, SPLIT_RTOL) for k, cs in per_task.items()}


def _session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _summary(cs: list, rtol: float = RTOL) -> dict:
    rels = [c["max_rel"] for c in cs]
    return {"max_rel": max(rels), "median_rel": float(np.median(rels)), "max_abs": max(c["max_abs"] for c in cs),
            "agree": sum(c["agree"] for c in cs), "total": sum(c["total"] for c in cs), "tasks": len(cs),
            "rtol": rtol, "tasks_within_rtol": sum(r <= rtol for r in rels),
            "float64_checks": [{k: c[k] for k in ("task", "max_rel", "max_rel_vs_float64")}
                                   for c in cs if "max_rel_vs_float64" in c],
            "failed_tasks": [c["task"] for c in cs if not c["ok"]], "ok": all(c["ok"] for c in cs)}


def parity_line(name: str, r: dict) -> str:
    """Hugging Face optimum style: '  ✓ onnxruntime vs eager: max rel diff 3.1e-06 ...'."""
    line = (f"  {'✓' if r['ok'] else '✗'} {name}: max rel diff {r['max_rel']:.2e} (median {r['median_rel']:.1e}, "
            f"tolerance {r.get('rtol', RTOL):.0e}), {r['tasks_within_rtol']}/{r['tasks']} tasks within, "
            f"same class {r['agree']}/{r['total']}")
    for s in r["float64_checks"]:
        verdict = "accepted: the reference is the one that drifted" if s["max_rel_vs_float64"] <= RTOL else "rejected"
        line += (f"\n      task {s['task']}: {s['max_rel']:.1e} apart; the export is {s['max_rel_vs_float64']:.1e} "
                 f"from float64 Paddle ({verdict})")
    return line
