"""Adaptation and meta-gradients against independent references: PaddleRec's loop, finite differences."""
import numpy as np
import paddle
import pytest

from maml_export.bench import paddlerec
from maml_export.data import TaskSampler, load_omniglot, split_characters
from maml_export.layers import softmax_cross_entropy
from maml_export.maml import (MAML, STEP_SIZES, expand_to_tasks, prototype_head, query_loss_and_grads, shifted_support,
                              step_size_shapes)
from maml_export.model import Model, to_tensors
from maml_export.specs import conv4_specs


@pytest.fixture(scope="module")
def omniglot_tasks(omniglot_dir):
    images = load_omniglot(omniglot_dir)
    sampler = TaskSampler(images, split_characters()["train"], ways=5, shots=1, query=3, seed=7)
    return sampler.sample(2)


def test_five_step_adaptation_equals_paddlerec_loop(omniglot_tasks):
    """Real Omniglot tasks (blank paper gives pooling ties), float64: fast weights and query logits agree
    (PaddleRec normalises the queries with their own batch's statistics: transductive)."""
    model = Model.from_specs(conv4_specs(ways=5, hidden=16, query_norm="transductive"))
    init = model.init_params(seed=3)
    maml = MAML(model, to_tensors(init, "float64"), inner_lr=0.4, steps=5, first_order=True)
    x_spt, y_spt, x_qry, _ = (paddle.to_tensor(a) for a in omniglot_tasks)
    x_spt, x_qry = x_spt.astype("float64"), x_qry.astype("float64")
    with paddle.no_grad():
        fast = maml.adapt(x_spt, y_spt)
        logits = maml.predict(fast, x_qry)
    net = paddlerec.build_net(model, init, dtype="float64")
    for t in range(2):
        ref = paddlerec.adapt(net, x_spt[t], y_spt[t], steps=5, inner_lr=0.4)
        for name, want in paddlerec.net_params(model, ref).items():
            got = fast[name][t].numpy()
            assert np.abs(got - want).max() <= 1e-9 * max(1.0, np.abs(want).max()), name
        want_logits = ref(x_qry[t]).numpy()
        assert np.abs(logits[t].numpy() - want_logits).max() <= 1e-9 * np.abs(want_logits).max()


def test_first_order_meta_gradient_equals_paddlerec_loop(omniglot_tasks):
    model = Model.from_specs(conv4_specs(ways=5, hidden=8, query_norm="transductive"))
    init = model.init_params(seed=4)
    tasks = [paddle.to_tensor(a) for a in omniglot_tasks]
    tasks = [t.astype("float64") if t.dtype == paddle.float32 else t for t in tasks]
    ours = MAML(model, to_tensors(init, "float64"), inner_lr=0.4, steps=3, first_order=True).meta_step(*tasks)
    loss, grads = paddlerec.meta_step_first_order(paddlerec.build_net(model, init, "float64"), tasks, 3, 0.4)
    assert abs(ours.loss - loss) <= 1e-10
    for (name, got), want in zip(ours.grads.items(), grads):
        assert np.abs(got.numpy() - want.numpy()).max() <= 1e-9 * np.abs(want.numpy()).max(), name


@pytest.mark.parametrize("head_init,query_norm", [("meta", "transductive"), ("prototypes", "transductive"),
                                                  ("meta", "support"), ("prototypes", "support")])
