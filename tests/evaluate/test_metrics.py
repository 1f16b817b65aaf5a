"""Metrics by hand and bootstrap intervals against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import metrics


def test_metrics_by_hand():
    y = np.array([0, 0, 1, 2])
    proba = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.5, 0.2, 0.3]])
    assert metrics.top_k_accuracy(y, proba, 1) == 0.5
    assert metrics.top_k_accuracy(y, proba, 2) == 1.0  # row 2's label is its second choice
    rel = metrics.reliability(y, proba, bins=10)
    # confidences 0.9 (right), 0.7 (wrong), 0.8 (right), 0.5 (wrong): |1-.9|+|0-.7|+|1-.8|+|0-.5|
    # over 4
    assert rel["ece"] == pytest.approx((0.1 + 0.7 + 0.2 + 0.5) / 4)
    scores = metrics.evaluate(y, proba, ["a", "b", "c"])
    assert scores["top1"] == 0.5 and scores["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert scores["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_bootstrap_intervals_match_a_plain_loop():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    ci = metrics.bootstrap_ci(y, pred, 4, resamples=200, seed=5)
    again = np.random.default_rng(5)
    top1, balanced = [], []
    for _ in range(200):
        idx = again.integers(0, 300, 300)
        top1.append((pred[idx] == y[idx]).mean())
        recalls = [(pred[idx][y[idx] == c] == c).mean() for c in range(4) if (y[idx] == c).any()]
        balanced.append(np.mean(recalls))
    np.testing.assert_allclose(ci["top1"], np.percentile(top1, [2.5, 97.5]))
    np.testing.assert_allclose(ci["balanced_accuracy"], np.percentile(balanced, [2.5, 97.5]))
    assert ci["top1"][0] < (pred == y).mean() < ci["top1"][1]
