"""Paddle static program -> ONNX: the ops paddle2onnx can take, the conversion, its graph cleaned and stamped.

Stages 2 and 3 of `export.export_model`:

  check    every op of the saved PIR program is in paddle2onnx's supported list (it aborts the process on
           any other one: docs/design.md#paddle2onnx-aborts-on-an-unsupported-op) and none would change the maths (`*_grad`, unpool,
           batch_norm, pad3d whose constant paddle2onnx 2.1.0 mis-converts): `inspect_program`, `check_ops`
  convert  paddle2onnx in a child process, so that an abort there is an ExportError here (`convert`); then
           the graph cleaned (docs/design.md#raw-export-leaves-unused-initializers), its output and dims named, the metadata a deployment needs
           written, onnx.checker run (`finish_onnx`)
"""
from __future__ import annotations

import collections
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import paddle
import paddle2onnx

from . import __version__
from .checkpoint import weights_sha256
from .errors import ExportError
from .maml import split_step_sizes

BATCH_NORM = {  # the metadata's words for each query_norm (layers.BatchNorm)
    "support": "the support set's own statistics in each SGD step; queries: the support set's statistics under "
               "the adapted weights, so each query's logits depend on the support set and that image alone",
    "transductive": "statistics of the batch at hand (the support set in each step, then the query set: a "
                    "query's logits depend on the other queries)"}

# paddle2onnx matches a PIR op by its name after this renaming (Paddle2ONNX exporter.h,
# `convert_pir_op_name`; the same pairs are in the strings of the 2.1.0 binary).
_PIR_TO_P2O = {
    "matmul": "matmul_v2", "batch_norm_": "batch_norm", "topk": "top_k_v2", "expand": "expand_v2",
    "repeat_interleave_with_tensor_index": "repeat_interleave", "assign_value_": "assign_value",
    "flatten": "flatten_contiguous_range", "unsqueeze": "unsqueeze2", "arange": "range",
    "argmax": "arg_max", "argmin": "arg_min", "floor_divide": "elementwise_floordiv",
    "subtract": "elementwise_sub", "multiply": "elementwise_mul", "divide": "elementwise_div",
    "remainder": "elementwise_mod", "minimum": "elementwise_min", "maximum": "elementwise_max",
    "min": "reduce_min", "max": "reduce_max", "mean": "reduce_mean", "sum": "reduce_sum",
    "prod": "reduce_prod", "any": "reduce_any", "all": "reduce_all", "numel": "size",
    "hardswish": "hard_swish", "hardsigmoid": "hard_sigmoid", "add": "elementwise_add",
    "add_n": "sum", "grid_sample": "grid_sampler", "nonzero": "where_index"}
# Ops the converter skips (graph inputs/outputs, control flow shells) or that hold the weights.
_P2O_SKIPPED = {"pd_op.data", "pd_op.feed", "pd_op.fetch", "pd_op.if", "pd_op.while", "cf.yield",
                "pd_op.print", "builtin.parameter"}
# Convertible, but wrong for this graph: docs/design.md#paddle2onnx-converts-no-gradient-op and #saving-makes-batch-norm-inference-mode, and layers.MaxPool2's eager path.
_FORBIDDEN = {"batch_norm": "jit.save turns it into inference mode (running statistics)",
              "unpool": "the eager-only max-pool backward leaked into the static graph",
              # paddle2onnx 2.1.0's Pad3DMapper reads the attribute "value", PIR calls it "pad_value": the
              # ONNX Pad gets an uninitialised constant (seen: 4.9e+22). layers.py concatenates zeros instead.
              "pad3d": "paddle2onnx 2.1.0 converts its constant as uninitialised memory"}


# ---------------------------------------------------------------------------------------------
# check (export stage 2)
# ---------------------------------------------------------------------------------------------

@dataclass
class Program:
    """What the later stages need to know about a saved PIR program."""

    ops: collections.Counter  # PIR op name -> count, every block


def inspect_program(prefix: Path) -> Program:
    """Load `prefix`.json (static mode, restored afterwards) and list its ops."""
    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        program, _, _ = paddle.static.load_inference_model(str(prefix), paddle.static.Executor(paddle.CPUPlace()))
        ops: collections.Counter = collections.Counter()
        stack = [program.global_block()]
        while stack:
            for op in stack.pop().ops:
                ops[op.name()] += 1
                stack.extend(op.blocks())  # if/while bodies
        return Program(ops)
    finally:
        if was_dynamic:
            paddle.disable_static()


