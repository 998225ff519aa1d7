"""Adapt-then-predict latency of an exported MAML graph beside its peers, and the machine's limit.

A call is one task in (support images and labels, query images: numpy) and its query logits out (numpy),
all K SGD steps and tensor conversions included. Same weights, same inputs, one process, in turn:

    onnxruntime        the exported model.onnx: CPU provider (intra-op threads = --threads), or CUDA /
                       TensorRT with IO binding (inputs and logits stay on the device)
    paddle-eager       MAML.adapt/predict (T=1) under paddle.no_grad, the function the graph was traced from
    paddlerec-loop     PaddleRec style: deep-copy a paddle.nn conv-4, SGD with loss.backward(), forward
    paddle-inference   the exported static program (model.json/.pdiparams), oneDNN off (NOTES point 10)

With `task_batch` T (maml-bench --task-batch T), two more onnxruntime rows per config time throughput on
the same T tasks: `onnxruntime-batch`, one call of the graph exported with --task-batch T (the same
weights), and `onnxruntime-loop`, T calls of the single-task graph; their ms are per call (T tasks),
their tasks/s per task.

Each is warmed up, then each call is timed with perf_counter, the runtimes of a config round-robin (a
burst of load on a shared machine then hits them alike, not one row's ratio). Eager Paddle is the reference: a runtime
that predicts other classes (argmax) than eager float32 *and* eager float64 is a disagreement.

The limit: `count_flops` counts 2 x multiply-adds of the convolutions and the linear head (per SGD step
on the support set: forward, weight gradients, input gradients except the first layer's; then one
forward on the query set); `gemm_gflops` measures numpy's float32 2048^3 matmul on --threads threads
in the same run; flops / rate is the floor that CPU rows are reported as a multiple of.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import ConfigError, MamlError

QUERY = 15  # query images per class, as the protocol reports accuracy
NEAR_TIE = 1e-4  # a class difference where the reference's top-2 logits are closer (relative) is a tie
MIN_RUNS = 3  # timed calls per row even once --max-seconds is spent
GPU = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
INSTALL = 'pip uninstall onnxruntime && pip install "maml-export[gpu]"'


class ProviderError(MamlError):
    """The onnxruntime execution provider --provider asks for is missing, or fell back to the CPU."""


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


def count_flops(specs: list[dict], support: int, query: int, steps: int, image_size: int = 28) -> int:
    """FLOPs (2 x MACs of Conv2d and Linear layers) of `steps` SGD steps on `support` images, then one
    forward on `query` images; the first layer's input gradient (the image's) is never computed."""
    size, forward, first = image_size, 0, 0
    for s in specs:
        macs = 0
        if s["type"] == "Conv2d":
            size = (size + 2 * s["padding"] - s["kernel"]) // s["stride"] + 1
            macs = s["out_channels"] * s["in_channels"] * s["kernel"] ** 2 * size * size
        elif s["type"] == "Linear":
            macs = s["in_features"] * s["out_features"]
        elif s["type"] == "MaxPool2":
            size //= 2
        forward, first = forward + macs, first or macs
    step = forward + forward + (forward - first)  # forward, weight gradients, input gradients
    return 2 * (steps * support * step + query * forward)


_GEMM = """import sys, time, numpy as np
n = int(sys.argv[1]); a, b = (np.random.default_rng(i).standard_normal((n, n), dtype=np.float32) for i in (0, 1))
a @ b; best = float("inf")
for _ in range(5):
    start = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - start)
print(2 * n ** 3 / best / 1e9)"""


def gemm_gflops(threads: int, n: int = 2048) -> float:
    """numpy's float32 n^3 matmul rate, best of 5 after a warm-up, in a child process whose OpenBLAS
    gets `threads` threads (OPENBLAS_NUM_THREADS only takes effect before numpy is imported)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    return float(subprocess.run([sys.executable, "-c", _GEMM, str(n)], env=env, capture_output=True, text=True,
                                check=True).stdout)


def machine_info(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), cpu)
    dists = [d.metadata["Name"] for d in metadata.distributions()]
    versions = {d: metadata.version(d) for d in ("maml-export", "paddlepaddle", "paddlepaddle-gpu", "onnxruntime",
                                                 "onnxruntime-gpu", "onnx", "paddle2onnx", "numpy") if d in dists}
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


