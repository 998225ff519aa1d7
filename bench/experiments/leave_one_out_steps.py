"""Steps on the support set's leave-one-out prototype loss: can K shots teach the body what the queries need?

    python bench/experiments/leave_one_out_steps.py OUT.json CONDITIONS LRS [STEPS] [TASKS] [BATCH] [CHECKPOINT]
    e.g. ... out.json tilted,all 0.05,0.1 10 100 16     (docs/experiments.md#two-more-ways-to-make-the-steps-help)

With the prototype head, a support image's own class prototype contains the image, so the support loss is
nearly zero and a step has nothing to correct. Leaving the image out of its own prototype makes the support
loss a stand-in for the query loss: with p_c the mean of the K features of class c, the image's distance to
its class without it is |f - (K p_c - f)/(K - 1)|^2 = (K/(K-1))^2 |f - p_c|^2. The body (every layer before the
head) takes STEPS plain SGD steps on that cross-entropy (autograd, eager Paddle); the queries are then
classified by the prototypes of the adapted body, each query alone (the support's statistics). Paired with
0 steps on the same tasks, suite validation characters, 5-way 5-shot.
"""
import json, os, sys

import numpy as np
import paddle

from maml_export.checkpoint import as_deployed, load_checkpoint, resolve_checkpoint
from maml_export.data import TaskSampler
from maml_export.maml import class_prototypes, expand_to_tasks
from maml_export.model import Model, to_tensors
from maml_export.suite import split_drawings, suite_images
from maml_export.trainer import QUERY, TEST_SEED, _task_batches, as_tensors, mean_ci95, set_threads

from augmented_support_steps import query_hits  # the prototype classifier of an adapted body, each query alone

WAYS, SHOTS = 5, 5
out, conditions, lrs = sys.argv[1], sys.argv[2].split(","), [float(v) for v in sys.argv[3].split(",")]
steps, tasks, batch = (int(sys.argv[i]) if len(sys.argv) > i else d for i, d in ((4, 10), (5, 100), (6, 16)))
set_threads(1)
ckpt = as_deployed(load_checkpoint(resolve_checkpoint(sys.argv[7] if len(sys.argv) > 7 else "omniglot-5w1s")), ways=WAYS)
model = Model.from_specs(ckpt.config.layers)
body = {k: v for k, v in to_tensors(ckpt.params).items() if not k.startswith(model.names[-1])}


def leave_one_out_loss(params, x_spt, y_spt):
    """Per-task mean cross-entropy of each support image against the prototypes, its own class's without it."""
    features = model.forward(params, x_spt, upto=-1)[0]  # (T, S, F)
    protos = class_prototypes(features, y_spt, WAYS)  # (T, ways, F)
    distances = ((features.unsqueeze(2) - protos.unsqueeze(1)) ** 2).sum(-1)  # (T, S, ways)
    own = paddle.nn.functional.one_hot(y_spt, WAYS) * ((SHOTS / (SHOTS - 1)) ** 2 - 1) + 1
    logits = -distances * own
    loss = paddle.nn.functional.cross_entropy(logits.reshape([-1, WAYS]), y_spt.reshape([-1]), reduction="none")
    return loss.reshape(y_spt.shape).mean(-1)


rows, drawings = [], split_drawings(os.environ.get("OMNIGLOT_DIR", "../shared/omniglot"), "val")
for condition in conditions:
    images = suite_images(drawings, condition)
    hits = {}
    for lr in [0.0] + lrs:
        per_task = []
        sampler = TaskSampler(images, np.arange(len(images)), WAYS, SHOTS, QUERY, TEST_SEED)
        for _, task in _task_batches(sampler, tasks, batch, False):
            x_spt, y_spt, x_qry, _ = as_tensors(task)
            params = {k: v.detach() for k, v in expand_to_tasks(body, x_spt.shape[0]).items()}
            for _ in range(steps if lr else 0):
                for v in params.values():
                    v.stop_gradient = False
                grads = paddle.grad(leave_one_out_loss(params, x_spt, y_spt).sum(), list(params.values()))
                params = {k: (v - lr * g).detach() for (k, v), g in zip(params.items(), grads)}
            with paddle.no_grad():
                per_task.append(query_hits(model, params, x_spt, y_spt, x_qry, task.y_qry))
        hits[lr] = np.concatenate(per_task)
        gain, gain_ci = mean_ci95(hits[lr] - hits[0.0])
        rows.append({"condition": condition, "lr": lr, "steps": steps if lr else 0,
                     "accuracy": float(hits[lr].mean()), "gain": gain, "gain_ci95": gain_ci})
        print(json.dumps(rows[-1]), flush=True)
json.dump({"tasks": tasks, "batch": batch, "shots": SHOTS, "ways": WAYS, "rows": rows}, open(out, "w"), indent=1)