def test_second_order_meta_gradient_matches_finite_differences(head_init, query_norm):
    """Autograd through the hand-written inner gradient (and the prototype head, and the support statistics the
    queries are normalised with) = central differences of the meta-loss (float64)."""
    model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=12, blocks=2, head_init=head_init,
                                         query_norm=query_norm))
    rng = np.random.default_rng(0)
    init = model.init_params(seed=1)
    # 2 shots: with one, each support image is its own prototype and the prototype head leaves its steps nothing
    x_spt = paddle.to_tensor(rng.random((2, 6, 1, 12, 12)))
    y_spt = paddle.to_tensor(np.array([[0, 1, 2, 0, 1, 2], [2, 0, 1, 1, 2, 0]]))
    x_qry = paddle.to_tensor(rng.random((2, 6, 1, 12, 12)))
    y_qry = paddle.to_tensor(np.array([[0, 1, 2, 0, 1, 2]] * 2))

    def meta_loss(params_np):
        maml = MAML(model, to_tensors(params_np, "float64"), inner_lr=0.5, steps=1)
        with paddle.no_grad():
            loss, _ = softmax_cross_entropy(maml.predict(maml.adapt(x_spt, y_spt), x_qry), y_qry)
        return float(loss.mean())

    step = MAML(model, to_tensors(init, "float64"), inner_lr=0.5, steps=1, first_order=False).meta_step(
        x_spt, y_spt, x_qry, y_qry)
    direction = {k: rng.normal(size=v.shape) for k, v in init.items()}
    eps = 1e-5
    plus = meta_loss({k: init[k] + eps * direction[k] for k in init})
    minus = meta_loss({k: init[k] - eps * direction[k] for k in init})
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(float((step.grads[k].numpy() * direction[k]).sum()) for k in init)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))
    if head_init == "prototypes":  # the head's meta-parameters take no part: zero gradient, none in the loss
        assert not any(step.grads[k].numpy().any() for k in ("fc1.weight", "fc1.bias"))
    # and the second-order terms matter: first-order gives a different directional derivative
    fo = MAML(model, to_tensors(init, "float64"), inner_lr=0.5, steps=1, first_order=True).meta_step(
        x_spt, y_spt, x_qry, y_qry)
    first_order = sum(float((fo.grads[k].numpy() * direction[k]).sum()) for k in init)
    assert abs(first_order - numeric) > 1e-4 * max(1.0, abs(numeric))


@pytest.mark.parametrize("head_init", ["meta", "prototypes"])
def test_first_order_query_gradient_under_support_statistics_matches_finite_differences(head_init):
    """First-order with query_norm "support": the query loss depends on the fast weights also through the support
    statistics the queries are normalised with; its gradient (autograd) = central differences (float64)."""
    model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=12, blocks=2, head_init=head_init))
    rng = np.random.default_rng(5)
    x_spt = paddle.to_tensor(rng.random((2, 6, 1, 12, 12)))
    x_qry = paddle.to_tensor(rng.random((2, 4, 1, 12, 12)))
    y_qry = paddle.to_tensor(np.array([[0, 1, 2, 0]] * 2))
    fast_np = {k: np.stack([v, v + 0.1 * rng.normal(size=v.shape)]) for k, v in model.init_params(seed=2).items()}
    loss, grads, _ = query_loss_and_grads(model, to_tensors(fast_np, "float64"), x_spt, x_qry, y_qry)

    def query_loss(params_np):
        fast = to_tensors(params_np, "float64")
        logits, _ = model.forward({**fast, **model.support_stats(fast, x_spt)}, x_qry)
        return float(softmax_cross_entropy(logits, y_qry)[0].sum())

    direction = {k: rng.normal(size=v.shape) for k, v in fast_np.items()}
    eps = 1e-6
    numeric = (query_loss({k: v + eps * direction[k] for k, v in fast_np.items()})
               - query_loss({k: v - eps * direction[k] for k, v in fast_np.items()})) / (2 * eps)
    analytic = sum(float((grads[k].numpy() * direction[k]).sum()) for k in fast_np)
    assert abs(float(loss.sum()) - query_loss(fast_np)) <= 1e-12
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))
    # the path through the statistics matters: holding them constant gives another derivative
    fixed = {**to_tensors(fast_np, "float64"), **model.support_stats(to_tensors(fast_np, "float64"), x_spt)}
    stats = {k: v for k, v in fixed.items() if k not in fast_np}
    leaves = to_tensors(fast_np, "float64", trainable=True)
    held = paddle.grad(softmax_cross_entropy(model.forward({**leaves, **stats}, x_qry)[0], y_qry)[0].sum(),
                       list(leaves.values()), allow_unused=True)
    held = sum(float((g.numpy() * direction[k]).sum()) for k, g in zip(leaves, held) if g is not None)
    assert abs(held - numeric) > 1e-4 * max(1.0, abs(numeric))


