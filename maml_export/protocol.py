"""The evaluation protocol's task streams and how their accuracy is reported (numpy only).

The split itself (which characters are train, val, test) is `data.split_characters`, from the protocol in
the Omniglot folder's README. Each split's tasks come from a seeded stream, so every run, every validation
and every independent check draws the same tasks:

    >>> from maml_export.protocol import TEST_SEED, mean_ci95
    >>> mean_ci95([0.98, 1.0, 0.96])     # (mean, half-width of the 95 % interval)
"""
from __future__ import annotations

import numpy as np

VAL_SEED = 1_000_003  # validation: the same tasks at every validation, and across runs
TEST_SEED = 2_000_003  # meta-test: the figures this project reports
CALIBRATION_SEED = 3_000_003  # validation tasks for the temperature: others than the ones that chose the checkpoint


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval, 1.96 * std / sqrt(n), as the protocol reports."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(1.96 * values.std() / np.sqrt(len(values)))
