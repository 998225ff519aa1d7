"""Every hand-written backward equals autograd (`paddle.grad`) of its forward, in float64."""
import numpy as np
import paddle
import pytest

from maml_export.layers import (BatchNorm, Conv2d, Flatten, Linear, MaxPool2, ReLU, im2col, maxpool2_backward_portable,
                                softmax_cross_entropy)
from maml_export.model import Model
from maml_export.specs import conv4_specs

TOL = 1e-8  # relative error, float64


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check_layer(layer, x_shape, tasks, seed=0, x=None):
    """Compare layer.backward with paddle.grad of sum(forward * dy) for x and every parameter."""
    rng = np.random.default_rng(seed)
    params = {k: paddle.to_tensor(rng.normal(size=(tasks,) + s), dtype="float64", stop_gradient=False)
              for k, s in layer.param_shapes().items()}
    if x is None:
        x = rng.normal(size=x_shape)
    x = paddle.to_tensor(x, dtype="float64", stop_gradient=False)
    y, cache = layer.forward(params, x)
    dy = paddle.to_tensor(rng.normal(size=y.shape), dtype="float64")
    dx, dparams = layer.backward(params, cache, dy)
    leaves = [x] + list(params.values())
    expected = paddle.grad((y * dy).sum(), leaves)
    assert rel_err(dx.numpy(), expected[0].numpy()) <= TOL
    for (name, got), want in zip(dparams.items(), expected[1:]):
        assert got.shape == want.shape, name
        assert rel_err(got.numpy(), want.numpy()) <= TOL, name
    return y


def test_conv2d_backward_chunks_many_images_without_changing_the_gradient():
    from maml_export.layers import IM2COL_CHUNK
    layer = Conv2d(2, 3, kernel=3, stride=1, padding=1)
    check_layer(layer, (2 * IM2COL_CHUNK + 3, 2 * 2, 6, 7), tasks=2)  # 2 full chunks and a partial one


@pytest.mark.parametrize("tasks,cin,cout,size,stride,padding", [
    (1, 1, 4, 7, 1, 1), (3, 2, 5, 9, 1, 1), (2, 3, 4, 11, 2, 1), (2, 2, 3, 8, 2, 0), (1, 3, 2, 10, 3, 2),
])
def test_conv2d_backward(tasks, cin, cout, size, stride, padding):
    layer = Conv2d(cin, cout, kernel=3, stride=stride, padding=padding)
    y = check_layer(layer, (5, tasks * cin, size, size + 1), tasks)
    assert y.shape[1] == tasks * cout and y.shape[2] == layer.out_size(size)


@pytest.mark.parametrize("tasks,size", [(1, 5), (3, 7), (2, 4)])
def test_batchnorm_backward(tasks, size):
    check_layer(BatchNorm(3), (4, tasks * 3, size, size), tasks)


def test_batchnorm_uses_batch_statistics_per_task():
    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.normal(3.0, 2.0, size=(6, 2 * 4, 5, 5)))
    params = {"weight": paddle.ones([2, 4], "float64"), "bias": paddle.zeros([2, 4], "float64")}
    y, _ = BatchNorm(4).forward(params, x)
    y = y.numpy()
    assert np.abs(y.mean(axis=(0, 2, 3))).max() < 1e-12
    assert np.abs(y.var(axis=(0, 2, 3)) - 1).max() < 1e-3  # var/(var+eps)


def test_relu_backward():
    check_layer(ReLU(), (3, 4, 5, 5), 1)


@pytest.mark.parametrize("size", [(6, 6), (7, 7), (5, 8), (3, 3)])
def test_maxpool_backward(size):
    y = check_layer(MaxPool2(), (2, 3) + size, 1)
    assert tuple(y.shape[2:]) == (size[0] // 2, size[1] // 2)


def test_maxpool_ties_go_to_the_first_maximum_like_paddle():
    # blank paper gives windows of equal values: the gradient must not be copied to every tie
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2, size=(2, 3, 7, 6)).astype("float64")
    check_layer(MaxPool2(), None, 1, x=x)


@pytest.mark.parametrize("size", [(6, 6), (7, 7), (5, 8)])
def test_portable_maxpool_backward_equals_autograd_with_ties(size):
    """The static-graph (exported) pool backward: same first-maximum rule, checked with ties."""
    rng = np.random.default_rng(5)
    x = paddle.to_tensor(rng.integers(0, 3, size=(2, 3) + size).astype("float64"), stop_gradient=False)
    y = paddle.nn.functional.max_pool2d(x, 2, 2)
    dy = paddle.to_tensor(rng.normal(size=y.shape))
    (expected,) = paddle.grad((y * dy).sum(), [x])
    assert rel_err(maxpool2_backward_portable(x, dy).numpy(), expected.numpy()) <= TOL