@dataclass
class Exported:
    """An exported graph and what the Paddle peers need to compute the same function."""
    onnx: Path
    config: object  # MamlConfig
    params: dict  # name -> float32 ndarray
    inner_lr: float
    steps: int
    source: str  # where the weights come from, for the table


def load_exported(onnx_path: Path) -> Exported:
    """A maml-export folder: metadata from model.onnx, weights from model.pdiparams, checked against the
    ONNX metadata's weights_sha256, so that every runtime really computes with the same weights."""
    import paddle
    from .adapter import Adapter
    from .config import MamlConfig
    from .export import weights_sha256
    from .model import Model
    meta, prefix = Adapter(onnx_path).metadata, onnx_path.with_name("model")
    if int(meta.get("task_batch") or 0):
        raise ConfigError(f"--model: {onnx_path} adapts {meta['task_batch']} tasks per call; maml-bench takes a "
                          "single-task export (--task-batch T exports the batched graph from its weights)")
    missing = [p.name for p in (prefix.with_suffix(".json"), prefix.with_suffix(".pdiparams")) if not p.is_file()]
    if missing:
        raise ConfigError(f"--model: {onnx_path.parent} has no {' or '.join(missing)} beside model.onnx (maml-export "
                          "writes them together; the Paddle peers run them)")
    config, why = MamlConfig.from_dict(json.loads(meta["config"])), "their sha256 is not model.onnx's weights_sha256"
    try:  # jit.save names the parameters <layer>.w_<k>_0, k in creation order: the checkpoint's order
        ps = sorted(paddle.jit.load(str(prefix)).parameters(), key=lambda p: int(re.search(r"\.w_(\d+)", p.name)[1]))
        params = {name: p.numpy() for name, p in zip(Model.from_specs(config.layers).param_shapes(), ps)}
        ok = weights_sha256(params) == meta.get("weights_sha256")
    except Exception as e:  # noqa: BLE001 - Paddle's loader raises many kinds
        ok, why = False, f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    if not ok:
        raise ConfigError(f"--model: cannot recover the weights in {prefix}.pdiparams for the Paddle peers ({why})")
    return Exported(onnx_path, config, params, float(meta["inner_lr"]), int(meta["steps"]), f"--model {onnx_path}")


def export_checkpoint(path: Path, out: Path, steps: int, inner_lr, data, source: str,
                      task_batch: int | None = None) -> Exported:
    from .checkpoint import load_checkpoint
    from .export import export_model
    ckpt = load_checkpoint(path)
    export_model(path, out, steps=steps, inner_lr=inner_lr, tasks=1, data=data, task_batch=task_batch)
    lr = ckpt.config.inner_lr if inner_lr is None else inner_lr
    return Exported(out / "model.onnx", ckpt.config, ckpt.params, lr, steps, source)


def batched(exp: Exported, task_batch: int, workdir: Path, data) -> Exported:
    """`exp`'s weights, steps and inner lr exported again as a graph for `task_batch` tasks per call."""
    from .checkpoint import Checkpoint, save_checkpoint
    name = f"{exp.config.ways}way-batch{task_batch}"
    path = save_checkpoint(workdir / f"{name}.npz", Checkpoint(exp.config, exp.params))
    return export_checkpoint(path, workdir / name, exp.steps, exp.inner_lr, data, exp.source, task_batch)


def reheaded(base: Exported, ways: int, workdir: Path, data) -> Exported:
    """A `ways`-way graph of the same architecture and steps: a bundled checkpoint of that many ways if one
    matches, else `base`'s backbone with a zero head. Latency does not depend on the values; a zero head
    keeps adaptation well-conditioned (on random weights float32 runtimes can take other paths)."""
    from .checkpoint import PRETRAINED_DIR, Checkpoint, load_checkpoint, save_checkpoint
    from .config import MamlConfig
    from .model import Model
    specs = [dict(s) for s in base.config.layers]
    if specs[-1]["type"] != "Linear":
        raise ConfigError(f"--configs: cannot make a {ways}-way model from one without a Linear head")
    specs[-1]["out_features"] = ways
    for path in sorted(PRETRAINED_DIR.glob(f"*-{ways}w*s.npz")):
        if load_checkpoint(path).config.layers == specs:
            return export_checkpoint(path, workdir / f"{ways}way", base.steps, None, data, f"bundled {path.name}")
    c, model = base.config, Model.from_specs(specs)
    params = {k: base.params[k] if v.shape == base.params[k].shape else np.zeros_like(v)
              for k, v in model.init_params(0).items()}
    config = MamlConfig(name=f"{c.name}-backbone-{ways}w", ways=ways, inner_lr=base.inner_lr, hidden=c.hidden,
                        channels=c.channels, image_size=c.image_size, layers=specs)
    path = save_checkpoint(workdir / f"{ways}way.npz", Checkpoint(config, params))
    return export_checkpoint(path, workdir / f"{ways}way", base.steps, base.inner_lr, data,
                             f"{base.source.removeprefix('bundled ')}'s backbone, zero {ways}-way head")


