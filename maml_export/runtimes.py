"""The runtimes `maml-bench` compares, each computing the exported function with the same weights.

`RUNTIMES[name](exported, provider, threads)` returns a binder: `bind(x_spt, y_spt, x_qry)` (numpy, one
task) gives a call that returns the query logits, all K SGD steps and tensor conversions included:

    onnxruntime        the exported model.onnx: CPU provider (intra-op threads = --threads), or CUDA /
                       TensorRT with IO binding (inputs and logits stay on the device)
    paddle-eager       MAML.adapt/predict (T=1) under paddle.no_grad, the function the graph was traced from
    paddlerec-loop     PaddleRec style: deep-copy a paddle.nn conv-4, SGD with loss.backward(), forward
    paddle-inference   the exported static program (model.json/.pdiparams), oneDNN off (NOTES point 10)
    pytorch-eager      a learn2learn-style functional conv-4, torch.autograd.grad per step (optional)

`Exported` is what they share: the graph, its config and weights (checked against the ONNX metadata).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, MamlError

GPU = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
from .cli import GPU_INSTALL as INSTALL  # noqa: E402


GPU_ROWS = ("onnxruntime", "pytorch-eager")  # the runtimes that compute on --provider's device


def host(out) -> np.ndarray:
    """A runtime's output as a numpy array: an ndarray, an OrtValue or a torch tensor (possibly on a GPU)."""
    if isinstance(out, np.ndarray):
        return out
    return out.detach().cpu().numpy() if hasattr(out, "detach") else out.numpy()


class ProviderError(MamlError):
    """The onnxruntime execution provider --provider asks for is missing, or fell back to the CPU."""


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
    from .onnx_convert import weights_sha256
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
        model = Model.from_specs(config.layers)
        params = {name: p.numpy() for name, p in zip(model.param_shapes(), ps)}
        if model.head_init == "prototypes":  # the graph never reads the head's parameters, so jit.save drops
            # them: the rest are the body's, and the head is zero (as_deployed)
            body = [n for n in model.param_shapes() if not model.is_head(n)]
            params = model.with_zero_head({name: p.numpy() for name, p in zip(body, ps)})
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
    from .model import Model, with_head
    try:
        specs = with_head(base.config.layers, ways)
    except ValueError as e:
        raise ConfigError(f"--configs: {e}") from None
    for path in sorted(PRETRAINED_DIR.glob(f"*-{ways}w*s.npz")):  # the same network, whichever head init
        if with_head(load_checkpoint(path).config.layers, init="meta") == with_head(specs, init="meta"):
            return export_checkpoint(path, workdir / f"{ways}way", base.steps, None, data, f"bundled {path.name}")
    c, model = base.config, Model.from_specs(specs)
    params = model.with_zero_head(base.params)
    config = MamlConfig(name=f"{c.name}-backbone-{ways}w", ways=ways, inner_lr=base.inner_lr, hidden=c.hidden,
                        channels=c.channels, image_size=c.image_size, head_init=c.head_init, layers=specs)
    path = save_checkpoint(workdir / f"{ways}way.npz", Checkpoint(config, params))
    return export_checkpoint(path, workdir / f"{ways}way", base.steps, base.inner_lr, data,
                             f"{base.source.removeprefix('bundled ')}'s backbone, zero {ways}-way head")


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
        fast = paddlerec.adapt(net, paddle.to_tensor(xs), paddle.to_tensor(ys), exp.steps, exp.inner_lr,
                               exp.config.head_init)
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
    import contextlib
    import io
    import onnxruntime as ort
    from .adapter import Adapter
    if provider == "cpu":
        return Adapter(exp.onnx, ["CPUExecutionProvider"], threads)
    wanted = [(GPU[provider], options or {})] + (["CUDAExecutionProvider"] if provider == "tensorrt" else [])
    # onnxruntime reports a provider that cannot load by itself, in C++ error logs and a Python print of
    # "EP Error ... Falling back" (seen with TensorRT absent on an H100 box): keep that out of the output
    # and say it in the ProviderError's one line, naming the missing library when onnxruntime did.
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as said:
            adapter = Adapter(exp.onnx, wanted + ["CPUExecutionProvider"], threads)
    finally:
        ort.set_default_logger_severity(2)
    if adapter.providers[0] != GPU[provider]:
        missing = re.search(r"(lib[\w.+-]+\.so[\d.]*): cannot open shared object file", said.getvalue())
        why = f"{missing[1]} not found" if missing else (
            "TensorRT's libraries missing?" if provider == "tensorrt" else "CUDA/cuDNN libraries missing or mismatched?")
        raise ProviderError(f"--provider {provider}: onnxruntime could not load {GPU[provider]} ({why}) and fell back "
                            f"to {adapter.providers[0]}; {INSTALL}")
    return adapter


