"""The linear heads, trained with C: `torch` (an nn.Linear with cross-entropy + L2, by the batched
torch solver) and `logreg` (scikit-learn's `LogisticRegression`), plus what every linear kind shares
(`LinearStorage`: weights and intercept on disk, numpy predictions, the export graph) and
`TorchLinearClassifier`, the torch head with the scikit-learn estimator contract.

Both heads use scikit-learn's C: the objective is C * sum_i w_i loss_i + ||W||^2 / 2. For a mean
cross-entropy that is an L2 penalty lambda * ||W||^2 / 2 with lambda = 1 / (C * sum_i w_i). Row
weights are the class weights (`--class-weight`) times the sample weights (`--views`), mixed in one
place (`row_weights`), and every torch fit goes through one front door (`solve_torch`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import ConfigError
from pipeline.heads.estimators import (
    LinearDecision,
    Preprocessor,
    balanced_weights,
    log_proba_from_decision,
)
from pipeline.heads.kinds.registry import HeadKind, register
from pipeline.heads.options import DEFAULTS, SolverOptions
from pipeline.heads.posthoc import Adjustment
from pipeline.heads.runs import Fit, resolution
from pipeline.registry import DEFAULT_GRID, JOBLIB_BACKENDS

if TYPE_CHECKING:
    from pipeline.config import HeadConfig
    from pipeline.heads.objective import Solution
    from pipeline.heads.trained import TrainedHead


class LinearStorage(HeadKind):
    """A head that is ``softmax(Z @ coef.T + intercept)`` once trained (one logit for two classes):
    the linear heads, and nearest class mean. Saved as `coef` (O, D) and `intercept` (O,)."""

    model = "linear"

    def trained(
        self, fit: Fit, prep: Preprocessor, classes: np.ndarray, adjustment: Adjustment
    ) -> TrainedHead:
        from pipeline.heads.trained import TrainedHead

        coef, intercept = adjustment.linear(
            fit.coef, fit.intercept
        )  # the adjustment inside the weights
        arrays = {
            "coef": np.asarray(coef.T, np.float32),
            "intercept": np.asarray(intercept, np.float32),
        }
        return TrainedHead(self, prep, classes, arrays)

    def array_shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
        n_classes = len(meta["classes"])
        outputs = 1 if n_classes == 2 else n_classes
        return {"coef": (outputs, meta["n_features"]), "intercept": (outputs,)}

    def n_features(self, arrays: dict[str, np.ndarray]) -> int:
        return int(arrays["coef"].shape[1])

    def log_proba(self, head: TrainedHead, Z: np.ndarray) -> np.ndarray:
        coef = np.asarray(head.arrays["coef"], np.float32)
        scores = Z @ coef.T + np.asarray(head.arrays["intercept"], np.float32)
        return log_proba_from_decision(scores.ravel() if scores.shape[1] == 1 else scores)

    def module(self, head: TrainedHead) -> Any:
        import torch
        from torch import nn

        class Linear(nn.Module):
            """Z @ coef.T + intercept -> probabilities (a sigmoid pair for one binomial logit)."""

            def __init__(self) -> None:
                super().__init__()
                for name in (
                    "coef",
                    "intercept",
                ):  # own contiguous copies: torch.export saves them whole
                    array = np.ascontiguousarray(head.arrays[name], dtype=np.float32)
                    self.register_buffer(name, torch.tensor(array))

            def forward(self, z: torch.Tensor) -> torch.Tensor:
                logits = z @ self.coef.T + self.intercept  # (B, O)
                if logits.shape[1] == 1:
                    p = torch.sigmoid(logits)
                    return torch.cat([1 - p, p], dim=1)
                return torch.softmax(logits, dim=1)

        return Linear()


C_RANGE = (1e-12, 1e12)


class LinearKind(LinearStorage):
    """What the two heads trained with C share: the C grid and its checks."""

    takes_c = True

    def check(self, cfg: HeadConfig) -> None:
        super().check(cfg)
        for value in ([cfg.C] if cfg.C is not None else []) + list(cfg.grid or ()):
            if not value > 0 or value == float("inf"):
                raise ConfigError(
                    f"C value {value} is not allowed; C must be a positive, finite number"
                )
            if (
                not C_RANGE[0] <= value <= C_RANGE[1]
            ):  # beyond, the penalty 1 / (C n) over- or underflows
                raise ConfigError(
                    f"C value {value:g} is out of range; pass C in [{C_RANGE[0]:g}, "
                    f"{C_RANGE[1]:g}] (the default "
                    "grid spans 1e-6 to 1e5)"
                )

    def grid(self, cfg: HeadConfig) -> list[float]:
        return sorted(cfg.grid or ((cfg.C,) if cfg.C is not None else DEFAULT_GRID))


def row_weights(
    y: np.ndarray, class_weight: Any, sample_weight: np.ndarray | None
) -> tuple[np.ndarray | None, float]:
    """(per-row weights or None, their sum): the class weights times the sample weights, the one
    place they are mixed. `class_weight` is None, 'none', 'balanced' or {class: weight}."""
    per_class = balanced_weights(y, None if class_weight == "none" else class_weight, sample_weight)
    weights = (
        sample_weight
        if per_class is None
        else per_class * (1.0 if sample_weight is None else sample_weight)
    )
    return weights, float(len(y) if weights is None else np.sum(weights))


def solve_torch(
    X: np.ndarray,
    y: np.ndarray,
    Cs: list[float],
    n_classes: int,
    options: SolverOptions,
    class_weight: Any = None,
    sample_weight: np.ndarray | None = None,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
    block: int | None = None,
) -> tuple[Solution, float]:
    """Every torch fit's one front door: the row weights mixed (`solver.solve` checks them), then
    the path along `Cs`, in X's precision. Returns the solution and the sum of the row weights."""
    from pipeline.heads import solver  # torch only when a torch head is trained

    if sample_weight is not None and np.shape(sample_weight) != (len(y),):
        raise ValueError(
            f"sample_weight: expected {len(y)} finite non-negative weights, not all zero; got "
            f"shape {np.shape(sample_weight)}"
        )
    weights, w_sum = row_weights(y, class_weight, sample_weight)
    device = options.device.split(":")[0]
    sol = solver.solve(
        X,
        y,
        Cs,
        n_classes=n_classes,
        options=options,
        sample_weight=weights,
        init=init,
        progress=progress,
        block=block or solver.default_block(len(Cs), device),
        dtype=_torch_dtype(X.dtype),
    )
    return sol, w_sum