def task_inputs(c: BenchConfig, channels: int, size: int, images=None, seed: int = 0) -> tuple:
    """(x_spt, y_spt, x_qry, y_qry) of one task: an Omniglot test task when `images` are given, else
    random sparse binary images (as the export's parity check). Labels sorted, every class present."""
    if images is not None:
        from .data import TaskSampler, split_characters
        test = split_characters(len(images))["test"]
        return tuple(a[0] for a in TaskSampler(images, test, c.ways, c.shots, c.query, seed).sample(1))
    rng, s = np.random.default_rng(seed), c.ways * c.shots
    x = (rng.random((c.ways * (c.shots + c.query), channels, size, size)) < 0.2).astype(np.float32)
    return x[:s], np.repeat(np.arange(c.ways), c.shots), x[s:], np.repeat(np.arange(c.ways), c.query)


# Runtimes: runtime(exp, provider, threads) -> bind; bind(xs, ys, xq) -> call; call() -> logits [Q, ways].

def paddle_eager(exp: Exported, provider="cpu", threads=None, dtype="float32"):
    import paddle
    from .maml import MAML
    from .model import Model, to_tensors
    maml = MAML(Model.from_specs(exp.config.layers), to_tensors(exp.params, dtype), exp.inner_lr, exp.steps)

    def call(xs, ys, xq):
        with paddle.no_grad():
            fast = maml.adapt(paddle.to_tensor(xs.astype(dtype))[None], paddle.to_tensor(ys)[None])
            return maml.predict(fast, paddle.to_tensor(xq.astype(dtype))[None])[0].numpy()
    return lambda xs, ys, xq: lambda: call(xs, ys, xq)


def paddlerec_loop(exp: Exported, provider="cpu", threads=None):
    import warnings
    import paddle
    from . import paddlerec
    from .model import Model
    warnings.filterwarnings("ignore", message="When training, we now always track")  # BatchNorm2D in train mode
    net = paddlerec.build_net(Model.from_specs(exp.config.layers), exp.params)

    def call(xs, ys, xq):
        fast = paddlerec.adapt(net, paddle.to_tensor(xs), paddle.to_tensor(ys), exp.steps, exp.inner_lr)
        with paddle.no_grad():
            return fast(paddle.to_tensor(xq)).numpy()
    return lambda xs, ys, xq: lambda: call(xs, ys, xq)


def paddle_inference(exp: Exported, provider: str, threads: int):
    import paddle.inference as pi
    prefix = exp.onnx.with_name("model")
    config = pi.Config(f"{prefix}.json", f"{prefix}.pdiparams")
    config.disable_mkldnn()  # NOTES point 10
    config.set_cpu_math_library_num_threads(threads)
    config.disable_glog_info()
    predictor = pi.create_predictor(config)
    handles = {name: predictor.get_input_handle(name) for name in predictor.get_input_names()}
    out = predictor.get_output_handle(predictor.get_output_names()[0])

    def call(feeds):
        for name, a in feeds.items():
            handles[name].reshape(list(a.shape))
            handles[name].copy_from_cpu(a)
        predictor.run()
        return out.copy_to_cpu()
    return lambda xs, ys, xq: lambda: call({"x_spt": xs, "y_spt": ys, "x_qry": xq})


