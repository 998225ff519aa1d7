"""Omniglot's own drawings: median of max(ink bbox)/105 over 2000 drawings of the meta-training characters."""
import os, numpy as np
from maml_export.suite import raw_drawings
from maml_export.data import split_characters
train = split_characters()["train"]
rng = np.random.default_rng(0)
chars = rng.choice(train, 100, replace=False)
found = raw_drawings(os.environ["OMNIGLOT_DIR"], chars)
f, hs, ws = [], [], []
for c in chars:
    for paper in found[int(c)]:
        ink = ~paper
        ys, xs = np.nonzero(ink)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        f.append(max(h, w) / paper.shape[0]); hs.append(h); ws.append(w)
f = np.array(f)
print(len(f), "drawings; median", np.median(f), "quartiles", np.percentile(f, [10, 25, 75, 90]),
      "mean", f.mean(), "median h/w", np.median(hs), np.median(ws))