def fixed_shapes(onnx_path: Path, feeds: dict, out: Path) -> Path:
    """A copy of the graph with its inputs' dynamic dimensions set to those of `feeds`. onnxruntime then
    folds the shape arithmetic into constants; left dynamic, those nodes run on the CPU provider (84 of them
    in the 5-way graph, seen on an H100) and a CUDA graph cannot be captured."""
    import onnx
    model = onnx.load(str(onnx_path))
    for value in model.graph.input:
        for dim, n in zip(value.type.tensor_type.shape.dim, feeds[value.name].shape):
            dim.dim_value = n  # clears dim_param (a oneof)
    onnx.save(model, str(out))
    return out


def onnxruntime(exp: Exported, provider: str, threads: int):
    """CPU: session.run. GPU: IO binding on device buffers, in a CUDA graph where onnxruntime can capture one
    (on a copy of the graph with this task's shapes fixed); TF32 off, as in the exactness checks."""
    import dataclasses
    import tempfile
    import onnxruntime as ort
    if provider == "cpu":
        session = open_session(exp, provider, threads).session
        return lambda xs, ys, xq: lambda: session.run(["logits"], {"x_spt": xs, "y_spt": ys, "x_qry": xq})[0]
    workdir = tempfile.TemporaryDirectory(prefix="maml-bench-gpu-")
    fp32 = {"use_tf32": "0"} if provider == "cuda" else {}  # onnxruntime's CUDA default is TF32: 3e-3 off

    def bind(xs, ys, xq):  # a session per shape: a CUDA graph or a TensorRT engine holds one
        feeds = {"x_spt": xs, "y_spt": ys, "x_qry": xq}
        name = "x".join(map(str, xs.shape + xq.shape))  # one copy per shape
        fixed = fixed_shapes(exp.onnx, feeds, Path(workdir.name) / f"{name}.onnx")
        for graph in [True, False] if provider == "cuda" else [False]:
            try:
                options = {**fp32, **({"enable_cuda_graph": "1"} if graph else {})}
                session = open_session(dataclasses.replace(exp, onnx=fixed), provider, threads, options).session
                binding, keep = session.io_binding(), [ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in feeds.values()]
                for name, value in zip(feeds, keep):
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

            def feed(*arrays, keep=keep):  # another task of the bound shapes, into the same device buffers
                for value, a in zip(keep, arrays):
                    value.update_inplace(np.ascontiguousarray(a))
            call.feed = feed
            call.detail = "IO binding" + (", CUDA graph" if graph else "")
            call.workdir = workdir  # the fixed-shape copies live as long as a call needs them
            return call
    return bind


def pytorch_eager(exp: Exported, provider="cpu", threads=None):
    """The peer a PyTorch user would write (learn2learn-style): functional conv-4, `torch.autograd.grad`
    per step. On --provider cuda/tensorrt it runs on the GPU, inputs and logits on the device (as
    onnxruntime's IO binding), TF32 off (onnxruntime's CUDA provider computes in full fp32). Optional:
    `pip install "maml-export[torch]"`; without it (or without a CUDA device) the row says why."""
    try:
        import torch
        import torch.nn.functional as tf
    except ImportError:
        raise ImportError('PyTorch is not installed (optional peer: pip install "maml-export[torch]")') from None
    device = "cuda" if provider in GPU else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ImportError(f"this PyTorch {torch.__version__} sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    specs = exp.config.layers
    meta = [torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in exp.params.values()]  # layer order

    def forward(params, x, specs=specs):
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
        params = [p.clone().requires_grad_() for p in meta]
        if exp.config.head_init == "prototypes":  # the head from the support's Euclidean prototypes
            with torch.no_grad():
                onehot = tf.one_hot(ys, exp.config.ways).to(xs.dtype)  # (S, ways)
                prototypes = onehot.T @ forward(params[:-2], xs, specs[:-1]) / onehot.sum(0)[:, None]  # (ways, F)
            params[-2:] = [(2 * prototypes.T).requires_grad_(), (-(prototypes ** 2).sum(1)).requires_grad_()]
        for _ in range(exp.steps):
            grads = torch.autograd.grad(tf.cross_entropy(forward(params, xs), ys), params)
            params = [(p - exp.inner_lr * g).detach().requires_grad_() for p, g in zip(params, grads)]
        with torch.no_grad():
            logits = forward(params, xq)
        if device == "cuda":
            torch.cuda.synchronize()
        return logits

    def bind(xs, ys, xq):
        xs, ys, xq = (torch.from_numpy(a).to(device) for a in (xs, ys, xq))
        return lambda: call(xs, ys.long(), xq)
    return bind


RUNTIMES = {"paddle-eager": paddle_eager, "onnxruntime": onnxruntime, "paddlerec-loop": paddlerec_loop,
            "paddle-inference": paddle_inference, "pytorch-eager": pytorch_eager}  # eager first: the reference