@pytest.mark.parametrize("head_init", ["meta", "prototypes"])
def test_support_statistics_make_each_query_independent_of_the_others(head_init):
    """query_norm "support": a query predicted alone gets the logits of its row in any batch; transductive:
    not (its batch-mates change the statistics)."""
    rng = np.random.default_rng(6)
    x_spt = paddle.to_tensor(rng.random((1, 6, 1, 12, 12)))
    y_spt = paddle.to_tensor(np.array([[0, 1, 2, 0, 1, 2]]))
    x_qry = paddle.to_tensor(rng.random((1, 7, 1, 12, 12)))
    gaps = {}
    for norm in ("support", "transductive"):
        model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=12, blocks=2, head_init=head_init,
                                             query_norm=norm))
        maml = MAML(model, to_tensors(model.init_params(0), "float64"), inner_lr=0.3, steps=2)
        with paddle.no_grad():
            fast = maml.adapt(x_spt, y_spt)
            batch = maml.predict(fast, x_qry).numpy()[0]
            alone = np.concatenate([maml.predict(fast, x_qry[:, i:i + 1]).numpy()[0] for i in range(7)])
        gaps[norm] = np.abs(batch - alone).max() / np.abs(batch).max()
        assert sorted(k for k in fast if k.startswith("bn")) == (
            ["bn1.bias", "bn1.mean", "bn1.var", "bn1.weight", "bn2.bias", "bn2.mean", "bn2.var", "bn2.weight"]
            if norm == "support" else ["bn1.bias", "bn1.weight", "bn2.bias", "bn2.weight"])
    assert gaps["support"] <= 1e-12 and gaps["transductive"] > 1e-3


def test_tasks_in_a_batch_adapt_independently():
    """Task-stacked adaptation of T tasks equals adapting each task alone."""
    model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=14, blocks=2))
    rng = np.random.default_rng(2)
    maml = MAML(model, to_tensors(model.init_params(0), "float64"), inner_lr=0.3, steps=2)
    x = paddle.to_tensor(rng.random((3, 6, 1, 14, 14)))
    y = paddle.to_tensor(rng.integers(0, 3, (3, 6)))
    with paddle.no_grad():
        together = maml.adapt(x, y)
        for t in range(3):
            alone = maml.adapt(x[t:t + 1], y[t:t + 1])
            for name in together:
                np.testing.assert_allclose(together[name][t].numpy(), alone[name][0].numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_init", ["meta", "prototypes"])
@pytest.mark.parametrize("first_order", [True, False])
def test_meta_step_in_task_blocks_equals_the_whole_batch(first_order, head_init):
    """meta_step works through TASK_CHUNK tasks at a time; uneven blocks weigh by their tasks (float64)."""
    model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=14, blocks=2, head_init=head_init))
    rng = np.random.default_rng(3)
    x_spt, x_qry = paddle.to_tensor(rng.random((5, 3, 1, 14, 14))), paddle.to_tensor(rng.random((5, 6, 1, 14, 14)))
    y_spt = paddle.to_tensor(np.array([[0, 1, 2]] * 5))
    y_qry = paddle.to_tensor(np.array([[0, 1, 2, 2, 1, 0]] * 5))
    init = model.init_params(0)
    steps = {}
    for chunk in (2, 100):  # blocks of 2, 2, 1 tasks; one block
        maml = MAML(model, to_tensors(init, "float64"), inner_lr=0.3, steps=2, first_order=first_order)
        maml.TASK_CHUNK = chunk
        steps[chunk] = maml.meta_step(x_spt, y_spt, x_qry, y_qry)
    assert abs(steps[2].loss - steps[100].loss) <= 1e-12 and abs(steps[2].accuracy - steps[100].accuracy) <= 1e-6
    for name, want in steps[100].grads.items():
        got = steps[2].grads[name].numpy()
        assert np.abs(got - want.numpy()).max() <= 1e-12 * max(1.0, np.abs(want.numpy()).max()), name


