"""Run under `paddle.distributed.launch` by tests/test_distributed.py: one meta-batch's meta-gradient and the
validation accuracy of the initial weights, as the ranks compute them together; the main rank writes them to
`sys.argv[2]` (.npz). `sys.argv[1]` is the run folder."""
import os
import sys

import numpy as np

from maml_export.config import MamlConfig
from maml_export.trainer import Training

SMALL = MamlConfig(hidden=16, meta_batch=4, query=3, inner_steps=2, val_tasks=8, first_order=True)


def gradient_and_validation(data, out) -> tuple[dict, float, bool]:
    """The first meta-batch's meta-gradient (name -> array), the validation accuracy of the initial weights,
    and whether this process is the main rank."""
    training = Training(SMALL, data, out)
    accuracy, _ = training.validate()
    grads, _, _ = training.meta_gradient()
    return {k: g.numpy() for k, g in grads.items()}, accuracy, training.ranks.main


if __name__ == "__main__":
    grads, accuracy, main = gradient_and_validation(os.environ["OMNIGLOT_DIR"], sys.argv[1])
    if main:
        np.savez(sys.argv[2], val_accuracy=accuracy, **grads)
