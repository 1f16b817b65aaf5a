"""What crosses the head stage's modules, typed: one trained model (`Fit`), one repeat of the
protocol (`FittedRun`), the scored test rows (`Predictions`), and the wall-time spans (`Timer`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.heads.estimators import Preprocessor, log_proba_from_decision
from pipeline.heads.posthoc import Adjustment

if TYPE_CHECKING:  # torch is imported only when a torch head is trained
    from pipeline.heads.objective import Solution


def resolution(C: float, coef: np.ndarray, weight_sum: float) -> float:
    """max |W| / (C * sum of row weights): the largest gradient the penalty adds on the mean
    scale."""
    return float(np.abs(coef).max(initial=0.0)) / (C * weight_sum)


@dataclass
class Fit:
    """One trained linear model: (D, O) weights, (O,) intercept, and how its optimisation ended.

    `warm_start_only`: the solver took no step from the previous C's solution because its gradient
    there was already within tol, so these are that solution's weights, not a fit at this C.
    `penalty_gradient`: max |W| / (C * sum of row weights), the largest gradient the penalty adds
    on the stopping rule's (mean) scale. Below tol, the point where the solver stopped passes the
    rule whatever the penalty: the fit did not resolve its C (see `status`).
    """

    value: float  # the setting it was fitted at: C (linear heads), T (ncm)
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int
    converged: bool
    warm_start_only: bool = False
    penalty_gradient: float = float("inf")
    tol: float = 0.0
    exact: bool = False  # closed form (ncm): nothing to converge
    param: str = "C"  # the name of `value`: the curve's first column

    @classmethod
    def from_solution(
        cls, Cs: list[float], sol: Solution, weight_sum: float, tol: float
    ) -> list[Fit]:
        """One fit per C of a torch `Solution`, with how far each resolves its C."""
        return [
            cls(
                C,
                sol.coef[k],
                sol.intercept[k],
                int(sol.n_iter[k]),
                bool(sol.converged[k]),
                bool(sol.copied[k]),
                resolution(C, sol.coef[k], weight_sum),
                tol,
            )
            for k, C in enumerate(Cs)
        ]

    @property
    def status(self) -> str:
        """How far the weights are a fit at this C:

        - `not converged`: stopped at max_iter (mini-batch: the epochs ended above tol);
        - `warm start only`: the previous C's weights, no step taken (torch head);
        - `C not resolved`: converged, but the penalty's gradient is below tol, so this point passes
          the stopping rule for any larger C too: where the solver stopped on a loss that is flat to
          within tol, which differs between solvers, starts and BLAS threads, not the optimum at
          this C;
        - `converged`: the optimum at this C, to within tol;
        - `exact`: computed in closed form (the ncm and knn heads);
        - `diverged`: the weights are not finite (a learning rate too high for the mini-batch
          solvers): never chosen.
        """
        if not (np.isfinite(self.coef).all() and np.isfinite(self.intercept).all()):
            return "diverged"
        if self.exact:
            return "exact"
        if not self.converged:
            return "not converged"
        if self.warm_start_only:
            return "warm start only"
        return "C not resolved" if self.penalty_gradient <= self.tol else "converged"

    def decision(self, X: np.ndarray) -> np.ndarray:
        """Logits in float64, in row chunks (no float64 copy of all of X): exact inputs for the
        log-softmax."""
        coef, intercept = self.coef.astype(np.float64), self.intercept.astype(np.float64)
        step = max(1, 2_000_000 // max(X.shape[1], 1))  # ~16 MB of float64 rows at a time
        out = np.empty((len(X), coef.shape[1]))
        for a in range(0, len(X), step):
            out[a : a + step] = X[a : a + step].astype(np.float64) @ coef + intercept
        return out.ravel() if out.shape[1] == 1 else out

    def log_proba(self, X: np.ndarray) -> np.ndarray:
        return log_proba_from_decision(self.decision(X))

    def proba(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.log_proba(X))


@dataclass(frozen=True)
class ChoiceRows:
    """Which rows chose the head's setting: the val split, a stratified holdout of train (no val
    split: its fraction and seed), or none (a fixed --C)."""

    on: Literal["val", "holdout", "none"]
    fraction: float = 0.0
    seed: int = 0

    @property
    def name(self) -> str:
        """What the summary and the post-hoc record call these rows."""
        return {
            "val": "val",
            "holdout": "a stratified holdout of train",
            "none": "none (--C given)",
        }[self.on]

    @property
    def note(self) -> str:
        """The name with what made the rows (result.json's `protocol.selected_on_note`)."""
        if self.on == "holdout":
            return f"{self.name} ({self.fraction:.0%}, seed {self.seed}; no val split)"
        return self.name


@dataclass(frozen=True)
class FittedRun:
    """One pass of the protocol: the validation curve, the chosen index, the final fit and the
    preprocessing it was trained with, and which rows trained it."""

    curve: list[dict[str, Any]]
    best: int
    final: Fit
    prep: Preprocessor
    trained_on: str
    adjustment: Adjustment = dataclasses.field(
        default_factory=Adjustment
    )  # --logit-adjust, --calibrate
    train_counts: np.ndarray | None = (
        None  # per class: the train rows of the sweep (its frequency groups)
    )

    @property
    def value(self) -> float:
        """The chosen setting (C, k or T)."""
        return self.final.value


@dataclass(frozen=True)
class Predictions:
    """The test rows as scored: ids, true classes (encoded), and float64 log-probabilities."""

    ids: np.ndarray
    y: np.ndarray
    log_proba: np.ndarray  # (n, classes)

    @property
    def proba(self) -> np.ndarray:
        return np.exp(self.log_proba)

    def adjusted(self, adjustment: Adjustment) -> Predictions:
        """These predictions after a post-hoc adjustment (logit adjustment, temperature)."""
        return Predictions(self.ids, self.y, adjustment(self.log_proba))

    @property
    def pred(self) -> np.ndarray:
        return self.log_proba.argmax(axis=1)


class Timer:
    """Wall time per named span (read, sweep, refit, test, write), summed over repeats."""

    def __init__(self) -> None:
        self.spans: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.spans[name] = self.spans.get(name, 0.0) + time.perf_counter() - start
