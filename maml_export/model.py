"""The network: a sequence of layers from `layers.py`, with parameters as a flat, named, ordered dict.

A model is described by its layer specs (JSON-able dicts), which every checkpoint and export stores,
so resume and export rebuild exactly the network that was trained.

Example:
    >>> from maml_export.specs import conv4_specs
    >>> model = Model.from_specs(conv4_specs(ways=5))
    >>> params = model.init_params(seed=0)          # {"conv1.weight": ndarray (64, 1, 3, 3), ...}
    >>> list(params)[:3]
    ['conv1.weight', 'bn1.weight', 'bn1.bias']
"""
from __future__ import annotations

import numpy as np
import paddle

from .layers import BatchNorm, Layer, layer_from_spec

_PREFIX = {"Conv2d": "conv", "BatchNorm": "bn", "Linear": "fc"}


class Model:
    """Runs layers forward and backward on task-stacked parameters (leading task axis T)."""

    def __init__(self, layers: list[Layer]):
        self.layers = list(layers)
        counts: dict[str, int] = {}
        self.names: list[str | None] = []  # parameter prefix of each layer, None if it has none
        for layer in self.layers:
            kind = type(layer).__name__
            if layer.param_shapes():
                counts[kind] = counts.get(kind, 0) + 1
                self.names.append(f"{_PREFIX.get(kind, kind.lower())}{counts[kind]}")
            else:
                self.names.append(None)

    @classmethod
    def from_specs(cls, specs: list[dict]) -> "Model":
        return cls([layer_from_spec(s) for s in specs])

    def specs(self) -> list[dict]:
        return [layer.spec() for layer in self.layers]

    @property
    def ways(self) -> int:
        return self.layers[-1].out_features

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Flat name -> shape (no task axis), in layer order."""
        return {f"{prefix}.{k}": shape for layer, prefix in zip(self.layers, self.names) if prefix
                for k, shape in layer.param_shapes().items()}

    def init_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {f"{prefix}.{k}": v for layer, prefix in zip(self.layers, self.names) if prefix
                for k, v in layer.init_params(rng).items()}

    def is_head(self, name: str) -> bool:
        """Whether parameter `name` belongs to the head (the last layer)."""
        return name.startswith(self.names[-1] + ".")

    def with_zero_head(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This model's parameters from another model's with the same backbone (the caller checks that): the
        backbone's arrays as they are, the head's zero. A model meta-trained with the zeroing trick
        (`--zero-head`) has a task-agnostic zero head, so its backbone serves any number of ways (docs/pretrained.md#omniglot-20w1s)."""
        shapes = self.param_shapes()
        weights = {k: np.zeros(shape, "float32") if self.is_head(k) else params[k] for k, shape in shapes.items()}
        return {**weights, **{k: v for k, v in params.items() if k not in shapes}}  # others (step sizes) kept

    def _local(self, params: dict, prefix: str | None) -> dict:
        if prefix is None:
            return {}
        return {k[len(prefix) + 1:]: v for k, v in params.items() if k.startswith(prefix + ".")}

    @property
    def head_init(self) -> str:
        """Where adaptation starts the head: "meta" or "prototypes" (see `layers.Linear`)."""
        return getattr(self.layers[-1], "init", "meta")

    @property
    def query_norm(self) -> str:
        """How batch norm normalises query images: "support" or "transductive" (see `layers.BatchNorm`)."""
        norms = {layer.query_norm for layer in self.layers if isinstance(layer, BatchNorm)}
        if len(norms) > 1:
            raise ValueError(f"the batch norm layers disagree on query_norm: {sorted(norms)}")
        return norms.pop() if norms else "transductive"  # no batch norm: nothing depends on the batch

    @property
    def temperature(self) -> float:
        """What deployed logits are divided by (see `layers.Linear`)."""
        return getattr(self.layers[-1], "temperature", 1.0)

    @property
    def support_shift(self) -> int:
        """How many pixels adaptation also shifts each support image by, 0: none (see `layers.Linear`)."""
        return getattr(self.layers[-1], "support_shift", 0)

    def support_stats(self, params: dict, x) -> dict:
        """Each batch norm's statistics of the images x (T, S, C, H, W) under `params`, as params entries
        {"bn1.mean": (T, C), "bn1.var": (T, C), ...}: given to `forward` with the params, they normalise
        other images (queries) as x was normalised. Runs the layers up to the last batch norm."""
        last = max(i for i, layer in enumerate(self.layers) if isinstance(layer, BatchNorm)) + 1
        _, caches = self.forward(params, x, upto=last)
        return self.batch_stats(caches, x.shape[0])

    def batch_stats(self, caches: list, tasks: int) -> dict:
        """The statistics each batch norm of a forward (`caches`, on T = `tasks` tasks) normalised its batch with,
        as `support_stats` names them."""
        return {f"{prefix}.{k}": v for layer, prefix, cache in zip(self.layers, self.names, caches)
                if isinstance(layer, BatchNorm) for k, v in layer.stats(cache, tasks).items()}

    def forward(self, params: dict, x, upto: int | None = None, body: tuple | None = None):
        """x: (T, N, C, H, W) -> logits (T, N, ways), and the caches `backward` needs; with `upto=-1`, the
        head's input features (T, N, F) instead of the logits. Batch norm uses x's own statistics unless
        `params` holds them (`support_stats`). `body`: what a forward of x through the first layers returned
        (`upto=-1`: the features and their caches) under the same weights of those layers; the forward goes on
        from there (the prototype head's support forward is the first SGD step's, `maml.MAML.adapt`)."""
        if body is not None:
            h, caches = body[0], list(body[1])
        else:
            T, C, H, W = x.shape[0], x.shape[2], x.shape[3], x.shape[4]
            # (T, N, C, H, W) -> (N, T*C, H, W): task-stacked channels for the grouped convolutions
            h = x.transpose([1, 0, 2, 3, 4]).reshape([-1, T * C, H, W]) if T != 1 else x.reshape([-1, C, H, W])
            caches = []
        done = len(caches)
        for layer, prefix in zip(self.layers[done:upto], self.names[done:upto]):
            h, cache = layer.forward(self._local(params, prefix), h)
            caches.append(cache)
        return h, caches

    def backward(self, params: dict, caches: list, dlogits) -> dict:
        """Gradients of the loss whose logits gradient is `dlogits`, for every parameter (task-stacked)."""
        grads = {}
        dh = dlogits
        for i in reversed(range(len(self.layers))):
            layer, prefix = self.layers[i], self.names[i]
            # the first layer's input is the image: its gradient is never needed
            dh, local = layer.backward(self._local(params, prefix), caches[i], dh, need_dx=i > 0)
            grads.update({f"{prefix}.{k}": g for k, g in local.items()})
        return {name: grads[name] for name in params}  # parameter order


def to_tensors(params: dict[str, np.ndarray], dtype: str = "float32", trainable: bool = False) -> dict:
    """numpy arrays -> Paddle tensors (optionally leaves that autograd differentiates)."""
    out = {}
    for name, value in params.items():
        t = paddle.to_tensor(np.asarray(value), dtype=dtype)
        t.stop_gradient = not trainable
        out[name] = t
    return out