@register
class TorchHead(LinearKind):
    """`--head torch`: an nn.Linear trained with cross-entropy + L2, every C of the grid at once."""

    name = "torch"
    may_stream = True
    packages = ("torch",)

    def solver(self, cfg: HeadConfig, streaming: bool) -> str:
        return SolverOptions.for_head(cfg, streaming).solver

    def fit_grid(
        self, cfg, X, y, n_classes, grid, tick=lambda n: None, init=None, sample_weight=None
    ) -> list[Fit]:
        from pipeline.devices import choose_device

        options = SolverOptions.for_head(
            cfg, streaming=False, device=str(choose_device(cfg.device))
        )
        sol, w_sum = solve_torch(
            X,
            y,
            grid,
            n_classes,
            options,
            cfg.class_weight,
            sample_weight,
            init=None if init is None else (init.coef[None], init.intercept[None]),
            progress=tick,
            block=cfg.sweep_block,
        )
        return Fit.from_solution(grid, sol, w_sum, cfg.tol)


@register
class LogRegHead(LinearKind):
    """`--head logreg`: scikit-learn's `LogisticRegression` (lbfgs, multinomial), one fit per C, in
    parallel under a joblib backend (`--jobs`, `--joblib-backend`)."""

    name = "logreg"

    def solver(self, cfg: HeadConfig, streaming: bool) -> str:
        return "lbfgs (scikit-learn)"

    def fit_grid(
        self, cfg, X, y, n_classes, grid, tick=lambda n: None, init=None, sample_weight=None
    ) -> list[Fit]:
        from joblib import Parallel, delayed

        class_weight = None if cfg.class_weight == "none" else cfg.class_weight
        _, w_sum = row_weights(y, class_weight, sample_weight)

        def one(C: float) -> Fit:
            from sklearn.exceptions import ConvergenceWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # recorded per C instead
                model = make_logreg(C, class_weight, cfg.max_iter, cfg.tol).fit(
                    X, y, sample_weight=sample_weight
                )
            n_iter = int(model.n_iter_.max())
            coef = model.coef_.T.copy()
            return Fit(
                C,
                coef,
                model.intercept_.copy(),
                n_iter,
                n_iter < cfg.max_iter,
                False,
                resolution(C, coef, w_sum),
                cfg.tol,
            )

        if len(grid) == 1:
            fits = [one(grid[0])]
            tick(1)
            return fits
        fits = []
        with joblib_backend(cfg.joblib_backend):
            for fit in Parallel(n_jobs=cfg.jobs or -1, return_as="generator")(
                delayed(one)(C) for C in grid
            ):
                fits.append(fit)
                tick(1)
        return fits


