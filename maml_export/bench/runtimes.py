"""The runtimes `maml-bench` compares, each computing the exported function with the same weights.

`RUNTIMES[name](exported, provider, threads)` returns a binder: `bind(x_spt, y_spt, x_qry)` (numpy, one
task) gives a call that returns the query logits, all K SGD steps and tensor conversions included:

    onnxruntime        the exported model.onnx: CPU provider (intra-op threads = --threads), or CUDA /
                       TensorRT with IO binding (inputs and logits stay on the device)
    paddle-eager       MAML.adapt/predict (T=1) under paddle.no_grad, the function the graph was traced from
    paddlerec-loop     PaddleRec style: deep-copy a paddle.nn conv-4, SGD with loss.backward(), forward
    paddle-inference   the exported static program (model.json/.pdiparams), oneDNN off (docs/design.md#paddle-inference-needs-onednn-off)
    pytorch-eager      a learn2learn-style functional conv-4, torch.autograd.grad per step (optional)

`SPLITS[name](exported, provider, threads)` returns the same adaptation in two calls, adapt (support set ->
the task's state) and predict (state, queries -> logits), for onnxruntime (adapt.onnx, predict.onnx) and
the PyTorch peer (see "adapt once, predict many" below).

`Exported` is what they share: the graph, its config and weights (checked against the ONNX metadata), and
whether its adaptation runs every step. The same work everywhere: where the single-task graphs stop at a fixed
point of the SGD (docs/design.md#adaptation-stops-at-a-fixed-point), eager Paddle, Paddle Inference and the
PyTorch peer stop there too, their softmax exact as `layers.softmax_cross_entropy`'s; under `every_step` all
of them run every step. The PaddleRec loop always runs every step, as PaddleRec does. A call that knows how many
steps its last run took says so (`call.steps_run()`); the others compute the graph's function, stopping where
it does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..contract import (ADAPT_FILE, FUSED_INPUTS, LOG_TINY, LOGITS, PREDICT_FILE, QUERY_IMAGES, SUPPORT_IMAGES,
                        SUPPORT_LABELS)
from ..errors import ConfigError, MamlError
from ..specs import support_windows

GPU = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
from ..cli import GPU_INSTALL as INSTALL  # noqa: E402


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
    every_step: bool = False  # the single-task graphs run all `steps` (maml-export --every-step), no fixed-point stop


def load_exported(onnx_path: Path) -> Exported:
    """A maml-export folder: metadata from model.onnx, weights from model.pdiparams, checked against the
    ONNX metadata's weights_sha256, so that every runtime really computes with the same weights."""
    import paddle
    from ..adapter import Adapter
    from ..checkpoint import weights_sha256
    from ..config import MamlConfig
    from ..contract import every_step
    from ..model import Model
    meta, prefix = Adapter(onnx_path).metadata, onnx_path.with_name("model")
    if int(meta.get("task_batch") or 0):
        raise ConfigError(f"--model: {onnx_path} adapts {meta['task_batch']} tasks per call; maml-bench takes a "
                          "single-task export (--task-batch T exports the batched graph from its weights)")
    missing = [p.name for p in (prefix.with_suffix(".json"), prefix.with_suffix(".pdiparams")) if not p.is_file()]
    if missing:
        raise ConfigError(f"--model: {onnx_path.parent} has no {' or '.join(missing)} beside model.onnx (maml-export "
                          "writes them together; the Paddle peers run them)")
    config, why = MamlConfig.from_dict(json.loads(meta["config"])), "their sha256 is not model.onnx's weights_sha256"
    refuse_learned_step_sizes(config, f"--model {onnx_path}")
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
    return Exported(onnx_path, config, params, float(meta["inner_lr"]), int(meta["steps"]), f"--model {onnx_path}",
                    every_step(meta))


def refuse_learned_step_sizes(config: MamlConfig, what: str) -> None:
    """The peers take one step size for every layer and step: a model with learned ones (--learn-inner-lr) would
    have them do other work than its graphs, so it is refused (one line) rather than compared."""
    if config.learn_inner_lr:
        raise ConfigError(f"{what} learned a step size per layer and step (--learn-inner-lr); the peers take one "
                          f"step size, so they would do other work: benchmark a model without learned step sizes")


