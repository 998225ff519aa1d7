"""Calibration: the fitted temperature, ECE and the report (numpy only, against hand-made references)."""
import numpy as np
import pytest

from maml_export.calibration import (calibration_report, expected_calibration_error, fit_temperature, nll,
                                     softmax)


def sampled(temperature: float, n: int = 4000, ways: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature): `temperature` is the calibrating one."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, ways)) * 4
    p = softmax(logits / temperature)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


@pytest.mark.parametrize("temperature", [0.25, 1.0, 6.0])
def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with(temperature):
    logits, labels = sampled(temperature)
    t = fit_temperature(logits, labels)
    assert abs(np.log(t / temperature)) < 0.15, t
    # it is the minimum of the NLL: a step either way is worse
    assert nll(logits / t, labels) <= min(nll(logits / (t * 1.05), labels), nll(logits / (t / 1.05), labels))
    assert expected_calibration_error(softmax(logits / t), labels) < 0.03


def test_ece_by_hand():
    # bin of confidence 0.9 (two answers, one right) and bin of 0.6 (one answer, right):
    # ECE = 2/3 * |0.5 - 0.9| + 1/3 * |1 - 0.6|
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    assert expected_calibration_error(p, labels) == pytest.approx(2 / 3 * 0.4 + 1 / 3 * 0.4)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0  # confidence 1: last bin


def test_report_and_bad_input():
    logits, labels = sampled(2.0, n=500)
    r = calibration_report(logits, labels, 2.0)
    assert r["answers"] == 500 and 0 <= r["ece"] < 0.1 and r["temperature"] == 2.0
    assert all(0 <= v["right"] <= 1 and v["all"] >= 0 for v in r["below"].values())
    assert r["below"]["0.99"]["all"] >= r["below"]["0.5"]["all"]
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(logits[:, 0], labels)
