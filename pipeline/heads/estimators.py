"""Linear heads with the scikit-learn estimator contract, preprocessing, and pickle-free saving.

- `TorchLinearClassifier`: nn.Linear-equivalent weights trained with cross-entropy + L2 by the
  batched torch solver (`pipeline.heads.solver`); torch is imported only when it is fitted.
- `make_logreg`: scikit-learn's `LogisticRegression` (lbfgs, multinomial) configured alike.
- `Preprocessor`: standardise or L2-normalise rows; fitted on the training rows only.
- `LinearProbe`: a fitted head (preprocessing + weights) as plain arrays; what `save_head`
  writes and `load_head` returns. It predicts with numpy alone.

Both heads use scikit-learn's C: the objective is C * sum_i w_i loss_i + ||W||^2 / 2, which for a
mean cross-entropy is an L2 penalty lambda * ||W||^2 / 2 with lambda = 1 / (C * sum_i w_i).
"""

from __future__ import annotations

import re
from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import ConfigError
from pipeline.heads.options import DEFAULTS, SolverOptions
from pipeline.registry import PREPROCESSING, SOLVERS


def log_proba_from_decision(decision: np.ndarray) -> np.ndarray:
    """(n, C) float64 log-probabilities from (n, C) logits, or (n,) binomial logits of the second class.

    A log-softmax in float64: a confident mistake keeps its true loss (p = 1e-12 is log p = -27.6),
    where float32 probabilities underflow to 0 past a logit gap of about 100.
    """
    z = np.asarray(decision, dtype=np.float64)
    if z.ndim == 1:  # binomial: log sigmoid(-z), log sigmoid(z), without overflow
        return -np.logaddexp(0.0, np.column_stack([z, -z]))
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def proba_from_decision(decision: np.ndarray) -> np.ndarray:
    """float64 probabilities (rows sum to 1), from the float64 log-softmax."""
    return np.exp(log_proba_from_decision(decision))


class Preprocessor:
    """`standardize` (mean/std of the rows it is fitted on), `l2` (unit rows), `center-l2` (minus the
    mean of the rows it is fitted on, then unit rows) or `none`."""

    def __init__(self, kind: str = "standardize") -> None:
        if kind not in PREPROCESSING:
            raise ConfigError(f"unknown preprocessing {kind!r}; choose one of: {', '.join(PREPROCESSING)}")
        self.kind = kind
        self.mean_: np.ndarray | None = None
        self.scale_: np.ndarray | None = None

    def fit(self, X: np.ndarray) -> Preprocessor:
        if self.kind == "standardize":
            self.mean_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
            std = X.std(axis=0, dtype=np.float64)
            self.scale_ = np.where(std > 1e-12, std, 1.0).astype(np.float32)  # constant columns stay put
        elif self.kind == "center-l2":
            self.mean_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.kind == "standardize":
            return (X - self.mean_) / self.scale_
        if self.kind == "center-l2":
            X = X - self.mean_
        if self.kind in ("l2", "center-l2"):
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            return X / np.where(norms > 0, norms, 1.0)
        return X

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)


def balanced_weights(y: np.ndarray, class_weight: Any, sample_weight: np.ndarray | None = None) -> np.ndarray | None:
    """Per-row class weights from `class_weight` (None, 'balanced' or {class: weight}), as scikit-learn does.

    'balanced' is sum(w) / (classes * sum of w over class c), the class counts weighed by `sample_weight`
    (as scikit-learn 1.9's `LogisticRegression` does; earlier releases counted rows). The sample weights
    themselves are not included: the caller multiplies them in."""
    if class_weight is None or class_weight == "none":
        return None
    classes, codes = np.unique(y, return_inverse=True)
    if class_weight == "balanced":
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        counts = np.bincount(codes, weights=w, minlength=len(classes))
        with np.errstate(divide="ignore"):  # a class whose rows all weigh 0 contributes nothing anyway
            per_class = np.where(counts > 0, counts.sum() / (len(classes) * counts), 0.0)
    else:
        per_class = compute_class_weight(class_weight, classes=classes, y=y)
    return per_class[codes]


class Described:
    """`meta`: what head.json says about the run that trained a loaded head (set by `load_head`)."""

    @property
    def meta(self) -> dict[str, Any]:
        return self.__dict__.setdefault("_meta", {})