def check_provider(provider: str) -> None:
    """One ProviderError line unless this onnxruntime offers the provider --provider asks for."""
    import onnxruntime as ort
    if provider in GPU and GPU[provider] not in ort.get_available_providers():
        libs = " and TensorRT's libraries" if provider == "tensorrt" else ""
        raise ProviderError(f"--provider {provider}: this onnxruntime {ort.__version__} has no {GPU[provider]} (only "
                            f"{', '.join(ort.get_available_providers())}); install the GPU build{libs}: {INSTALL}")


def open_session(exp: Exported, provider: str, threads: int, options: dict | None = None):
    """An Adapter on the provider; a GPU session that fell back to the CPU is a ProviderError, never a CPU row."""
    from .adapter import Adapter
    if provider == "cpu":
        return Adapter(exp.onnx, ["CPUExecutionProvider"], threads)
    wanted = [(GPU[provider], options or {})] + (["CUDAExecutionProvider"] if provider == "tensorrt" else [])
    adapter = Adapter(exp.onnx, wanted + ["CPUExecutionProvider"], threads)
    if adapter.providers[0] != GPU[provider]:
        raise ProviderError(f"--provider {provider}: onnxruntime could not load {GPU[provider]} and fell back to "
                            f"{adapter.providers[0]} (CUDA/cuDNN libraries missing or mismatched?); {INSTALL}")
    return adapter


def onnxruntime(exp: Exported, provider: str, threads: int):
    """CPU: session.run. GPU: IO binding on device buffers, in a CUDA graph where onnxruntime can capture one."""
    import onnxruntime as ort
    if provider == "cpu":
        session = open_session(exp, provider, threads).session
        return lambda xs, ys, xq: lambda: session.run(["logits"], {"x_spt": xs, "y_spt": ys, "x_qry": xq})[0]

    def bind(xs, ys, xq):  # a session per shape: a CUDA graph or a TensorRT engine holds one
        for graph in [True, False] if provider == "cuda" else [False]:
            try:
                session = open_session(exp, provider, threads, {"enable_cuda_graph": "1"} if graph else None).session
                binding, keep = session.io_binding(), [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in (xs, ys, xq)]
                for name, value in zip(("x_spt", "y_spt", "x_qry"), keep):
                    binding.bind_ortvalue_input(name, value)
                logits = list(xq.shape[:-3]) + [exp.config.ways]  # [Q, ways], or [T, Q, ways] for a batched graph
                keep.append(ort.OrtValue.ortvalue_from_shape_and_type(logits, np.float32, "cuda", 0))
                binding.bind_ortvalue_output("logits", keep[-1])
                session.run_with_iobinding(binding)  # with a CUDA graph: the capture
            except Exception as e:  # noqa: BLE001 - a node off the CUDA provider: no graph, plain IO binding
                if graph and not isinstance(e, ProviderError):
                    continue
                raise

            def call(session=session, binding=binding, keep=keep):
                session.run_with_iobinding(binding)  # returns once the run's stream is synchronized
                return keep[-1]
            call.detail = "IO binding" + (", CUDA graph" if graph else "")
            return call
    return bind


def pytorch_eager(exp: Exported, provider="cpu", threads=None):
    """The peer a PyTorch user would write (learn2learn-style): functional conv-4, `torch.autograd.grad`
    per step. Optional: `pip install "maml-export[torch]"`; without it the row says so."""
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError:
        raise ImportError('PyTorch is not installed (optional peer: pip install "maml-export[torch]")') from None
    if threads:
        torch.set_num_threads(threads)
    specs = exp.config.layers
    meta = [torch.from_numpy(np.ascontiguousarray(v)) for v in exp.params.values()]  # layer order

    def forward(params, x):
        it = iter(params)
        for spec in specs:
            kind = spec["type"]
            if kind == "Conv2d":
                x = tf.conv2d(x, next(it), stride=spec["stride"], padding=spec["padding"])
            elif kind == "BatchNorm":  # the batch's own statistics, as MAML uses them
                x = tf.batch_norm(x, None, None, next(it), next(it), training=True, eps=spec["eps"])
            elif kind == "MaxPool2":
                x = tf.max_pool2d(x, 2, 2)
            elif kind == "ReLU":
                x = tf.relu(x)
            elif kind == "Flatten":
                x = x.flatten(1)
            elif kind == "Linear":
                x = x @ next(it) + next(it)  # weight stored (in, out)
        return x

    def call(xs, ys, xq):
        xs_t, ys_t, xq_t = torch.from_numpy(xs), torch.from_numpy(ys).long(), torch.from_numpy(xq)
        params = [p.clone().requires_grad_() for p in meta]
        for _ in range(exp.steps):
            grads = torch.autograd.grad(tf.cross_entropy(forward(params, xs_t), ys_t), params)
            params = [(p - exp.inner_lr * g).detach().requires_grad_() for p, g in zip(params, grads)]
        with torch.no_grad():
            return forward(params, xq_t).numpy()
    return lambda xs, ys, xq: lambda: call(xs, ys, xq)


