"""What is done to a trained head's outputs after the choice of its setting, fitted on rows the
chosen sweep fit never trained on (val, or the holdout of train), never on test:

- post-hoc logit adjustment (`--logit-adjust TAU|auto`; Menon et al., ICLR 2021): log p - TAU log
  prior, the prior being the class frequencies of the rows the head trained on; `auto` takes TAU
  from `registry.LOGIT_ADJUST_GRID` by the --select metric on val;
- temperature scaling (`--calibrate temperature`; Guo et al., ICML 2017): one T > 0 that divides the
  (adjusted) log-probabilities before a softmax, fitted by minimising the log-loss.

Both leave a softmax of (log p + offsets) / T. Adding to log-probabilities or to logits is the same
after the softmax, so a linear head takes them into its weights and intercept and predicts and
exports adjusted as saved; the knn head keeps them (`CosineKNN.offsets`, `.calibration`). The
temperature does not change the argmax; the logit adjustment does: that is its purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from pipeline.evaluate import metrics
from pipeline.heads.estimators import log_proba_from_decision
from pipeline.registry import LOGIT_ADJUST_GRID, SELECT_RULES

BOUNDS = (-7.0, 7.0)  # log T: T from about 1e-3 to 1e3
NOT_FITTED = (
    "not fitted: every held-out row is predicted right (or the best T lies at the edge of "
    "1e-3..1e3), so the "
    "log-loss has no minimum to find; T = 1 kept"
)


def apply(
    log_proba: np.ndarray, temperature: float, offsets: np.ndarray | float = 0.0
) -> np.ndarray:
    """float64 log-probabilities of softmax((log p + offsets) / T)."""
    return log_proba_from_decision(
        (np.asarray(log_proba, dtype=np.float64) + offsets) / temperature
    )


def nll(y: np.ndarray, log_proba: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes after scaling by T."""
    return float(-apply(log_proba, temperature)[np.arange(len(y)), y].mean())


def fit_temperature(y: np.ndarray, log_proba: np.ndarray) -> float | None:
    """The T that minimises the NLL of (y, log_proba), or None when the NLL has no minimum to find.

    The NLL is convex in 1/T, so a bounded search over log T finds its one minimum. When every row
    is predicted right, the NLL falls toward 0 as T -> 0 and any T found is arbitrary (where the
    loss rounds to 0); when the minimum lands on a bound of the search, it is not a minimum either.
    Both return None: the head stays uncalibrated rather than confidently wrong on new rows."""
    y, log_proba = np.asarray(y), np.asarray(log_proba, dtype=np.float64)
    if len(y) == 0 or (log_proba.argmax(axis=1) == y).all():
        return None
    found = minimize_scalar(
        lambda log_t: nll(y, log_proba, float(np.exp(log_t))),
        bounds=BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    if min(found.x - BOUNDS[0], BOUNDS[1] - found.x) < 1e-3:
        return None
    return float(np.exp(found.x))


def log_prior(counts: np.ndarray) -> np.ndarray:
    """log class frequencies of training rows (a class without rows counts as half a row)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 0.5)
    return np.log(counts / counts.sum())


def choose_tau(
    y: np.ndarray, log_proba: np.ndarray, prior: np.ndarray, select: str, classes: list[str]
) -> dict:
    """TAU from the grid by the --select rule's metric on held-out rows (ties: the smaller TAU)."""
    metric = SELECT_RULES[select]
    scores = []
    for tau in LOGIT_ADJUST_GRID:
        adjusted = apply(log_proba, 1.0, -tau * prior)
        s = metrics.evaluate(y, np.exp(adjusted), classes, detail=False, log_proba=adjusted)[metric]
        scores.append(-s if metric == "log_loss" else s)
    best = int(np.argmax(scores))  # the first of equal scores: the grid is ascending
    sign = -1 if metric == "log_loss" else 1
    edge = "largest" if best == len(LOGIT_ADJUST_GRID) - 1 else None  # the best may lie beyond 2
    return {
        "tau": LOGIT_ADJUST_GRID[best],
        "metric": metric,
        "curve": [sign * s for s in scores],
        "at_edge": edge,
    }


@dataclass
class Adjustment:
    """softmax((log p + offsets) / temperature); the identity by default. `record` says how each was
    fitted."""

    offsets: np.ndarray | None = None
    temperature: float = 1.0
    record: dict[str, Any] = field(default_factory=dict)

    def __call__(self, log_proba: np.ndarray) -> np.ndarray:
        if self.offsets is None and self.temperature == 1.0:
            return log_proba
        return apply(log_proba, self.temperature, 0.0 if self.offsets is None else self.offsets)

    def linear(self, coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(D, O) weights and (O,) intercept of a linear head with this adjustment inside."""
        offsets = np.zeros(max(coef.shape[1], 2)) if self.offsets is None else self.offsets
        shift = (
            offsets[1:] - offsets[:1] if coef.shape[1] == 1 else offsets
        )  # one binomial logit: class 1 - class 0
        return coef / self.temperature, (intercept + shift) / self.temperature


def fit(
    cfg: Any,
    y: np.ndarray,
    log_proba: np.ndarray,
    train_prior: np.ndarray,
    final_prior: np.ndarray,
    classes: list[str],
) -> Adjustment:
    """The adjustment `cfg` asks for, fitted on held-out (y, log_proba) of a fit trained with
    `train_prior`, for a final head trained with `final_prior`."""
    adjustment, tau = Adjustment(), cfg.logit_adjust_tau
    if tau == "auto":
        chosen = choose_tau(y, log_proba, train_prior, cfg.select, classes)
        adjustment.record["logit_adjust"] = {"grid": list(LOGIT_ADJUST_GRID)} | chosen
        tau = chosen["tau"]
    elif tau is not None:
        adjustment.record["logit_adjust"] = {"tau": tau}
    if tau:
        log_proba = apply(log_proba, 1.0, -tau * train_prior)
        adjustment.offsets = -tau * final_prior
    if cfg.calibrate == "temperature":
        T = fit_temperature(y, log_proba)
        if T is None:
            adjustment.record["calibration"] = {
                "method": "temperature",
                "temperature": 1.0,
                "fitted": False,
                "reason": NOT_FITTED,
            }
            return adjustment
        val = {
            "log_loss": [nll(y, log_proba, 1.0), nll(y, log_proba, T)],
            "ece": [
                metrics.reliability(y, np.exp(lp))["ece"] for lp in (log_proba, apply(log_proba, T))
            ],
        }
        adjustment.temperature = T
        adjustment.record["calibration"] = {
            "method": "temperature",
            "temperature": T,
            "fitted": True,
        } | {
            "val_before": {k: v[0] for k, v in val.items()},
            "val_after": {k: v[1] for k, v in val.items()},
        }
    return adjustment