def test_flatten_backward():
    check_layer(Flatten(channels=3), (4, 2 * 3, 3, 3), 2)


def test_linear_backward():
    check_layer(Linear(6, 5), (3, 4, 6), 3)


def test_softmax_cross_entropy_gradient():
    rng = np.random.default_rng(3)
    logits = paddle.to_tensor(rng.normal(size=(3, 7, 5)), stop_gradient=False)
    labels = paddle.to_tensor(rng.integers(0, 5, size=(3, 7)))
    loss, dlogits = softmax_cross_entropy(logits, labels)
    ref = paddle.nn.functional.cross_entropy(logits.reshape([-1, 5]), labels.reshape([-1, 1]), reduction="none")
    assert rel_err(loss.numpy(), ref.numpy().reshape(3, 7).mean(1)) <= TOL
    (expected,) = paddle.grad(loss.sum(), [logits])
    assert rel_err(dlogits.numpy(), expected.numpy()) <= TOL


def test_softmax_cross_entropy_is_exact_for_saturated_logits():
    """float32 margins of 70 to 300: the probabilities are exp(-margin) down to float32's smallest normal number
    and 0 below, not Paddle's log_softmax's e^-64 floor, so a 1-shot prototype head's gradient is exactly zero,
    as in onnxruntime."""
    margins = np.array([[0.0, -300.0, -70.0, -80.0], [-200.0, 0.0, -250.0, -90.0]], np.float32)
    loss, dlogits = softmax_cross_entropy(paddle.to_tensor(margins[None]), paddle.to_tensor([[0, 1]]))
    want = np.where(margins > -87.3, np.exp(margins.astype(np.float64)), 0)
    np.testing.assert_allclose(dlogits.numpy()[0].astype(np.float64) * 2 + np.eye(2, 4), want, rtol=1e-5, atol=0)
    assert float(loss[0]) == 0.0
    saturated = paddle.to_tensor([[[0.0, -300.0, -200.0], [-150.0, 0.0, -300.0]]])
    assert not softmax_cross_entropy(saturated, paddle.to_tensor([[0, 1]]))[1].numpy().any()


@pytest.mark.parametrize("channels,size,hidden,tasks", [(1, 28, 8, 2), (3, 21, 4, 1)])
def test_whole_model_backward(channels, size, hidden, tasks):
    """The composed backward of a full conv-4 (odd sizes: 21 -> 10 -> 5 -> 2 -> 1) equals autograd."""
    model = Model.from_specs(conv4_specs(ways=4, channels=channels, image_size=size, hidden=hidden))
    rng = np.random.default_rng(4)
    params = {k: paddle.to_tensor(np.repeat(v[None], tasks, 0) + 0.1 * rng.normal(size=(tasks,) + v.shape),
                                  dtype="float64", stop_gradient=False)
              for k, v in model.init_params(0).items()}
    x = paddle.to_tensor(rng.random((tasks, 6, channels, size, size)))
    y = paddle.to_tensor(rng.integers(0, 4, size=(tasks, 6)))
    logits, caches = model.forward(params, x)
    loss, dlogits = softmax_cross_entropy(logits, y)
    grads = model.backward(params, caches, dlogits)
    expected = paddle.grad(loss.sum(), list(params.values()))
    for (name, got), want in zip(grads.items(), expected):
        assert rel_err(got.numpy(), want.numpy()) <= TOL, name


@pytest.mark.parametrize("shape,k,stride,padding", [((2, 3, 7, 7), 3, 1, 1), ((1, 2, 9, 8), 3, 2, 1), ((2, 1, 6, 6), 3, 1, 0)])
def test_static_im2col_equals_unfold(shape, k, stride, padding):
    """The one-hot-convolution im2col of static graphs moves exactly the values F.unfold does (eager)."""
    x = np.random.default_rng(6).normal(size=shape).astype("float32")
    Ho, Wo = (shape[2] + 2 * padding - k) // stride + 1, (shape[3] + 2 * padding - k) // stride + 1
    want = im2col(paddle.to_tensor(x), k, stride, padding, Ho, Wo).numpy()
    paddle.enable_static()  # trace a static program, N dynamic, as the export does
    try:
        main = paddle.static.Program()
        with paddle.static.program_guard(main):
            t = paddle.static.data("x", [-1, *shape[1:]], "float32")
            out = im2col(t, k, stride, padding, Ho, Wo)
        (got,) = paddle.static.Executor(paddle.CPUPlace()).run(main, feed={"x": x}, fetch_list=[out])
    finally:
        paddle.disable_static()
    np.testing.assert_array_equal(got, want)
