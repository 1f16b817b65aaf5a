"""Seeded row selection: the long-tailed subset follows the CIFAR-LT formula exactly."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.splits import long_tail


@pytest.mark.parametrize("ratio", [1.0, 10.0, 100.0])
def test_long_tail_counts_follow_the_formula_and_are_seeded(ratio):
    labels = np.repeat(np.arange(10), 120)
    kept = long_tail(labels, ratio, seed=3, order="frequency")
    counts = np.bincount(labels[kept], minlength=10)
    expected = [max(int(120 * ratio ** (-i / 9)), 1) for i in range(10)]
    assert counts.tolist() == expected, (
        "frequency order with equal counts: class order, then the formula"
    )
    assert (np.diff(kept) > 0).all(), "sorted row indices"
    again = long_tail(labels, ratio, seed=3, order="frequency")
    assert (again == kept).all()
    seeded = [np.bincount(labels[long_tail(labels, ratio, seed=s)], minlength=10) for s in (0, 1)]
    assert sorted(seeded[0].tolist(), reverse=True) == expected, (
        "a seeded class order, the same counts"
    )
    if ratio > 1:
        assert seeded[0].tolist() != seeded[1].tolist(), "another seed, another class order"


def test_long_tail_keeps_at_least_one_row_and_at_most_what_a_class_has():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 40)
    counts = np.bincount(labels[long_tail(labels, 1000.0, seed=0, order="frequency")])
    # n_max = 50; places: class 0 (50), class 2 (40), class 1 (3): 50, int(50 / sqrt(1000)) = 1,
    # max(0, 1) = 1
    assert counts.tolist() == [50, 1, 1]
