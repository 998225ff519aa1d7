"""A benchmark kit: `maml-bench` on a machine without Paddle, such as a GPU deployment box.

    maml-bench --write-kit kit/                       # here, with Paddle: graphs, task inputs, eager logits
    maml-bench --kit kit/ --provider cuda             # there, onnxruntime-gpu (and PyTorch) only

A deployment machine has onnxruntime but rarely Paddle, which `maml-bench` needs for two things: the
export and the reference logits every row is checked against. The kit carries both: each ways' exported
folder with its weights as `.npz` (the PyTorch peer computes with them), and per config the task's inputs
with eager Paddle's logits in float32 and float64 (float64 settles max-pool near-ties, as in
`benchmark.bench_config`). Runtimes timed from a kit: onnxruntime and the optional PyTorch peer.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import ConfigError
from .runtimes import Exported

FORMAT = "maml-export-bench-kit-v1"


def write_kit(out: Path, configs: list, model: Path | None, steps: int | None, data: str | None, echo=print) -> dict:
    """Export the graphs `configs` need into `out` (from `model`, else the bundled weights) and store each
    config's task (an Omniglot test task with `data`, else random images) with eager Paddle's logits."""
    from .benchmark import model_path, prepare_models, task_inputs
    from .machine import count_flops
    from .data import load_omniglot
    from .runtimes import paddle_eager
    model = model_path(model)
    images = load_omniglot(data) if data else None
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "models": {}, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="maml-kit-") as tmp:
        models = prepare_models(model, configs, steps, Path(tmp), data, echo)
        for ways, exp in models.items():  # the graph and its weights: all a kit's runtimes need
            shutil.copyfile(exp.onnx, out / f"{ways}way.onnx")
            np.savez(out / f"{ways}way-params.npz", **exp.params)
            index["models"][str(ways)] = {"onnx": f"{ways}way.onnx", "config": exp.config.to_dict(),
                                          "inner_lr": exp.inner_lr, "steps": exp.steps, "source": exp.source}
    for c in configs:
        exp = models[c.ways]
        xs, ys, xq, _ = task_inputs(c, exp.config.channels, exp.config.image_size, images)
        echo(f"{c.name}: eager Paddle's reference logits (float32, float64) ...")
        refs = {dtype: paddle_eager(exp, dtype=dtype)(xs, ys, xq)() for dtype in ("float32", "float64")}
        np.savez(out / f"{c.name}.npz", x_spt=xs, y_spt=ys, x_qry=xq, **refs)
        index["configs"][c.name] = {"ways": c.ways, "shots": c.shots, "query": c.query,
                                    "flops": count_flops(exp.config.layers, len(xs), len(xq), exp.steps,
                                                         exp.config.image_size)}
    (out / "kit.json").write_text(json.dumps(index, indent=1))
    return index


def read_kit(kit: Path) -> tuple[dict, dict]:
    """(ways -> Exported, config name -> {x_spt, y_spt, x_qry, float32, float64, flops}) from a kit folder;
    needs numpy only (the config is a plain namespace: MamlConfig's module imports Paddle)."""
    try:
        index = json.loads((kit / "kit.json").read_text())
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT}")
        models = {}
        for ways, m in index["models"].items():
            with np.load(kit / f"{ways}way-params.npz", allow_pickle=False) as z:
                params = {name: z[name] for name in z.files}
            models[int(ways)] = Exported(kit / m["onnx"], SimpleNamespace(**m["config"]), params, float(m["inner_lr"]),
                                         int(m["steps"]), m["source"])
        tasks = {}
        for name, c in index["configs"].items():
            with np.load(kit / f"{name}.npz", allow_pickle=False) as z:
                tasks[name] = {**{k: z[k] for k in z.files}, **c}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--kit {kit}: not a readable benchmark kit ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                          "write one with maml-bench --write-kit DIR on a machine with Paddle") from None
    return models, tasks