def export_checkpoint(path: Path, out: Path, steps: int, inner_lr, data, source: str,
                      task_batch: int | None = None, query_norm: str | None = None,
                      every_step: bool = False) -> Exported:
    from ..checkpoint import as_deployed, load_checkpoint
    from ..export import export_model
    ckpt = as_deployed(load_checkpoint(path), query_norm=query_norm)
    refuse_learned_step_sizes(ckpt.config, f"--checkpoint {path}")
    export_model(path, out, steps=steps, inner_lr=inner_lr, tasks=1, data=data, task_batch=task_batch,
                 query_norm=query_norm, every_step=every_step)
    lr = ckpt.config.inner_lr if inner_lr is None else inner_lr
    return Exported(out / "model.onnx", ckpt.config, ckpt.params, lr, steps, source, every_step or bool(task_batch))


def batched(exp: Exported, task_batch: int, workdir: Path, data) -> Exported:
    """`exp`'s weights, steps and inner lr exported again as a graph for `task_batch` tasks per call (every step)."""
    from ..checkpoint import Checkpoint, save_checkpoint
    name = f"{exp.config.ways}way-batch{task_batch}"
    path = save_checkpoint(workdir / f"{name}.npz", Checkpoint(exp.config, exp.params))
    return export_checkpoint(path, workdir / name, exp.steps, exp.inner_lr, data, exp.source, task_batch)


def reheaded(base: Exported, ways: int, workdir: Path, data) -> Exported:
    """A `ways`-way graph of the same architecture, steps and stop: a bundled checkpoint of that many ways if one
    matches, else `base`'s backbone with a zero head. Latency does not depend on the values; a zero head
    keeps adaptation well-conditioned (on random weights float32 runtimes can take other paths)."""
    from ..checkpoint import PRETRAINED_DIR, Checkpoint, load_checkpoint, save_checkpoint
    from ..config import MamlConfig
    from ..model import Model
    from ..specs import with_head, with_query_norm
    try:
        specs = with_head(base.config.layers, ways)
    except ValueError as e:
        raise ConfigError(f"--configs: {e}") from None
    # the same network, whichever head init, temperature or query normalisation; exported with the base's
    norm = query_norm(base.config)
    same = lambda layers: with_head(with_query_norm(layers, norm), init="meta", temperature=1.0, support_shift=0)  # noqa: E731
    for path in sorted(PRETRAINED_DIR.glob(f"*-{ways}w*s.npz")):
        if same(load_checkpoint(path).config.layers) == same(specs):
            return export_checkpoint(path, workdir / f"{ways}way", base.steps, None, data, f"bundled {path.name}",
                                     query_norm=norm, every_step=base.every_step)
    c, model = base.config, Model.from_specs(specs)
    params = model.with_zero_head(base.params)
    config = MamlConfig(name=f"{c.name}-backbone-{ways}w", ways=ways, inner_lr=base.inner_lr, hidden=c.hidden,
                        channels=c.channels, image_size=c.image_size, head_init=c.head_init, query_norm=c.query_norm,
                        temperature=c.temperature, support_shift=c.support_shift, layers=specs)
    path = save_checkpoint(workdir / f"{ways}way.npz", Checkpoint(config, params))
    return export_checkpoint(path, workdir / f"{ways}way", base.steps, base.inner_lr, data,
                             f"{base.source.removeprefix('bundled ')}'s backbone, zero {ways}-way head",
                             every_step=base.every_step)


def paddle_eager(exp: Exported, provider="cpu", threads=None, dtype="float32"):
    """MAML.adapt/predict, stopping at the fixed point where the graphs do (its softmax is theirs, exact)."""
    import paddle
    from ..maml import MAML
    from ..model import Model, to_tensors
    maml = MAML(Model.from_specs(exp.config.layers), to_tensors(exp.params, dtype), exp.inner_lr, exp.steps,
                stop_at_fixed_point=not exp.every_step)

    def call(xs, ys, xq):
        with paddle.no_grad():
            fast = maml.adapt(paddle.to_tensor(xs.astype(dtype))[None], paddle.to_tensor(ys)[None])
            return maml.predict(fast, paddle.to_tensor(xq.astype(dtype))[None])[0].numpy()
    return lambda xs, ys, xq: lambda: call(xs, ys, xq)


