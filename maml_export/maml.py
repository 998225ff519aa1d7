"""MAML adaptation (Finn et al., 2017, https://arxiv.org/abs/1703.03400) on hand-written gradients.

`adapt` runs plain SGD on a support set with the gradients of `Model.backward`, for a batch of T
tasks at once. Second-order meta-gradients come from ordinary autograd *through* that backward (Paddle's
own double-backward is missing for several ops, docs/design.md#no-double-backward-in-paddle); first-order stops the
gradient of the inner-loop gradients. For inference the exported single-task graphs stop the SGD at a fixed point
(`steps_to_fixed_point`), with the same result.

Example:
    >>> import numpy as np, paddle
    >>> from maml_export.model import Model, to_tensors
    >>> from maml_export.specs import conv4_specs
    >>> model = Model.from_specs(conv4_specs(ways=5))
    >>> maml = MAML(model, to_tensors(model.init_params(0)), inner_lr=0.4, steps=5)
    >>> x_spt = paddle.rand([2, 5, 1, 28, 28]); y_spt = paddle.to_tensor([[0, 1, 2, 3, 4]] * 2)
    >>> fast = maml.adapt(x_spt, y_spt)                      # task-stacked fast weights
    >>> maml.predict(fast, paddle.rand([2, 75, 1, 28, 28])).shape
    [2, 75, 5]
"""
from __future__ import annotations

from dataclasses import dataclass

import paddle

from .layers import Linear, softmax_cross_entropy
from .model import Model
from .specs import support_windows


def expand_to_tasks(params: dict, tasks: int) -> dict:
    """Meta-parameters (no task axis) -> one copy per task (leading axis T); autograd sums back."""
    return {k: v.unsqueeze(0).expand([tasks] + list(v.shape)) for k, v in params.items()}


def loss_and_grads(model: Model, params: dict, x, y, body: tuple | None = None):
    """Per-task mean cross-entropy (T,), its gradients for every parameter, and the logits (`body`: see
    `Model.forward`)."""
    logits, caches = model.forward(params, x, body=body)
    loss, dlogits = softmax_cross_entropy(logits, y)
    return loss, model.backward(params, caches, dlogits), logits


