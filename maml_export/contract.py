"""The exported graphs' contract, in one place: file names, input and output names, tolerances, and how
logits are compared against a reference (`compare_logits`, `compare_settled`).

Paddle-free (numpy only), so that the exporter, its validation, the onnxruntime `Adapter` and the benchmark
all read the same names. An export folder holds three graphs of the same weights (docs/deploy.md):

    model.onnx    x_spt [S, C, H, W], y_spt [S], x_qry [Q, C, H, W]  -> logits [Q, ways]   (adapt + predict)
    adapt.onnx    x_spt, y_spt                                       -> the task's state (named tensors)
    predict.onnx  the task's state (the same names), x_qry [Q, ...]  -> logits [Q, ways]

The task's state is every fast weight under its parameter name ("conv1.weight", ..., "fc1.bias") and, when
queries are normalised with the support set's statistics, each batch norm's "bnK.mean" and "bnK.var".
"""
from __future__ import annotations

from typing import Callable

import numpy as np

MODEL_FILE, ADAPT_FILE, PREDICT_FILE = "model.onnx", "adapt.onnx", "predict.onnx"
SUPPORT_IMAGES, SUPPORT_LABELS, QUERY_IMAGES = "x_spt", "y_spt", "x_qry"
FUSED_INPUTS = (SUPPORT_IMAGES, SUPPORT_LABELS, QUERY_IMAGES)
ADAPT_INPUTS = (SUPPORT_IMAGES, SUPPORT_LABELS)
LOGITS = "logits"

# Parity of an export with eager Paddle: max|a - b| / max|reference| of the logits (parity.py,
# docs/deploy.md#parity-tolerance).
RTOL = 1e-4
# adapt.onnx -> predict.onnx against model.onnx, and a query alone against its row in a batch: the same
# onnxruntime kernels on the same values, so only the order of float sums may differ.
SPLIT_RTOL = 1e-5

# The most inner SGD steps an export unrolls. Every step is traced into the graphs, so tracing time and memory grow
# with them: 20 steps export (trace, convert, parity) in 1.5 minutes on 2 cores at 1.6 GB; at 50 Paddle's tracing
# failed ("forward doesn't exist in the Module transformed from AST"), at 1000 it hit Python's recursion limit
# after 10 minutes and 8 GB. maml-export refuses more before any work.
MAX_STEPS = 20

# The loss gradient's probabilities below exp(LOG_TINY), float32's smallest normal number (1.18e-38), are zero,
# so that a saturated softmax gives a gradient of exactly zero in every runtime: the fixed point the single-task
# graphs stop at (layers.softmax_cross_entropy; maml-bench's PyTorch peer stops there too).
LOG_TINY = -87.3

# Metadata keys every graph carries (onnx metadata_props), read by `adapter.Adapter`.
REQUIRED_METADATA = ("ways", "steps", "inner_lr", "image_size", "channels")


def every_step(meta: dict) -> bool:
    """Whether a graph with ONNX metadata `meta` runs all its SGD steps (no `If`: "every_step" "1") or stops at a
    fixed point of the SGD ("0"; docs/design.md#adaptation-stops-at-a-fixed-point). An export written before the
    key: every step where it adapts a batch of tasks (those never stopped), else the stop."""
    return meta.get("every_step", "1" if int(meta.get("task_batch") or 0) else "0") == "1"


def state_names(param_names, batch_norms, query_norm: str) -> list[str]:
    """The task state's tensor names, in graph order: the parameters, then (query_norm "support") each batch
    norm layer's mean and var."""
    stats = [f"{bn}.{k}" for bn in batch_norms for k in ("mean", "var")] if query_norm == "support" else []
    return list(param_names) + stats


def compare_logits(got: np.ndarray, ref: np.ndarray, rtol: float = RTOL) -> dict:
    """One task's logits [Q, ways] against a reference: the max relative error (to the reference's largest
    |logit|: elementwise relative errors blow up near 0) and predicted-class agreement. A class disagreement
    is "clear" (a failure) only where the reference's top-2 margin exceeds the tolerance (a near-tie otherwise).

    Returns {"max_rel", "max_abs", "agree", "total", "clear_disagreements", "ok"}; ok: within rtol and no
    clear disagreement.
    """
    scale = max(float(np.abs(ref).max()), 1e-12)
    diff = float(np.abs(got - ref).max()) if np.isfinite(got).all() else float("inf")
    top2 = np.sort(ref, axis=-1)[:, -2:]
    differ = got.argmax(-1) != ref.argmax(-1)
    clear = int((differ & ((top2[:, 1] - top2[:, 0]) > rtol * scale)).sum())
    rel = diff / scale
    return {"max_rel": rel, "max_abs": diff, "agree": int((~differ).sum()), "total": int(ref.shape[0]),
            "clear_disagreements": clear, "ok": rel <= rtol and clear == 0}


def compare_settled(got: np.ndarray, ref: np.ndarray, float64_ref: Callable[[], np.ndarray],
                    rtol: float = RTOL) -> dict:
    """`compare_logits` against the float32 reference; where that fails, the float64 reference decides
    (`float64_ref()`, called only then), adding "max_rel_vs_float64". Why: a max-pool window whose two largest
    values differ by less than float32 rounding sends the gradient to a different pixel in one implementation
    than in another, and the SGD steps carry that to the logits (docs/deploy.md#parity-tolerance); an export
    within rtol of float64 computes the reference's function, rounded differently."""
    c = compare_logits(got, ref, rtol)
    if not c["ok"]:
        c64 = compare_logits(got, float64_ref(), rtol)
        c.update(ok=c64["ok"], max_rel_vs_float64=c64["max_rel"])
    return c