def paddlerec_loop(exp: Exported, provider="cpu", threads=None):
    import warnings
    import paddle
    from . import paddlerec
    from ..maml import shifted_support
    from ..model import Model
    warnings.filterwarnings("ignore", message="When training, we now always track")  # BatchNorm2D in train mode
    net = paddlerec.build_net(Model.from_specs(exp.config.layers), exp.params)

    def call(xs, ys, xq):
        xs, ys = paddle.to_tensor(xs), paddle.to_tensor(ys)
        if exp.config.support_shift:  # the same augmented support set as the graph's (maml.shifted_support)
            xs, ys = (t[0] for t in shifted_support(xs[None], ys[None], exp.config.support_shift))
        fast = paddlerec.adapt(net, xs, ys, exp.steps, exp.inner_lr, exp.config.head_init)
        with paddle.no_grad():
            return fast(paddle.to_tensor(xq)).numpy()

    def bind(xs, ys, xq):
        bound = lambda: call(xs, ys, xq)  # noqa: E731
        bound.steps_run = lambda: exp.steps  # every step, as PaddleRec's loop.backward() loop does
        return bound
    return bind


def paddle_inference(exp: Exported, provider: str, threads: int):
    import paddle.inference as pi
    prefix = exp.onnx.with_name("model")
    config = pi.Config(f"{prefix}.json", f"{prefix}.pdiparams")
    config.disable_mkldnn()  # docs/design.md#paddle-inference-needs-onednn-off
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
    return lambda xs, ys, xq: lambda: call(dict(zip(FUSED_INPUTS, (xs, ys, xq))))


def check_provider(provider: str) -> None:
    """One ProviderError line unless this onnxruntime offers the provider --provider asks for."""
    import onnxruntime as ort
    if provider in GPU and GPU[provider] not in ort.get_available_providers():
        libs = " and TensorRT's libraries" if provider == "tensorrt" else ""
        raise ProviderError(f"--provider {provider}: this onnxruntime {ort.__version__} has no {GPU[provider]} (only "
                            f"{', '.join(ort.get_available_providers())}); install the GPU build{libs}: {INSTALL}")


def on_provider(load, provider: str, options: dict | None = None):
    """`load(providers)` (something that opens an onnxruntime session: an Adapter, an InferenceSession) on
    --provider's device; a GPU session that fell back to the CPU is a ProviderError, never a CPU row."""
    import contextlib
    import io
    import onnxruntime as ort
    if provider == "cpu":
        return load(["CPUExecutionProvider"])
    wanted = [(GPU[provider], options or {})] + (["CUDAExecutionProvider"] if provider == "tensorrt" else [])
    # onnxruntime reports a provider that cannot load by itself, in C++ error logs and a Python print of
    # "EP Error ... Falling back" (seen with TensorRT absent on an H100 box): keep that out of the output
    # and say it in the ProviderError's one line, naming the missing library when onnxruntime did.
    ort.set_default_logger_severity(4)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as said:
            loaded = load(wanted + ["CPUExecutionProvider"])
    finally:
        ort.set_default_logger_severity(2)
    got = getattr(loaded, "session", loaded).get_providers()[0]  # an Adapter holds its session
    if got != GPU[provider]:
        missing = re.search(r"(lib[\w.+-]+\.so[\d.]*): cannot open shared object file", said.getvalue())
        why = f"{missing[1]} not found" if missing else (
            "TensorRT's libraries missing?" if provider == "tensorrt" else "CUDA/cuDNN libraries missing or mismatched?")
        raise ProviderError(f"--provider {provider}: onnxruntime could not load {GPU[provider]} ({why}) and fell back "
                            f"to {got}; {INSTALL}")
    return loaded


