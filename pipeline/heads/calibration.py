"""Temperature scaling (`--calibrate temperature`; Guo et al., ICML 2017): one T > 0 that divides the
log-probabilities before a softmax, fitted by minimising the negative log-likelihood on rows the
model did not train on (the chosen setting's sweep fit, scored on val or the holdout), then applied
to the final head. The argmax, and so top-1, does not change.

For a linear head, dividing the logits by T is dividing its weights and intercept by T, so the
saved head predicts and exports calibrated as it is; the knn head keeps T and applies it to its
votes' log-probabilities."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from pipeline.heads.estimators import log_proba_from_decision

BOUNDS = (-7.0, 7.0)  # log T: T from about 1e-3 to 1e3


def apply(log_proba: np.ndarray, temperature: float) -> np.ndarray:
    """float64 log-probabilities of softmax(log p / T): the same as softmax(logits / T) for any logits."""
    return log_proba_from_decision(np.asarray(log_proba, dtype=np.float64) / temperature)


def nll(y: np.ndarray, log_proba: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes after scaling by T."""
    return float(-apply(log_proba, temperature)[np.arange(len(y)), y].mean())


def fit_temperature(y: np.ndarray, log_proba: np.ndarray) -> float:
    """The T that minimises the NLL of (y, log_proba). The NLL is convex in 1/T, so a bounded search
    over log T finds its one minimum (a boundary when the rows are all right or all wrong)."""
    y, log_proba = np.asarray(y), np.asarray(log_proba, dtype=np.float64)
    found = minimize_scalar(
        lambda log_t: nll(y, log_proba, float(np.exp(log_t))), bounds=BOUNDS, method="bounded",
        options={"xatol": 1e-6},
    )  # fmt: skip
    return float(np.exp(found.x))