RUNTIMES = {"paddle-eager": paddle_eager, "onnxruntime": onnxruntime, "paddlerec-loop": paddlerec_loop,
            "paddle-inference": paddle_inference, "pytorch-eager": pytorch_eager}  # eager first: the reference


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
    times = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)

    def running(name):
        n = len(times[name])
        return n < runs and not (max_seconds and n >= MIN_RUNS and spent[name] > max_seconds)

    last = None
    while any(running(name) for name in calls):
        for name in [n for n in calls if running(n)]:
            if last not in (None, name):
                time.sleep(pause)  # untimed: the previous runtime's worker threads stop spinning
            last = name
            began = time.perf_counter()
            outs[name] = [calls[name]()]
            spent[name] += time.perf_counter() - began
            times[name].append((time.perf_counter() - began) * 1e3)
    result = {}
    for name, ms in times.items():
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        result[name] = ({"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(np.mean(ms)),
                         "tasks_per_s": float(1e3 / np.mean(ms)), "runs": len(ms)}, outs[name][0])
    return result


def agreement(logits: np.ndarray, ref: np.ndarray) -> dict:
    """Max relative logit difference (to the reference's largest |logit|) and predicted-class agreement; a
    class difference is a disagreement unless the reference's top-2 margin is a near-tie."""
    scale = max(float(np.abs(ref).max()), 1e-12)
    differ = logits.argmax(-1) != ref.argmax(-1)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) <= NEAR_TIE * scale
    rel = float(np.abs(logits - ref).max()) / scale if np.isfinite(logits).all() else float("inf")
    return {"max_rel_vs_eager": rel, "same_class": int((~differ).sum()), "queries": len(ref),
            "disagreements": int((differ & ~tie).sum())}


def agreement_per_task(logits: np.ndarray, ref: np.ndarray) -> dict:
    """`agreement` of each task's [Q, ways] logits in [T, Q, ways], combined: the largest relative
    difference, the sums of the counts."""
    each = [agreement(a, b) for a, b in zip(logits, ref)]
    return {"max_rel_vs_eager": max(e["max_rel_vs_eager"] for e in each),
            **{k: sum(e[k] for e in each) for k in ("same_class", "queries", "disagreements")}}


def meta_test_accuracy(exp: Exported, c: BenchConfig, provider: str, threads: int, images, tasks: int) -> dict:
    """Query accuracy ± 95% interval of the exported graph and of eager adaptation on the same `tasks`
    Omniglot test tasks (the shared protocol, the trainer's TEST_SEED)."""
    from .data import TaskSampler, split_characters
    from .trainer import TEST_SEED, mean_ci95
    sampler = TaskSampler(images, split_characters(len(images))["test"], c.ways, c.shots, c.query, TEST_SEED)
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


def prepare_models(model: Path | None, configs: list, steps: int | None, workdir: Path, data, echo) -> dict:
    """ways -> Exported: --model (or the bundled weights, exported now), and a graph for every other ways."""
    from .checkpoint import default_checkpoint
    if model:
        base = load_exported(model)
        if steps is not None and steps != base.steps:
            raise ConfigError(f"--steps {steps}: {model} was exported with {base.steps} steps (re-export it with "
                              f"maml-export --steps {steps}, or leave --steps out)")
    else:
        if not default_checkpoint().is_file():
            raise ConfigError(f"the bundled weights {default_checkpoint()} are missing: pass --model DIR/model.onnx")
        echo(f"exporting the bundled {default_checkpoint().name} with {steps or 5} steps ...")
        base = export_checkpoint(default_checkpoint(), workdir / "base", steps or 5, None, data,
                                 f"bundled {default_checkpoint().name}")
    models = {base.config.ways: base}
    for ways in sorted({c.ways for c in configs} - set(models)):
        echo(f"exporting a {ways}-way graph of the same architecture ...")
        models[ways] = reheaded(base, ways, workdir, data)
    return models


