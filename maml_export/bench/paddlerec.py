"""The PaddleRec-style MAML loop: a `paddle.nn` conv-4, deep-copied per task, `paddle.optimizer.SGD` and
`loss.backward()`, as PaddleRec's `models/multitask/maml` does it.

It is the reference the hand-written gradients are tested against (same weights, same tasks) and the
peer the benchmarks time. It uses Paddle's native layers and autograd only, in PaddleRec's layer order
(conv, batch norm, ReLU, max-pool).
"""
from __future__ import annotations

import copy

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..layers import BatchNorm, Conv2d, Flatten, Linear, MaxPool2, ReLU
from ..model import Model


def build_net(model: Model, params: dict[str, np.ndarray], dtype: str = "float32") -> nn.Layer:
    """A `paddle.nn.Sequential` equal to `model` (conv-4 family), loaded with `params` (no task axis)."""
    modules = []
    for layer, prefix in zip(model.layers, model.names):
        if isinstance(layer, Conv2d):
            m = nn.Conv2D(layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding,
                          bias_attr=False)
        elif isinstance(layer, BatchNorm):
            m = nn.BatchNorm2D(layer.channels, epsilon=layer.eps)  # training mode: batch statistics
        elif isinstance(layer, MaxPool2):
            m = nn.MaxPool2D(2, 2)
        elif isinstance(layer, ReLU):
            m = nn.ReLU()
        elif isinstance(layer, Flatten):
            m = nn.Flatten()
        elif isinstance(layer, Linear):
            m = nn.Linear(layer.in_features, layer.out_features)
        else:
            raise TypeError(f"no paddle.nn equivalent for {type(layer).__name__}")
        if prefix:
            for key, value in zip(("weight", "bias"), (m.weight, getattr(m, "bias", None))):
                if value is not None and f"{prefix}.{key}" in params:
                    value.set_value(np.asarray(params[f"{prefix}.{key}"], dtype="float32"))
        modules.append(m)
    # PaddleRec's order is conv, BN, ReLU, pool; ours pools first (they commute). Keep PaddleRec's.
    for i in range(len(modules) - 1):
        if isinstance(modules[i], nn.MaxPool2D) and isinstance(modules[i + 1], nn.ReLU):
            modules[i], modules[i + 1] = modules[i + 1], modules[i]
    net = nn.Sequential(*modules)
    if dtype != "float32":
        net.to(dtype=dtype)
    net.train()
    return net


def adapt(net: nn.Layer, x_spt, y_spt, steps: int, inner_lr: float, head_init: str = "meta") -> nn.Layer:
    """Deep-copy `net` and take `steps` SGD steps on one task's support set (x (S, C, H, W), y (S,)); with
    `head_init="prototypes"` the copy's head starts as the support's Euclidean prototype classifier."""
    fast, features = copy.deepcopy(net), None
    if head_init == "prototypes":  # written apart from maml.prototype_head, so that it checks it
        *body, head = fast.children()
        # (S, F), with autograd: the first step goes on from this forward, as maml.MAML._start's does
        features = nn.Sequential(*body)(x_spt)
        with paddle.no_grad():
            onehot = F.one_hot(y_spt, head.weight.shape[1]).astype(features.dtype)  # (S, ways)
            prototypes = (onehot.T @ features.detach()) / onehot.sum(axis=0).unsqueeze(-1)  # (ways, F)
            head.weight.set_value(2 * prototypes.T)
            head.bias.set_value(-(prototypes ** 2).sum(axis=1))
    opt = paddle.optimizer.SGD(learning_rate=inner_lr, parameters=trainable(fast))
    for k in range(steps):
        logits = head(features) if k == 0 and features is not None else fast(x_spt)
        loss = F.cross_entropy(logits, y_spt.reshape([-1, 1]))
        loss.backward()
        opt.step()
        opt.clear_grad()
    return fast


def meta_step_first_order(net: nn.Layer, tasks, steps: int, inner_lr: float) -> tuple[float, list]:
    """First-order meta-gradient of a meta-batch, task by task: returns (mean query loss, grads)."""
    x_spt, y_spt, x_qry, y_qry = tasks
    grads = [paddle.zeros_like(p) for p in trainable(net)]
    total = 0.0
    for t in range(x_spt.shape[0]):
        fast = adapt(net, x_spt[t], y_spt[t], steps, inner_lr)
        loss = F.cross_entropy(fast(x_qry[t]), y_qry[t].reshape([-1, 1]))
        loss.backward()
        grads = [g + p.grad / x_spt.shape[0] for g, p in zip(grads, trainable(fast))]
        total += float(loss)
    return total / x_spt.shape[0], grads


def trainable(net: nn.Layer) -> list:
    """The trainable parameters (batch norm's running statistics are parameters too in Paddle)."""
    return [p for p in net.parameters() if not p.stop_gradient]


def net_params(model: Model, net: nn.Layer) -> dict[str, np.ndarray]:
    """`net`'s parameters under `model`'s names (both list them in layer order)."""
    return {name: p.numpy() for name, p in zip(model.param_shapes(), trainable(net))}