def test_prototype_head_is_the_euclidean_prototype_classifier():
    """Logits of the prototype head = -|f - p_c|^2 + |f|^2 for features f and class means p_c (numpy, float64),
    with several shots per class in any order."""
    model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=12, blocks=2, head_init="prototypes"))
    rng = np.random.default_rng(5)
    params = expand_to_tasks(to_tensors(model.init_params(2), "float64"), 2)
    x_spt, x_qry = paddle.to_tensor(rng.random((2, 6, 1, 12, 12))), paddle.to_tensor(rng.random((2, 4, 1, 12, 12)))
    y_spt = paddle.to_tensor(np.array([[2, 0, 1, 0, 2, 1], [1, 1, 0, 2, 0, 2]]))
    head = prototype_head(model, params, x_spt, y_spt)
    logits = model.forward({**params, **head}, x_qry)[0].numpy()  # (T, Q, 3)
    fs, fq = model.forward(params, x_spt, upto=-1)[0].numpy(), model.forward(params, x_qry, upto=-1)[0].numpy()
    for t in range(2):
        p = np.stack([fs[t][y_spt.numpy()[t] == c].mean(0) for c in range(3)])  # (3, F)
        want = -((fq[t][:, None, :] - p[None]) ** 2).sum(-1) + (fq[t] ** 2).sum(-1, keepdims=True)
        np.testing.assert_allclose(logits[t], want, rtol=1e-10, atol=1e-10)


def test_the_first_step_going_on_from_the_prototypes_forward_is_the_same_arithmetic():
    """`MAML._start` hands the prototypes' support forward to the first SGD step (one forward fewer): the fast
    weights and support statistics are bit-for-bit those of steps that run every forward themselves, under SGD
    to the end and under the fixed-point stop, and 0 steps take the same statistics from it."""
    from maml_export.maml import sgd_steps
    model = Model.from_specs(conv4_specs(ways=3, hidden=8, head_init="prototypes"))
    rng = np.random.default_rng(4)
    x = paddle.to_tensor(rng.random((2, 6, 1, 28, 28)).astype("float32"))
    y = paddle.to_tensor(np.array([[0, 1, 2, 2, 1, 0]] * 2))
    maml = MAML(model, to_tensors(model.init_params(6)), inner_lr=0.2, steps=3)
    start, body = maml._start(x, y)
    assert body is not None and body[0].shape == [2, 6, model.layers[-1].in_features]
    with paddle.no_grad():
        shared = sgd_steps(model, start, x, y, 3, 0.2, False, body=body)
        alone = sgd_steps(model, start, x, y, 3, 0.2, False)
        for name in alone:
            np.testing.assert_array_equal(shared[name].numpy(), alone[name].numpy(), err_msg=name)
        for steps in (0, 3):
            stop = MAML(model, maml.params, inner_lr=0.2, steps=steps, stop_at_fixed_point=True).adapt(x, y)
            want = dict(sgd_steps(model, start, x, y, steps, 0.2, False))  # 0 steps: `start` itself
            want.update(model.support_stats(want, x))
            for name in want:
                np.testing.assert_array_equal(stop[name].numpy(), want[name].numpy(), err_msg=f"{steps} steps: {name}")