def bench_config(c: BenchConfig, exp: Exported, binders: dict, report: dict, images, warmup, runs, max_seconds):
    """Time each runtime on one task of config `c`; add its rows (or why a runtime cannot run) to `report`."""
    provider, threads = report["settings"]["provider"], report["settings"]["threads"]
    xs, ys, xq, _ = task_inputs(c, exp.config.channels, exp.config.image_size, images)
    flops = count_flops(exp.config.layers, len(xs), len(xq), exp.steps, exp.config.image_size)
    report["flop_floor_ms"][c.name] = flops / report["gemm_gflops"] / 1e6
    report["models"][c.name] = {"weights": exp.source, "flops": flops, "steps": exp.steps}
    outs, calls = {}, {}
    for name, runtime in RUNTIMES.items():
        timed = provider == "cpu" or name == "onnxruntime"  # Paddle here computes on the CPU only
        if not timed and name != "paddle-eager":
            continue
        try:  # bind and call once: a runtime that cannot run says why in its row, before any timing
            bind = binders[name, c.ways] = binders.get((name, c.ways)) or runtime(exp, provider, threads)
            call = bind(xs, ys, xq)
            out = call()
        except Exception as e:  # noqa: BLE001 - Paddle Inference may fail in many ways: say why in its row
            optional = name == "paddle-inference" or (name == "pytorch-eager" and isinstance(e, ImportError))
            if not optional or isinstance(e, MamlError):
                raise
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            report["skipped"].append({"runtime": name, "config": c.name, "reason": why})
            continue
        outs[name] = out if isinstance(out, np.ndarray) else out.numpy()  # an OrtValue on the device
        if timed:
            calls[name] = call
    for name, (stats, out) in time_interleaved(calls, warmup, runs, max_seconds).items():
        outs[name] = out if isinstance(out, np.ndarray) else out.numpy()
        report["results"].append({"runtime": name, "provider": provider if name == "onnxruntime" else "cpu",
                                  "config": c.name, "steps": exp.steps, **stats, "detail": getattr(calls[name], "detail", ""),
                                  **agreement(outs[name], outs["paddle-eager"])})
    rows = [r for r in report["results"] if r["config"] == c.name and r["disagreements"]]
    if rows:  # did eager float32 round a max-pool near-tie the other way? float64 decides, as in the export
        f64 = paddle_eager(exp, dtype="float64")(xs, ys, xq)()
        for r in rows:
            r["settled_by_float64"] = agreement(outs[r["runtime"]], f64)["disagreements"] == 0


def bench_task_batch(c: BenchConfig, exp: Exported, batch: Exported, task_batch: int, binders: dict, report: dict,
                     images, warmup, runs, max_seconds):
    """Throughput on T = `task_batch` tasks of config `c`: one call of the batched graph `batch` against T calls
    of the single-task graph, on the same tasks; adds rows onnxruntime-batch and onnxruntime-loop to `report`."""
    provider, threads = report["settings"]["provider"], report["settings"]["threads"]
    tasks = [task_inputs(c, exp.config.channels, exp.config.image_size, images, seed=i)[:3] for i in range(task_batch)]
    eager, single = binders["paddle-eager", c.ways], binders["onnxruntime", c.ways]
    ref = np.stack([eager(*t)() for t in tasks])  # eager Paddle, one task at a time: (T, Q, ways)
    singles = [single(*t) for t in tasks]
    calls = {"onnxruntime-batch": (onnxruntime(batch, provider, threads)(*map(np.stack, zip(*tasks))),
                                   f"{task_batch} tasks in one call"),
             "onnxruntime-loop": (lambda: np.stack([np.asarray(call()) for call in singles]),
                                  f"{task_batch} single-task calls")}
    rows = {}
    timed = time_interleaved({name: call for name, (call, _) in calls.items()}, warmup, runs, max_seconds)
    for name, (call, detail) in calls.items():
        stats, out = timed[name]
        out = out if isinstance(out, np.ndarray) else out.numpy()  # an OrtValue on the device
        stats["tasks_per_s"] *= task_batch  # per task: a call adapts T tasks
        rows[name] = {"runtime": name, "provider": provider, "config": c.name, "steps": exp.steps, **stats,
                      "detail": detail, "task_batch": task_batch, **agreement_per_task(out, ref)}
        if rows[name]["disagreements"]:  # float64 decides, as in bench_config
            f64 = paddle_eager(exp, dtype="float64")
            rows[name]["settled_by_float64"] = agreement_per_task(out, np.stack([f64(*t)() for t in tasks]))[
                "disagreements"] == 0
    rows["onnxruntime-batch"]["speedup_vs_loop"] = (rows["onnxruntime-batch"]["tasks_per_s"]
                                                    / rows["onnxruntime-loop"]["tasks_per_s"])
    report["results"] += rows.values()


