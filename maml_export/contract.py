"""The exported graphs' contract, in one place: file names, input and output names, tolerances.

Paddle-free (numpy only), so that the exporter, its validation, the onnxruntime `Adapter` and the benchmark
all read the same names. An export folder holds three graphs of the same weights (docs/deploy.md):

    model.onnx    x_spt [S, C, H, W], y_spt [S], x_qry [Q, C, H, W]  -> logits [Q, ways]   (adapt + predict)
    adapt.onnx    x_spt, y_spt                                       -> the task's state (named tensors)
    predict.onnx  the task's state (the same names), x_qry [Q, ...]  -> logits [Q, ways]

The task's state is every fast weight under its parameter name ("conv1.weight", ..., "fc1.bias") and, when
queries are normalised with the support set's statistics, each batch norm's "bnK.mean" and "bnK.var".
"""
from __future__ import annotations

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

# Metadata keys every graph carries (onnx metadata_props), read by `adapter.Adapter`.
REQUIRED_METADATA = ("ways", "steps", "inner_lr", "image_size", "channels")


def state_names(param_names, batch_norms, query_norm: str) -> list[str]:
    """The task state's tensor names, in graph order: the parameters, then (query_norm "support") each batch
    norm layer's mean and var."""
    stats = [f"{bn}.{k}" for bn in batch_norms for k in ("mean", "var")] if query_norm == "support" else []
    return list(param_names) + stats