def test_prototype_head_adaptation_equals_paddlerec_loop(omniglot_tasks):
    """`MAML.adapt` from the prototype head = PaddleRec's loop from its own prototypes (float64, 3 steps;
    transductive, as PaddleRec)."""
    model = Model.from_specs(conv4_specs(ways=5, hidden=16, head_init="prototypes", query_norm="transductive"))
    init = model.init_params(seed=3)
    maml = MAML(model, to_tensors(init, "float64"), inner_lr=0.1, steps=3)
    x_spt, y_spt, x_qry, _ = (paddle.to_tensor(a) for a in omniglot_tasks)
    x_spt, x_qry = x_spt.astype("float64"), x_qry.astype("float64")
    with paddle.no_grad():
        logits = maml.predict(maml.adapt(x_spt, y_spt), x_qry)
    net = paddlerec.build_net(model, init, dtype="float64")
    for t in range(2):
        want = paddlerec.adapt(net, x_spt[t], y_spt[t], 3, 0.1, head_init="prototypes")(x_qry[t]).numpy()
        assert np.abs(logits[t].numpy() - want).max() <= 1e-9 * np.abs(want).max()


def test_first_order_prototype_head_keeps_the_path_through_the_prototypes():
    """With no inner step the first-order meta-gradient is exact, so under the prototype head it must equal the
    second-order one, the path through the prototypes included (float64); with steps it differs from it."""
    model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=12, blocks=2, head_init="prototypes"))
    rng = np.random.default_rng(4)
    x_spt, x_qry = paddle.to_tensor(rng.random((2, 6, 1, 12, 12))), paddle.to_tensor(rng.random((2, 6, 1, 12, 12)))
    y = paddle.to_tensor(np.array([[0, 1, 2, 2, 1, 0]] * 2))
    init = model.init_params(1)
    grads = {}
    for first_order in (True, False):
        for steps in (0, 2):
            maml = MAML(model, to_tensors(init, "float64"), inner_lr=0.05, steps=steps, first_order=first_order)
            grads[first_order, steps] = {k: g.numpy() for k, g in maml.meta_step(x_spt, y, x_qry, y).grads.items()}
    for k, exact in grads[False, 0].items():
        np.testing.assert_allclose(grads[True, 0][k], exact, rtol=1e-9, atol=1e-12, err_msg=k)
    assert np.abs(grads[True, 0]["conv1.weight"]).max() > 0 and not grads[True, 0]["fc1.weight"].any()
    assert not np.allclose(grads[True, 2]["conv1.weight"], grads[False, 2]["conv1.weight"], rtol=1e-6)


def test_adaptation_stopping_at_a_fixed_point_equals_every_step():
    """MAML(stop_at_fixed_point=True).adapt, one nested cond per step, gives the fast weights and support statistics
    of the plain loop bit for bit where the steps move the weights (freshly initialised, zero head). Where they
    do not: test_eager_adaptation_stops_where_the_prototype_heads_gradient_is_zero and test_export's
    test_adapt_onnx_stops_at_a_fixed_point_and_only_there."""
    from maml_export.data import synthetic_tasks
    model = Model.from_specs(conv4_specs(ways=5, head_init="meta", query_norm="support"))
    params = to_tensors(model.with_zero_head(model.init_params(3)))
    t = synthetic_tasks(3, 5, 1, 2, seed=4)
    x_spt, y_spt = paddle.to_tensor(t.x_spt), paddle.to_tensor(t.y_spt)
    with paddle.no_grad():
        every = MAML(model, params, 0.4, steps=5).adapt(x_spt, y_spt)
        stopped = MAML(model, params, 0.4, steps=5, stop_at_fixed_point=True).adapt(x_spt, y_spt)
    assert sorted(every) == sorted(stopped) and any(k.endswith(".mean") for k in every)
    for k in every:
        assert np.array_equal(every[k].numpy(), stopped[k].numpy()), k
    assert float((every["conv2.weight"] - params["conv2.weight"].unsqueeze(0)).abs().max()) > 1e-4  # steps ran


