"""Each query matched at several rotations: a class's score is its best logit over the query's rotations.

    python bench/experiments/query_rotations.py OUT.json CONDITIONS ANGLES[,ANGLES...] SHOTS [TASKS] [CHECKPOINT]
    e.g. ... out.json as-drawn,tilted -15/0/15,-30/-15/0/15/30 1 48      (docs/experiments.md#query-rotations)

A tilt-tolerant matching that costs nothing at adaptation (the support set is untouched) and one constant MatMul
and one forward pass per angle at prediction. Paired with the plain prediction (angle 0 alone) on the same tasks,
suite validation characters, 5-way, 0 steps, each query alone.
"""
import json, os, sys

import numpy as np
import paddle

from maml_export.checkpoint import as_deployed, load_checkpoint, resolve_checkpoint
from maml_export.data import TaskSampler
from maml_export.suite import split_drawings, suite_images
from maml_export.trainer import QUERY, TEST_SEED, _deployed_maml, _task_batches, as_tensors, mean_ci95, set_threads
from rotated_support_views import rotation_matrix  # this folder: the same bilinear rotation as that experiment's

out, conditions = sys.argv[1], sys.argv[2].split(",")
variants = {v: [float(a) for a in v.split("/")] for v in sys.argv[3].split(",")}
shots_list, tasks = [int(s) for s in sys.argv[4].split(",")], int(sys.argv[5]) if len(sys.argv) > 5 else 100
set_threads(1)
maml = _deployed_maml(as_deployed(load_checkpoint(resolve_checkpoint(sys.argv[6] if len(sys.argv) > 6 else "omniglot-5w1s")), ways=5))
angles = sorted({a for v in variants.values() for a in v} | {0.0})
maps = {a: paddle.to_tensor(rotation_matrix(a).T) for a in angles}  # rotated.flat = image.flat @ M.T
drawings, rows = split_drawings(os.environ.get("OMNIGLOT_DIR", "../shared/omniglot"), "val"), []
for condition in conditions:
    images = suite_images(drawings, condition)
    for shots in shots_list:
        sampler, hits = TaskSampler(images, np.arange(len(images)), 5, shots, QUERY, TEST_SEED), {}
        per_task = {v: [] for v in ["0"] + list(variants)}
        with paddle.no_grad():
            for _, task in _task_batches(sampler, tasks, 16, False):
                x_spt, y_spt, x_qry, _ = as_tensors(task)
                fast = maml.adapt(x_spt, y_spt, steps=0)
                flat = x_qry.reshape(x_qry.shape[:2] + [-1])  # [T, Q, 784]
                logits = {a: maml.predict(fast, paddle.matmul(flat, maps[a]).reshape(x_qry.shape)).numpy()
                          for a in angles}  # each [T, Q, N]
                for v, chosen in [("0", [0.0])] + list(variants.items()):
                    best = np.max([logits[a] for a in chosen], 0)
                    per_task[v].append((best.argmax(-1) == task.y_qry).mean(1))
        plain = np.concatenate(per_task["0"])
        for v, h in per_task.items():
            h = np.concatenate(h)
            gain, gain_ci = mean_ci95(h - plain)
            rows.append({"condition": condition, "shots": shots, "angles": v, "accuracy": float(h.mean()),
                         "gain": gain, "gain_ci95": gain_ci})
            print(json.dumps(rows[-1]), flush=True)
json.dump({"tasks": tasks, "rows": rows}, open(out, "w"), indent=1)