def run_benchmark(configs: list[BenchConfig], provider: str = "cpu", model: str | None = None, steps: int | None = None,
                  threads: int | None = None, warmup: int = 1, runs: int = 20, max_seconds: float = 2.0,
                  data: str | None = None, tasks: int = 0, task_batch: int | None = None, echo=print) -> dict:
    """Time every runtime on every config (and, with `task_batch`, onnxruntime's throughput on that many tasks
    per call); returns the report `maml-bench --json` writes."""
    check_provider(provider)  # the cheap checks first: no export, no Paddle import before a usage error
    if task_batch and provider != "cpu":
        raise ConfigError(f"--task-batch: measured with --provider cpu only (not {provider}) for now")
    if tasks and not data:
        raise ConfigError("--tasks (meta-test accuracy) needs Omniglot: pass --data DIR or set OMNIGLOT_DIR")
    path = model and (Path(model) / "model.onnx" if Path(model).is_dir() else Path(model))
    if path and not path.is_file():
        raise ConfigError(f"--model {path} does not exist (write one with `maml-export --out DIR`, pass DIR/model.onnx)")
    from .data import load_omniglot
    from .trainer import set_threads
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    set_threads(threads)
    inputs = f"Omniglot test tasks from {data}" if data else "random sparse binary images"
    report = {"machine": machine_info(threads), "results": [], "flop_floor_ms": {}, "gemm_gflops": None, "skipped": [],
              "models": {}, "accuracy": [], "settings": {"provider": provider, "threads": threads, "warmup": warmup,
                                                         "runs": runs, "max_seconds": max_seconds, "inputs": inputs,
                                                         "task_batch": task_batch}}
    images = load_omniglot(data) if data else None
    with tempfile.TemporaryDirectory(prefix="maml-bench-") as tmp:
        models, binders = prepare_models(path, configs, steps, Path(tmp), data, echo), {}
        batches = {}
        for ways, exp in models.items() if task_batch else ():
            echo(f"exporting the {ways}-way graph for {task_batch} tasks per call ...")
            batches[ways] = batched(exp, task_batch, Path(tmp), data)
        echo(f"measuring the float32 GEMM rate (numpy 2048^3, {threads} threads) ...")
        report["gemm_gflops"] = gemm_gflops(threads)
        for c in configs:
            echo(f"timing {c.name} ...")
            bench_config(c, models[c.ways], binders, report, images, warmup, runs, max_seconds)
            if task_batch:
                echo(f"timing {c.name}, {task_batch} tasks: one batched call against {task_batch} single calls ...")
                bench_task_batch(c, models[c.ways], batches[c.ways], task_batch, binders, report, images, warmup, runs,
                                 max_seconds)
            if tasks:
                echo(f"{c.name}: meta-test accuracy on {tasks} tasks ...")
                report["accuracy"].append(meta_test_accuracy(models[c.ways], c, provider, threads, images, tasks))
    per_task = lambda r: r["p50_ms"] / r.get("task_batch", 1)  # noqa: E731 - rows of --task-batch time T tasks a call
    for r in report["results"]:
        r["ratio_to_fastest"] = per_task(r) / min(per_task(x) for x in report["results"] if x["config"] == r["config"])
        r["floor_multiple"] = per_task(r) / report["flop_floor_ms"][r["config"]] if r["provider"] == "cpu" else None
        r["flagged"] = bool(r["disagreements"]) and not r.get("settled_by_float64")
    return report