def p2o_name(pir_name: str) -> str:
    """The name paddle2onnx looks a PIR op up by: 'pd_op.multiply' -> 'elementwise_mul'."""
    if pir_name.startswith("pd_op."):
        name = pir_name[len("pd_op."):]
    elif pir_name.startswith("builtin."):
        name = pir_name.replace(".", "_", 1)
    else:
        name = pir_name
    return _PIR_TO_P2O.get(name, name)


def check_ops(ops: collections.Counter) -> None:
    """Raise one ExportError naming every op paddle2onnx lacks or that must not be in this graph."""
    supported = set(paddle2onnx.paddle2onnx_cpp2py_export.get_all_supported_operators_pir())
    problems = []
    for op in sorted(ops):
        if op in _P2O_SKIPPED:
            continue
        name = p2o_name(op)
        bad = [why for key, why in _FORBIDDEN.items() if key in name]
        if name.endswith("_grad"):
            bad.append("a gradient op (docs/design.md#paddle2onnx-converts-no-gradient-op)")
        if name not in supported:
            bad.append(f"paddle2onnx {paddle2onnx.__version__} cannot convert it")
        if bad:
            problems.append(f"{op} x{ops[op]} ({'; '.join(bad)})")
    if problems:
        raise ExportError("the static graph holds ops that cannot be exported: " + ", ".join(problems))


# ---------------------------------------------------------------------------------------------
# convert (export stage 3)
# ---------------------------------------------------------------------------------------------

_CONVERT = """
import sys, paddle2onnx
model, params, out, opset = sys.argv[1:5]
# optimize_tool='None': the default (polygraphy) pip-installs packages at run time (docs/design.md#paddle2onnx-optimizer-installs-packages)
paddle2onnx.export(model, params, out, opset_version=int(opset), auto_upgrade_opset=False,
                   enable_onnx_checker=True, optimize_tool='None')
"""


def convert(prefix: Path, onnx_path: Path, opset: int, timeout: float = 600) -> None:
    """paddle2onnx in a child process: a C++ abort there is an ExportError here, not a dead caller."""
    onnx_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", _CONVERT, f"{prefix}.json", f"{prefix}.pdiparams", str(onnx_path), str(opset)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExportError(f"paddle2onnx did not finish within {timeout:.0f} s") from None
    if done.returncode != 0 or not onnx_path.is_file():
        text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + "\n" + done.stderr)  # drop terminal colours
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        picked = [ln for ln in lines if any(k in ln for k in ("[ERROR]", "not supported", "Error:", "FatalError"))]
        picked.sort(key=lambda ln: "[ERROR]" not in ln)  # paddle2onnx's own reason first
        hint = "; ".join(dict.fromkeys(picked)) or (lines[-1] if lines else "no output")
        how = f"exit status {done.returncode}" if done.returncode >= 0 else f"killed by signal {-done.returncode}"
        raise ExportError(f"paddle2onnx failed ({how}): {hint}")


def nested_nodes(nodes) -> list:
    """Every node inside the subgraphs (`If` branches, loop bodies) of `nodes`, at any depth. A subgraph may
    read any tensor of the graphs around it by name without listing it as an input of its `If`, so a pass
    that renames or drops top-level tensors must look in here too (adapt's steps are `If`s:
    docs/design.md#adaptation-stops-at-a-fixed-point)."""
    return [n for sub in _subgraphs(nodes) for n in sub.node]


def _branches(node) -> list:
    """The subgraphs (GraphProto) of one node's attributes: an `If`'s two branches, a loop's body; none for others."""
    return [sub for attr in node.attribute
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)]


def _subgraphs(nodes) -> list:
    """Every subgraph (GraphProto) inside `nodes`, at any depth."""
    found, stack = [], list(nodes)
    while stack:
        subs = _branches(stack.pop())
        found.extend(subs)
        stack.extend(n for sub in subs for n in sub.node)
    return found


def _prune_subgraphs(nodes) -> None:
    """`keep_live` in every `If` branch of `nodes`, outermost first: paddle2onnx leaves dead constants there as in
    the main graph, and onnxruntime warns about each. (Recursive over the live nodes: `keep_live` rewrites a
    graph's node list, so subgraphs collected before it would be stale copies.)"""
    for node in nodes:
        for sub in _branches(node):
            keep_live(sub, list(sub.node))
            _prune_subgraphs(sub.node)


