"""Adam for the meta-update, on a dict of Paddle tensors, with state that saves as plain arrays.

It applies exactly `paddle.optimizer.Adam`'s update (tested against it), but its state is a few named
numpy arrays, so checkpoints need no pickle and do not depend on Paddle's generated parameter names.
"""
from __future__ import annotations

import math

import numpy as np
import paddle


class Adam:
    """Adam (Kingma & Ba, 2015) in Paddle's form: the epsilon is scaled by sqrt(1 - beta2^t).

    Args:
        params: name -> tensor, updated in place.
        lr: step size; beta1, beta2, eps: as in `paddle.optimizer.Adam`.
    """

    def __init__(self, params: dict, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.params, self.lr, self.beta1, self.beta2, self.eps = params, lr, beta1, beta2, eps
        self.t = 0
        self.m = {k: paddle.zeros_like(p) for k, p in params.items()}
        self.v = {k: paddle.zeros_like(p) for k, p in params.items()}

    @paddle.no_grad()
    def step(self, grads: dict) -> None:
        self.t += 1
        b1t, b2t = self.beta1 ** self.t, self.beta2 ** self.t
        lr_t = self.lr * math.sqrt(1 - b2t) / (1 - b1t)
        eps_t = self.eps * math.sqrt(1 - b2t)
        for k, p in self.params.items():
            g = grads[k]
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * g * g
            p.set_value(p - lr_t * self.m[k] / (paddle.sqrt(self.v[k]) + eps_t))

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {"adam.t": np.array(self.t)}
        out.update({f"adam.m.{k}": v.numpy() for k, v in self.m.items()})
        out.update({f"adam.v.{k}": v.numpy() for k, v in self.v.items()})
        return out

    def load_state_arrays(self, arrays: dict) -> None:
        self.t = int(arrays["adam.t"])
        self.m = {k: paddle.to_tensor(arrays[f"adam.m.{k}"]) for k in self.params}
        self.v = {k: paddle.to_tensor(arrays[f"adam.v.{k}"]) for k in self.params}