def test_eager_adaptation_stops_where_the_prototype_heads_gradient_is_zero(omniglot_tasks):
    """The bundled weights with their features x16 (`--feature-scale 16`) on 1-shot test tasks: every support logit
    margin is in the hundreds, the exact softmax is one-hot and the first gradient exactly zero, so eager Paddle
    stops there too (`train evaluate`, `train bundle` and validation adapt so) with the queries' logits of the
    loop that runs every step."""
    from maml_export.checkpoint import as_deployed, load_checkpoint
    ckpt = as_deployed(load_checkpoint("omniglot-5w1s"), feature_scale=16)
    model, params = Model.from_specs(ckpt.config.layers), to_tensors(ckpt.params)
    x_spt, y_spt, x_qry, _ = (paddle.to_tensor(a[:4]) for a in omniglot_tasks)
    maml = MAML(model, params, 0.01, steps=5)
    with paddle.no_grad():
        support = shifted_support(x_spt, y_spt, model.support_shift)  # what adapt learns from (the bundle's shifts)
        _, dlogits = softmax_cross_entropy(model.forward(maml._start(*support)[0], support[0])[0], support[1])
        assert not dlogits.numpy().any()  # the first step's logit gradient: exactly zero, so the first cond stops
        stopped = MAML(model, params, 0.01, steps=5, stop_at_fixed_point=True).adapt(x_spt, y_spt)
        every = maml.adapt(x_spt, y_spt)
        for k in every:
            assert np.array_equal(every[k].numpy(), stopped[k].numpy()), k
        np.testing.assert_array_equal(maml.predict(every, x_qry).numpy(), maml.predict(stopped, x_qry).numpy())


def test_shifted_support_is_nine_edge_replicated_shifts_of_each_image():
    """`shifted_support` against numpy's edge padding: view (i, j) is the padded image's window at (i*k, j*k),
    view-major, labels repeated; the unshifted view (the middle one) is the support set itself."""
    from maml_export.maml import shifted_support
    rng = np.random.default_rng(0)
    x = rng.random((2, 3, 1, 9, 7)).astype("float32")
    y = np.array([[0, 1, 2], [2, 0, 1]])
    for k in (1, 2):
        xs, ys = shifted_support(paddle.to_tensor(x), paddle.to_tensor(y), k)
        xs, ys = xs.numpy(), ys.numpy()
        assert xs.shape == (2, 27, 1, 9, 7) and ys.shape == (2, 27)
        padded = np.pad(x, [(0, 0)] * 3 + [(k, k)] * 2, mode="edge")
        for v, (i, j) in enumerate((i, j) for i in range(3) for j in range(3)):
            np.testing.assert_array_equal(xs[:, 3 * v:3 * v + 3], padded[..., i * k:i * k + 9, j * k:j * k + 7])
            np.testing.assert_array_equal(ys[:, 3 * v:3 * v + 3], y)
        np.testing.assert_array_equal(xs[:, 12:15], x)


def test_support_shift_adapts_on_the_shifted_support_set():
    """A head with support_shift K adapts as the same model without it does on the 9-view support set: the fast
    weights and (under support statistics) the statistics of all 9 views; then the queries are predicted alone,
    unshifted."""
    from maml_export.data import synthetic_tasks
    from maml_export.maml import shifted_support
    from maml_export.specs import with_head
    plain = Model.from_specs(conv4_specs(ways=5, head_init="prototypes", query_norm="support"))
    shifted = Model.from_specs(with_head(plain.specs(), support_shift=2))
    assert shifted.support_shift == 2 and plain.support_shift == 0
    params = to_tensors(plain.init_params(5), "float64")
    t = synthetic_tasks(2, 5, 1, 2, seed=6)
    x_spt, y_spt, x_qry = (paddle.to_tensor(a) for a in (t.x_spt.astype("float64"), t.y_spt, t.x_qry.astype("float64")))
    with paddle.no_grad():
        got = MAML(shifted, params, 0.1, steps=2).adapt(x_spt, y_spt)
        want = MAML(plain, params, 0.1, steps=2).adapt(*shifted_support(x_spt, y_spt, 2))
        unshifted = MAML(plain, params, 0.1, steps=2).adapt(x_spt, y_spt)
        logits = MAML(shifted, params, 0.1, steps=2).predict(got, x_qry)
    assert sorted(got) == sorted(want)
    for k in got:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy(), err_msg=k)
    assert float((got["bn1.mean"] - unshifted["bn1.mean"]).abs().max()) > 1e-6  # the views' statistics
    assert logits.shape == [2, 10, 5]


