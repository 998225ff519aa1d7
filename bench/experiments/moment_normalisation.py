"""A drawing normalisation inside the graph, probed before building it: each 28x28 image's ink centroid moved
to the centre and, optionally, its RMS radius scaled to a fixed value, with no retraining.

    python bench/experiments/moment_normalisation.py OUT.json CONDITIONS SHOTS [TASKS] [CHECKPOINT]
    e.g. ... out.json as-drawn,tilted,small,all 1 100      (docs/experiments.md#a-drawing-normalisation)

Unlike the ink-box normalisation (bench/experiments/ink_box_normalisation.py, at 105x105 before the protocol's
resize), this one acts on the 28x28 pixels the graphs take, so the graphs could hold it and every caller (the
protocol's independent checks included) would get it: elementwise ops and two MatMuls, separable bilinear
resampling (paper outside the frame). Paired with the plain pixels on the same tasks, suite validation
characters, 5-way, 0 steps, each query alone.
"""
import json, os, sys

from maml_export.process import configure

configure()  # before Paddle loads: without it Paddle's MKL takes its slow path on AMD CPUs

import numpy as np
import paddle

from maml_export.checkpoint import as_deployed, load_checkpoint, resolve_checkpoint
from maml_export.data import TaskSampler
from maml_export.suite import split_drawings, suite_images
from maml_export.trainer import QUERY, TEST_SEED, _deployed_maml, mean_ci95, query_logits, set_threads

# Omniglot's meta-training drawings at 28x28: RMS ink radius 4.1 / 5.4 / 6.2 / 7.0 / 8.2 px at the 5/25/50/75/95th
# percentiles (300 characters). (r0, lo, hi): the target radius and the bounds on the zoom r0 / r.
VARIANTS = {"plain": None,
            "centre": (6.2, 1.0, 1.0),   # translation only
            "soft": (5.4, 1.0, 2.0),     # centred; drawings smaller than the 25th percentile enlarged
            "full": (6.2, 0.5, 2.0)}     # centred; every drawing to the median radius


def normalise(x, r0: float, lo: float, hi: float):
    """x: float ink [..., H, W] in [0, 1] -> the same drawing with its ink centroid at the frame's centre, zoomed
    by clip(r0 / RMS radius, lo, hi). Row i of the output reads the input at cy + (i - (H-1)/2) / zoom."""
    H, W = x.shape[-2], x.shape[-1]
    iy, ix = paddle.arange(H, dtype=x.dtype).reshape([H, 1]), paddle.arange(W, dtype=x.dtype).reshape([1, W])
    mass = x.sum([-2, -1], keepdim=True) + 1e-6                                    # [..., 1, 1]
    cy, cx = (x * iy).sum([-2, -1], keepdim=True) / mass, (x * ix).sum([-2, -1], keepdim=True) / mass
    var = (x * ((iy - cy) ** 2 + (ix - cx) ** 2)).sum([-2, -1], keepdim=True) / mass
    zoom = paddle.clip(r0 / paddle.sqrt(var + 1e-6), lo, hi)
    src_y = cy + (iy - (H - 1) / 2) / zoom                                          # [..., H, 1]
    src_x = cx + (ix.reshape([W, 1]) - (W - 1) / 2) / zoom                          # [..., W, 1]
    rows = paddle.nn.functional.relu(1 - paddle.abs(src_y - iy.reshape([1, H])))  # [..., H, H] bilinear weights
    cols = paddle.nn.functional.relu(1 - paddle.abs(src_x - ix))                   # [..., W, W]
    return paddle.matmul(paddle.matmul(rows, x), cols, transpose_y=True)


def paired_variants(argv: list, variants, transform) -> None:
    """The probes' command line (OUT.json CONDITIONS SHOTS [TASKS] [CHECKPOINT]): for each condition and variant,
    5-way accuracy on `transform(suite images [C, D, 28, 28], variant)`, paired with the first variant's on the
    same tasks (suite validation characters, 0 steps, each query alone); rows printed and written to OUT.json."""
    out, conditions, shots = argv[0], argv[1].split(","), int(argv[2])
    tasks = int(argv[3]) if len(argv) > 3 else 100
    set_threads(1)
    maml = _deployed_maml(as_deployed(load_checkpoint(resolve_checkpoint(argv[4] if len(argv) > 4 else "omniglot-5w1s")), ways=5))
    drawings, rows = split_drawings(os.environ.get("OMNIGLOT_DIR", "../shared/omniglot"), "val"), []
    for condition in conditions:
        raw, plain = suite_images(drawings, condition), None
        for variant in variants:
            images = transform(raw, variant)
            sampler = TaskSampler(images, np.arange(len(images)), 5, shots, QUERY, TEST_SEED)
            logits, labels = query_logits(maml, sampler, tasks, steps=0)  # [tasks, Q, 5], [tasks, Q]
            hits = (logits.argmax(-1) == labels).mean(1)
            plain = hits if plain is None else plain
            gain, gain_ci = mean_ci95(hits - plain)
            rows.append({"condition": condition, "shots": shots, "variant": variant, "accuracy": float(hits.mean()),
                         "gain": gain, "gain_ci95": gain_ci})
            print(json.dumps(rows[-1]), flush=True)
    json.dump({"tasks": tasks, "variants": variants, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    paired_variants(sys.argv[1:], VARIANTS, lambda raw, variant: raw if VARIANTS[variant] is None
                    else normalise(paddle.to_tensor(raw), *VARIANTS[variant]).numpy())
