"""Meta-training on redrawings tilted further than the suite tilts, probed before it becomes an option.

    PADDLE_DISTRI_BACKEND=gloo python -m paddle.distributed.launch --nproc_per_node 2 \
        bench/experiments/wide_tilt_training.py MAX_DEGREES --out RUN --resume --iterations N --meta-lr 1e-4 --threads 1
    (docs/experiments.md#wider-training-tilts)

The suite tilts each drawing by 10-30 degrees either way (`suite.TILT`), so a query and its class's support image
are up to 60 degrees apart, and tilted accuracy falls with that angle: 98.5 % within 10 degrees, 85 % at 50-60
(docs/experiments.md#tilt-weighted-redrawings). Training's redrawings use the same range, and pairs 40-60 degrees
apart are a few percent of its pairs. This runs `maml-train` (every argument after MAX_DEGREES is the CLI's) with
`suite.TILT` set to (10, MAX_DEGREES) in each rank, so that training's tilted and all-together redrawings turn by
up to MAX_DEGREES; the run's own records do not carry the range, so the run folder is named for it.
"""
import sys

from maml_export.process import configure

configure()  # before Paddle loads, as the console scripts do

from maml_export import suite
from train.__main__ import main

if __name__ == "__main__":
    suite.TILT = (10.0, float(sys.argv[1]))
    main(sys.argv[2:], prog_name="wide_tilt_training.py")
