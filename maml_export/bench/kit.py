"""A benchmark kit: `maml-bench` on a machine without Paddle, such as a GPU deployment box. This module reads one
(numpy only); `benchmark.write_kit` writes one, with Paddle.

    maml-bench --write-kit kit/                       # here, with Paddle: graphs, task inputs, eager logits
    maml-bench --kit kit/ --provider cuda             # there, onnxruntime-gpu (and PyTorch) only
    maml-bench --write-kit kit/ --task-batch 32       # also the graphs for 32 tasks a call, and 32 tasks
    maml-bench --kit kit/ --provider cuda --task-batch 32

A deployment machine has onnxruntime but rarely Paddle, which `maml-bench` needs for two things: the
export and the reference logits every row is checked against. The kit carries both: each ways' exported
graphs (a folder `<ways>way/` with model.onnx, adapt.onnx and predict.onnx, for the split rows) with its
weights as `.npz` (the PyTorch peer computes with them), and per config the task's inputs
with eager Paddle's logits in float32 and float64 (float64 settles max-pool near-ties, as in
`benchmark.bench_config`). Runtimes timed from a kit: onnxruntime and the optional PyTorch peer. With
`task_batch` T the kit also holds each ways' graph exported for T tasks a call and, per config, T tasks
(seeds 0..T-1, task 0 the single task) with their eager logits, for `benchmark.bench_task_batch`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..config import MamlConfig
from ..errors import ConfigError, reason
from .runtimes import Exported

FORMAT = "maml-export-bench-kit-v1"


def read_kit(kit: Path) -> tuple[dict, dict, int | None]:
    """(ways -> Exported, config name -> {x_spt, y_spt, x_qry, float32, float64, flops[, batch]}, T) from a kit
    folder, T the task batch it was written with (None: none), `batch` the T tasks in `batch_tasks`' layout
    and the batched graph's Exported under "graph"; needs numpy only."""
    try:
        index = json.loads((kit / "kit.json").read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT}")
        models, batches = {}, {}
        for ways, m in index["models"].items():
            with np.load(kit / f"{ways}way-params.npz", allow_pickle=False) as z:
                params = {name: z[name] for name in z.files}
            models[int(ways)] = Exported(kit / m["onnx"], MamlConfig.from_dict(m["config"]), params, float(m["inner_lr"]),
                                         int(m["steps"]), m["source"], bool(m.get("every_step")))  # older kits: stop
            if m.get("batch_onnx"):
                batches[int(ways)] = dataclasses.replace(models[int(ways)], onnx=kit / m["batch_onnx"])
        tasks = {}
        for name, c in index["configs"].items():
            with np.load(kit / f"{name}.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            tasks[name] = {**{k: v for k, v in arrays.items() if not k.startswith("batch_")}, **c}
            if index.get("task_batch"):
                tasks[name]["batch"] = {k.removeprefix("batch_"): v for k, v in arrays.items()
                                        if k.startswith("batch_")}
                tasks[name]["batch"]["graph"] = batches[c["ways"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--kit {kit}: not a readable benchmark kit ({' '.join(reason(e).split())[:160]}); "
                          "write one with maml-bench --write-kit DIR on a machine with Paddle") from None
    return models, tasks, index.get("task_batch")