def open_session(exp: Exported, provider: str, threads: int, options: dict | None = None):
    """An Adapter of `exp`'s model.onnx on the provider (`on_provider`)."""
    from ..adapter import Adapter
    return on_provider(lambda providers: Adapter(exp.onnx, providers, threads), provider, options)


def fixed_shapes(onnx_path: Path, feeds: dict, out: Path) -> Path:
    """A copy of the graph with the dynamic dimensions of the inputs in `feeds` set to theirs (other inputs as
    they are). onnxruntime then folds the shape arithmetic into constants; left dynamic, those nodes run on
    the CPU provider (84 of them in the 5-way graph, seen on an H100) and a CUDA graph cannot be captured."""
    import onnx
    model = onnx.load(str(onnx_path))
    for value in model.graph.input:
        if value.name in feeds:
            for dim, n in zip(value.type.tensor_type.shape.dim, feeds[value.name].shape):
                dim.dim_value = n  # clears dim_param (a oneof)
    onnx.save(model, str(out))
    return out


def device_call(onnx_path: Path, feeds: dict, outputs: dict, provider: str, threads: int, workdir):
    """A call of the graph `onnx_path` on the GPU with IO binding, returning its outputs as device OrtValues
    (a list in `outputs`' order). `feeds`: input name -> numpy array (copied to the device once) or an
    OrtValue already there (another call's output: it is read in place); `outputs`: name -> shape, written
    into device buffers allocated here. Runs in a CUDA graph where onnxruntime can capture one, on a copy
    of the graph with the numpy inputs' shapes fixed (in `workdir`, a TemporaryDirectory the call keeps
    alive); TF32 off, as in the exactness checks. `call.feed(*arrays)` refills the numpy inputs in place
    (another task of the same shapes); `call.detail` says how it runs."""
    import onnxruntime as ort
    arrays = {k: v for k, v in feeds.items() if isinstance(v, np.ndarray)}
    shapes = "-".join("x".join(map(str, a.shape)) for a in arrays.values())
    fixed = fixed_shapes(onnx_path, arrays, Path(workdir.name) / f"{onnx_path.stem}-{shapes}.onnx")  # one per shape
    fp32 = {"use_tf32": "0"} if provider == "cuda" else {}  # onnxruntime's CUDA default is TF32: 3e-3 off
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    for graph in [True, False] if provider == "cuda" else [False]:
        try:
            session = on_provider(lambda providers: ort.InferenceSession(str(fixed), options, providers=providers),
                                  provider, {**fp32, **({"enable_cuda_graph": "1"} if graph else {})})
            binding = session.io_binding()
            inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) if k in arrays else v for k, v in feeds.items()}
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, value)
            outs = [ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, "cuda", 0)
                    for shape in outputs.values()]
            for name, value in zip(outputs, outs):
                binding.bind_ortvalue_output(name, value)
            session.run_with_iobinding(binding)  # with a CUDA graph: the capture
        except Exception as e:  # noqa: BLE001 - a node off the CUDA provider: no graph, plain IO binding
            if graph and not isinstance(e, ProviderError):
                continue
            raise

        def call(session=session, binding=binding, outs=outs):
            session.run_with_iobinding(binding)  # returns once the run's stream is synchronized
            return outs

        def feed(*new, values=[inputs[k] for k in arrays]):  # into the same device buffers
            for value, a in zip(values, new):
                value.update_inplace(np.ascontiguousarray(a))
        call.feed = feed
        call.detail = "IO binding" + (", CUDA graph" if graph else "")
        call.workdir = workdir  # the fixed-shape copies live as long as a call needs them
        call.inputs = inputs  # the device buffers the call reads
        return call


