"""Where an exported graph spends its time in onnxruntime: a steady-state profile by op type and shape.

onnxruntime's own profiler records every node of every run; the first runs pay for memory-arena
growth and page faults (a full-size `Sub` of the query pass measured 15 ms in the first run, 2 ms
from the fourth on), so `profile` drops `warmup` runs and takes each node's median over the rest.
This is the tool behind the before/after profiles in docs/experiments.md#graph-speed-ups (`python -m bench.profile`).

Example:
    >>> report = profile_graph("exported/model.onnx", threads=2)        # doctest: +SKIP
    >>> report["by_op"][0]                                              # doctest: +SKIP
    {'op': 'Conv', 'ms': 38.2, 'nodes': 44}
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..contract import FUSED_INPUTS


def graph_inputs(session, shots: int, query: int) -> dict:
    """The graph's inputs for one `shots`-shot task with `query` queries per class (made-up characters, as
    `benchmark.task_inputs` draws them without data), its ways read from the metadata; a task-batch graph gets
    T copies."""
    from ..data import synthetic_tasks
    meta = session.get_modelmeta().custom_metadata_map
    task = synthetic_tasks(1, int(meta["ways"]), shots, query, 0, int(meta["image_size"]), int(meta["channels"]))
    x_spt, y_spt, x_qry = task.x_spt[0], task.y_spt[0], task.x_qry[0]
    tasks = int(meta.get("task_batch") or 0)
    feeds = dict(zip(FUSED_INPUTS, (x_spt, y_spt.astype("int64"), x_qry)))
    names = [i.name for i in session.get_inputs()]  # model.onnx: all three; adapt.onnx: the support set
    if not set(names) <= set(feeds):
        raise ValueError(f"{meta.get('graph', 'this graph')}.onnx takes a task's state ({', '.join(names[:3])}, ...): "
                         "profile model.onnx or adapt.onnx")
    return {k: np.stack([feeds[k]] * tasks) if tasks else feeds[k] for k in names}


def profile_graph(model: str | os.PathLike, threads: int = 2, shots: int = 1, query: int = 15, runs: int = 12,
                  warmup: int = 4) -> dict:
    """Run `model` `runs` times under onnxruntime's profiler; per node the median kernel time of the runs
    after `warmup`, summed by op type and by (op type, output shape), largest first, in ms."""
    if runs <= warmup:
        raise ValueError(f"runs ({runs}) must exceed warmup ({warmup})")
    times, kinds = collections.defaultdict(list), {}
    for e in node_events(model, lambda session: graph_inputs(session, shots, query), threads, runs):
        times[e["name"]].append(e["dur"] / 1e3)
        kinds[e["name"]] = (e["args"]["op_name"], str(e["args"].get("output_type_shape", "")))
    median = {name: float(np.median(ms[warmup:])) for name, ms in times.items() if len(ms) > warmup}
    by_op, by_shape = collections.Counter(), collections.Counter()
    nodes_op, nodes_shape = collections.Counter(), collections.Counter()
    for name, ms in median.items():
        op, shape = kinds[name]
        by_op[op] += ms
        nodes_op[op] += 1
        by_shape[op, shape] += ms
        nodes_shape[op, shape] += 1
    return {"model": str(model), "threads": threads, "shots": shots, "query": query, "runs": runs,
            "warmup": warmup, "nodes": len(median), "total_ms": sum(median.values()),
            "by_op": [{"op": op, "ms": ms, "nodes": nodes_op[op]} for op, ms in by_op.most_common()],
            "by_shape": [{"op": op, "shape": shape, "ms": ms, "nodes": nodes_shape[op, shape]}
                         for (op, shape), ms in by_shape.most_common()]}


def node_events(model: str | os.PathLike, feeds, threads: int = 1, runs: int = 1) -> list[dict]:
    """onnxruntime's profiler events of every node kernel it ran (the nodes inside `If` branches included) in
    `runs` calls of `model` (CPU, `threads` threads) on `feeds`: the inputs, or a function of the session that
    gives them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level, options.enable_profiling = threads, 3, True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        inputs = feeds(session) if callable(feeds) else feeds
        for _ in range(runs):
            session.run(None, inputs)
        events = json.loads(Path(session.end_profiling()).read_text())
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def executed_ops(model: str | os.PathLike, feeds: dict) -> collections.Counter:
    """How many kernels of each op type onnxruntime runs in one call of `model` on `feeds`, the nodes inside
    `If` branches included (`node_events`; CPU, one thread)."""
    return collections.Counter(e["args"]["op_name"] for e in node_events(model, feeds))


def steps_run(adapt_model: str | os.PathLike, feeds: dict, layers: list[dict]) -> int | None:
    """How many SGD steps an exported adaptation (adapt.onnx, or model.onnx with its queries) ran on `feeds`: a
    single-task graph stops at a fixed point of its SGD (docs/design.md#adaptation-stops-at-a-fixed-point).
    Each step's backward runs one ConvTranspose per convolution but the first (whose input is the image);
    None for a network with a single convolution."""
    convs = sum(spec["type"] == "Conv2d" for spec in layers)
    return executed_ops(adapt_model, feeds)["ConvTranspose"] // (convs - 1) if convs > 1 else None
