"""A checkpoint with its last convolution widened (64 -> WIDTH output channels), to meta-train on from there.

    python bench/experiments/widen_last_conv.py SOURCE.npz OUT.npz WIDTH
    python bench/experiments/widen_last_conv.py train OUT.npz RUN_FOLDER [--resume]   (under paddle.distributed.launch)
    (docs/experiments.md#a-wider-last-block)

The old channels keep their weights; the new ones start from He-normal weights with a batch-norm scale a tenth
of the old channels' mean, so the widened network starts close to the source's function (its validation reads
the same) and the outer loop can grow them. The head is zero (the prototype head's weights are not learned).
Only the last block widens: it works on 3x3 maps, so 128 channels there add about 3 % to the adaptation's FLOPs
(the latency bar of issue 33 leaves little room for more). `train` meta-trains it with SOURCE's recipe at
meta-lr 1e-4: the CLI builds conv-4s of one width, this passes the widened layers as the config's.
"""
import dataclasses, os, sys

import numpy as np


def widen(source: str, out: str, width: int) -> None:
    from maml_export.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from maml_export.model import Model
    ckpt = load_checkpoint(source)
    layers = [dict(s) for s in ckpt.config.layers]
    last = max(i for i, s in enumerate(layers) if s["type"] == "Conv2d")
    old = layers[last]["out_channels"]
    layers[last]["out_channels"] = width
    for s in layers[last + 1:]:
        if s["type"] in ("BatchNorm", "Flatten"):
            s["channels"] = width
        elif s["type"] == "Linear":
            s["in_features"] = width
    model = Model.from_specs(layers)
    conv, bn = model.names[last], model.names[last + 1]  # the model's own parameter prefixes ("conv4", "bn4")
    rng, p = np.random.default_rng(1), dict(ckpt.params)
    w = p[f"{conv}.weight"]  # (64, 64, 3, 3): no bias (batch norm follows)
    fresh = rng.normal(0, np.sqrt(2 / (w.shape[1] * 9)), (width - old,) + w.shape[1:]).astype(np.float32)
    p[f"{conv}.weight"] = np.concatenate([w, fresh])
    p[f"{bn}.weight"] = np.concatenate([p[f"{bn}.weight"], np.full(width - old, 0.1 * np.abs(p[f"{bn}.weight"]).mean(), np.float32)])
    p[f"{bn}.bias"] = np.concatenate([p[f"{bn}.bias"], np.zeros(width - old, np.float32)])
    shapes = model.param_shapes()
    p.update({k: np.zeros(shapes[k], np.float32) for k in p if k.startswith("fc1.")})
    save_checkpoint(out, Checkpoint(dataclasses.replace(ckpt.config, layers=layers, name="omniglot-wide"), p))


def train(init: str, out: str, resume: bool) -> None:
    from maml_export.checkpoint import load_checkpoint
    from maml_export.trainer import train as meta_train
    c = load_checkpoint(init).config
    config = dataclasses.replace(c, name="omniglot-wide", init=init, meta_lr=1e-4, iterations=4000, val_every=500)
    print(meta_train(config, os.environ.get("OMNIGLOT_DIR", "../shared/omniglot"), out, resume=resume, threads=1))


if __name__ == "__main__":
    from maml_export.process import configure
    configure()  # as every console script does: without it Paddle's MKL takes its slow path on AMD CPUs (2x here)
    if sys.argv[1] == "train":
        train(sys.argv[2], sys.argv[3], "--resume" in sys.argv)
    else:
        widen(sys.argv[1], sys.argv[2], int(sys.argv[3]))