def onnxruntime(exp: Exported, provider: str, threads: int):
    """model.onnx. CPU: session.run. GPU: `device_call` (IO binding, inputs and logits on the device)."""
    import tempfile
    if provider == "cpu":
        session = open_session(exp, provider, threads).session
        return lambda xs, ys, xq: lambda: session.run([LOGITS], dict(zip(FUSED_INPUTS, (xs, ys, xq))))[0]
    workdir = tempfile.TemporaryDirectory(prefix="maml-bench-gpu-")

    def bind(xs, ys, xq):  # a session per shape: a CUDA graph or a TensorRT engine holds one
        logits = list(xq.shape[:-3]) + [exp.config.ways]  # [Q, ways], or [T, Q, ways] for a batched graph
        outs = device_call(exp.onnx, dict(zip(FUSED_INPUTS, (xs, ys, xq))), {LOGITS: logits}, provider,
                           threads, workdir)
        call = lambda: outs()[0]  # noqa: E731
        call.feed, call.detail = outs.feed, outs.detail
        return call
    return bind


# --- adapt once, predict many: the split rows ------------------------------------------------------------------
#
# `SPLITS[name](exported, provider, threads)` returns two binders, `bind_adapt(x_spt, y_spt)` -> a call returning
# the task's adapted state (in the runtime's own tensors) and `bind_predict(state, x_qry)` -> a call returning the
# logits of x_qry under that state, conversions of the inputs done at bind time as for the fused rows.

def onnxruntime_split(exp: Exported, provider: str, threads: int):
    """adapt.onnx and predict.onnx beside `exp`'s model.onnx (the state: their tensors, by name). CPU:
    session.run; GPU: `device_call`, the state staying on the device between the two. A ValueError (one
    line) when the export has no halves."""
    import tempfile
    # on the CPU (on a GPU only for the halves' names and shapes): checks that they exist and hold model.onnx's weights
    adapter = open_session(exp, "cpu", threads)
    adapt, predict = adapter.halves()
    names = [o.name for o in adapt.get_outputs()]
    if provider == "cpu":
        def bind_adapt(xs, ys):
            return lambda: adapt.run(None, {SUPPORT_IMAGES: xs, SUPPORT_LABELS: ys})

        def bind_predict(state, xq):
            feeds = {**dict(zip(names, state)), QUERY_IMAGES: xq}
            return lambda: predict.run([LOGITS], feeds)[0]
        return bind_adapt, bind_predict
    workdir, folder = tempfile.TemporaryDirectory(prefix="maml-bench-gpu-"), exp.onnx.parent

    def bind_adapt(xs, ys):
        shapes = {name: adapter.state_shapes[name] for name in names}  # in adapt's output order
        return device_call(folder / ADAPT_FILE, {SUPPORT_IMAGES: xs, SUPPORT_LABELS: ys}, shapes, provider, threads,
                           workdir)

    def bind_predict(state, xq):  # state: OrtValues on the device, an adapt call's outputs
        outs = device_call(folder / PREDICT_FILE, {**dict(zip(names, state)), QUERY_IMAGES: xq},
                           {LOGITS: [len(xq), exp.config.ways]}, provider, threads, workdir)
        call = lambda: outs()[0]  # noqa: E731
        call.detail = outs.detail
        return call
    return bind_adapt, bind_predict


def query_norm(config) -> str:
    """How `config`'s batch norms normalise the queries of an adapted task, "support" or "transductive", read
    from its layer specs as `model.Model.query_norm` reads the layers, without Paddle (a kit's config is a
    plain namespace). A spec without the key was written before it existed, when queries were transductive."""
    norms = {s.get("query_norm", "transductive") for s in config.layers if s["type"] == "BatchNorm"}
    if len(norms) > 1:
        raise ValueError(f"the batch norm layers disagree on query_norm: {sorted(norms)}")
    return norms.pop() if norms else "transductive"


