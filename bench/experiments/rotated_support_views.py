"""The support set with rotated copies of each image as more examples of its class (test-time augmentation).

    python bench/experiments/rotated_support_views.py OUT.json CONDITIONS ANGLES[,ANGLES...] SHOTS [TASKS] [CHECKPOINT]
    e.g. ... out.json as-drawn,tilted -15/15 1,5 100      (docs/experiments.md#two-more-ways-to-make-the-steps-help)

Each rotation is a fixed linear map of the 28x28 pixels (bilinear, about the centre, paper outside): in a graph,
one constant MatMul. The prototypes (0 steps) then average each class over its views; paired with no views on
the same tasks, suite validation characters, 5-way, each query alone.
"""
import json, os, sys

import numpy as np
import paddle

from maml_export.checkpoint import as_deployed, load_checkpoint, resolve_checkpoint
from maml_export.data import TaskSampler
from maml_export.suite import split_drawings, suite_images
from maml_export.trainer import QUERY, TEST_SEED, _deployed_maml, _task_batches, as_tensors, mean_ci95, set_threads


def rotation_matrix(degrees: float, n: int = 28, scale: float = 1.0) -> np.ndarray:
    """(n*n, n*n) M with rotated.flat = M @ image.flat: bilinear, about the centre, zero (paper) outside; `scale`
    < 1 draws the image smaller (about the centre too)."""
    t, c = np.deg2rad(degrees), (n - 1) / 2
    m = np.zeros((n * n, n * n), np.float32)
    for i in range(n):
        for j in range(n):
            sy = (np.cos(t) * (i - c) - np.sin(t) * (j - c)) / scale + c
            sx = (np.sin(t) * (i - c) + np.cos(t) * (j - c)) / scale + c
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            for yy, wy in ((y0, 1 - (sy - y0)), (y0 + 1, sy - y0)):
                for xx, wx in ((x0, 1 - (sx - x0)), (x0 + 1, sx - x0)):
                    if 0 <= yy < n and 0 <= xx < n:
                        m[i * n + j, yy * n + xx] += wy * wx
    return m


if __name__ == "__main__":
    out, conditions = sys.argv[1], sys.argv[2].split(",")
    variants = [[float(a) for a in v.split("/")] for v in sys.argv[3].split(",")]
    shots_list, tasks = [int(s) for s in sys.argv[4].split(",")], int(sys.argv[5]) if len(sys.argv) > 5 else 100
    set_threads(1)
    maml = _deployed_maml(as_deployed(load_checkpoint(resolve_checkpoint(sys.argv[6] if len(sys.argv) > 6 else "omniglot-5w1s")), ways=5))
    drawings, rows = split_drawings(os.environ.get("OMNIGLOT_DIR", "../shared/omniglot"), "val"), []
    for condition in conditions:
        images = suite_images(drawings, condition)
        for shots in shots_list:
            hits = {}
            for angles in [[]] + variants:
                maps = [paddle.to_tensor(rotation_matrix(a).T) for a in angles]
                sampler, per_task = TaskSampler(images, np.arange(len(images)), 5, shots, QUERY, TEST_SEED), []
                with paddle.no_grad():
                    for _, task in _task_batches(sampler, tasks, 16, False):
                        x_spt, y_spt, x_qry, _ = as_tensors(task)
                        flat = x_spt.reshape(x_spt.shape[:2] + [-1])
                        views = [x_spt] + [paddle.matmul(flat, m).reshape(x_spt.shape) for m in maps]
                        fast = maml.adapt(paddle.concat(views, 1), paddle.concat([y_spt] * len(views), 1), steps=0)
                        per_task.append((maml.predict(fast, x_qry).numpy().argmax(-1) == task.y_qry).mean(1))
                key = "/".join(f"{a:g}" for a in angles) or "none"
                hits[key] = np.concatenate(per_task)
                gain, gain_ci = mean_ci95(hits[key] - hits["none"])
                rows.append({"condition": condition, "shots": shots, "views": key, "accuracy": float(hits[key].mean()),
                             "gain": gain, "gain_ci95": gain_ci})
                print(json.dumps(rows[-1]), flush=True)
    json.dump({"tasks": tasks, "rows": rows}, open(out, "w"), indent=1)