def query_loss_and_grads(model: Model, fast: dict, x_spt, x_qry, y_qry):
    """The query loss (T,) under fast weights (no statistics among them), its gradients for the fast weights
    (of the loss summed over tasks, task-stacked) and the logits: the first-order meta-gradient's parts.

    Under query_norm "support" the queries are normalised with the support's statistics, which depend on
    the fast weights too; that path is part of the exact gradient, so autograd takes it (a forward-only
    graph, which Paddle differentiates). Transductive: the hand-written backward of the query batch."""
    if model.query_norm == "transductive":
        return loss_and_grads(model, fast, x_qry, y_qry)
    leaves = {k: v.detach() for k, v in fast.items()}
    for v in leaves.values():
        v.stop_gradient = False
    with paddle.enable_grad():
        logits, _ = model.forward({**leaves, **model.support_stats(leaves, x_spt)}, x_qry)
        loss, _ = softmax_cross_entropy(logits, y_qry)
        grads = paddle.grad(loss.sum(), list(leaves.values()), allow_unused=True)
    grads = {k: paddle.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return loss.detach(), grads, logits.detach()


STEP_SIZES = "lslr."  # the meta-parameters of learned step sizes: "lslr.<layer>", one per step, shape (K,)


def step_size_shapes(model: Model, steps: int) -> dict:
    """The learned step sizes' meta-parameters (`--learn-inner-lr`): one (steps,) vector per layer with weights."""
    return {f"{STEP_SIZES}{prefix}": (steps,) for prefix in model.names if prefix is not None}


def layer_of(name: str) -> str:
    """The layer a parameter belongs to, whose step size it takes: "conv2.weight" -> "conv2"."""
    return name.split(".")[0]


def split_step_sizes(params: dict) -> tuple[dict, dict]:
    """params -> (the network's weights, the learned step sizes: layer -> (K,) tensor; empty without them)."""
    weights = {k: v for k, v in params.items() if not k.startswith(STEP_SIZES)}
    return weights, {k[len(STEP_SIZES):]: v for k, v in params.items() if k.startswith(STEP_SIZES)}


def step_lr(inner_lr, step: int):
    """The step size(s) of inner step `step`: `inner_lr` a float for every step and parameter, or a list with
    one entry per step, each a float or parameter name -> step size (a float, or a 0-d tensor in training)."""
    return inner_lr[step] if isinstance(inner_lr, list) else inner_lr


def learned_schedule(step_sizes: dict, names, steps: int, constants: bool = False) -> list:
    """Learned step sizes (layer -> (K,) vector) as `step_lr`'s schedule for the parameters `names`: per step,
    name -> its layer's step size; `constants`: Python floats, which a traced graph holds as constants."""
    learned = len(next(iter(step_sizes.values())))
    if steps > learned:
        raise ValueError(f"this model learned step sizes for {learned} inner steps, not {steps}: pass --steps "
                         f"{learned} or fewer")
    size = (lambda v: float(v)) if constants else (lambda v: v)  # noqa: E731
    return [{name: size(step_sizes[layer_of(name)][k]) for name in names} for k in range(steps)]


def sgd_update(params: dict, grads: dict, lr) -> dict:
    """One SGD step: `lr` a float for every parameter, or name -> step size (a float 0: the parameter stays)."""
    lr = lr if isinstance(lr, dict) else dict.fromkeys(params, lr)
    return {k: p if isinstance(lr[k], float) and lr[k] == 0 else p - lr[k] * grads[k] for k, p in params.items()}


def sgd_steps(model: Model, params: dict, x, y, steps: int, inner_lr, first_order: bool,
              record: list | None = None, body: tuple | None = None) -> dict:
    """`steps` SGD steps on (x, y) from task-stacked `params` at `inner_lr` (see `step_lr`); returns the fast
    weights. `record`, a list: each step's gradients are appended to it (first-order: the step sizes'
    meta-gradient needs them). `body`: x's forward through the body under `params` (`MAML._start`), which the
    first step's forward goes on from."""
    for k in range(steps):
        _, grads, _ = loss_and_grads(model, params, x, y, body if k == 0 else None)
        if first_order:  # first-order MAML: the inner gradient is a constant for the meta-gradient
            grads = {name: g.detach() for name, g in grads.items()}
        if record is not None:
            record.append(grads)
        params = sgd_update(params, grads, step_lr(inner_lr, k))
    return params


def steps_to_fixed_point(model: Model, params: dict, x, y, steps: int, inner_lr, stats: bool,
                         body: tuple | None = None) -> tuple[dict, dict]:
    """`sgd_steps` for inference, stopping where the rest would change nothing; and, with `stats`, each batch
    norm's support statistics under the result (`Model.support_stats`): what running all `steps` and then
    `support_stats` gives (`body`: as `sgd_steps`'s).

    A step whose logits gradient is exactly zero leaves every weight exactly as it was (every gradient is a
    product with it): the weights are a fixed point of the SGD, and each later step would repeat that one.
    So each step is a `paddle.static.nn.cond` (an ONNX `If` in a traced graph) whose other branch passes the
    weights and the statistics of that step's own forward through. In onnxruntime, with the prototype head, a
    1-shot support loss's softmax is exactly one-hot and adaptation is one forward pass instead of 6 forwards
    and 5 backwards; eager Paddle too, since `softmax_cross_entropy` sets probabilities below float32's smallest
    normal number to zero (docs/design.md#adaptation-stops-at-a-fixed-point). No meta-gradient flows through it.
    """
    if steps == 0:
        if not stats:
            return params, {}
        return params, model.batch_stats(body[1], x.shape[0]) if body else model.support_stats(params, x)
    logits, caches = model.forward(params, x, body=body)
    _, dlogits = softmax_cross_entropy(logits, y)
    here = model.batch_stats(caches, x.shape[0]) if stats else {}
    names, stat_names = list(params), list(here)

    def step():
        grads = model.backward(params, caches, dlogits)
        later_lr = inner_lr[1:] if isinstance(inner_lr, list) else inner_lr  # the schedule from the next step on
        fast, later = steps_to_fixed_point(model, sgd_update(params, grads, step_lr(inner_lr, 0)), x, y, steps - 1,
                                           later_lr, stats)
        return [fast[k] for k in names] + [later[k] for k in stat_names]

    def still():
        return [params[k] for k in names] + [here[k] for k in stat_names]

    # abs() > 0, not != 0: Paddle's float comparisons have a 1e-8 tolerance (docs/design.md#paddle-compares-floats-with-a-tolerance)
    out = paddle.static.nn.cond(paddle.any(dlogits.abs() > 0), step, still)
    return dict(zip(names, out[:len(names)])), dict(zip(stat_names, out[len(names):]))


def shifted_support(x_spt, y_spt, shift: int):
    """The support set with each image also shifted by `shift` pixels: 9 views, every (dy, dx) in {-shift, 0,
    shift}^2, the edges replicated (Omniglot's are paper, 0). x_spt (T, S, C, H, W), y_spt (T, S) -> (T, 9*S,
    C, H, W), (T, 9*S); view-major, the unshifted view in the middle. Test-time augmentation of the support set
    only: each query is still one image under the task's state (docs/experiments.md#support-shifts).
    """
    T, C, H, W = x_spt.shape[0], x_spt.shape[2], x_spt.shape[3], x_spt.shape[4]
    x = x_spt.reshape([-1, C, H, W])
    # edges replicated by concatenation, not F.pad: paddle2onnx mis-converts pad3d (docs/design.md#paddle2onnx-mis-converts-pad3d)
    x = paddle.concat([x[:, :, :1]] * shift + [x] + [x[:, :, -1:]] * shift, axis=2)
    padded = paddle.concat([x[:, :, :, :1]] * shift + [x] + [x[:, :, :, -1:]] * shift, axis=3)  # (T*S, C, H+2k, W+2k)
    views = [padded[:, :, top:top + H, left:left + W] for top, left in support_windows(shift)]
    x = paddle.concat([v.reshape([T, -1, C, H, W]) for v in views], axis=1)  # (T, 9*S, C, H, W)
    return x, paddle.concat([y_spt] * len(views), axis=1)


def predict(model: Model, fast: dict, x_qry):
    """Query logits (T, Q, ways) under an adapted state (`MAML.adapt`), divided by the head's temperature.

    Under query_norm "support" each query is normalised with the support's statistics (in `fast`), so its
    logits do not depend on the other queries; "transductive": with the query batch's own."""
    logits = model.forward(fast, x_qry)[0]
    return logits if model.temperature == 1.0 else logits / model.temperature


def prototype_head(model: Model, params: dict, x_spt, y_spt, features=None) -> dict:
    """The head a task's adaptation starts from under `head_init="prototypes"`: the Euclidean prototype
    classifier of the support set (Snell et al., 2017), as a linear layer (Proto-MAML, Triantafillou et al.,
    "Meta-Dataset", ICLR 2020, https://arxiv.org/abs/1903.03096).

    With p_c the mean support features of class c, -|f - p_c|^2 = 2 p_c.f - |p_c|^2 - |f|^2, and the last
    term is the same for every class, so weight 2 p_c and bias -|p_c|^2 rank classes by distance to their
    prototype. docs/pretrained.md#omniglot-5w1s: on the 5-way bundle's backbone this classifier read +0.31 +- 0.11 points (600
    validation tasks) above the zero head's 5 steps, whose first step gives the dot product (p_c - mean
    p).f instead, which lacks the -|p_c|^2 term.

    params: task-stacked; x_spt (T, S, C, H, W), y_spt (T, S) with every class present; `features`: the support's
    (T, S, F) where the caller has them (`model.forward(params, x_spt, upto=-1)[0]`). Returns the head's
    parameters {"<head>.weight": (T, F, ways), "<head>.bias": (T, ways)}, differentiable in `params` (a
    second-order meta-gradient flows through the prototypes, as in Prototypical Networks).
    """
    if features is None:  # (T, S, F), batch norm on the support's statistics
        features = model.forward(params, x_spt, upto=-1)[0]
    prototypes = class_prototypes(features, y_spt, model.ways)
    head = model.names[-1]
    return {f"{head}.weight": 2 * prototypes.transpose([0, 2, 1]), f"{head}.bias": -(prototypes * prototypes).sum(-1)}


def class_prototypes(features, y_spt, ways: int):
    """Each class's mean support feature: features (T, S, F), y_spt (T, S) with every class 0..ways-1 present ->
    (T, ways, F)."""
    classes = paddle.arange(ways, dtype=y_spt.dtype)
    onehot = (y_spt.unsqueeze(-1) == classes).astype(features.dtype)  # (T, S, ways); a comparison: see layers
    return paddle.matmul(onehot, features, transpose_x=True) / onehot.sum(axis=1).unsqueeze(-1)


def zero_head(model: Model, params: dict) -> None:
    """Set the head's (the last layer's) meta-parameters to zero, in place.

    The zeroing trick (Kao, Chiu, Chen, "MAML is a Noisy Contrastive Learner in Classification", ICLR
    2022, https://arxiv.org/abs/2106.15367): applied after every meta-update, each task's adaptation
    starts from a zero head. docs/experiments.md#why-the-plain-recipe-was-stuck found the meta-learned head of the plain recipe starting every
    task at a support loss of 51 and doing all its work in the first SGD step, with validation
    stuck at 93.5 %; from scratch, the trick lifted validation at iteration 100 from 75.6 % to 84.7 %.
    """
    if not isinstance(model.layers[-1], Linear):
        raise ValueError(f"zero_head needs a Linear last layer, not {type(model.layers[-1]).__name__}")
    for name, p in params.items():
        if model.is_head(name):
            p.set_value(paddle.zeros_like(p))


@dataclass
class MetaStep:
    """What one meta-batch gives: the query loss and accuracy (means over tasks) and meta-gradients."""

    loss: float
    accuracy: float
    grads: dict


class MAML:
    """A model, its meta-parameters and the adaptation defaults; per-call `None` means the default.

    Args:
        model: the network (`Model`).
        params: meta-parameters, name -> Paddle tensor without task axis; with learned step sizes
            (`--learn-inner-lr`, MAML++'s LSLR) also "lslr.<layer>": each layer's step size at each step, (K,).
        inner_lr: step size of the inner SGD: a float, or a schedule (`step_lr`); where step sizes are learned,
            only a call's `inner_lr` overrides them.
        steps: number of inner SGD steps.
        first_order: drop second-order terms of the meta-gradient (FOMAML).
        stop_at_fixed_point: `adapt` stops at the first step whose gradient is exactly zero
            (`steps_to_fixed_point`: the same result, for inference; the exported single-task graphs do).
    """

    TASK_CHUNK = 4  # tasks per block in meta_step (see there)

    def __init__(self, model: Model, params: dict, inner_lr: float, steps: int, first_order: bool = False,
                 stop_at_fixed_point: bool = False):
        self.model, self.params = model, params
        self.weights, self.step_sizes = split_step_sizes(params)  # the same tensors: Adam's updates show in both
        self.inner_lr, self.steps, self.first_order = inner_lr, steps, first_order
        self.stop_at_fixed_point = stop_at_fixed_point

    def adapt(self, x_spt, y_spt, steps: int | None = None, inner_lr: float | None = None,
              first_order: bool | None = None) -> dict:
        """x_spt (T, S, C, H, W), y_spt (T, S) -> the adapted state, task-stacked: the fast weights (the head
        starting from `prototype_head`'s under the model's head_init "prototypes") and, under query_norm
        "support", each batch norm's support statistics under them ("bn1.mean", "bn1.var": (T, C)). Under the
        head's support_shift K > 0, adaptation learns from the shifted support set (`shifted_support`)."""
        support = self.model.query_norm == "support"
        if self.model.support_shift:
            x_spt, y_spt = shifted_support(x_spt, y_spt, self.model.support_shift)
        if self.stop_at_fixed_point:
            steps = self.steps if steps is None else steps
            start, body = self._start(x_spt, y_spt)
            fast, stats = steps_to_fixed_point(self.model, start, x_spt, y_spt, steps,
                                               self.schedule(steps, inner_lr, constants=True), support, body)
            return {**fast, **stats}
        fast = self.fast_weights(x_spt, y_spt, steps, inner_lr, first_order)
        return {**fast, **self.model.support_stats(fast, x_spt)} if support else fast

    def _start(self, x_spt, y_spt) -> tuple[dict, tuple | None]:
        """Where a task's adaptation starts: the meta-parameters per task, the head the prototypes' under
        head_init "prototypes"; and there, the support's forward through the body (features (T, S, F) and
        caches), which the first SGD step goes on from instead of running it again (else None). The body's
        weights are the same in both, so this is the same arithmetic with one forward pass fewer: one of 6
        forwards and 5 backwards on the support set (5 steps), half the work where the SGD stops at step 0. (An
        exported graph gains nothing: onnxruntime's optimiser merges two identical forwards anyway.)"""
        fast = expand_to_tasks(self.weights, x_spt.shape[0])
        if self.model.head_init != "prototypes":
            return fast, None
        body = self.model.forward(fast, x_spt, upto=-1)
        fast.update(prototype_head(self.model, fast, x_spt, y_spt, features=body[0]))
        return fast, body

    @property
    def step_size_summary(self):
        """What reports say the step size is: `inner_lr`, or the learned ones (layer -> one per step)."""
        if not self.step_sizes:
            return self.inner_lr
        return {layer: [round(float(v), 6) for v in sizes.numpy()] for layer, sizes in self.step_sizes.items()}

    def schedule(self, steps: int, inner_lr: float | None = None, constants: bool = False):
        """The step sizes of `steps` steps (`step_lr`): a call's `inner_lr`, else the learned ones (per step, per
        parameter; `constants`: as Python floats, which a traced graph holds as constants), else `self.inner_lr`."""
        if inner_lr is not None or not self.step_sizes:
            return self.inner_lr if inner_lr is None else inner_lr
        return learned_schedule(self.step_sizes, self.weights, steps, constants)

    def fast_weights(self, x_spt, y_spt, steps: int | None = None, inner_lr: float | None = None,
                     first_order: bool | None = None, record: list | None = None) -> dict:
        """`adapt` without the support statistics: the fast weights alone (`record`: see `sgd_steps`)."""
        steps = self.steps if steps is None else steps
        first_order = self.first_order if first_order is None else first_order
        start, body = self._start(x_spt, y_spt)
        return sgd_steps(self.model, start, x_spt, y_spt, steps, self.schedule(steps, inner_lr), first_order,
                         record, body)

    def predict(self, fast: dict, x_qry):
        """Query logits (T, Q, ways) under the adapted state (`adapt`): `predict`."""
        return predict(self.model, fast, x_qry)

    def meta_step(self, x_spt, y_spt, x_qry, y_qry, steps: int | None = None) -> MetaStep:
        """Meta-gradient of the mean query loss over a batch of T tasks.

        Tasks are independent (batch norm's statistics are per task), so the batch is worked through
        TASK_CHUNK tasks at a time and the per-task gradients summed: Paddle's CPU kernels slow down
        on the full batch's activations (e.g. (75, 32*64, 28, 28) floats, 480 MB a tensor). Measured,
        first-order, 32 tasks x 75 queries, 1 thread: 15-16 s whole, 12 s in chunks of 4.
        """
        T, chunk = x_spt.shape[0], self.TASK_CHUNK
        if T <= chunk:
            return self._meta_step_block(x_spt, y_spt, x_qry, y_qry, steps)
        blocks = [self._meta_step_block(x_spt[i:i + chunk], y_spt[i:i + chunk], x_qry[i:i + chunk],
                                        y_qry[i:i + chunk], steps) for i in range(0, T, chunk)]
        shares = [min(chunk, T - i) / T for i in range(0, T, chunk)]  # each block's fraction of the tasks
        mean = lambda values: sum(w * v for w, v in zip(shares, values))  # noqa: E731
        return MetaStep(mean(b.loss for b in blocks), mean(b.accuracy for b in blocks),
                        {k: mean(b.grads[k] for b in blocks) for k in blocks[0].grads})

    def _meta_step_block(self, x_spt, y_spt, x_qry, y_qry, steps: int | None = None) -> MetaStep:
        """`meta_step` on one block of tasks: means over the block's tasks.

        First-order runs without autograd through the steps: the meta-gradient is the query gradient at
        the fast weights, summed over tasks by hand (plus, under head_init "prototypes", its path through
        the prototypes: `_through_prototypes`). Second-order differentiates through the inner loop.
        """
        T = x_spt.shape[0]
        if self.first_order:
            record = [] if self.step_sizes else None
            with paddle.no_grad():
                fast = self.fast_weights(x_spt, y_spt, steps=steps, record=record)
                loss, grads, logits = query_loss_and_grads(self.model, fast, x_spt, x_qry, y_qry)
                meta_grads = {k: g.sum(axis=0) / T for k, g in grads.items()}
                if record is not None:
                    meta_grads.update(self._step_size_grads(grads, record, T))
            if self.model.head_init == "prototypes":
                meta_grads = self._through_prototypes(meta_grads, grads, x_spt, y_spt)
        else:
            params = list(self.params.values())
            for p in params:
                p.stop_gradient = False
            fast = self.adapt(x_spt, y_spt, steps=steps)
            logits, caches = self.model.forward(fast, x_qry)
            loss, _ = softmax_cross_entropy(logits, y_qry)
            # allow_unused: under head_init="prototypes" the head's meta-parameters take no part (zero gradient)
            grads = paddle.grad(loss.mean(), params, allow_unused=True)
            meta_grads = {k: paddle.zeros_like(p) if g is None else g for (k, p), g in zip(self.params.items(), grads)}
        accuracy = (logits.argmax(axis=-1) == y_qry).astype("float32").mean()
        return MetaStep(float(loss.mean()), float(accuracy), meta_grads)

    def _step_size_grads(self, query_grads: dict, record: list, T: int) -> dict:
        """First-order meta-gradients of the learned step sizes. The fast weights are w_0 - sum_k a_k g_k with each
        step's gradient g_k a constant, so dL/da_k of a layer is -<dL/dw, g_k> over the layer's weights, with
        dL/dw the query gradient at the fast weights (`query_grads`, task-stacked); the mean over the T tasks."""
        out = {}
        for layer, sizes in self.step_sizes.items():
            per_step = [-sum((query_grads[n] * g[n]).sum() for n in g if layer_of(n) == layer) / T for g in record]
            per_step += [paddle.zeros([], sizes.dtype)] * (len(sizes) - len(record))  # steps not run this time
            out[STEP_SIZES + layer] = paddle.stack(per_step).reshape(sizes.shape)
        return out

    def _through_prototypes(self, meta_grads: dict, fast_grads: dict, x_spt, y_spt) -> dict:
        """First-order meta-gradients under head_init "prototypes", as first-order Proto-MAML (Triantafillou
        et al., 2020) takes them: the steps' gradients stay constants, so the fast head is its start plus a
        constant and the query gradient of the fast head (`fast_grads`, task-stacked) flows back through the
        prototypes into the body. The head's own meta-parameters take no part: zero gradient."""
        T = x_spt.shape[0]
        body = {k: p for k, p in self.weights.items() if not self.model.is_head(k)}
        for p in body.values():
            p.stop_gradient = False
        start = prototype_head(self.model, expand_to_tasks(body, T), x_spt, y_spt)  # recomputed, now with autograd
        through = paddle.grad(list(start.values()), list(body.values()),
                              grad_outputs=[fast_grads[k] / T for k in start], allow_unused=True)
        through = {k: g for k, g in zip(body, through) if g is not None}
        return {k: paddle.zeros_like(g) if self.model.is_head(k) else g + through[k].detach() if k in through else g
                for k, g in meta_grads.items()}  # the step sizes' own ("lslr.fc1" is no head weight) pass as they are