def make_logreg(
    C: float = 1.0, class_weight: Any = None, max_iter: int = 1000, tol: float = DEFAULTS.tol
) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(
        C=C, solver="lbfgs", class_weight=class_weight, max_iter=max_iter, tol=tol
    )


@contextmanager
def joblib_backend(name: str | None) -> Iterator[None]:
    """The joblib backend of the scikit-learn sweep; `dask` runs the fits on a dask.distributed
    cluster: the current client, else the scheduler at $DASK_SCHEDULER_ADDRESS, else a local
    cluster."""
    import joblib

    if name is None:
        yield
        return
    if name not in JOBLIB_BACKENDS:
        raise ConfigError(
            f"unknown joblib backend {name!r}; choose one of: {', '.join(JOBLIB_BACKENDS)}"
        )
    if name != "dask":
        with joblib.parallel_config(backend=name):
            yield
        return
    try:
        from dask.distributed import Client, get_client
    except ImportError:
        raise ConfigError(
            "--joblib-backend dask needs dask.distributed; pip install 'pipeline[dask]'"
        ) from None
    try:
        client, owned = get_client(), False
    except ValueError:  # no client yet: connect (or start a local cluster) for this sweep
        client, owned = Client(os.environ.get("DASK_SCHEDULER_ADDRESS")), True
    try:
        with joblib.parallel_config(backend="dask"):
            yield
    finally:
        if owned:
            client.close()


def constraints_of(options: type, rename: dict[str, str]) -> dict[str, list[Any]]:
    """scikit-learn parameter constraints from a config dataclass's declared options: a choice list,
    a boolean, a number within its `bounds` (None too where the default is None), or a string."""
    hints = typing.get_type_hints(options)
    out: dict[str, list[Any]] = {}
    for f in dataclasses.fields(options):
        kind = next(
            t
            for t in (bool, int, float, str)
            if t is hints[f.name] or t in typing.get_args(hints[f.name])
        )
        if f.metadata.get("choices"):
            rule: list[Any] = [StrOptions(set(f.metadata["choices"]))]
        elif kind is bool:
            rule = ["boolean"]
        elif f.metadata.get("bounds"):
            low, high, closed = f.metadata["bounds"]
            rule = [
                Interval(
                    Integral if kind is int else Real,
                    low,
                    None if high == float("inf") else high,
                    closed=closed,
                )
            ]
        else:
            rule = [kind]
        out[rename.get(f.name, f.name)] = rule + ([None] if f.default is None else [])
    return out


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return torch.float64 if dtype == np.float64 else torch.float32


class TorchLinearClassifier(LinearDecision, ClassifierMixin, BaseEstimator):
    """The torch head as a scikit-learn estimator: multinomial (binomial for two classes) logistic
    regression, through the same front door as `--head torch` (`solve_torch`).

    Parameters mirror `LogisticRegression` where they overlap (`C`, `tol`, `max_iter`,
    `class_weight`); the solver's own ones (`solver`, `epochs`, `batch_size`, `lr`,
    `label_smoothing`, `balanced_sampler`, `device`) are those of `SolverOptions`, with its
    defaults.
    """

    # Checked up front by `fit`, scikit-learn style (an error names the parameter and what it
    # accepts):
    # the solver's options from their one declaration in `SolverOptions`, and the estimator's own.
    _parameter_constraints: ClassVar[dict] = {
        **constraints_of(SolverOptions, rename={"seed": "random_state"}),
        "C": [Interval(Real, 0, None, closed="neither")],
        "class_weight": [dict, StrOptions({"balanced"}), None],
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

    def fit(
        self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> TorchLinearClassifier:
        from pipeline.devices import choose_device

        self._validate_params()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device)):
            raise ValueError(
                "The 'device' parameter of TorchLinearClassifier must be 'auto', 'cpu', 'cuda', "
                "'cuda:N' or 'mps'. "
                f"Got {self.device!r} instead."
            )
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                "needs samples of at least 2 classes, but the data has 1 class: "
                f"{self.classes_[0]!r}"
            )
        weights = (
            np.ones(len(y))
            if sample_weight is None
            else np.asarray(sample_weight, dtype=np.float64)
        )
        sol, _ = solve_torch(
            X,
            codes,
            [self.C],
            len(self.classes_),
            self.options(device=str(choose_device(self.device))),
            self.class_weight,
            weights,
        )
        self.coef_ = sol.coef[0].T.astype(
            X.dtype
        )  # (O, D) like scikit-learn: O = 1 for two classes
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
