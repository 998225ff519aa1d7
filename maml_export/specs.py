"""Layer specs: the JSON description of a network that every config, checkpoint and export carries.

Paddle-free, so that the config, the Paddle-free Adapter and the benchmark kit read and validate a model's
description without loading Paddle. Each spec class holds a layer's fields, its parameter shapes and their
initialisation; `layers.py` subclasses each one with the forward and backward in Paddle ops.

Example:
    >>> specs = conv4_specs(ways=5)                  # the MAML conv-4 for 28x28 Omniglot
    >>> [s["type"] for s in specs][:4]
    ['Conv2d', 'BatchNorm', 'MaxPool2', 'ReLU']
    >>> layer_spec(specs[0]).param_shapes()
    {'weight': (64, 1, 3, 3)}
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# What a batch norm normalises a task's queries with (see `BatchNorm`).
QUERY_NORMS = ("support", "transductive")
# Where adaptation starts the head for each task (see `Linear`).
HEAD_INITS = ("meta", "prototypes")


@dataclass(frozen=True)
class LayerSpec:
    """Base: a layer has a type name and optional parameters."""

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Local parameter name -> shape, without the task axis."""
        return {}

    def init_params(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {}

    def spec(self) -> dict:
        """JSON-able description; `layer_spec(x.spec())` rebuilds it."""
        return {"type": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class Conv2d(LayerSpec):
    """2-D convolution without bias (a following batch norm cancels a bias exactly)."""

    in_channels: int
    out_channels: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1

    def param_shapes(self):
        return {"weight": (self.out_channels, self.in_channels, self.kernel, self.kernel)}

    def init_params(self, rng):
        # Kaiming-uniform on fan-in, the usual choice for conv + ReLU.
        fan_in = self.in_channels * self.kernel * self.kernel
        bound = math.sqrt(6.0 / fan_in)
        return {"weight": rng.uniform(-bound, bound, self.param_shapes()["weight"]).astype("float32")}

    def out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class BatchNorm(LayerSpec):
    """Batch norm with the statistics of the batch at hand, or with statistics given to it.

    The support set is always normalised with its own statistics (in every inner step). `query_norm` says
    what the query images get once a task is adapted (`maml.MAML.adapt` / `predict`):
      "support"       the support set's statistics under the adapted weights (passed in as the local
                      parameters "mean" and "var", shape (T, C)): a query's logits depend on the support
                      set and on that image alone, so one image is classified as it is in any batch;
      "transductive"  the query batch's own statistics, as the MAML paper's code does: a query's class can
                      change with its batch-mates (docs/design.md#query-normalisation).
    """

    channels: int
    eps: float = 1e-5
    query_norm: str = "support"

    def __post_init__(self):
        if self.query_norm not in QUERY_NORMS:
            raise ValueError(f"unknown query norm {self.query_norm!r}; known: {', '.join(QUERY_NORMS)}")

    def param_shapes(self):
        return {"weight": (self.channels,), "bias": (self.channels,)}

    def init_params(self, rng):
        return {"weight": np.ones(self.channels, "float32"), "bias": np.zeros(self.channels, "float32")}


@dataclass(frozen=True)
class ReLU(LayerSpec):
    pass


@dataclass(frozen=True)
class MaxPool2(LayerSpec):
    """2x2 max pooling, stride 2, floor mode (7 -> 3: the last row/column is dropped)."""


@dataclass(frozen=True)
class Flatten(LayerSpec):
    """(N, T*C, H, W) -> (T, N, C*H*W): from task-stacked channels to one row per image per task.

    `channels` is C, the channels of one task, so that T = x.shape[1] // C is known statically.
    """

    channels: int


@dataclass(frozen=True)
class Linear(LayerSpec):
    """Per-task affine map on (T, N, in_features) -> (T, N, out_features); weight is (in, out).

    `init` says where adaptation starts this layer (the head) for each task: "meta", from its meta-learned
    weights; "prototypes", from the support set's class prototypes (`maml.prototype_head`).
    `temperature` divides the logits a deployed model outputs (`maml.MAML.predict`), fitted on validation
    tasks so that their softmax is calibrated (`calibration.py`); the inner loop's loss never sees it.
    `support_shift` K > 0: a task's adaptation also learns from each support image shifted by K pixels in each
    direction (`maml.shifted_support`: 9 views), for the head's prototypes, batch norm's support statistics and
    the SGD steps; 0: the support set as given. Like the temperature, a deployment setting: training leaves it 0.
    """

    in_features: int
    out_features: int
    init: str = "meta"
    temperature: float = 1.0
    support_shift: int = 0

    def __post_init__(self):
        if self.init not in HEAD_INITS:
            raise ValueError(f"unknown head init {self.init!r}; known: {', '.join(HEAD_INITS)}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ValueError(f"the head's temperature must be a positive number, got {self.temperature!r}")
        if isinstance(self.support_shift, bool) or not isinstance(self.support_shift, int) or self.support_shift < 0:
            raise ValueError(f"the head's support_shift must be a whole number of pixels >= 0, got {self.support_shift!r}")

    def param_shapes(self):
        return {"weight": (self.in_features, self.out_features), "bias": (self.out_features,)}

    def init_params(self, rng):
        bound = math.sqrt(6.0 / (self.in_features + self.out_features))  # Xavier-uniform
        return {"weight": rng.uniform(-bound, bound, (self.in_features, self.out_features)).astype("float32"),
                "bias": np.zeros(self.out_features, "float32")}


SPEC_TYPES = {cls.__name__: cls for cls in (Conv2d, BatchNorm, ReLU, MaxPool2, Flatten, Linear)}


def layer_spec(spec: dict, types: dict | None = None) -> LayerSpec:
    """The validated layer of a spec dict (as stored in checkpoints and exports); ValueError names the fault.
    `types`: type name -> class to build (default: the Paddle-free `SPEC_TYPES`; `layers.LAYER_TYPES` for
    layers that run)."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    types = SPEC_TYPES if types is None else types
    if kind not in types:
        raise ValueError(f"unknown layer type {kind!r}; known: {', '.join(types)}")
    try:
        return types[kind](**spec)
    except TypeError as e:  # a missing or unknown field
        raise ValueError(f"{kind}: {e}") from None


def conv4_specs(ways: int, channels: int = 1, image_size: int = 28, hidden: int = 64,
                blocks: int = 4, head_init: str = "meta", query_norm: str = "support") -> list[dict]:
    """Layer specs of the MAML conv-4: `blocks` x [conv3x3, batch norm, max-pool 2x2, ReLU], linear head.

    Omniglot: channels=1, image_size=28, hidden=64 (28 -> 14 -> 7 -> 3 -> 1, 64 features), as in
    PaddleRec's MAML. MiniImageNet: channels=3, image_size=84, hidden=32. `head_init`: see `Linear`;
    `query_norm`: see `BatchNorm`.
    """
    layers: list[LayerSpec] = []
    size, cin = image_size, channels
    for _ in range(blocks):
        # ReLU after the pool: max-pool and ReLU commute (ReLU is monotonic), values and gradients are
        # identical to PaddleRec's conv-BN-ReLU-pool, and the ReLU runs on a quarter of the pixels.
        layers += [Conv2d(cin, hidden), BatchNorm(hidden, query_norm=query_norm), MaxPool2(), ReLU()]
        size, cin = size // 2, hidden
    if size < 1:
        raise ValueError(f"image size {image_size} is too small for {blocks} conv blocks")
    layers += [Flatten(hidden), Linear(hidden * size * size, ways, head_init)]
    return [layer.spec() for layer in layers]


def with_head(specs: list[dict], ways: int | None = None, init: str | None = None,
              temperature: float | None = None, support_shift: int | None = None) -> list[dict]:
    """The same layer specs with a head of `ways` classes (for a backbone trained with `--zero-head`), another
    `init`, `temperature` and/or `support_shift` (see `Linear`); None keeps the head's own."""
    if specs[-1]["type"] != "Linear":
        raise ValueError(f"cannot change the head of a model whose last layer is a {specs[-1]['type']}")
    changes = {"out_features": ways, "init": init, "temperature": temperature, "support_shift": support_shift}
    head = {**specs[-1], **{k: v for k, v in changes.items() if v is not None}}
    return [dict(s) for s in specs[:-1]] + [head]


def support_windows(shift: int) -> list[tuple[int, int]]:
    """The views a support shift K makes of each image (`Linear.support_shift`): the (top, left) corners of the
    image-sized windows into the image padded by K on every side, every shift (dy, dx) in {-K, 0, K}^2, view-major,
    the unshifted view (K, K) in the middle. `maml.shifted_support` and maml-bench's PyTorch peer cut these."""
    return [(top, left) for top in (0, shift, 2 * shift) for left in (0, shift, 2 * shift)]


def support_views(specs: list[dict]) -> int:
    """How many images adaptation learns from per support image: 9 under the head's support_shift (`Linear`), else 1."""
    shift = specs[-1].get("support_shift", 0)
    return len(support_windows(shift)) if shift else 1


def with_query_norm(specs: list[dict], query_norm: str) -> list[dict]:
    """The same layer specs with every batch norm normalising queries by `query_norm` (see `BatchNorm`)."""
    return [{**s, "query_norm": query_norm} if s["type"] == "BatchNorm" else dict(s) for s in specs]
