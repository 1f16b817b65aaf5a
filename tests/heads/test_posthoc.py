"""Post-hoc adjustments: temperature scaling (fitted on held-out validation rows only, lowers their
log-loss, keeps top-1) and logit adjustment (the identity at TAU = 0, helps the rare classes of a
long tail); both travel with the saved head."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import read_features
from pipeline.config import HeadConfig
from pipeline.errors import ConfigError
from pipeline.heads import fitting, posthoc, protocol
from pipeline.heads.estimators import log_proba_from_decision
from pipeline.heads.saved import load_head


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    true_T = 2.5
    p = np.exp(log_proba_from_decision(logits / true_T))
    y = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)  # labels drawn from softmax(logits / T)
    T = posthoc.fit_temperature(y, log_proba_from_decision(logits))
    assert abs(T - true_T) < 0.1
    # The minimum: the NLL at T is below its neighbours' and below T = 1.
    lp = log_proba_from_decision(logits)
    assert posthoc.nll(y, lp, T) < min(posthoc.nll(y, lp, T * 1.05), posthoc.nll(y, lp, T / 1.05))
    assert posthoc.nll(y, lp, T) < posthoc.nll(y, lp, 1.0)


@pytest.mark.parametrize("head", ["logreg", "knn", "ncm"])
def test_calibration_lowers_val_log_loss_keeps_top1_and_is_saved(synthetic_cache, tmp_path, head):
    grid = {"logreg": (0.01, 0.1, 1.0), "knn": (5, 20), "ncm": None}[head]
    settings = dict(
        features=str(synthetic_cache), head=head, grid=grid, progress=False, bootstrap=0
    )
    plain = protocol.run(HeadConfig(out=str(tmp_path / "plain"), **settings))
    result = protocol.run(
        HeadConfig(out=str(tmp_path / "cal"), calibrate="temperature", **settings)
    )
    adjusted = result["posthoc"]
    cal = adjusted["calibration"]
    assert (
        cal["method"] == "temperature" and adjusted["fitted_on"] == "val" and cal["temperature"] > 0
    )
    assert cal["val_after"]["log_loss"] < cal["val_before"]["log_loss"]
    assert adjusted["test_before"]["log_loss"] == pytest.approx(plain["test"]["log_loss"], rel=1e-9)
    assert adjusted["test_after"]["log_loss"] == pytest.approx(result["test"]["log_loss"], rel=1e-9)
    assert result["test"]["top1"] == plain["test"]["top1"] and result["chosen"] == plain["chosen"]
    # The saved head predicts calibrated: its test log-loss is the reported one.
    test = read_features(synthetic_cache)["test"]
    loaded = load_head(tmp_path / "cal")
    log_proba = loaded.predict_log_proba(test.X)
    assert -log_proba[np.arange(len(test.y)), test.y].mean() == pytest.approx(
        result["test"]["log_loss"], rel=1e-5
    )
    saved = json.loads((tmp_path / "cal" / "head.json").read_text())
    assert saved["posthoc"] == {"logit_adjust_tau": 0.0, "temperature": cal["temperature"]}


def test_the_temperature_is_fitted_before_the_test_split_is_read(
    synthetic_cache, tmp_path, monkeypatch
):
    events = []
    real_read, real_fit = fitting.read_features, posthoc.fit_temperature
    monkeypatch.setattr(
        fitting,
        "read_features",
        lambda path, splits, **kw: events.append(tuple(splits)) or real_read(path, splits, **kw),
    )
    monkeypatch.setattr(
        posthoc, "fit_temperature", lambda y, lp: events.append(("fit", len(y))) or real_fit(y, lp)
    )
    cfg = HeadConfig(
        features=str(synthetic_cache),
        grid=(0.1, 1.0),
        calibrate="temperature",
        out=str(tmp_path / "r"),
        progress=False,
        bootstrap=0,
    )
    protocol.run(cfg)
    assert events == [("train", "val"), ("fit", 120), ("test",)], (
        "fitted on the 120 val rows, before test is read"
    )


def test_few_shot_calibrates_each_draw_on_val(synthetic_cache, tmp_path):
    cfg = HeadConfig(
        features=str(synthetic_cache),
        grid=(0.1, 1.0),
        shots=5,
        repeats=3,
        calibrate="temperature",
        out=str(tmp_path / "r"),
        progress=False,
        bootstrap=0,
    )
    result = protocol.run(cfg)
    records = result["posthoc"]
    assert len(records) == 3 and all(c["fitted_on"] == "val" for c in records)
    assert len({c["calibration"]["temperature"] for c in records}) == 3, "one temperature per draw"


def test_unknown_calibration_is_one_line():
    with pytest.raises(
        ConfigError, match=r"--calibrate 'platt' is not allowed; choose one of: none, temperature"
    ):
        HeadConfig(features="c.h5", calibrate="platt")


def test_logit_adjustment_at_tau_zero_is_the_identity_and_shifts_by_the_prior():
    rng = np.random.default_rng(1)
    lp = log_proba_from_decision(rng.normal(size=(6, 4)))
    prior = posthoc.log_prior(np.array([100, 30, 5, 1]))
    np.testing.assert_allclose(posthoc.apply(lp, 1.0, -0.0 * prior), lp, atol=1e-12)
    adjusted = posthoc.apply(lp, 1.0, -1.0 * prior)
    expected = lp - prior - np.log(np.exp(lp - prior).sum(1, keepdims=True))
    np.testing.assert_allclose(adjusted, expected, atol=1e-12)
    # In a linear head the offsets become the intercept: one logit for two classes, the difference.
    two = posthoc.Adjustment(offsets=np.array([0.3, -0.2]), temperature=2.0)
    coef, intercept = two.linear(np.ones((3, 1)), np.array([1.0]))
    assert np.allclose(coef, 0.5) and np.allclose(intercept, (1.0 - 0.5) / 2.0)


def _long_tail_cache(tmp_path):
    """Ten Gaussian classes, overlapping; 200 train rows each (made long-tailed by the head), 40
    val, 100 test."""
    rng = np.random.default_rng(2)
    means = rng.normal(0, 1.0, (10, 16))
    rows = {"train": 200, "val": 40, "test": 100}
    X, y, split = [], [], []
    for code, n in enumerate(rows.values()):
        labels = np.repeat(np.arange(10), n)
        X.append(means[labels] + rng.normal(0, 1.0, (len(labels), 16)))
        y.append(labels)
        split.append(np.full(len(labels), code, dtype=np.int8))
    from helpers import write_cache

    return write_cache(tmp_path / "lt.h5", np.vstack(X), np.concatenate(y), np.concatenate(split))


def test_logit_adjustment_raises_few_group_accuracy_on_a_long_tail(tmp_path):
    cache = _long_tail_cache(tmp_path)
    settings = dict(
        features=str(cache),
        grid=(0.01, 0.1, 1.0),
        imbalance_ratio=100.0,
        imbalance_order="frequency",
        progress=False,
        bootstrap=0,
    )
    plain = protocol.run(HeadConfig(out=str(tmp_path / "plain"), **settings))
    adjusted = protocol.run(HeadConfig(out=str(tmp_path / "la"), logit_adjust="1", **settings))
    zero = protocol.run(HeadConfig(out=str(tmp_path / "zero"), logit_adjust="0", **settings))
    assert zero["test"]["top1"] == plain["test"]["top1"] and zero["test"][
        "log_loss"
    ] == pytest.approx(plain["test"]["log_loss"], rel=1e-12), "TAU = 0 is the identity"
    few_plain, few_adjusted = plain["test"]["groups"]["few"], adjusted["test"]["groups"]["few"]
    assert few_plain["classes"] == few_adjusted["classes"] >= 3
    assert few_adjusted["top1"] > few_plain["top1"] + 0.05
    assert adjusted["posthoc"]["test_before"]["top1"] == plain["test"]["top1"]
    assert plain["protocol"]["trained_on"] == "train, long-tailed (imbalance ratio 100)"
    # The saved head predicts adjusted.
    test = read_features(cache)["test"]
    head = load_head(tmp_path / "la")
    assert (
        head.predict(test.X)
        == np.array(adjusted["classes"])[np.load(tmp_path / "la" / "predictions.npz")["y_pred"]]
    ).all()


def test_auto_logit_adjustment_chooses_tau_on_val(tmp_path):
    cache = _long_tail_cache(tmp_path)
    cfg = HeadConfig(
        features=str(cache),
        grid=(0.1,),
        imbalance_ratio=100.0,
        logit_adjust="auto",
        progress=False,
        bootstrap=0,
        out=str(tmp_path / "auto"),
    )
    chosen = protocol.run(cfg)["posthoc"]["logit_adjust"]
    assert chosen["metric"] == "top1" and len(chosen["curve"]) == len(chosen["grid"])
    assert chosen["tau"] == chosen["grid"][int(np.argmax(chosen["curve"]))] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"logit_adjust": "lots"},
            r"--logit-adjust 'lots' is not allowed; pass a number in \[0, 100\] \(1 is the usual "
            r"choice\) or auto",
        ),
        ({"logit_adjust": "-1"}, r"--logit-adjust '-1' is not allowed"),
        ({"imbalance_ratio": 0.5}, r"--imbalance-ratio 0.5 must be a finite number >= 1"),
        (
            {"imbalance_ratio": 10.0, "shots": 4},
            r"--imbalance-ratio and --shots both choose the training rows",
        ),
        (
            {"imbalance_order": "random"},
            r"--imbalance-order 'random' is not allowed; choose one of: seeded, frequency",
        ),
    ],
)
def test_long_tail_settings_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        HeadConfig(features="c.h5", **overrides)


def test_temperature_is_not_fitted_when_the_log_loss_has_no_minimum(synthetic_cache, tmp_path):
    right = log_proba_from_decision(np.array([[5.0, 0.0], [0.0, 4.0], [3.0, 1.0]]))
    assert posthoc.fit_temperature(np.array([0, 1, 0]), right) is None, (
        "all right: the loss falls toward T -> 0"
    )
    # Through the protocol: a cache whose val rows are all predicted right keeps T = 1, and says so.
    rng = np.random.default_rng(3)
    X = np.repeat(np.eye(3) * 10, 40, axis=0) + rng.normal(0, 0.1, (120, 3))
    y = np.repeat([0, 1, 2], 40)
    split = np.tile(np.array([0, 0, 1, 2], dtype=np.int8), 30)
    from helpers import write_cache

    cache = write_cache(tmp_path / "easy.h5", X, y, split)
    result = protocol.run(
        HeadConfig(
            features=str(cache),
            head="ncm",
            calibrate="temperature",
            out=str(tmp_path / "r"),
            progress=False,
            bootstrap=0,
        )
    )
    calibration = result["posthoc"]["calibration"]
    assert calibration["fitted"] is False and calibration["temperature"] == 1.0
    assert calibration["reason"].startswith("not fitted: every held-out row is predicted right")
    assert result["posthoc"]["test_after"] == result["posthoc"]["test_before"]


def test_the_logit_adjustment_grid_is_the_documented_one_and_its_edge_is_flagged():
    from pipeline.evaluate import report
    from pipeline.heads.posthoc import choose_tau
    from pipeline.registry import LOGIT_ADJUST_GRID

    assert LOGIT_ADJUST_GRID == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    prior = np.log(np.array([0.99, 0.01]))
    signal = np.where(y[:, None] == np.arange(2), 1.0, 0.0) + rng.normal(0, 0.3, (400, 2))
    logits = 2 * signal + 2.3 * prior  # a head more biased to the head class than TAU = 2 undoes
    log_proba = logits - np.logaddexp(logits[:, :1], logits[:, 1:])
    chosen = choose_tau(y, log_proba, prior, "balanced-0.5se", ["a", "b"])
    assert chosen["tau"] == 2.0 and chosen["at_edge"] == "largest"
    notes = report.choice_notes({"protocol": {}, "posthoc": {"logit_adjust": chosen}})
    assert notes == [
        "logit adjustment TAU = 2 is the end of its grid (0, 0.25, ..., 2): the best may be larger"
    ]
