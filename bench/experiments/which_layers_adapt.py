"""Which parameters adapt, at what step: 5-shot suite cells on validation characters, paired with 0 steps.

    python bench/experiments/which_layers_adapt.py OUT.json RULE[,RULE...] [CONDITIONS] [SHOTS] [CHECKPOINT]
    RULE: scope:lr[:steps], scope in all|head|top|bn (docs/experiments.md#steps-that-help-chosen-at-deployment)
"""
import json, os, sys
from pathlib import Path
import numpy as np, paddle
from maml_export.checkpoint import load_checkpoint, resolve_checkpoint, as_deployed
from maml_export.trainer import _deployed_maml, query_logits, mean_ci95, set_threads
from maml_export.data import TaskSampler
from maml_export.suite import split_drawings, suite_images

set_threads(1)
out, rules = sys.argv[1], sys.argv[2].split(",")
conditions = sys.argv[3].split(",") if len(sys.argv) > 3 else ["tilted", "small", "all", "as-drawn", "thick"]
shots = int(sys.argv[4]) if len(sys.argv) > 4 else 5
ckpt = as_deployed(load_checkpoint(resolve_checkpoint(sys.argv[5] if len(sys.argv) > 5 else "omniglot-5w1s")))
maml = _deployed_maml(ckpt)
names = list(maml.params)
SCOPES = {"all": lambda k: True, "head": lambda k: k.startswith("fc"),
          "top": lambda k: k.startswith(("fc", "conv4", "bn4")), "bn": lambda k: k.startswith(("fc", "bn"))}
cache = Path("/tmp/suite-val"); cache.mkdir(exist_ok=True)
chars = None
rows = []
for cond in conditions:
    f = cache / f"{cond}.npy"
    if not f.exists():
        chars = chars or split_drawings(os.environ.get("OMNIGLOT_DIR", "../shared/omniglot"), "val")
        np.save(f, suite_images(chars, cond))
    images = np.load(f)
    sampler = lambda: TaskSampler(images, np.arange(len(images)), 5, shots, 15, 2000003)
    logits, labels = query_logits(maml, sampler(), 100, steps=0)
    zero = (logits.argmax(-1) == labels).mean(1)
    for rule in rules:
        scope, lr, *st = rule.split(":")
        steps = int(st[0]) if st else 5
        lrs = {k: float(lr) if SCOPES[scope](k) else 0.0 for k in names}
        logits, labels = query_logits(maml, sampler(), 100, steps=steps, inner_lr=lrs)
        hit = (logits.argmax(-1) == labels).mean(1)
        g, gci = mean_ci95(hit - zero)
        rows.append(dict(condition=cond, shots=shots, rule=rule, zero=float(zero.mean()), acc=float(hit.mean()), gain=g, gain_ci=gci))
        print(f"{cond:>9} {shots}-shot {rule:>12}: {100*zero.mean():.2f} -> {100*hit.mean():.2f} ({100*g:+.2f} ± {100*gci:.2f})", flush=True)
json.dump(rows, open(out, "w"), indent=1)