class TorchMAML:
    """The PyTorch peer a PyTorch user would write (learn2learn-style): a functional conv-4 from the layer
    specs, `torch.autograd.grad` per SGD step. `adapt` -> the state (fast weights and, under query_norm
    "support", each batch norm's support statistics), `predict` -> logits, on torch tensors. On --provider
    cuda/tensorrt it runs on the GPU, inputs and outputs on the device (as onnxruntime's IO binding), TF32
    off (onnxruntime's CUDA provider computes in full fp32). Where the graphs stop at a fixed point (not
    `exp.every_step`), it stops there too: its loss gradient is then `layers.softmax_cross_entropy`'s, exact
    (probabilities below float32's smallest normal number are zero), and a step whose gradient is exactly zero
    ends the loop (`steps_run`: the steps the last `adapt` ran). Optional: `pip install "maml-export[torch]"`;
    without it (or without a CUDA device) an ImportError says why, and the rows say it."""

    def __init__(self, exp: Exported, provider="cpu", threads=None):
        try:
            import torch
            import torch.nn.functional as tf
        except ImportError:
            raise ImportError('PyTorch is not installed (optional peer: pip install "maml-export[torch]")') from None
        self.torch, self.tf = torch, tf
        self.device = "cuda" if provider in GPU else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ImportError(f"this PyTorch {torch.__version__} sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        self.exp, self.specs = exp, exp.config.layers
        self.stop, self.steps_run = not exp.every_step, exp.steps
        self.meta = [torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in exp.params.values()]
        self.support_norm = query_norm(exp.config) == "support"
        # the layers the support statistics need: up to the last batch norm (model.Model.support_stats)
        self.stats_upto = max(i for i, s in enumerate(self.specs) if s["type"] == "BatchNorm") + 1
        self.temperature = self.specs[-1].get("temperature", 1.0)  # layers.Linear's
        self.support_shift = self.specs[-1].get("support_shift", 0)  # layers.Linear's

    def tensor(self, a: np.ndarray):
        return self.torch.from_numpy(a).to(self.device)

    def forward(self, params, x, specs=None, stats=None, record=None):
        """The layers `specs` (default: all) on x (N, C, H, W). Batch norm normalises with the (mean, var) of
        `stats` where given (queries under the support's statistics), else with x's own statistics, which
        `record` (a list), where given, collects."""
        tf, it, given = self.tf, iter(params), iter(stats or ())
        for spec in self.specs if specs is None else specs:
            kind = spec["type"]
            if kind == "Conv2d":
                x = tf.conv2d(x, next(it), stride=spec["stride"], padding=spec["padding"])
            elif kind == "BatchNorm":
                weight, bias = next(it), next(it)
                if stats is None and record is None:  # the batch's own statistics, as MAML adapts with them
                    x = tf.batch_norm(x, None, None, weight, bias, training=True, eps=spec["eps"])
                else:  # per channel over (N, H, W), the variance biased, as batch norm normalises
                    mean, var = next(given) if stats is not None else (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
                    if record is not None:
                        record.append((mean, var))
                    x = tf.batch_norm(x, mean, var, weight, bias, training=False, eps=spec["eps"])
            elif kind == "MaxPool2":
                x = tf.max_pool2d(x, 2, 2)
            elif kind == "ReLU":
                x = tf.relu(x)
            elif kind == "Flatten":
                x = x.flatten(1)
            elif kind == "Linear":
                x = x @ next(it) + next(it)  # weight stored (in, out)
        return x

    def adapt(self, xs, ys) -> tuple:
        """(fast weights, support statistics or None) after the SGD steps on the support set (xs, ys)."""
        torch, tf, exp = self.torch, self.tf, self.exp
        if self.support_shift:  # 9 views of each support image, as maml.shifted_support makes them
            k, (H, W), windows = self.support_shift, xs.shape[-2:], support_windows(self.support_shift)
            padded = tf.pad(xs, (k, k, k, k), mode="replicate")
            xs = torch.cat([padded[..., top:top + H, left:left + W] for top, left in windows])
            ys = ys.repeat(len(windows))
        params, features = [p.clone().requires_grad_() for p in self.meta], None
        if exp.config.head_init == "prototypes":  # the head from the support's Euclidean prototypes
            # (S, F), with autograd: the first step goes on from this forward, as maml.MAML._start's does
            features = self.forward(params[:-2], xs, self.specs[:-1])
            with torch.no_grad():
                onehot = tf.one_hot(ys, exp.config.ways).to(xs.dtype)  # (S, ways)
                prototypes = onehot.T @ features / onehot.sum(0)[:, None]
            params[-2:] = [(2 * prototypes.T).requires_grad_(), (-(prototypes ** 2).sum(1)).requires_grad_()]
        self.steps_run = 0
        for k in range(exp.steps):
            first = k == 0 and features is not None
            logits = self.forward(params[-2:], features, self.specs[-1:]) if first else self.forward(params, xs)
            if self.stop:  # the graphs' exact stop (maml.steps_to_fixed_point); the check waits for the GPU
                dlogits = self.exact_dlogits(logits, ys)
                if not bool((dlogits != 0).any()):
                    break
                grads = torch.autograd.grad(logits, params, dlogits)
            else:  # as a learn2learn user writes it
                grads = torch.autograd.grad(tf.cross_entropy(logits, ys), params)
            params = [(p - exp.inner_lr * g).detach().requires_grad_() for p, g in zip(params, grads)]
            self.steps_run += 1
        # (where it stopped, the support statistics below take one more forward than the graphs, which keep the
        # stopping forward's: up to the last batch norm, a fraction of a step)
        params, stats = [p.detach() for p in params], None
        if self.support_norm:  # the support set's statistics under the fast weights, for the queries
            stats = []
            with torch.no_grad():
                self.forward(params, xs, self.specs[:self.stats_upto], record=stats)
        return self._done((params, stats))

    def exact_dlogits(self, logits, ys):
        """The gradient of the mean cross-entropy for the logits, as `layers.softmax_cross_entropy` computes it:
        the log-softmax written out, probabilities below float32's smallest normal number zero, so that a
        saturated support loss has a gradient of exactly zero where the graphs' has."""
        log_p = logits - logits.max(-1, keepdim=True).values
        log_p = log_p - log_p.exp().sum(-1, keepdim=True).log()
        probs = self.torch.where(log_p > LOG_TINY, log_p.exp(), self.torch.zeros_like(log_p))
        return (probs - self.tf.one_hot(ys, logits.shape[-1]).to(logits.dtype)) / len(ys)

    def predict(self, state: tuple, xq):
        """Logits of the queries xq under `adapt`'s state, divided by the head's temperature."""
        params, stats = state
        with self.torch.no_grad():
            logits = self.forward(params, xq, stats=stats)
        return self._done(logits if self.temperature == 1.0 else logits / self.temperature)

    def _done(self, out):
        if self.device == "cuda":  # a call's time includes its kernels, as onnxruntime's run does
            self.torch.cuda.synchronize()
        return out


def pytorch_eager(exp: Exported, provider="cpu", threads=None):
    """The PyTorch peer (`TorchMAML`) adapting and predicting in one call."""
    peer = TorchMAML(exp, provider, threads)

    def bind(xs, ys, xq):
        xs, ys, xq = peer.tensor(xs), peer.tensor(ys).long(), peer.tensor(xq)
        call = lambda: peer.predict(peer.adapt(xs, ys), xq)  # noqa: E731
        call.steps_run = lambda: peer.steps_run
        return call
    return bind


def pytorch_split(exp: Exported, provider="cpu", threads=None):
    """The PyTorch peer (`TorchMAML`): adapt, then predict, as two calls."""
    peer = TorchMAML(exp, provider, threads)

    def bind_adapt(xs, ys):
        xs, ys = peer.tensor(xs), peer.tensor(ys).long()
        call = lambda: peer.adapt(xs, ys)  # noqa: E731
        call.steps_run = lambda: peer.steps_run
        return call

    def bind_predict(state, xq):
        xq = peer.tensor(xq)
        return lambda: peer.predict(state, xq)
    return bind_adapt, bind_predict


RUNTIMES = {"paddle-eager": paddle_eager, "onnxruntime": onnxruntime, "paddlerec-loop": paddlerec_loop,
            "paddle-inference": paddle_inference, "pytorch-eager": pytorch_eager}  # eager first: the reference
SPLITS = {"onnxruntime": onnxruntime_split, "pytorch-eager": pytorch_split}  # GPU_ROWS both
