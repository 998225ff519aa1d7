"""A benchmark kit: `maml-bench` on a machine without Paddle, such as a GPU deployment box.

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
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .contract import ADAPT_FILE, MODEL_FILE, PREDICT_FILE
from .errors import ConfigError, reason
from .runtimes import Exported

FORMAT = "maml-export-bench-kit-v1"


def write_kit(out: Path, configs: list, model: Path | None, steps: int | None, data: str | None,
              task_batch: int | None = None, echo=print) -> dict:
    """Export the graphs `configs` need into `out` (from `model`, else the bundled weights) and store each
    config's task (an Omniglot test task with `data`, else made-up characters) with eager Paddle's logits; with
    `task_batch` T, also the graphs for T tasks a call and T tasks per config (`batch_*` arrays)."""
    from .benchmark import batch_tasks, model_path, prepare_models
    from .machine import count_flops
    from .data import load_omniglot
    from .runtimes import batched
    model = model_path(model)
    images = load_omniglot(data) if data else None
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "models": {}, "configs": {}, "task_batch": task_batch}
    with tempfile.TemporaryDirectory(prefix="maml-kit-") as tmp:
        models = prepare_models(model, configs, steps, Path(tmp), data, echo)
        for ways, exp in models.items():  # the graphs and their weights: all a kit's runtimes need
            folder = out / f"{ways}way"  # model.onnx with adapt.onnx and predict.onnx beside it, as exported
            folder.mkdir(exist_ok=True)
            for name in (MODEL_FILE, ADAPT_FILE, PREDICT_FILE):
                if (exp.onnx.parent / name).is_file():  # an older --model export may have no halves
                    shutil.copyfile(exp.onnx.parent / name, folder / name)
            np.savez(out / f"{ways}way-params.npz", **exp.params)
            index["models"][str(ways)] = {"onnx": f"{ways}way/{MODEL_FILE}", "config": exp.config.to_dict(),
                                          "inner_lr": exp.inner_lr, "steps": exp.steps, "source": exp.source}
            if task_batch:
                echo(f"exporting the {ways}-way graph for {task_batch} tasks per call ...")
                shutil.copyfile(batched(exp, task_batch, Path(tmp), data).onnx, out / f"{ways}way-batch.onnx")
                index["models"][str(ways)]["batch_onnx"] = f"{ways}way-batch.onnx"
    for c in configs:
        exp = models[c.ways]
        echo(f"{c.name}: eager Paddle's reference logits (float32, float64) on {task_batch or 1} task(s) ...")
        tasks = batch_tasks(c, exp, task_batch or 1, images)  # task 0 is the single-task rows' task
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


def read_kit(kit: Path) -> tuple[dict, dict, int | None]:
    """(ways -> Exported, config name -> {x_spt, y_spt, x_qry, float32, float64, flops[, batch]}, T) from a kit
    folder, T the task batch it was written with (None: none), `batch` the T tasks in `batch_tasks`' layout
    and the batched graph's Exported under "graph"; needs numpy only (the config is a plain namespace:
    MamlConfig's module imports Paddle)."""
    try:
        index = json.loads((kit / "kit.json").read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT}")
        models, batches = {}, {}
        for ways, m in index["models"].items():
            with np.load(kit / f"{ways}way-params.npz", allow_pickle=False) as z:
                params = {name: z[name] for name in z.files}
            models[int(ways)] = Exported(kit / m["onnx"], SimpleNamespace(**m["config"]), params, float(m["inner_lr"]),
                                         int(m["steps"]), m["source"])
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