def test_feature_scale_multiplies_the_prototype_logits_by_its_square_and_stops_adaptation():
    """`scale_features` by 4 (a power of two) on a freshly initialised conv-4 with support statistics: every
    query logit of the unadapted prototype head is exactly 16 times the unscaled one, so no class changes; the
    scaled support loss saturates where the unscaled one does not (eager adapts to its fixed point at once);
    a scale that is not a positive number is refused naming the flag."""
    from maml_export.checkpoint import scale_features
    from maml_export.errors import CheckpointError
    from maml_export.config import MamlConfig
    from maml_export.data import synthetic_tasks
    config = MamlConfig(ways=5, head_init="prototypes", query_norm="support")
    model = Model.from_specs(config.layers)
    params = model.init_params(0)
    x_spt, y_spt, x_qry, _ = (paddle.to_tensor(a) for a in synthetic_tasks(2, 5, 1, 3, seed=1))
    logits = {}
    for scale in (1, 4):
        maml = MAML(model, to_tensors(scale_features(config, params, scale)), 0.01, steps=0)
        with paddle.no_grad():
            logits[scale] = maml.predict(maml.adapt(x_spt, y_spt), x_qry).numpy()
    assert np.array_equal(logits[4], 16 * logits[1])
    scaled = MAML(model, to_tensors(scale_features(config, params, 64)), 0.01, steps=3)
    with paddle.no_grad():
        start = scaled._start(x_spt, y_spt)[0]
        assert not softmax_cross_entropy(model.forward(start, x_spt)[0], y_spt)[1].numpy().any()  # saturated
        _, unscaled = softmax_cross_entropy(model.forward(MAML(model, to_tensors(params), 0.01, 3)._start(x_spt, y_spt)[0],
                                                          x_spt)[0], y_spt)
    assert unscaled.numpy().any()  # without the scale the first step would move the weights
    for bad in (0, -2.0, float("inf")):
        with pytest.raises(CheckpointError, match="--feature-scale"):
            scale_features(config, params, bad)


def _tiny_lslr_task(head_init="prototypes", steps=2):
    """A tiny model with learned step sizes (distinct per layer and step) and one 2-task, 2-shot batch (float64)."""
    model = Model.from_specs(conv4_specs(ways=3, hidden=4, image_size=12, blocks=2, head_init=head_init,
                                         query_norm="support"))
    rng = np.random.default_rng(3)
    init = model.init_params(seed=2)
    init.update({k: rng.uniform(0.2, 0.6, shape) for k, shape in step_size_shapes(model, steps).items()})
    x_spt = paddle.to_tensor(rng.random((2, 6, 1, 12, 12)))
    y_spt = paddle.to_tensor(np.array([[0, 1, 2, 0, 1, 2], [2, 0, 1, 1, 2, 0]]))
    x_qry = paddle.to_tensor(rng.random((2, 6, 1, 12, 12)))
    y_qry = paddle.to_tensor(np.array([[0, 1, 2, 0, 1, 2]] * 2))
    return model, init, (x_spt, y_spt, x_qry, y_qry), rng


