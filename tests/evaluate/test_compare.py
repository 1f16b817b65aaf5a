"""Comparing results: McNemar and the paired bootstrap by hand, who wins only when significant,
runs on different test sets left unpaired, and compare's one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import cli
from pipeline.config import HeadConfig
from pipeline.errors import CacheError, DataError
from pipeline.evaluate import compare
from pipeline.heads import protocol

from helpers import write_cache


def _two_runs(tmp_path, same_test: bool):
    from sklearn.datasets import make_classification

    X, y = make_classification(400, 12, n_informative=6, n_classes=3, random_state=0)
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [240, 80, 80])
    other = split if same_test else np.repeat(np.array([0, 1, 2], dtype=np.int8), [200, 80, 120])
    a = write_cache(tmp_path / "a.h5", X, y, split, fingerprint={"backbone": "A"})
    b = write_cache(
        tmp_path / "b.h5",
        X + np.random.default_rng(1).normal(0, 6.0, X.shape),
        y,
        other,
        fingerprint={"backbone": "B"},
    )
    runs = []
    for name, cache in (("a", a), ("b", b)):
        cfg = HeadConfig(
            features=str(cache), out=str(tmp_path / "runs" / name), grid=(0.1, 1.0), progress=False
        )
        protocol.run(cfg, cell={"dataset": "toy", "backbone": name.upper(), "head": "logreg"})
        runs.append(compare.load_run(tmp_path / "runs" / name))
    return runs


def test_mcnemar_and_paired_bootstrap_by_hand():
    # 10 rows only A gets right, 2 only B gets right, 88 both right:
    # p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    a = np.array([True] * 10 + [False] * 2 + [True] * 88)
    b = np.array([False] * 10 + [True] * 2 + [True] * 88)
    assert compare.mcnemar(a, b) == (10, 2, pytest.approx(2 * 79 / 4096))
    diff, lo, hi = compare.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert diff == pytest.approx(0.08) and 0 < lo < 0.08 < hi
    assert compare.mcnemar(a, a)[2] == 1.0


@pytest.mark.slow
def test_paired_comparison_says_who_wins_only_when_significant(tmp_path):
    a, b = _two_runs(tmp_path, same_test=True)
    result = compare.pair(a, b)
    _, ya, pa = a.predictions()
    _, yb, pb = b.predictions()
    assert result["a_only_right"] == int(((pa == ya) & (pb != yb)).sum())
    assert result["significant"] and result["p_value"] < 0.05
    assert result["statement"].startswith("A beats B on toy (logreg): ")
    [auto] = compare.comparisons([a, b])
    assert auto["statement"] == result["statement"]


@pytest.mark.slow
def test_runs_on_different_test_sets_are_not_paired(tmp_path, capsys):
    a, b = _two_runs(tmp_path, same_test=False)
    with pytest.raises(
        DataError,
        match=r"cannot pair .*a and .*b: they were scored on different test sets \(80 vs 120",
    ):
        compare.pair(a, b)
    assert compare.comparisons([a, b]) == []
    assert cli.main(["compare", "--pair", str(a.folder), str(b.folder)]) == 2
    assert "scored on different test sets" in capsys.readouterr().err


def test_compare_errors(tmp_path):
    with pytest.raises(
        Exception, match=r"no result\.json under .*; run `pipeline head` or a study first"
    ):
        compare.gather([tmp_path])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text(json.dumps({"schema": 0}))
    with pytest.raises(
        CacheError, match=r"result .*old/result\.json has schema 0, this pipeline reads 1; rerun"
    ):
        compare.gather([tmp_path])


def test_long_tailed_runs_are_compared_within_each_frequency_group(tmp_path):
    rng = np.random.default_rng(2)
    means = rng.normal(0, 1.0, (10, 16))
    X, y, split = [], [], []
    for code, n in enumerate((200, 40, 100)):
        labels = np.repeat(np.arange(10), n)
        X.append(means[labels] + rng.normal(0, 1.0, (len(labels), 16)))
        y.append(labels)
        split.append(np.full(len(labels), code, dtype=np.int8))
    cache = write_cache(tmp_path / "lt.h5", np.vstack(X), np.concatenate(y), np.concatenate(split))
    for head, extra in (("plain", {}), ("adjusted", {"logit_adjust": "1"})):
        cfg = HeadConfig(
            features=str(cache),
            out=str(tmp_path / "runs" / head),
            grid=(0.1,),
            imbalance_ratio=100.0,
            imbalance_order="frequency",
            progress=False,
            bootstrap=0,
            **extra,
        )
        protocol.run(cfg, cell={"dataset": "lt", "backbone": "g", "head": head})
    balanced = HeadConfig(
        features=str(cache),
        out=str(tmp_path / "runs" / "balanced"),
        grid=(0.1,),
        progress=False,
        bootstrap=0,
    )
    protocol.run(balanced, cell={"dataset": "lt", "backbone": "g", "head": "all-rows"})
    everything = compare.gather([tmp_path / "runs"])
    assert len(compare.comparisons(everything)) == 1, (
        "runs trained on other rows (no long tail) are not paired"
    )
    runs = [r for r in everything if r.head != "all-rows"]
    # int(200 * 100 ** (-i / 9)): 200, 119, 71, 43, 25, 15, 9, 5, 3, 2 train images
    assert compare.group_classes(runs[0]) == {
        "many": [0, 1],
        "medium": [2, 3, 4],
        "few": [5, 6, 7, 8, 9],
    }
    [paired] = compare.comparisons(runs)
    few = paired["groups"]["few"]
    _, y_test, pred_a = runs[0].predictions()
    rows = np.isin(y_test, [5, 6, 7, 8, 9])
    _, _, pred_b = runs[1].predictions()
    assert few["n"] == rows.sum() == 500
    assert few["diff_top1"] == pytest.approx(
        (pred_a[rows] == y_test[rows]).mean() - (pred_b[rows] == y_test[rows]).mean()
    )
    rows_table = compare.summary_rows(runs)
    assert {r["head"]: r["few_top1"] for r in rows_table}["adjusted"] > {
        r["head"]: r["few_top1"] for r in rows_table
    }["plain"]
    text = compare.markdown(rows_table, [paired], [], [])
    assert "## Top-1 (%) by class frequency" in text and "  - by group (A-B, McNemar p): " in text


def test_runs_of_one_head_that_differ_in_post_hoc_settings_are_told_apart():
    assert compare.head_label({"head": "knn"}) == "knn"
    config = {
        "head": "logreg",
        "imbalance_ratio": 10.0,
        "logit_adjust": "auto",
        "calibrate": "temperature",
    }
    assert (
        compare.head_label(config)
        == "logreg + long tail R=10 + logit adjust auto + calibrated (temperature)"
    )
    assert compare.head_label({"head": "torch", "views": True}) == "torch + augmented views"