def clean_graph(model: onnx.ModelProto, inputs: list[str], outputs: list[str],
                dims: dict[str, dict[int, str | int]]) -> onnx.ModelProto:
    """Constants -> initializers, Identity chains bypassed, dead nodes and unused initializers dropped; the
    graph's inputs and outputs renamed to `inputs` and `outputs` (in order: the contract's names, which
    Paddle's input specs and paddle2onnx's outputs cannot carry), and their dims named or fixed:
    `dims[name] = {axis: "S" (a named dynamic dim) or 8 (a fixed one)}`."""
    g = model.graph
    if len(g.input) != len(inputs) or len(g.output) != len(outputs):
        raise ExportError(f"the converted graph has {len(g.input)} inputs and {len(g.output)} outputs, "
                          f"expected {len(inputs)} and {len(outputs)}")
    # Constant nodes -> initializers: the weights become inspectable, and no Constant is left dead.
    # (Nodes are collected into lists and written back once: removing from a protobuf list one by
    # one is quadratic, 10 s for a 10-step graph.)
    nodes = []
    for node in g.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            tensor = g.initializer.add()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        else:
            nodes.append(node)
    # Identity nodes: consumers read the Identity's input instead. The raw graph outputs are names
    # of their own: renamed below, whatever produces them.
    alias = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Identity"}

    def resolve(name):
        while name in alias:
            name = alias[name]
        return name

    finals = [resolve(o.name) for o in g.output]
    if len(set(finals)) != len(finals):
        raise ExportError("two outputs of the converted graph are the same tensor")
    keep = [n for n in nodes if n.op_type != "Identity"]
    rename = {**dict(zip(finals, outputs)), **{i.name: new for i, new in zip(g.input, inputs)}}
    for n in keep:
        n.input[:] = [rename.get(resolve(i), resolve(i)) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
    for n in nested_nodes(keep):  # names are unique across subgraphs (SSA), so only outer ones match
        n.input[:] = [rename.get(resolve(i), resolve(i)) for i in n.input]
    for init in g.initializer:
        init.name = rename.get(init.name, init.name)
    for vi, name in list(zip(g.input, inputs)) + list(zip(g.output, outputs)):
        vi.name = name
    keep_live(g, keep)
    _prune_subgraphs(g.node)
    del g.value_info[:]  # intermediate shapes of the raw graph refer to removed names
    for vi in list(g.input) + list(g.output):
        for axis, value in dims.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[axis]
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
    lost = [o for o in outputs if o not in produced]
    if lost:
        raise ExportError(f"graph cleaning lost the producer of {', '.join(lost)}")
    return model


_VIEWS = {"Reshape", "Unsqueeze", "Squeeze", "Flatten"}  # ops that only change a tensor's shape, never its values


def fold_view_chains(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each chain of view ops (Reshape, Unsqueeze, Squeeze, Flatten) whose result has a static shape becomes one
    Reshape to that shape from the chain's source, or nothing where the shape is the source's own.

    Why: the layers index parameters task-stacked, so predict.onnx adds a task axis to each state input and
    reshapes it back (`w.unsqueeze(0)` then `w.reshape([T * O, ...])`): 54 of its 106 nodes, about a fifth of a
    one-query prediction's time in onnxruntime, which does not fuse them itself. Values are untouched, so the
    graph computes bit for bit what it did (the export's parity checks run on the folded graphs)."""
    inferred = onnx.shape_inference.infer_shapes(model)

    def static(vi):
        dims = vi.type.tensor_type.shape.dim
        if not vi.type.tensor_type.HasField("shape") or not all(d.HasField("dim_value") for d in dims):
            return None
        return [d.dim_value for d in dims]

    g = model.graph
    shapes = {vi.name: static(vi) for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output)
              + list(inferred.graph.output)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    producer = {o: n for n in g.node for o in n.output}
    outputs = {o.name for o in g.output}
    replace: dict[str, str] = {}  # tensor -> the tensor consumers read instead
    new_nodes, counter = [], 0
    for n in g.node:
        if n.op_type not in _VIEWS or shapes.get(n.output[0]) is None or n.output[0] in outputs:
            continue
        source = n.input[0]
        while source in producer and producer[source].op_type in _VIEWS:  # to the start of the chain
            source = producer[source].input[0]
        if source == n.input[0] and n.op_type == "Reshape":
            continue  # a single Reshape already
        target = shapes[n.output[0]]
        if shapes.get(source) == target:
            replace[n.output[0]] = source
        else:
            counter += 1
            shape_name = f"{n.output[0]}__folded_shape"
            g.initializer.append(onnx.numpy_helper.from_array(np.array(target, dtype=np.int64), shape_name))
            new_nodes.append((n, onnx.helper.make_node("Reshape", [source, shape_name], [n.output[0]],
                                                       name=f"{n.name or n.output[0]}__folded")))
    swap = {id(old): new for old, new in new_nodes}
    nodes = [swap.get(id(n), n) for n in g.node if n.output[0] not in replace]
    for n in nodes + nested_nodes(nodes):
        n.input[:] = [replace.get(i, i) for i in n.input]
    keep_live(g, nodes)  # drops the chains' interiors, which no output needs any more
    return model


def keep_live(g: onnx.GraphProto, nodes: list) -> None:
    """Set the graph's nodes to those of `nodes` (in order) that an output needs, and its initializers to the
    used ones: walk back from the outputs; a node is live when one of its outputs is needed."""
    needed, live = {o.name for o in g.output}, []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(i for i in n.input if i)
            needed.update(i for sub in nested_nodes([n]) for i in sub.input if i)  # its subgraphs' outer reads
    del g.node[:]
    g.node.extend(reversed(live))
    used = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(used)


CALIBRATION_KEYS = ("temperature", "split", "tasks", "query", "ece_before", "ece_after")


def metadata(config, steps: int, inner_lr: float, params: dict, opset: int, task_batch: int = 0,
             every_step: bool = False, calibration: dict | None = None) -> dict[str, str]:
    """The ONNX metadata_props: what a deployment must know to feed the graph and trust it. `task_batch`
    is "0" for the single-task graph (no task axis; an export without the key is one too), else T.
    `every_step` is "1" where adaptation runs all its steps (a task-batched graph, or maml-export --every-step),
    "0" where it stops at a fixed point of the SGD (`contract.every_step` reads an export without the key).
    `calibration`: how the temperature was fitted (a checkpoint's `state["calibration"]`), in `calibration` as
    JSON; "none" says that the probabilities are not calibrated (`adapter.Adapter.calibrated`)."""
    t = f"{task_batch}, " if task_batch else ""
    learned = split_step_sizes(params)[1]  # --learn-inner-lr's step sizes, layer -> (K,); empty without
    return {"ways": str(config.ways), "steps": str(steps), "every_step": str(int(every_step or bool(task_batch))),
            "inner_lr": repr(float(inner_lr)),
            # --learn-inner-lr: each layer's step size at each step (what the graph holds), inner_lr their start
            **({"inner_lr_learned": json.dumps({layer: [float(x) for x in v] for layer, v in learned.items()})}
               if learned else {}),
            **config.preprocessing.metadata(),  # channels, image_size, pixels, resize, input_range
            "task_batch": str(task_batch), "head_init": config.head_init,
            "input_layout": f"x_spt [{t}S, C, H, W] float32, y_spt [{t}S] int64 in 0..ways-1, x_qry [{t}Q, C, H, W] "
                            f"float32 -> logits [{t}Q, ways]",
            "query_norm": config.query_norm, "batch_norm": BATCH_NORM[config.query_norm],
            "temperature": repr(float(config.temperature)),
            "calibration": json.dumps({k: calibration[k] for k in CALIBRATION_KEYS if k in calibration})
                           if calibration else "none",
            "config_name": config.name, "shots_trained": str(config.shots), "weights_sha256": weights_sha256(params),
            "weights_sha256_scheme": weights_sha256.__doc__, "config": json.dumps(config.to_dict()),
            "opset": str(opset), "maml_export_version": __version__, "paddle_version": paddle.__version__,
            "paddle2onnx_version": paddle2onnx.__version__, "protocol": config.protocol}


def finish_onnx(onnx_path: Path, meta: dict[str, str], inputs: list[str], outputs: list[str],
                dims: dict[str, dict[int, str | int]], doc: str) -> collections.Counter:
    """Clean (`clean_graph`), stamp and check the converted model in place; returns its op-type histogram, the
    nodes of `If` branches included."""
    model = onnx.load(str(onnx_path))
    model = fold_view_chains(clean_graph(model, inputs, outputs, dims))
    onnx.helper.set_model_props(model, meta)
    model.producer_name, model.producer_version = "maml-export", __version__
    model.doc_string = doc
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - checker raises ValidationError and InferenceError
        raise ExportError(f"the cleaned ONNX graph fails onnx.checker: {str(e).splitlines()[0]}") from e
    onnx.save(model, str(onnx_path))
    return collections.Counter(n.op_type for n in list(model.graph.node) + nested_nodes(model.graph.node))