@pytest.mark.parametrize("head_init", ["meta", "prototypes"])
def test_learned_step_sizes_second_order_gradient_matches_finite_differences(head_init):
    """--learn-inner-lr (LSLR): the meta-gradient of every step size, second order, = central differences of the
    meta-loss along a random direction of the step sizes (float64); and each step size moves the loss."""
    model, init, (x_spt, y_spt, x_qry, y_qry), rng = _tiny_lslr_task(head_init)
    sizes = [k for k in init if k.startswith(STEP_SIZES)]

    def meta_loss(params_np):
        maml = MAML(model, to_tensors(params_np, "float64"), inner_lr=99.0, steps=2)  # the learned sizes rule
        with paddle.no_grad():
            loss, _ = softmax_cross_entropy(maml.predict(maml.adapt(x_spt, y_spt), x_qry), y_qry)
        return float(loss.mean())

    step = MAML(model, to_tensors(init, "float64"), inner_lr=99.0, steps=2).meta_step(x_spt, y_spt, x_qry, y_qry)
    direction = {k: rng.normal(size=init[k].shape) for k in sizes}
    eps = 1e-5
    numeric = (meta_loss({**init, **{k: init[k] + eps * direction[k] for k in sizes}})
               - meta_loss({**init, **{k: init[k] - eps * direction[k] for k in sizes}})) / (2 * eps)
    analytic = sum(float((step.grads[k].numpy() * direction[k]).sum()) for k in sizes)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    assert all(np.abs(step.grads[k].numpy()).min() > 0 for k in sizes)  # every layer's every step matters


def test_learned_step_sizes_first_order_gradient_is_the_surrogates():
    """First order, each step's gradient g_k is a constant: the step sizes' meta-gradient is that of the query
    loss at w_0 - sum_k a_k g_k, checked by central differences with the g_k held fixed (float64)."""
    model, init, (x_spt, y_spt, x_qry, y_qry), rng = _tiny_lslr_task()
    sizes = [k for k in init if k.startswith(STEP_SIZES)]
    maml = MAML(model, to_tensors(init, "float64"), inner_lr=99.0, steps=2, first_order=True)
    record = []
    with paddle.no_grad():
        maml.fast_weights(x_spt, y_spt, record=record)
        start = maml._start(x_spt, y_spt)[0]

    def surrogate(sizes_np):
        fast = dict(start)
        for k, grads in enumerate(record):
            fast = {n: w - float(sizes_np[STEP_SIZES + n.split(".")[0]][k]) * grads[n] for n, w in fast.items()}
        with paddle.no_grad():
            loss, _, _ = query_loss_and_grads(model, fast, x_spt, x_qry, y_qry)
        return float(loss.mean())

    step = maml.meta_step(x_spt, y_spt, x_qry, y_qry)
    direction = {k: rng.normal(size=init[k].shape) for k in sizes}
    eps = 1e-5
    numeric = (surrogate({k: init[k] + eps * direction[k] for k in sizes})
               - surrogate({k: init[k] - eps * direction[k] for k in sizes})) / (2 * eps)
    analytic = sum(float((step.grads[k].numpy() * direction[k]).sum()) for k in sizes)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_equal_learned_step_sizes_adapt_as_one_inner_lr_and_stop_at_the_same_fixed_point():
    """Learned step sizes all equal to 0.3 give the fast weights of inner_lr 0.3 bit for bit (every step, and
    stopping at a fixed point); sizes that differ by layer give other weights."""
    model, init, (x_spt, y_spt, _, _), _ = _tiny_lslr_task(head_init="meta")
    weights = {k: v for k, v in init.items() if not k.startswith(STEP_SIZES)}
    equal = {**init, **{k: np.full_like(v, 0.3) for k, v in init.items() if k.startswith(STEP_SIZES)}}
    with paddle.no_grad():
        plain = MAML(model, to_tensors(weights, "float64"), 0.3, steps=2).adapt(x_spt, y_spt)
        for stop in (False, True):
            learned = MAML(model, to_tensors(equal, "float64"), 99.0, steps=2, stop_at_fixed_point=stop).adapt(x_spt, y_spt)
            assert sorted(learned) == sorted(plain)
            for k in plain:
                assert np.array_equal(plain[k].numpy(), learned[k].numpy()), (stop, k)
        other = MAML(model, to_tensors(init, "float64"), 0.3, steps=2).adapt(x_spt, y_spt)
    assert not np.allclose(other["conv1.weight"].numpy(), plain["conv1.weight"].numpy())
    with pytest.raises(ValueError, match="learned step sizes for 2 inner steps, not 3"):
        MAML(model, to_tensors(init, "float64"), 0.3, steps=3).adapt(x_spt, y_spt)
