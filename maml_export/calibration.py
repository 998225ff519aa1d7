"""Calibrated probabilities: the temperature deployed logits are divided by, and how calibrated they are.

The prototype head's logits are negative squared distances, hundreds apart, so their raw softmax says
1.000 for nearly every answer, right or wrong. One temperature T, fitted on validation tasks by minimising
the negative log-likelihood of softmax(logits / T) (Guo et al., "On Calibration of Modern Neural Networks",
ICML 2017), makes the probabilities mean what they say without changing any predicted class. It is stored
in the model (the head's `temperature`, `layers.Linear`), so every export divides by it inside the graph.

Example:
    >>> logits = np.array([[40.0, 0.0], [0.0, 30.0], [25.0, 0.0], [0.0, 10.0]]); labels = np.array([0, 1, 1, 1])
    >>> t = fit_temperature(logits, labels)        # > 1: the raw logits were overconfident
    >>> t > 1 and nll(logits / t, labels) < nll(logits, labels)
    True
"""
from __future__ import annotations

import numpy as np

ECE_BINS = 15
UNKNOWN_THRESHOLDS = (0.5, 0.7, 0.9, 0.95, 0.99)  # maml-predict --unknown-below: the rates docs/deploy.md lists


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits); logits (N, C), labels (N,)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising nll(logits / T, labels). The NLL is convex in 1/T, so a golden-section search on
    log T (unimodal there) finds it; bracketed in [1e-3, 1e5] times the logits' spread."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"fit_temperature needs logits (N, C) and labels (N,), got {logits.shape}, {labels.shape}")
    spread = max(float(logits.std()), 1e-12)
    lo, hi = np.log(spread * 1e-3), np.log(spread * 1e5)
    f = lambda log_t: nll(logits / np.exp(log_t), labels)  # noqa: E731
    golden = (np.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(100):  # (hi - lo) shrinks by 0.618 each time: 1e-20 of the bracket
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = f(b)
    return float(np.exp((lo + hi) / 2))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over `bins` equal-width confidence bins: sum over bins of (share of answers) * |accuracy - mean
    confidence|, the confidence being each answer's top probability. probabilities (N, C), labels (N,)."""
    p = np.asarray(probabilities, np.float64)
    confidence, correct = p.max(axis=-1), (p.argmax(axis=-1) == np.asarray(labels)).astype(np.float64)
    which = np.minimum((confidence * bins).astype(int), bins - 1)  # confidence 1.0 goes to the last bin
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def calibration_report(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> dict:
    """ECE and NLL of softmax(logits / temperature), the accuracy, and for each of UNKNOWN_THRESHOLDS the share
    of all answers, and of the right ones, whose top probability falls below it, for JSON reports."""
    logits = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1]) / temperature
    labels = np.asarray(labels).reshape(-1)
    p = softmax(logits)
    top, right = p.max(-1), p.argmax(-1) == labels
    return {"ece": expected_calibration_error(p, labels), "nll": nll(logits, labels),
            "accuracy": float(right.mean()), "answers": int(len(labels)), "temperature": float(temperature),
            "below": {str(t): {"all": float((top < t).mean()), "right": float((top[right] < t).mean())}
                      for t in UNKNOWN_THRESHOLDS}}
