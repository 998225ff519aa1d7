"""Layers whose backward pass is written in ordinary Paddle forward ops.

Why: paddle2onnx converts no `*_grad` op and Paddle's eager double-backward is missing for several
ops (docs/design.md#paddle2onnx-converts-no-gradient-op and #no-double-backward-in-paddle). Writing each layer's gradient by hand in forward ops lets
one implementation serve eager adaptation, second-order meta-training (autograd runs *through* these
backward functions) and the exported graph.

Every layer is a frozen dataclass (its fields, parameter shapes and initialisation in `specs.py`) with

    forward(params, x)              -> (y, cache)
    backward(params, cache, dy)     -> (dx, dparams)      # dx is None when need_dx=False

Parameters carry a leading task axis T (one set of fast weights per task), so T tasks adapt at once:
  * conv stages hold activations as (N, T*C, H, W): task t owns channels t*C..(t+1)*C-1, so a grouped
    convolution (groups=T) gives each task its own weights and batch norm's per-channel statistics
    are automatically per task;
  * `Flatten` turns that into (T, N, F) for the per-task `Linear` head and the loss.
N (images per task) may be a dynamic dimension in a static graph: reshapes use -1 or 0 for it.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F

from . import specs
from .contract import LOG_TINY


def _tasks(params: dict) -> int:
    """Number of tasks T: the leading axis of any parameter."""
    return next(iter(params.values())).shape[0]


class Layer(specs.LayerSpec):
    """Base: a layer spec (`specs.py`: fields, parameter shapes, initialisation) with forward and backward in
    Paddle forward ops."""


class Conv2d(specs.Conv2d, Layer):
    """2-D convolution without bias (a following batch norm cancels a bias exactly)."""

    def forward(self, params, x):
        # x: (N, T*Cin, H, W); weight: (T, Cout, Cin, k, k) -> grouped (T*Cout, Cin, k, k)
        w = params["weight"]
        T = w.shape[0]
        w = w.reshape([T * self.out_channels, self.in_channels, self.kernel, self.kernel])
        y = F.conv2d(x, w, stride=self.stride, padding=self.padding, groups=T)
        return y, (x,)

    def backward(self, params, cache, dy, need_dx=True):
        (x,) = cache
        w = params["weight"]
        T, O, C, k = w.shape[0], self.out_channels, self.in_channels, self.kernel
        H, W = x.shape[2], x.shape[3]
        Ho, Wo = dy.shape[2], dy.shape[3]
        # Weight gradient as im2col + matmul: cols[n, t, c*k*k + i*k + j, p] = x_pad[n, t*C+c, s*p + (i, j)],
        # dW[t] = sum_n dy[n, t] @ cols[n, t]^T. Measured against a convolution with a dy-sized kernel
        # (groups=T): 2-8x faster in Paddle on CPU for the support sets and the first layer.
        L = Ho * Wo
        if paddle.in_dynamic_mode() and x.shape[0] > IM2COL_CHUNK:
            # eager, many images: im2col a few images at a time. F.unfold's time grows faster than its
            # output: 0.17 s for 8 images of layer 2 at 32 tasks, 4.2 s for 75 (1 GB); chunked, the
            # weight gradient took 2.7 s instead of 5.6 (75 queries x 32 tasks, 1 thread).
            dw = sum(paddle.matmul(dy[i:i + IM2COL_CHUNK].reshape([-1, T, O, L]),
                                   im2col(x[i:i + IM2COL_CHUNK], k, self.stride, self.padding, Ho, Wo)
                                   .reshape([-1, T, C * k * k, L]), transpose_y=True).sum(axis=0)
                     for i in range(0, x.shape[0], IM2COL_CHUNK)).reshape([T, O, C, k, k])
        else:
            cols = im2col(x, k, self.stride, self.padding, Ho, Wo).reshape([-1, T, C * k * k, L])
            per_image = paddle.matmul(dy.reshape([-1, T, O, L]), cols, transpose_y=True)  # (N, T, O, C*k*k)
            # The sum over images as a product with a row of ones: onnxruntime's ReduceSum over a leading
            # axis ran 8x slower on 2 threads than on 1 (1.5 ms for 25 support images of layer 2, per
            # step); the matmul takes 0.08 ms.
            ones = paddle.ones_like(dy[:, :1, 0, 0]).reshape([1, -1])  # (1, N)
            dw = paddle.matmul(ones, per_image.reshape([-1, T * O * C * k * k])).reshape([T, O, C, k, k])
        dx = None
        if need_dx:
            # Input gradient: the transposed convolution with the same (grouped) weights.
            wg = w.reshape([T * O, C, k, k])
            dx = F.conv2d_transpose(dy, wg, stride=self.stride, padding=self.padding, groups=T,
                                    output_size=[H, W])
        return dx, {"weight": dw}


IM2COL_CHUNK = 8  # images per eager im2col in Conv2d.backward (see there)


def im2col(x, k: int, stride: int, padding: int, Ho: int, Wo: int):
    """(N, C, H, W) -> (N, C*k*k, Ho*Wo) patches, ordered as `F.unfold` orders them (c, then i, then j).

    Eager Paddle runs `F.unfold` fastest. paddle2onnx turns `unfold` into Gathers (a quarter of
    onnxruntime's time, once), and k*k strided slices + zero padding + a stack cost about 20 nodes
    per call; a depthwise convolution with a constant one-hot kernel is one node that onnxruntime
    runs with its prepacked-weight kernels. Each output is 1.0 * one input value plus 0.0 * the
    others, so all three move the same values exactly.
    """
    if paddle.in_dynamic_mode():
        return F.unfold(x, [k, k], strides=stride, paddings=padding)
    C = x.shape[1]
    # The kernel is expanded in the graph from one identity, not stored: stored, each call's copy took
    # C*k*k*k*k floats in the file (0.3 MB per model, 10 MB with --task-batch 32, where C = 32*64).
    # onnxruntime folds the Expand at load, so the convolution still gets a constant, prepacked kernel.
    eye = paddle.to_tensor(np.eye(k * k, dtype="float32").reshape(1, k * k, 1, k, k), dtype=x.dtype)
    onehot = eye.expand([C, k * k, 1, k, k]).reshape([C * k * k, 1, k, k])
    patches = F.conv2d(x, onehot, stride=stride, padding=padding, groups=C)
    return patches.reshape([0, C * k * k, Ho * Wo])  # (N, C*k*k, Ho*Wo)


class BatchNorm(specs.BatchNorm, Layer):
    """Batch norm with the statistics of the batch at hand, or with statistics given to it (`specs.BatchNorm`
    says which the query images get). The statistics are computed with mean ops, not `F.batch_norm`, because
    `paddle.jit.save` silently turns training-mode batch norm into inference mode (docs/design.md#saving-makes-batch-norm-inference-mode).
    """

    def forward(self, params, x):
        # x: (N, T*C, H, W) viewed as (N, T*C, H*W): statistics per channel over (N, H*W), i.e. per
        # task and channel. Per-channel vectors broadcast as (T*C, 1) over that view, which Paddle's
        # CPU kernels run about twice as fast as a (1, T*C, 1, 1) broadcast over NCHW.
        # With "mean" and "var" among the params (T, C), x is normalised with those instead of its own
        # statistics (a query set under support statistics); such a forward has no hand-written backward.
        shape = x.shape
        x3 = x.reshape([0, shape[1], -1])
        given = "mean" in params
        if given:  # per-channel scale and shift first: two passes over x instead of three (predict.onnx's cost)
            mean, var = params["mean"].reshape([-1, 1]), params["var"].reshape([-1, 1])
            scale = params["weight"].reshape([-1, 1]) * paddle.rsqrt(var + self.eps)
            y = x3 * scale + (params["bias"].reshape([-1, 1]) - mean * scale)
            return y.reshape(shape), (None, None, scale, mean, var, given)
        mean = x3.mean(axis=2, keepdim=True).mean(axis=0)  # (T*C, 1); every image has H*W pixels
        xc = x3 - mean
        var = (xc * xc).mean(axis=2, keepdim=True).mean(axis=0)  # biased, as batch norm uses
        inv_std = paddle.rsqrt(var + self.eps)
        scale = params["weight"].reshape([-1, 1]) * inv_std  # gamma / std, (T*C, 1)
        y = xc * scale + params["bias"].reshape([-1, 1])
        return y.reshape(shape), (xc, inv_std, scale, mean, var, given)

    def stats(self, cache, tasks: int) -> dict:
        """The statistics a forward normalised with, {"mean", "var"} each (T, C): a support set's, for its queries."""
        mean, var = cache[3], cache[4]
        return {"mean": mean.reshape([tasks, self.channels]), "var": var.reshape([tasks, self.channels])}

    def backward(self, params, cache, dy, need_dx=True):
        xc, inv_std, scale, _, _, given = cache  # xc: (N, T*C, H*W) centred input
        if given:  # never needed: adaptation normalises the support set with its own statistics
            raise ValueError("BatchNorm.backward is written for the batch's own statistics, not given ones")
        T = _tasks(params)
        shape = dy.shape
        dy3 = dy.reshape([0, shape[1], -1])
        mean_dy = dy3.mean(axis=2, keepdim=True).mean(axis=0)  # (T*C, 1)
        mean_dy_xc = (dy3 * xc).mean(axis=2, keepdim=True).mean(axis=0)
        # pixels per channel, N*H*W: from the 4-D shape, since a reshape with -1 hides H*W from static
        # shape inference when N is dynamic (N itself then comes from the run-time shape)
        n = shape[0] if shape[0] > 0 else paddle.shape(dy)[0].astype(dy.dtype)
        count = n * (shape[2] * shape[3])
        # sum(dy * xhat) = count * inv_std * mean(dy * xc)
        dgamma = (count * inv_std * mean_dy_xc).reshape([T, self.channels])
        dbeta = (count * mean_dy).reshape([T, self.channels])
        dx = None
        if need_dx:
            # dx = gamma*inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)), means over (N, H, W)
            dx = (dy3 - mean_dy) * scale - xc * (scale * inv_std * inv_std * mean_dy_xc)
            dx = dx.reshape(shape)
        return dx, {"weight": dgamma, "bias": dbeta}


class ReLU(specs.ReLU, Layer):
    def forward(self, params, x):
        y = F.relu(x)
        return y, (y,)

    def backward(self, params, cache, dy, need_dx=True):
        (y,) = cache
        return dy * (y > 0).astype(dy.dtype), {}


class MaxPool2(specs.MaxPool2, Layer):
    """2x2 max pooling, stride 2, floor mode (7 -> 3: the last row/column is dropped).

    The backward routes each gradient to the *first* maximum of its window in row-major order, as
    Paddle's own pool2d_grad does. Ties are common here, not rare: blank paper gives equal values
    across a window, and sending the gradient to every tied element would multiply it.
    """

    def forward(self, params, x):
        if paddle.in_dynamic_mode():
            y, argmax = F.max_pool2d(x, kernel_size=2, stride=2, return_mask=True)
            return y, (x, argmax)
        return F.max_pool2d(x, kernel_size=2, stride=2), (x, None)

    def backward(self, params, cache, dy, need_dx=True):
        x, argmax = cache
        if argmax is not None:
            # eager: scatter to the recorded argmax (first maximum), 6x faster than the mask below
            return F.max_unpool2d(dy, argmax, kernel_size=2, stride=2, output_size=x.shape[2:]), {}
        return maxpool2_backward_portable(x, dy), {}


def maxpool2_backward_portable(x, dy):
    """MaxPool2's input gradient in ops every exporter converts (no unpool, no Tile upsampling).

    Each window's four values are brought onto an axis of their own, (N, C, H, W) -> (N*C*h, 4, w),
    by splitting the columns by parity and stacking; `argmax` over the 4 picks the *first* maximum
    in row-major order (ties included, as Paddle's pool2d_grad does), the output gradient is written
    there, and the inverse split + concat restores (N, C, H, W). Used inside static graphs.
    Measured in onnxruntime at (5, 64, 28, 28): a Transpose that moves a size-2 axis took 0.27 ms on
    1 thread and 6.8 ms on 2 (its threading is pathological for tiny inner dims), 6-D broadcast masks
    were as slow; a Split or Concat on the innermost axis takes 0.07 ms on either.
    """
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    h, w = H // 2, W // 2
    if H != 2 * h or W != 2 * w:
        x = x[:, :, : 2 * h, : 2 * w]
    even, odd = paddle.split(x.reshape([-1, 2, w, 2]), 2, axis=3)  # columns 2j and 2j+1: (M, 2, w, 1)
    x4 = paddle.stack([even.reshape([-1, 2, w]), odd.reshape([-1, 2, w])], axis=2)  # (M, row, col, w)
    first = x4.reshape([-1, 4, w]).argmax(axis=1, keepdim=True)  # (M, 1, w): window position 0..3
    hit = (paddle.arange(4, dtype=first.dtype).reshape([1, 4, 1]) == first).astype(dy.dtype)
    dx4 = (hit * dy.reshape([-1, 1, w])).reshape([-1, 2, 2, w])  # (M, row, col, w)
    dx_even, dx_odd = paddle.split(dx4, 2, axis=2)  # (M, 2, 1, w)
    dx = paddle.concat([dx_even.reshape([-1, 2, w, 1]), dx_odd.reshape([-1, 2, w, 1])], axis=3)
    dx = dx.reshape([-1, C, 2 * h, 2 * w])
    # the dropped row/column gets no gradient. Zeros are concatenated rather than padded: paddle2onnx
    # 2.1.0 reads pad3d's constant under an old attribute name and pads with uninitialised memory.
    if W != 2 * w:
        dx = paddle.concat([dx, paddle.zeros_like(dx[:, :, :, : W - 2 * w])], axis=3)
    if H != 2 * h:
        dx = paddle.concat([dx, paddle.zeros_like(dx[:, :, : H - 2 * h, :])], axis=2)
    return dx


class Flatten(specs.Flatten, Layer):
    """(N, T*C, H, W) -> (T, N, C*H*W): from task-stacked channels to one row per image per task.

    `channels` is C, the channels of one task, so that T = x.shape[1] // C is known statically.
    """

    def forward(self, params, x):
        T = x.shape[1] // self.channels
        y = x.reshape([0, T, -1]).transpose([1, 0, 2])
        return y, (x.shape[1], x.shape[2], x.shape[3])

    def backward(self, params, cache, dy, need_dx=True):
        C, H, W = cache
        return dy.transpose([1, 0, 2]).reshape([-1, C, H, W]), {}


class Linear(specs.Linear, Layer):
    """Per-task affine map on (T, N, in_features) -> (T, N, out_features); weight is (in, out); `specs.Linear`:
    where adaptation starts it, the temperature of deployed logits."""

    def forward(self, params, x):
        return paddle.matmul(x, params["weight"]) + params["bias"].unsqueeze(1), (x,)

    def backward(self, params, cache, dy, need_dx=True):
        (x,) = cache
        dw = paddle.matmul(x, dy, transpose_x=True)  # (T, in, out)
        db = dy.sum(axis=1)  # (T, out)
        dx = paddle.matmul(dy, params["weight"], transpose_y=True) if need_dx else None
        return dx, {"weight": dw, "bias": db}




def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy per task and its gradient.

    logits: (T, N, O); labels: (T, N) int64. Returns (loss (T,), dlogits (T, N, O)) where dlogits is
    the gradient of loss.sum() (each task's loss only depends on its own logits).
    """
    n = logits.shape[1]
    # a comparison, not F.one_hot: onnxruntime's CUDA provider has no OneHot kernel for the exported
    # types, and that one node on the CPU ruled out a CUDA graph (seen on an H100, onnxruntime-gpu 1.30)
    classes = paddle.arange(logits.shape[2], dtype=labels.dtype)
    onehot = (labels.unsqueeze(-1) == classes).astype(logits.dtype)
    # log-softmax written out, not F.log_softmax: Paddle's CPU kernel clips x - max at -64, so a saturated class
    # kept probability e^-64 and eager's gradient was never exactly zero where onnxruntime's is. Probabilities
    # below float32's smallest normal number (e^-87.3) are zero: Paddle's CPU exp floors there (e^-89.4) where
    # onnxruntime's underflows. So eager inference stops at the fixed point too (docs/design.md#adaptation-stops-at-a-fixed-point)
    shifted = logits - logits.max(axis=-1, keepdim=True)
    log_p = shifted - paddle.log(paddle.exp(shifted).sum(axis=-1, keepdim=True))
    probs = paddle.where(log_p > LOG_TINY, paddle.exp(log_p), paddle.zeros_like(log_p))
    loss = -(onehot * log_p).sum(axis=-1).mean(axis=-1)
    # n may be dynamic (-1) in a static graph: divide by the count computed at run time
    count = paddle.shape(labels)[1].astype(logits.dtype) if n is None or n < 0 else float(n)
    dlogits = (probs - onehot) / count
    return loss, dlogits


LAYER_TYPES = {cls.__name__: cls for cls in (Conv2d, BatchNorm, ReLU, MaxPool2, Flatten, Linear)}


def layer_from_spec(spec: dict) -> Layer:
    """The layer of a spec dict (`Layer.spec()` output, as stored in checkpoints and exports), validated."""
    return specs.layer_spec(spec, LAYER_TYPES)
