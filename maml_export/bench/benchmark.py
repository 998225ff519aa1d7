"""Adapt-then-predict latency of an exported MAML graph beside its peers, and the machine's limit.

A call is one task in (support images and labels, query images: numpy) and its query logits out (numpy),
all K SGD steps and tensor conversions included. Same weights, same inputs, one process, for each
runtime of `runtimes.RUNTIMES` (onnxruntime, paddle-eager, paddlerec-loop, paddle-inference,
pytorch-eager).

With `task_batch` T (maml-bench --task-batch T), two more onnxruntime rows per config time throughput on
the same T tasks: `onnxruntime-batch`, one call of the graph exported with --task-batch T (the same
weights), and `onnxruntime-loop`, T calls of the single-task graph; their ms are per call (T tasks),
their tasks/s per task.

Adapt once, predict many: per config, onnxruntime (adapt.onnx, predict.onnx) and the PyTorch peer also
adapt and predict in separate calls (`split_calls`; `runtimes.SPLITS`): rows `NAME adapt` (the support set
-> the task's state), `NAME predict x1` (one query) and `NAME predict xQ` (the config's Q = ways x 15
queries) under that state, with `queries_per_s`. Their `ratio_to_fastest` compares rows of the same work
(`same_work`), their floor is their own FLOPs' (`flops`), and their classes are checked against eager
Paddle's as every row's (one query alone only where queries are normalised with the support's statistics).
A predict row's `tasks_per_s` is its calls per second (it adapts no task; the table shows "-").

The same work: every row says how many SGD steps its call ran (`steps_run`, of `steps`) on how many views of the
support set (`support_views`). By default the single-task graphs stop at a fixed point of the SGD, and eager
Paddle, Paddle Inference and the PyTorch peer stop with them (`runtimes`); with `every_step` (maml-bench
--every-step) the graphs are exported without the stop and every runtime runs every step. The PaddleRec loop
always runs every step. `ratio_to_fastest` compares only rows of the same work (`same_work`): a row that no other
row's work matches gets none.

Each is warmed up, then each call is timed with perf_counter, the runtimes of a config round-robin (a
burst of load on a shared machine then hits them alike, not one row's ratio). Eager Paddle is the
reference: a runtime that predicts other classes (argmax) than eager float32 *and* eager float64 is a
disagreement.

The limit (`machine`): the adaptation's FLOPs over the matrix-multiply rate measured in the same run (numpy
on --threads threads for the CPU, PyTorch for a GPU) is the floor every row is reported as a multiple of.
On the CPU the GEMM is timed round-robin with each config's rows and its p50 rate sets that config's floor,
so that load from other work falls on the floor and the rows in the same rounds (`gemm_round_robin` in
the report; a graph of many small kernels still suffers more from it than one large product).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MamlError
from ..contract import ADAPT_FILE, MODEL_FILE, PREDICT_FILE, RTOL, SUPPORT_IMAGES, SUPPORT_LABELS, compare_logits
from .kit import FORMAT as KIT_FORMAT
from .kit import read_kit
from .machine import GemmWorker, available_cores, count_flops, gpu_gemm_gflops, gpu_name, machine_info
from ..specs import support_views
from .profile import steps_run
from .runtimes import (GPU_ROWS, RUNTIMES, SPLITS, Exported, batched, check_provider, export_checkpoint, host,
                       load_exported, onnxruntime, open_session, paddle_eager, query_norm, reheaded)

QUERY = 15  # query images per class, as the protocol reports accuracy
NEAR_TIE = RTOL  # a class difference where the reference's top-2 logits are closer (relative) is a tie
MIN_RUNS = 3  # timed calls per row even once --max-seconds is spent
@dataclass(frozen=True)
class BenchConfig:
    ways: int
    shots: int
    query: int = QUERY

    @property
    def name(self) -> str:
        return f"{self.ways}w{self.shots}s"


def parse_configs(text: str) -> list[BenchConfig]:
    """'5w1s,20w5s' -> configs (N-way K-shot, 15 queries per class); a bad item is one ConfigError."""
    configs = []
    for item in (s.strip() for s in text.split(",")):
        m = re.fullmatch(r"(\d+)w(\d+)s", item)
        if not m or int(m[1]) < 2 or int(m[2]) < 1:
            raise ConfigError(f"--configs: {item!r} is not a config like 5w1s (N-way K-shot, N >= 2, K >= 1)")
        configs.append(BenchConfig(int(m[1]), int(m[2])))
    return list(dict.fromkeys(configs))


def task_inputs(c: BenchConfig, channels: int, size: int, dataset=None, seed: int = 0) -> tuple:
    """(x_spt, y_spt, x_qry, y_qry) of one task: a test task of `dataset` (`folders.open_dataset`: Omniglot's
    protocol split or an image folder's) when given, else one of made-up characters (`data.synthetic_tasks`, as
    the export's parity check). Labels sorted."""
    from ..data import synthetic_tasks
    if dataset is not None:
        return tuple(a[0] for a in dataset.sampler("test", c.ways, c.shots, c.query, seed).sample(1))
    return tuple(a[0] for a in synthetic_tasks(1, c.ways, c.shots, c.query, seed, size, channels))


# Untimed pause when a round-robin switches runtime: OpenMP pools (Paddle's, PyTorch's) keep their threads
# spinning for up to 200 ms after a call (KMP_BLOCKTIME) and took a core from the next runtime (seen:
# PyTorch eager 5w1s p50 143-160 ms right after Paddle's calls, 100-105 ms with this pause).
SWITCH_PAUSE_S = float(os.environ.get("MAML_BENCH_SWITCH_PAUSE", "0.25"))


def time_calls(call, warmup: int, runs: int, max_seconds: float) -> tuple[dict, object]:
    """p50/p90/p99/mean ms and tasks/s of `runs` calls after `warmup` untimed ones, stopping early once
    `max_seconds` (0: never) are spent; and the last call's output."""
    return time_interleaved({"call": call}, warmup, runs, max_seconds)["call"]


def time_interleaved(calls: dict, warmup: int, runs: int, max_seconds: float, pause: float = SWITCH_PAUSE_S) -> dict:
    """`time_calls` for several runtimes at once, round-robin: each round calls every runtime still
    running once, so a burst of load from other work on a shared machine hits all of them alike.
    (Timed one after another, one burst decided a ratio: the same graph measured 64 ms and 102 ms p50
    in two runs an hour apart, its peers unchanged.) A runtime stops after `runs` calls or, past
    MIN_RUNS, once its own calls have taken `max_seconds` (0: never). Switching runtimes waits `pause`
    seconds, untimed. name -> (stats, last output)."""
    outs = {name: [call() for _ in range(warmup)][-1:] for name, call in calls.items()}
    times = {name: [] for name in calls}  # ms

    def running(name):
        n = len(times[name])
        return n < runs and not (max_seconds and n >= MIN_RUNS and sum(times[name]) > max_seconds * 1e3)

    last = None
    while any(running(name) for name in calls):
        for name in [n for n in calls if running(n)]:
            if last not in (None, name):
                time.sleep(pause)  # untimed: the previous runtime's worker threads stop spinning
            last = name
            began = time.perf_counter()
            outs[name] = [calls[name]()]
            times[name].append((time.perf_counter() - began) * 1e3)
    result = {}
    for name, ms in times.items():
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        result[name] = ({"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(np.mean(ms)),
                         "min_ms": float(np.min(ms)), "tasks_per_s": float(1e3 / np.mean(ms)), "runs": len(ms)}, outs[name][0])
    return result


def agreement(logits: np.ndarray, ref: np.ndarray) -> dict:
    """`contract.compare_logits` as a row reports it: max relative logit difference, predicted-class agreement,
    and the class differences that are not near-ties of the reference (within NEAR_TIE of its top-2 margin)."""
    c = compare_logits(logits, ref, NEAR_TIE)
    return {"max_rel_vs_eager": c["max_rel"], "same_class": c["agree"], "queries": c["total"],
            "disagreements": c["clear_disagreements"]}


def agreement_per_task(logits: np.ndarray, ref: np.ndarray) -> dict:
    """`agreement` of each task's [Q, ways] logits in [T, Q, ways], combined: the largest relative
    difference, the sums of the counts."""
    each = [agreement(a, b) for a, b in zip(logits, ref)]
    return {"max_rel_vs_eager": max(e["max_rel_vs_eager"] for e in each),
            **{k: sum(e[k] for e in each) for k in ("same_class", "queries", "disagreements")}}


def test_data(data, models: dict, configs: list):
    """The dataset in `data` (--data) whose test tasks the rows run on, read as the models were trained
    (`folders.open_dataset`: Omniglot's protocol, or the image folders of a folder-trained model); None without."""
    if not data:
        return None
    from ..folders import open_dataset
    return open_dataset(data, next(iter(models.values())).config, need=max(c.shots + c.query for c in configs))[0]


def meta_test_accuracy(exp: Exported, c: BenchConfig, provider: str, threads: int, dataset, tasks: int) -> dict:
    """Query accuracy ± 95% interval of the exported graph and of eager adaptation on the same `tasks` test
    tasks of `dataset` (the protocol's test stream, `protocol.TEST_SEED`)."""
    from ..protocol import TEST_SEED, mean_ci95
    sampler = dataset.sampler("test", c.ways, c.shots, c.query, TEST_SEED)
    adapter, eager = open_session(exp, provider, threads), paddle_eager(exp)
    acc, same = {"onnxruntime": [], "paddle-eager": []}, 0
    for _ in range(tasks):
        xs, ys, xq, yq = (a[0] for a in sampler.sample(1))
        a, b = adapter.predict(xs, ys, xq).argmax(-1), eager(xs, ys, xq)().argmax(-1)
        acc["onnxruntime"].append((a == yq).mean())
        acc["paddle-eager"].append((b == yq).mean())
        same += int((a == b).sum())
    return {"config": c.name, "tasks": tasks, "weights": exp.source, "same_class": same, "queries": tasks * len(yq),
            **{k: dict(zip(("accuracy", "ci95"), mean_ci95(v))) for k, v in acc.items()}}


def model_path(model: str | Path | None) -> Path | None:
    """--model as the model.onnx it names (a folder means its model.onnx); one ConfigError if it is missing."""
    path = model and (Path(model) / "model.onnx" if Path(model).is_dir() else Path(model))
    if path and not path.is_file():
        raise ConfigError(f"--model {path} does not exist (write one with `maml-export --out DIR`, pass DIR/model.onnx)")
    return path


def prepare_models(model: Path | None, configs: list, steps: int | None, workdir: Path, data, echo,
                   every_step: bool = False) -> dict:
    """ways -> Exported: --model (or the bundled weights, exported now, without the fixed-point stop under
    `every_step`), and a graph for every other ways, stopping as the first does."""
    from ..checkpoint import default_checkpoint
    if model:
        base = load_exported(model)
        if steps is not None and steps != base.steps:
            raise ConfigError(f"--steps {steps}: {model} was exported with {base.steps} steps (re-export it with "
                              f"maml-export --steps {steps}, or leave --steps out)")
        if every_step and not base.every_step:
            raise ConfigError(f"--every-step: {model} stops at a fixed point of its SGD (re-export it with "
                              "maml-export --every-step, or leave --every-step out)")
    else:
        if not default_checkpoint().is_file():
            raise ConfigError(f"the bundled weights {default_checkpoint()} are missing: pass --model DIR/model.onnx")
        echo(f"exporting the bundled {default_checkpoint().name} with {steps or 5} steps"
             + (", every step" if every_step else "") + " ...")
        base = export_checkpoint(default_checkpoint(), workdir / "base", steps or 5, None, data,
                                 f"bundled {default_checkpoint().name}", every_step=every_step)
    models = {base.config.ways: base}
    for ways in sorted({c.ways for c in configs} - set(models)):
        echo(f"exporting a {ways}-way graph of the same architecture ...")
        models[ways] = reheaded(base, ways, workdir, data)
    return models


# The agreement fields of a row whose logits have no reference to be compared with (`split_calls`)
UNCHECKED = {"max_rel_vs_eager": None, "same_class": 0, "queries": 0, "disagreements": 0}


def _why(e: Exception) -> str:
    """Why a runtime cannot run, for its `skipped` entry: the exception in one line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def graph_steps(exp: Exported, xs, ys) -> int:
    """How many of its steps onnxruntime's single-task graphs run on this support set: all of them under
    `every_step`, else up to the fixed point of the SGD they stop at (docs/design.md#adaptation-stops-at-a-fixed-point),
    counted in a run of adapt.onnx (`profile.steps_run`)."""
    adapt = exp.onnx.with_name(ADAPT_FILE)
    if exp.every_step or not adapt.is_file():
        return exp.steps
    ran = steps_run(adapt, {SUPPORT_IMAGES: xs, SUPPORT_LABELS: ys.astype("int64")}, exp.config.layers)
    return exp.steps if ran is None else min(ran, exp.steps)


def ran_steps(call, graph: int) -> int:
    """The steps a runtime's last call ran: its own count where it keeps one (`call.steps_run`), else the
    graph's (`graph_steps`: the runtimes that compute the graph's function stop where it does)."""
    return call.steps_run() if hasattr(call, "steps_run") else graph


def stop_detail(exp: Exported, ran: int) -> str:
    """A row's detail where its adaptation stopped before its last step."""
    return f"stops at a fixed point: {ran} of {exp.steps} steps ran" if ran < exp.steps else ""


def run_flops(exp: Exported, support: int, query: int, ran: int) -> int:
    """FLOPs of an adaptation that ran `ran` of its steps (one more forward of the support set found the fixed
    point), then `query` queries' forward; all steps: `count_flops`."""
    layers, size = exp.config.layers, exp.config.image_size
    # the forward that found the fixed point ran on every view of the support set (specs.support_views)
    found = count_flops(layers, 0, support * support_views(layers), 0, size) if ran < exp.steps else 0
    return count_flops(layers, support, query, ran, size) + found


def split_calls(name: str, split: tuple, exp: Exported, xs, ys, xq, graph: int | None = None) -> dict:
    """The rows of one runtime's adaptation in two calls (`runtimes.SPLITS`): `NAME adapt` (the support set ->
    the task's state), `NAME predict x1` (one query) and `NAME predict xQ` (the task's Q queries), both
    predicting under the state of a first, untimed adapt call. Returns row name -> (call, the row's fields,
    check): `check(output)` gives the logits to compare with eager Paddle's and which rows of eager Paddle's
    they are, or None where nothing compares: under transductive query normalisation one query alone is
    normalised with its own statistics, another function than the batch's that eager Paddle computed. `graph`:
    the steps the single-task graphs run on this support set (`graph_steps`; default: every step)."""
    bind_adapt, bind_predict = split
    layers, size, S, Q = exp.config.layers, exp.config.image_size, len(xs), len(xq)
    adapt = bind_adapt(xs, ys)
    state = adapt()
    ran = ran_steps(adapt, exp.steps if graph is None else graph)
    stopped, views = stop_detail(exp, ran), support_views(layers)
    no_steps = {"steps_run": None, "support_views": None}  # a predict call runs no SGD step
    one, every = bind_predict(state, xq[:1]), bind_predict(state, xq)
    alone = query_norm(exp.config) == "support"  # a query's logits do not depend on its batch-mates
    return {
        # the adapt row's state is checked by the classes it gives the task's queries (one untimed predict)
        f"{name} adapt": (adapt, {"stage": "adapt", "flops": run_flops(exp, S, 0, ran), "steps_run": ran,
                                  "support_views": views, **({"detail": stopped} if stopped else {})},
                          lambda out: (host(bind_predict(out, xq)()), slice(None))),
        f"{name} predict x1": (one, {"stage": "predict", "queries_per_call": 1, **no_steps,
                                     "flops": count_flops(layers, 0, 1, exp.steps, size)},
                               lambda out: (host(out), slice(0, 1)) if alone else None),
        f"{name} predict xQ": (every, {"stage": "predict", "queries_per_call": Q, "detail": f"{Q} queries", **no_steps,
                                       "flops": count_flops(layers, 0, Q, exp.steps, size)},
                               lambda out: (host(out), slice(None))),
    }


def bench_config(c: BenchConfig, exp: Exported, binders: dict, report: dict, dataset, warmup, runs, max_seconds,
                 task: dict | None = None):
    """Time each runtime on one task of config `c`, adapting and predicting in one call, and (`split_calls`)
    onnxruntime and the PyTorch peer adapting and predicting in separate calls; add their rows (or why a
    runtime cannot run) to `report`. With `task` (from a kit, maml_export.bench.kit): its inputs and eager Paddle's
    logits; no Paddle runtime runs."""
    provider, threads = report["settings"]["provider"], report["settings"]["threads"]
    if task is None:
        xs, ys, xq, _ = task_inputs(c, exp.config.channels, exp.config.image_size, dataset)
        flops = count_flops(exp.config.layers, len(xs), len(xq), exp.steps, exp.config.image_size)
    else:
        xs, ys, xq, flops = task["x_spt"], task["y_spt"], task["x_qry"], task["flops"]
    report["models"][c.name] = {"weights": exp.source, "flops": flops, "steps": exp.steps,
                                "support_views": support_views(exp.config.layers)}
    graph = graph_steps(exp, xs, ys)  # onnxruntime's single-task graphs may stop at a fixed point
    if graph < exp.steps:
        report["models"][c.name]["onnxruntime_steps_run"] = graph
    ref = {} if task is None else {"paddle-eager": task["float32"]}
    fused = lambda out: (host(out), slice(None))  # noqa: E731 - a row's logits of every query, in order
    calls = {}  # row name -> (call, the row's fields, check), as split_calls
    for name, runtime in RUNTIMES.items():
        # Paddle here computes on the CPU only; from a kit there is no Paddle at all
        timed = name in GPU_ROWS or (provider == "cpu" and task is None)
        if not timed and (name != "paddle-eager" or task is not None):
            continue
        try:  # bind and call once: a runtime that cannot run says why in its row, before any timing
            bind = binders[name, c.ways] = binders.get((name, c.ways)) or runtime(exp, provider, threads)
            call = bind(xs, ys, xq)
            out = call()
        except Exception as e:  # noqa: BLE001 - Paddle Inference may fail in many ways: say why in its row
            optional = name == "paddle-inference" or (name == "pytorch-eager" and isinstance(e, ImportError))
            if not optional or isinstance(e, MamlError):
                raise
            report["skipped"].append({"runtime": name, "config": c.name, "reason": _why(e)})
            continue
        if name == "paddle-eager":
            ref[name] = host(out)
        if timed:
            # PaddleRec's loop normalises a task's queries together (its BatchNorm2D in training mode): under
            # query_norm "support" that is another function than the export's, so its classes are not compared
            other_function = name == "paddlerec-loop" and query_norm(exp.config) == "support"
            # Paddle Inference runs the same traced program, its `cond`s and its written-out softmax, and eager
            # Paddle the same exact softmax, so they stop where onnxruntime does; the PyTorch peer and the PaddleRec
            # loop count their own steps (docs/design.md#adaptation-stops-at-a-fixed-point)
            ran = ran_steps(call, graph)
            detail = "; ".join(d for d in (stop_detail(exp, ran), other_function and "queries normalised together, "
                                           "as PaddleRec does: not compared") if d)
            fields = {"stage": "adapt+predict", "steps_run": ran, "support_views": support_views(exp.config.layers),
                      "flops": run_flops(exp, len(xs), len(xq), ran), **({"detail": detail} if detail else {})}
            calls[name] = (call, fields, (lambda out: None) if other_function else fused)
    for name, runtime in SPLITS.items():
        try:
            split = binders[name, "split", c.ways] = binders.get((name, "split", c.ways)) or runtime(exp, provider, threads)
            calls.update(split_calls(name, split, exp, xs, ys, xq, graph))
        except (ImportError, ValueError) as e:  # no PyTorch; an export without adapt.onnx and predict.onnx
            if isinstance(e, MamlError):
                raise
            report["skipped"].append({"runtime": f"{name} adapt/predict", "config": c.name, "reason": _why(e)})
    gemm = binders.get("gemm")  # CPU: the floor's GEMM, timed round-robin with the rows (machine.GemmWorker)
    timed = time_interleaved({**{name: call for name, (call, _, _) in calls.items()}, **({"gemm": gemm} if gemm else {})},
                             warmup, runs, max_seconds)
    rate = report["gemm_gflops"]
    if gemm:
        stats, _ = timed.pop("gemm")
        rate = gemm.flops / stats["p50_ms"] / 1e6
        report["gemm_round_robin"][c.name] = {"p50_gflops": rate, "best_gflops": gemm.flops / stats["min_ms"] / 1e6,
                                              "runs": stats["runs"]}
    report["flop_floor_ms"][c.name] = flops / rate / 1e6 if rate else None
    compared = {}  # row name -> (logits, eager Paddle's rows they are)
    for name, (stats, out) in timed.items():
        call, fields, check = calls[name]
        runtime = name.split()[0]  # a split row's name starts with its runtime's
        detail = ", ".join(d for d in (fields.get("detail"), getattr(call, "detail", "")) if d)  # what, then how
        row = {"runtime": name, "provider": provider if runtime in GPU_ROWS else "cpu", "config": c.name,
               "steps": exp.steps, **stats, **fields, "detail": detail}
        if "queries_per_call" in fields:
            row["queries_per_s"] = fields["queries_per_call"] * 1e3 / row["mean_ms"]
        compared[name] = check(out)
        if compared[name] is None:
            row.update(UNCHECKED)
        else:
            logits, rows = compared[name]
            row.update(agreement(logits, ref["paddle-eager"][rows]))
        report["results"].append(row)
    rows = [r for r in report["results"] if r["config"] == c.name and r["disagreements"]]
    if rows:  # did eager float32 round a max-pool near-tie the other way? float64 decides, as in the export
        f64 = paddle_eager(exp, dtype="float64")(xs, ys, xq)() if task is None else task["float64"]
        for r in rows:
            logits, which = compared[r["runtime"]]
            r["settled_by_float64"] = agreement(logits, f64[which])["disagreements"] == 0


def _eager_logits(exp: Exported, tasks: list, dtype: str) -> np.ndarray:
    """Eager Paddle's logits [T, Q, ways] for (x_spt, y_spt, x_qry) `tasks`, one task at a time."""
    eager = paddle_eager(exp, dtype=dtype)
    return np.stack([eager(*t)() for t in tasks])


def batch_tasks(c: BenchConfig, exp: Exported, task_batch: int, dataset, float64: bool = True) -> dict:
    """T = `task_batch` tasks of config `c` (seeds 0..T-1) stacked: x_spt [T, S, ...], y_spt [T, S], x_qry
    [T, Q, ...], and eager Paddle's logits [T, Q, ways] in float32 (and float64)."""
    tasks = [task_inputs(c, exp.config.channels, exp.config.image_size, dataset, seed=i)[:3] for i in range(task_batch)]
    out = dict(zip(("x_spt", "y_spt", "x_qry"), map(np.stack, zip(*tasks))))
    for dtype in ("float32", "float64")[:1 + float64]:
        out[dtype] = _eager_logits(exp, tasks, dtype)
    return out


def bench_task_batch(c: BenchConfig, exp: Exported, tasks: dict, binders: dict, report: dict, warmup, runs,
                     max_seconds):
    """Throughput on the T tasks of `tasks` (`batch_tasks`' layout, with the batched graph's Exported under
    "graph") of config `c`: one call of the batched graph against T calls of the single-task graph; adds rows
    onnxruntime-batch and onnxruntime-loop to `report`. On a GPU both rows copy their tasks in and the logits
    out on every call, as a server would (a CUDA graph replays on fixed device buffers: `feed` refills them)."""
    provider, threads = report["settings"]["provider"], report["settings"]["threads"]
    T = len(tasks["x_spt"])
    each = [(tasks["x_spt"][i], tasks["y_spt"][i], tasks["x_qry"][i]) for i in range(T)]
    stacked = (tasks["x_spt"], tasks["y_spt"], tasks["x_qry"])
    batch_call = onnxruntime(tasks["graph"], provider, threads)(*stacked)
    if provider == "cpu":
        singles = [binders["onnxruntime", c.ways](*t) for t in each]
        calls = {"onnxruntime-batch": (batch_call, f"{T} tasks in one call"),
                 "onnxruntime-loop": (lambda: np.stack([np.asarray(call()) for call in singles]),
                                      f"{T} single-task calls")}
    else:
        single = binders["onnxruntime", c.ways](*each[0])  # one session: a CUDA graph per bound shape

        def loop():
            outs = []
            for t in each:
                single.feed(*t)
                outs.append(host(single()))
            return np.stack(outs)

        def one_call():
            batch_call.feed(*stacked)
            return host(batch_call())
        copies = "inputs copied in and logits out each call"
        calls = {"onnxruntime-batch": (one_call, f"{T} tasks in one call, {batch_call.detail}, {copies}"),
                 "onnxruntime-loop": (loop, f"{T} single-task calls, {single.detail}, {copies}")}
    # the batched graph runs every step; the single-task graph may stop at a fixed point on some of the tasks: the
    # loop's steps_run is then their mean, another work than the batch's
    loop_steps = [graph_steps(exp, xs, ys) for xs, ys, _ in each]
    steps = {"onnxruntime-batch": exp.steps, "onnxruntime-loop": sum(loop_steps) / T}
    rows = {}
    timed = time_interleaved({name: call for name, (call, _) in calls.items()}, warmup, runs, max_seconds)
    for name, (call, detail) in calls.items():
        stats, out = timed[name]
        out = host(out)
        stats["tasks_per_s"] *= T  # per task: a call adapts T tasks
        if steps[name] < exp.steps:
            detail += f", steps ran per task: {', '.join(map(str, loop_steps))} of {exp.steps}"
        rows[name] = {"runtime": name, "provider": provider, "config": c.name, "steps": exp.steps, **stats,
                      "detail": detail, "stage": "adapt+predict", "task_batch": T, "steps_run": steps[name],
                      "support_views": support_views(exp.config.layers), **agreement_per_task(out, tasks["float32"])}
        if rows[name]["disagreements"]:  # float64 decides, as in bench_config
            f64 = tasks.get("float64")
            if f64 is None:  # not computed up front (batch_tasks(float64=False)): eager Paddle is here
                f64 = _eager_logits(exp, each, "float64")
            rows[name]["settled_by_float64"] = agreement_per_task(out, f64)["disagreements"] == 0
    batch, loop = rows["onnxruntime-batch"], rows["onnxruntime-loop"]
    batch["speedup_vs_loop"] = batch["tasks_per_s"] / loop["tasks_per_s"] if same_work(batch, loop) else None
    report["results"] += rows.values()


def same_work(a: dict, b: dict) -> bool:
    """Whether rows `a` and `b` time the same work, so that their ratio means something: the same call (config,
    stage and queries per call: adapt-and-predict rows against each other, adapt rows against adapt rows, ...)
    and the same SGD steps run on the same support views (a row that stopped at a fixed point did less)."""
    def key(r):
        return r["config"], r["stage"], r.get("queries_per_call"), r["steps_run"], r["support_views"]
    return key(a) == key(b)


def run_benchmark(configs: list[BenchConfig], provider: str = "cpu", model: str | None = None, steps: int | None = None,
                  threads: int | None = None, warmup: int = 1, runs: int = 20, max_seconds: float = 2.0,
                  data: str | None = None, tasks: int = 0, task_batch: int | None = None, kit: str | None = None,
                  echo=print, every_step: bool = False) -> dict:
    """Time every runtime on every config (and, with `task_batch`, onnxruntime's throughput on that many tasks
    per call); returns the report `maml-bench --json` writes. With `kit` (maml_export.bench.kit), the graphs, tasks
    and reference logits come from that folder and Paddle is not needed. `every_step`: every runtime runs every
    SGD step (graphs exported so, or a --model or kit that was); else they stop at the fixed point where the
    graphs do (an every-step --model or kit: every step)."""
    check_provider(provider)  # the cheap checks first: no export, no Paddle import before a usage error
    if tasks and not data:
        raise ConfigError("--tasks (meta-test accuracy) needs data: pass --data DIR (Omniglot, or the image folders the "
                          "--model was trained on) or set OMNIGLOT_DIR")
    if kit and (tasks or model or steps):
        raise ConfigError("--kit: the kit fixes the graphs and tasks; leave out --model, --steps, --tasks")
    path = model_path(model)
    threads = threads or available_cores()
    if not kit:
        from ..process import set_threads
        set_threads(threads)
    kit_models, kit_tasks, kit_batch = read_kit(Path(kit)) if kit else ({}, {}, None)
    if kit and task_batch and task_batch != kit_batch:
        raise ConfigError(f"--task-batch {task_batch}: the kit {kit} holds " + (
            f"{kit_batch} tasks a call" if kit_batch else "no batched graphs") +
            f"; write one with maml-bench --write-kit DIR --task-batch {task_batch}")
    if kit and every_step and not all(m.every_step for m in kit_models.values()):
        raise ConfigError(f"--every-step: the kit {kit} holds graphs that stop at a fixed point of their SGD; write "
                          "one with maml-bench --write-kit DIR --every-step")
    missing = [c.name for c in configs if kit and c.name not in kit_tasks]
    if missing:
        raise ConfigError(f"--configs: the kit {kit} has no {', '.join(missing)} (it has {', '.join(kit_tasks)})")
    inputs = (f"the tasks of kit {kit}" if kit else f"test tasks from {data}" if data
              else "synthetic drawings (no Omniglot)")
    report = {"machine": machine_info(threads), "results": [], "flop_floor_ms": {}, "gemm_gflops": None,
              "gemm_round_robin": {}, "skipped": [],
              "models": {}, "accuracy": [], "settings": {"provider": provider, "threads": threads, "warmup": warmup,
                                                         "runs": runs, "max_seconds": max_seconds, "inputs": inputs,
                                                         "kit": kit,
                                                         "task_batch": task_batch}}
    with tempfile.TemporaryDirectory(prefix="maml-bench-") as tmp, contextlib.ExitStack() as stack:
        models = kit_models or prepare_models(path, configs, steps, Path(tmp), data, echo, every_step)
        report["settings"]["every_step"] = all(m.every_step for m in models.values())
        dataset = None if kit else test_data(data, models, configs)
        binders, batches = {}, {}
        for ways, exp in models.items() if task_batch and not kit else ():
            echo(f"exporting the {ways}-way graph for {task_batch} tasks per call ...")
            batches[ways] = batched(exp, task_batch, Path(tmp), data)
        if provider == "cpu":  # the floor's GEMM is timed round-robin with each config's rows (bench_config)
            report["gemm"] = f"numpy float32 2048^3 GEMM on {threads} OpenBLAS threads"
            binders["gemm"] = stack.enter_context(GemmWorker(threads))
        else:
            echo("measuring the GPU's fp32 GEMM rate (PyTorch 4096^3, TF32 off) ...")
            report["gemm"] = "PyTorch fp32 4096^3 GEMM on the GPU, TF32 off"
            report["gemm_gflops"] = gpu_gemm_gflops()
            report["machine"]["gpu"] = gpu_name()
        for c in configs:
            echo(f"timing {c.name} ...")
            bench_config(c, models[c.ways], binders, report, dataset, warmup, runs, max_seconds, kit_tasks.get(c.name))
            if task_batch:
                batch = kit_tasks[c.name]["batch"] if kit else {
                    **batch_tasks(c, models[c.ways], task_batch, dataset, float64=False), "graph": batches[c.ways]}
                echo(f"timing {c.name}, {task_batch} tasks: one batched call against {task_batch} single calls ...")
                bench_task_batch(c, models[c.ways], batch, binders, report, warmup, runs, max_seconds)
            if tasks:
                echo(f"{c.name}: meta-test accuracy on {tasks} tasks ...")
                report["accuracy"].append(meta_test_accuracy(models[c.ways], c, provider, threads, dataset, tasks))
    per_task = lambda r: r["p50_ms"] / r.get("task_batch", 1)  # noqa: E731 - rows of --task-batch time T tasks a call
    for r in report["results"]:
        same = [x for x in report["results"] if same_work(x, r)]  # r among them; alone: no ratio
        r["ratio_to_fastest"] = per_task(r) / min(map(per_task, same)) if len(same) > 1 else None
        floor, flops = report["flop_floor_ms"][r["config"]], report["models"][r["config"]]["flops"]
        on_floor_device = (r["provider"] == "cpu") == (provider == "cpu") and floor
        # a split row's floor: its own share of the config's FLOPs at the same rate
        r["floor_multiple"] = per_task(r) / (floor * r.get("flops", flops) / flops) if on_floor_device else None
        r["flagged"] = bool(r["disagreements"]) and not r.get("settled_by_float64")
    return report


def write_kit(out: Path, configs: list, model: Path | None, steps: int | None, data: str | None,
              task_batch: int | None = None, echo=print, every_step: bool = False) -> dict:
    """Export the graphs `configs` need into `out` (from `model`, else the bundled weights; `every_step`: without
    the fixed-point stop) and store each config's task (an Omniglot test task with `data`, else made-up
    characters) with eager Paddle's logits; with `task_batch` T, also the graphs for T tasks a call and T tasks
    per config (`batch_*` arrays)."""
    model = model_path(model)
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": KIT_FORMAT, "models": {}, "configs": {}, "task_batch": task_batch}
    with tempfile.TemporaryDirectory(prefix="maml-kit-") as tmp:
        models = prepare_models(model, configs, steps, Path(tmp), data, echo, every_step)
        dataset = test_data(data, models, configs)
        for ways, exp in models.items():  # the graphs and their weights: all a kit's runtimes need
            folder = out / f"{ways}way"  # model.onnx with adapt.onnx and predict.onnx beside it, as exported
            folder.mkdir(exist_ok=True)
            for name in (MODEL_FILE, ADAPT_FILE, PREDICT_FILE):
                if (exp.onnx.parent / name).is_file():  # an older --model export may have no halves
                    shutil.copyfile(exp.onnx.parent / name, folder / name)
            np.savez(out / f"{ways}way-params.npz", **exp.params)
            index["models"][str(ways)] = {"onnx": f"{ways}way/{MODEL_FILE}", "config": exp.config.to_dict(),
                                          "inner_lr": exp.inner_lr, "steps": exp.steps, "source": exp.source,
                                          "every_step": exp.every_step}
            if task_batch:
                echo(f"exporting the {ways}-way graph for {task_batch} tasks per call ...")
                shutil.copyfile(batched(exp, task_batch, Path(tmp), data).onnx, out / f"{ways}way-batch.onnx")
                index["models"][str(ways)]["batch_onnx"] = f"{ways}way-batch.onnx"
    for c in configs:
        exp = models[c.ways]
        echo(f"{c.name}: eager Paddle's reference logits (float32, float64) on {task_batch or 1} task(s) ...")
        tasks = batch_tasks(c, exp, task_batch or 1, dataset)  # task 0 is the single-task rows' task
        arrays = {k: tasks[k][0] for k in ("x_spt", "y_spt", "x_qry", "float32", "float64")}
        if task_batch:
            arrays.update({f"batch_{k}": v for k, v in tasks.items()})
        np.savez_compressed(out / f"{c.name}.npz", **arrays)  # mostly-blank images: ~15x smaller
        xs, xq = arrays["x_spt"], arrays["x_qry"]
        index["configs"][c.name] = {"ways": c.ways, "shots": c.shots, "query": c.query,
                                    "flops": count_flops(exp.config.layers, len(xs), len(xq), exp.steps,
                                                         exp.config.image_size)}
    (out / "kit.json").write_text(json.dumps(index, indent=1))
    return index