class LinearDecision:
    """Probabilities and classes from `decision_function` (logits, or one binomial logit) and `classes_`:
    what every linear head here shares."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return proba_from_decision(self.decision_function(X))

    def predict_log_proba(self, X: np.ndarray) -> np.ndarray:
        return log_proba_from_decision(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        decision = self.decision_function(X)
        index = (decision > 0).astype(int) if decision.ndim == 1 else decision.argmax(axis=1)
        return self.classes_[index]


class TorchLinearClassifier(LinearDecision, ClassifierMixin, BaseEstimator):
    """Multinomial (binomial for two classes) logistic regression trained in torch.

    Parameters mirror `LogisticRegression` where they overlap (`C`, `tol`, `max_iter`,
    `class_weight`); `solver` is `lbfgs` (full batch), `adam` or `sgd` (mini-batch, cosine
    schedule, `epochs`, `batch_size`, `lr`); `label_smoothing`, `balanced_sampler` and `device`
    have no scikit-learn counterpart.
    """

    # Checked up front by `fit`, scikit-learn style: an error names the parameter and what it accepts.
    _parameter_constraints: dict = {  # noqa: RUF012 (scikit-learn's convention)
        "C": [Interval(Real, 0, None, closed="neither")],
        "solver": [StrOptions(set(SOLVERS))],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither"), None],
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
        "balanced_sampler": ["boolean"],
        "device": [str],
        "random_state": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(
        self,
        C: float = 1.0,
        solver: str = DEFAULTS.solver,
        max_iter: int = DEFAULTS.max_iter,
        tol: float = DEFAULTS.tol,
        epochs: int = DEFAULTS.epochs,
        batch_size: int = DEFAULTS.batch_size,
        lr: float | None = DEFAULTS.lr,
        label_smoothing: float = DEFAULTS.label_smoothing,
        class_weight: Any = None,
        balanced_sampler: bool = DEFAULTS.balanced_sampler,
        device: str = DEFAULTS.device,
        random_state: int = DEFAULTS.seed,
    ) -> None:
        self.C = C
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.label_smoothing = label_smoothing
        self.class_weight = class_weight
        self.balanced_sampler = balanced_sampler
        self.device = device
        self.random_state = random_state

    def options(self, **overrides: Any) -> SolverOptions:
        """These parameters as the solver's options."""
        return SolverOptions.from_config(self, **({"seed": self.random_state} | overrides))

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> TorchLinearClassifier:
        from pipeline.devices import choose_device
        from pipeline.heads import solver as torch_solver  # torch only when a torch head is trained

        self._validate_params()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise ValueError(
                f"The 'device' parameter of TorchLinearClassifier must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'. "
                f"Got {self.device!r} instead."
            )
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"needs samples of at least 2 classes, but the data has 1 class: {self.classes_[0]!r}")
        weights = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != (len(y),):
            raise ValueError(f"sample_weight has shape {weights.shape}; expected ({len(y)},), one weight per row")
        if not np.all(weights >= 0) or weights.sum() <= 0:
            raise ValueError("sample_weight must be non-negative and not all zero")
        per_class = balanced_weights(y, self.class_weight, weights)
        if per_class is not None:
            weights = weights * per_class
        sol = torch_solver.solve(
            X,
            codes,
            [self.C],
            n_classes=len(self.classes_),
            options=self.options(device=str(choose_device(self.device))),
            sample_weight=weights,
            dtype=_torch_dtype(X.dtype),
        )
        self.coef_ = sol.coef[0].T.astype(X.dtype)  # (O, D) like scikit-learn: O = 1 for two classes
        self.intercept_ = sol.intercept[0].astype(X.dtype)
        self.n_iter_ = np.array([sol.n_iter[0]])
        self.converged_ = bool(sol.converged[0])
        self.loss_ = float(sol.loss[0])  # the objective at the end: mean weighted loss + penalty
        return self

    def to_module(self) -> Any:
        """The fitted head as a `torch.nn.Linear` (D -> C outputs, or D -> 1 for two classes)."""
        import torch

        check_is_fitted(self)
        linear = torch.nn.Linear(self.coef_.shape[1], self.coef_.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(self.coef_))
            linear.bias.copy_(torch.as_tensor(self.intercept_))
        return linear

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return torch.float64 if dtype == np.float64 else torch.float32


def make_logreg(C: float = 1.0, class_weight: Any = None, max_iter: int = 1000, tol: float = DEFAULTS.tol) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="lbfgs", class_weight=class_weight, max_iter=max_iter, tol=tol)
