"""Steps that teach the body its support set's classes under rotation and size: test-time training on
transformed views of the support images.

    python bench/experiments/augmented_support_steps.py OUT.json CONDITIONS SHOTS VIEWS LRS [STEPS] [TASKS] [CHECKPOINT]
    e.g. ... out.json tilted,as-drawn 1,5 r-40,r-20,r20,r40 0.05,0.1 5 100

Why: the suite's tilted errors grow with the tilt between a query and its support
(docs/experiments.md#tilt-weighted-redrawings), and steps on the support set alone have nothing to correct
(every support image already sits on its own prototype). A view of a support image turned by 20 or 40 degrees
(`rN`) or drawn smaller (`sF`, F < 1) is a drawing of the same class the support does not hold: the steps make
the body map it onto its class's prototype, which is what a tilted query needs.

Each view is a constant linear map of the 28x28 pixels (one MatMul in a graph). The loss: the cross-entropy of
each view's features (normalised with the support's statistics, as a query is) against the prototypes of the
untransformed support, logits = -squared distance; the body (every layer before the head) takes STEPS plain SGD
steps on it (autograd, eager Paddle). The queries are then classified by the prototypes of the adapted body, each
query alone. Paired with 0 steps on the same tasks, suite validation characters, 5-way.
"""
import json, os, sys

from maml_export import process

process.configure()

import numpy as np
import paddle

from maml_export.checkpoint import as_deployed, load_checkpoint, resolve_checkpoint
from maml_export.data import TaskSampler
from maml_export.maml import class_prototypes, expand_to_tasks, prototype_head
from maml_export.model import Model, to_tensors
from maml_export.suite import split_drawings, suite_images
from maml_export.trainer import QUERY, TEST_SEED, _task_batches, as_tensors, mean_ci95, set_threads
from rotated_support_views import rotation_matrix

WAYS = 5


def view_matrix(view: str) -> paddle.Tensor:
    """'r20' -> turned by 20 degrees, 's0.75' -> drawn at 0.75 of its size; as (784, 784) for flat @ M."""
    angle, scale = (float(view[1:]), 1.0) if view[0] == "r" else (0.0, float(view[1:]))
    return paddle.to_tensor(rotation_matrix(angle, scale=scale).T)


def views_loss(model, params, x_spt, y_spt, maps):
    """Per-task mean cross-entropy of the support's views against the untransformed support's prototypes."""
    features = model.forward(params, x_spt, upto=-1)[0]  # (T, S, F), the support's own statistics
    protos = class_prototypes(features, y_spt, WAYS)  # (T, ways, F)
    stats = model.support_stats(params, x_spt)
    flat = x_spt.reshape(x_spt.shape[:2] + [-1])  # (T, S, 784)
    views = paddle.concat([paddle.matmul(flat, m).reshape(x_spt.shape) for m in maps], 1)  # (T, V*S, 1, 28, 28)
    f_views = model.forward({**params, **stats}, views, upto=-1)[0]  # (T, V*S, F)
    logits = -((f_views.unsqueeze(2) - protos.unsqueeze(1)) ** 2).sum(-1)  # (T, V*S, ways)
    labels = paddle.concat([y_spt] * len(maps), 1)
    loss = paddle.nn.functional.cross_entropy(logits.reshape([-1, WAYS]), labels.reshape([-1]), reduction="none")
    return loss.reshape(labels.shape).mean(-1)


def query_hits(model, params, x_spt, y_spt, x_qry, y_qry):
    """The prototype classifier of the adapted body, each query normalised with the support's statistics."""
    head = prototype_head(model, params, x_spt, y_spt)
    logits = model.forward({**params, **head, **model.support_stats(params, x_spt)}, x_qry)[0]
    return (logits.numpy().argmax(-1) == y_qry).mean(1)


def main(argv):
    out, conditions = argv[1], argv[2].split(",")
    shots_list, view_names = [int(s) for s in argv[3].split(",")], argv[4].split(",")
    lrs = [float(v) for v in argv[5].split(",")]
    steps, tasks = (int(argv[i]) if len(argv) > i else d for i, d in ((6, 5), (7, 100)))
    set_threads(2)
    ckpt = as_deployed(load_checkpoint(resolve_checkpoint(argv[8] if len(argv) > 8 else "omniglot-5w1s")), ways=WAYS)
    model = Model.from_specs(ckpt.config.layers)
    body = {k: v for k, v in to_tensors(ckpt.params).items() if not k.startswith(model.names[-1])}
    maps = [view_matrix(v) for v in view_names]
    rows, drawings = [], split_drawings(os.environ.get("OMNIGLOT_DIR", "../shared/omniglot"), "val")
    for condition in conditions:
        images = suite_images(drawings, condition)
        for shots in shots_list:
            hits = {}
            for lr in [0.0] + lrs:
                per_task, losses = [], []
                sampler = TaskSampler(images, np.arange(len(images)), WAYS, shots, QUERY, TEST_SEED)
                for _, task in _task_batches(sampler, tasks, 20 if shots == 1 else 10, False):
                    x_spt, y_spt, x_qry, _ = as_tensors(task)
                    params = {k: v.detach() for k, v in expand_to_tasks(body, x_spt.shape[0]).items()}
                    for step in range(steps if lr else 0):
                        for v in params.values():
                            v.stop_gradient = False
                        loss = views_loss(model, params, x_spt, y_spt, maps)
                        if step == 0:
                            losses.append(float(loss.mean()))
                        grads = paddle.grad(loss.sum(), list(params.values()))
                        params = {k: (v - lr * g).detach() for (k, v), g in zip(params.items(), grads)}
                    with paddle.no_grad():
                        per_task.append(query_hits(model, params, x_spt, y_spt, x_qry, task.y_qry))
                hits[lr] = np.concatenate(per_task)
                gain, gain_ci = mean_ci95(hits[lr] - hits[0.0])
                rows.append({"condition": condition, "shots": shots, "views": view_names, "lr": lr,
                             "steps": steps if lr else 0, "accuracy": float(hits[lr].mean()), "gain": gain,
                             "gain_ci95": gain_ci, "first_loss": float(np.mean(losses)) if losses else None})
                print(json.dumps(rows[-1]), flush=True)
    json.dump({"tasks": tasks, "ways": WAYS, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv)
