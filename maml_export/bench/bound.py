"""A lower bound on onnxruntime's CPU latency for an adaptation: work any graph of it must do, timed alone.

Any graph of the adaptation does at least its matrix products (`machine.matrix_products`), and stock
onnxruntime does them with its own GEMM (MLAS: `MatMul`, and `Conv`/`ConvTranspose` after im2col). Here each
product runs alone as one onnxruntime `MatMul` of its exact shape, its operands graph inputs (the adapted
weights are not constants, so nothing is prepacked) and im2col/col2im left out, in the fastest of four
forms: (m, k) x (k, n) or its transpose (n, k) x (k, m), whole or as a batch of one product per image.
Beside them, one piece of the rest: the query set's first block after its convolution must take the batch
statistics of the full-size map and max-pool it (normalizing can wait until after the pool, on a quarter
of the values, so it is not counted): `ReduceMean` and `ReduceSumSquare`, and the faster of `MaxPool` and a
reshape + `ReduceMax`. Everything else (the other blocks' batch norm, pooling and ReLU and their backward,
im2col, the loss, the SGD updates) is left out, so the sum is a lower bound for any graph built from
onnxruntime's kernels on this machine. All are timed round-robin with the floor's numpy GEMM
(`machine.GemmWorker`) and onnxruntime's own MatMul of the same 2048^3 product, as `maml-bench` times its
rows. (docs/benchmarks.md#a-lower-bound-for-onnxruntime: the goal was 5-way 1-shot at 2x the floor.)

Example:
    >>> from maml_export.specs import conv4_specs
    >>> report = product_bound(conv4_specs(5), support=5, query=75, steps=5, threads=2, rounds=3)
    >>> report["bound_ms"] > report["products_ms"] > 0
    True
"""
from __future__ import annotations

from .benchmark import time_interleaved
from .machine import GemmWorker, matrix_products

FORMS = ("whole", "whole, transposed", "per image", "per image, transposed")


def _session_call(nodes: list, inputs: dict, constants: dict, threads: int):
    """A call running a one-off onnxruntime graph of `nodes` on random float32 `inputs` (name -> shape);
    `constants` (name -> int64 list) are its initializers."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(nodes, "bound", [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))
                                               for name, shape in inputs.items()],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(v, np.int64), name) for name, v in constants.items()])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # dozens of sessions take turns: an idle one's threads must not spin on the cores the next one needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in inputs.items()}
    return lambda: session.run(None, feeds)


def _matmul(a_shape: tuple, b_shape: tuple, threads: int):
    from onnx import helper
    return _session_call([helper.make_node("MatMul", ["a", "b"], ["c"])], {"a": a_shape, "b": b_shape}, {}, threads)


def _first_block(shape: tuple, threads: int) -> dict:
    """Calls for the query's first block after its conv, on its (N, C, H, W) map: the batch statistics
    (mean, sum of squares per channel) and two forms of the 2x2 max-pool."""
    from onnx import helper
    n, c, h, w = shape
    x = {"x": shape}
    axes = {"axes": [0, 2, 3]}
    return {"statistics": _session_call([helper.make_node("ReduceMean", ["x", "axes"], ["mean"]),
                                         helper.make_node("ReduceSumSquare", ["x", "axes"], ["squares"])], x, axes,
                                        threads),
            "MaxPool": _session_call([helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2])],
                                     x, {}, threads),
            "reshape + ReduceMax": _session_call(
                [helper.make_node("Reshape", ["x", "windows"], ["x6"]),
                 helper.make_node("ReduceMax", ["x6", "window_axes"], ["p"], keepdims=0)],
                x, {"windows": [n, c, h // 2, 2, w // 2, 2], "window_axes": [3, 5]}, threads)}


def _forms(p) -> list[tuple | None]:
    """(a shape, b shape) of each of FORMS for product `p` (None where a form does not apply)."""
    whole, i = [((p.m, p.k), (p.k, p.n)), ((p.n, p.k), (p.k, p.m))], p.images
    if p.axis == "n":  # (m, k) x (i, k, n/i) and (i, n/i, k) x (k, m)
        return whole + [((p.m, p.k), (i, p.k, p.n // i)), ((i, p.n // i, p.k), (p.k, p.m))]
    if p.axis == "k":  # (i, m, k/i) x (i, k/i, n), the sum over i not counted (a lower bound)
        return whole + [((i, p.m, p.k // i), (i, p.k // i, p.n)), ((i, p.n, p.k // i), (i, p.k // i, p.m))]
    return whole + [None, None]


def product_bound(specs: list[dict], support: int, query: int, steps: int, threads: int, rounds: int = 15,
                  image_size: int = 28) -> dict:
    """Each product's best p50 over FORMS (ms) and their sum; the query's first block's statistics and its
    fastest pool; their total (`bound_ms`) and the floor at the numpy GEMM's p50 rate (onnxruntime's rate on
    the same 2048^3 product beside it)."""
    products = matrix_products(specs, support, query, steps, image_size)
    calls, shapes = {}, {}
    for j, p in enumerate(products):
        for form, ab in zip(FORMS, _forms(p)):
            if ab is not None:
                shapes[j, form] = ab
                calls[ab] = calls.get(ab) or _matmul(*ab, threads)
    first = next((p for p in products if p.axis == "n" and p.count == 1), None)  # the query's first conv forward
    size = round((first.n // query) ** 0.5) if first else 0  # its map is size x size
    block = _first_block((query, first.m, size, size), threads) if size and size % 2 == 0 else {}
    n = 2048  # the floor's product, in numpy (OpenBLAS) and in onnxruntime (MLAS)
    with GemmWorker(threads, n) as gemm:
        timed = time_interleaved({**calls, **block, "gemm": gemm, "ort_gemm": _matmul((n, n), (n, n), threads)},
                                 warmup=1, runs=rounds, max_seconds=0, pause=0)
    p50 = {name: stats["p50_ms"] for name, (stats, _) in timed.items()}
    rate, ort_rate = gemm.flops / p50["gemm"] / 1e6, gemm.flops / p50["ort_gemm"] / 1e6  # GFLOP/s
    rows = []
    for j, p in enumerate(products):
        ms = {form: p50[shapes[j, form]] for form in FORMS if (j, form) in shapes}
        best = min(ms, key=ms.get)
        rows.append({**p._asdict(), "flops": p.flops, "form": best, "ms_each": ms[best], "ms": ms[best] * p.count,
                     "gflops": 2 * p.m * p.k * p.n / ms[best] / 1e6, "whole_ms_each": min(ms[f] for f in FORMS[:2])})
    flops, products_ms = sum(p.flops for p in products), sum(r["ms"] for r in rows)
    pools = {name: p50[name] for name in block if name != "statistics"}
    block_ms = {"statistics": p50["statistics"], "pool": min(pools.values()), "pool_forms": pools} if block else {}
    bound = products_ms + (block_ms["statistics"] + block_ms["pool"] if block else 0)
    floor = flops / rate / 1e6
    return {"flops": flops, "gemm_p50_gflops": rate, "onnxruntime_gemm_p50_gflops": ort_rate, "floor_ms": floor,
            "products_ms": products_ms, "query_first_block_ms": block_ms, "bound_ms": bound,
            "floor_multiple": bound / floor, "products_floor_multiple": products_ms / floor,
            "threads": threads, "rounds": rounds, "products": rows}
