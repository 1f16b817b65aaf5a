"""Log-loss from float64 logits: exact where probabilities underflow float32 or are clipped."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax
from sklearn.metrics import log_loss as sklearn_log_loss

from pipeline import read_features
from pipeline.config import HeadConfig
from pipeline.evaluate import metrics
from pipeline.heads import choice, estimators, fitting, protocol, runs

from helpers import write_cache

TRUE = -math.log(1e-12)  # 27.631021115928547: the loss of a row whose label has p = 1e-12


def _multinomial_logits() -> np.ndarray:
    """Logits (0, a, a) with label 0: p(0) = 1 / (1 + 2 e^a) = 1e-12 exactly when a = log((1e12 - 1)
    / 2)."""
    a = math.log((1e12 - 1) / 2)
    return np.array([[0.0, a, a]])


def test_log_loss_of_a_one_in_a_trillion_label_is_exact():
    y = np.array([0])
    log_proba = estimators.log_proba_from_decision(_multinomial_logits())
    assert log_proba.dtype == np.float64
    assert metrics.log_loss(y, None, log_proba) == pytest.approx(TRUE, rel=0, abs=1e-9)
    # From float64 probabilities (what the heads now return) it is exact too ...
    proba = estimators.proba_from_decision(_multinomial_logits())
    assert proba.dtype == np.float64 and metrics.log_loss(y, proba) == pytest.approx(
        TRUE, rel=0, abs=1e-9
    )
    # ... where float32 probabilities, clipped at float32's epsilon by scikit-learn, gave 15.9.
    clipped = sklearn_log_loss(y, proba.astype(np.float32), labels=[0, 1, 2])
    assert clipped == pytest.approx(-math.log(np.finfo(np.float32).eps), rel=1e-3)


def test_binomial_logit_and_underflow_beyond_float32():
    z = np.array(
        [math.log(1e-12 / (1 - 1e-12)), 200.0, -200.0]
    )  # one logit each: p(class 1) = sigmoid(z)
    y = np.array([1, 0, 0])
    log_proba = estimators.log_proba_from_decision(z)
    expected = np.array([TRUE, 200.0 + math.log1p(math.exp(-200.0)), math.log1p(math.exp(-200.0))])
    np.testing.assert_allclose(-log_proba[np.arange(3), y], expected, rtol=0, atol=1e-9)
    assert metrics.log_loss(y, None, log_proba) == pytest.approx(expected.mean(), rel=0, abs=1e-9)
    assert metrics.evaluate(y, np.exp(log_proba), ["a", "b"], log_proba=log_proba)[
        "log_loss"
    ] == pytest.approx(expected.mean(), rel=0, abs=1e-9)


@pytest.mark.filterwarnings(
    "ignore:y_pred contains classes not in y_true"
)  # one row, predicted wrong
def test_the_validation_curve_takes_its_log_loss_from_logits():
    fit = runs.Fit(
        value=1.0, coef=_multinomial_logits(), intercept=np.zeros(3), n_iter=3, converged=True
    )  # (1, 3)
    X = np.ones((1, 1), dtype=np.float32)
    row = choice.curve_row(fit, np.array([0]), fit.log_proba(X), ["a", "b", "c"])
    assert row["val_log_loss"] == pytest.approx(TRUE, rel=0, abs=1e-9)
    assert row["val_top1"] == 0.0 and row["status"] == "converged"


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("head", ["logreg", "torch"])
def test_test_log_loss_matches_a_float64_reference(tmp_path, monkeypatch, head, n_classes):
    """A test row far inside another class: its p(y) underflows float32 (logit gap > 100), not
    float64."""
    rng = np.random.default_rng(0)
    means = 4.0 * np.eye(n_classes, 4)
    y = np.arange(300) % n_classes
    X = means[y] + rng.normal(size=(300, 4))
    X[-1], y[-1] = 60 * means[1], 0  # the last test row: a class-0 label deep in class 1
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [200, 50, 50])
    cache = write_cache(tmp_path / "c.h5", X, y, split)
    fits = []
    real = fitting.fit_grid
    monkeypatch.setattr(fitting, "fit_grid", lambda *a, **k: fits.append(real(*a, **k)) or fits[-1])
    cfg = HeadConfig(
        features=str(cache), head=head, C=10.0, out=str(tmp_path / "r"), progress=False, bootstrap=0
    )
    result = protocol.run(cfg)
    (final,) = fits[-1]
    fs = read_features(cache, dtype=np.float32)
    prep = estimators.Preprocessor("standardize").fit(
        np.concatenate([fs["train"].X, fs["val"].X])
    )  # as the refit does
    Z = prep.transform(fs["test"].X).astype(np.float64)
    logits = Z @ final.coef.astype(np.float64) + final.intercept.astype(np.float64)
    logits = np.column_stack([np.zeros(50), logits[:, 0]]) if n_classes == 2 else logits
    nll = -log_softmax(logits, axis=1)[np.arange(50), y[-50:]]
    assert nll[-1] > 150, "the wrong row's p(y) is below float32's range"
    assert result["test"]["log_loss"] == pytest.approx(nll.mean(), rel=1e-12, abs=1e-9)
