"""Linear heads with the scikit-learn estimator contract, preprocessing, and pickle-free saving.

- `TorchLinearClassifier`: nn.Linear-equivalent weights trained with cross-entropy + L2 by the
  batched torch solver (`pipeline.solver`); torch is imported only when it is fitted.
- `make_logreg`: scikit-learn's `LogisticRegression` (lbfgs, multinomial) configured alike.
- `Preprocessor`: standardise or L2-normalise rows; fitted on the training rows only.
- `LinearProbe`: a fitted head (preprocessing + weights) as plain arrays; what `save_head`
  writes and `load_head` returns. It predicts with numpy alone.

Both heads use scikit-learn's C: the objective is C * sum_i w_i loss_i + ||W||^2 / 2, which for a
mean cross-entropy is an L2 penalty lambda * ||W||^2 / 2 with lambda = 1 / (C * sum_i w_i).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.errors import CacheError, ConfigError, MissingError

HEADS = ("logreg", "torch")
PREPROCESSING = ("standardize", "l2", "none")
HEAD_SCHEMA = 1


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


def _proba_from_decision(decision: np.ndarray) -> np.ndarray:
    """float64 probabilities (rows sum to 1), from the float64 log-softmax."""
    return np.exp(log_proba_from_decision(decision))


class Preprocessor:
    """`standardize` (mean/std of the rows it is fitted on), `l2` (unit rows) or `none`."""

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
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.kind == "standardize":
            return (X - self.mean_) / self.scale_
        if self.kind == "l2":
            norms = np.linalg.norm(X, axis=1, keepdims=True)
            return X / np.where(norms > 0, norms, 1.0)
        return X

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)


def balanced_weights(y: np.ndarray, class_weight: Any) -> np.ndarray | None:
    """Per-row weights from `class_weight` (None, 'balanced' or {class: weight}), as scikit-learn does."""
    if class_weight is None or class_weight == "none":
        return None
    classes = np.unique(y)
    per_class = compute_class_weight(class_weight, classes=classes, y=y)
    return per_class[np.searchsorted(classes, y)]


class TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """Multinomial (binomial for two classes) logistic regression trained in torch.

    Parameters mirror `LogisticRegression` where they overlap (`C`, `tol`, `max_iter`,
    `class_weight`); `solver` is `lbfgs` (full batch), `adam` or `sgd` (mini-batch, cosine
    schedule, `epochs`, `batch_size`, `lr`); `label_smoothing`, `balanced_sampler` and `device`
    have no scikit-learn counterpart.
    """

    def __init__(
        self,
        C: float = 1.0,
        solver: str = "lbfgs",
        max_iter: int = 1000,
        tol: float = 1e-4,
        epochs: int = 30,
        batch_size: int = 512,
        lr: float | None = None,
        label_smoothing: float = 0.0,
        class_weight: Any = None,
        balanced_sampler: bool = False,
        device: str = "cpu",
        random_state: int = 0,
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

    def fit(self, X: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> TorchLinearClassifier:
        from pipeline import solver as torch_solver  # torch only when a torch head is trained

        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        if not np.isfinite(self.C) or self.C <= 0:
            raise ValueError(f"C must be a positive number, got {self.C!r}")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"needs samples of at least 2 classes, but the data has 1 class: {self.classes_[0]!r}")
        weights = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != (len(y),):
            raise ValueError(f"sample_weight has shape {weights.shape}; expected ({len(y)},), one weight per row")
        if not np.all(weights >= 0) or weights.sum() <= 0:
            raise ValueError("sample_weight must be non-negative and not all zero")
        per_class = balanced_weights(y, self.class_weight)
        if per_class is not None:
            weights = weights * per_class
        sol = torch_solver.solve(
            X,
            codes,
            [self.C],
            n_classes=len(self.classes_),
            sample_weight=weights,
            label_smoothing=self.label_smoothing,
            method=self.solver,
            max_iter=self.max_iter,
            tol=self.tol,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.random_state,
            balanced_sampler=self.balanced_sampler,
            device=self.device,
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

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _proba_from_decision(self.decision_function(X))

    def predict_log_proba(self, X: np.ndarray) -> np.ndarray:
        return log_proba_from_decision(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        decision = self.decision_function(X)
        index = (decision > 0).astype(int) if decision.ndim == 1 else decision.argmax(axis=1)
        return self.classes_[index]


def _torch_dtype(dtype: np.dtype) -> Any:
    import torch

    return torch.float64 if dtype == np.float64 else torch.float32


def make_logreg(C: float = 1.0, class_weight: Any = None, max_iter: int = 1000, tol: float = 1e-4) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, solver="lbfgs", class_weight=class_weight, max_iter=max_iter, tol=tol)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """A fitted head as arrays: preprocessing, then ``X @ coef_.T + intercept_``. Numpy only."""

    def __init__(self, preprocessor: Preprocessor, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray):
        self.preprocessor = preprocessor
        self.coef_ = np.asarray(coef, dtype=np.float32)
        self.intercept_ = np.asarray(intercept, dtype=np.float32)
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = self.coef_.shape[1]
        self.meta: dict[str, Any] = {}

    @classmethod
    def from_estimator(cls, preprocessor: Preprocessor, estimator: Any) -> LinearProbe:
        return cls(preprocessor, estimator.coef_, estimator.intercept_, estimator.classes_)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = self.preprocessor.transform(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[-1]} features, but this head expects {self.n_features_in_}")
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return _proba_from_decision(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        decision = self.decision_function(X)
        index = (decision > 0).astype(int) if decision.ndim == 1 else decision.argmax(axis=1)
        return self.classes_[index]


def save_head(probe: LinearProbe, folder: str | Path, meta: dict[str, Any]) -> Path:
    """``head.npz`` (arrays, no pickle) and ``head.json`` (classes, preprocessing, cache fingerprint);
    both carry ``meta["run_id"]`` so a folder mixing two runs is refused on load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"coef": probe.coef_, "intercept": probe.intercept_, "run_id": np.array(str(meta.get("run_id", "")))}
    if probe.preprocessor.kind == "standardize":
        arrays.update(mean=probe.preprocessor.mean_, scale=probe.preprocessor.scale_)
    np.savez(folder / "head.npz", **arrays)
    document = {
        "schema": HEAD_SCHEMA,
        "classes": [str(c) for c in probe.classes_],
        "preprocessing": probe.preprocessor.kind,
        "n_features": probe.n_features_in_,
        **meta,
    }
    (folder / "head.json").write_text(json.dumps(document, indent=2))
    return folder


def _bad_head(folder: Path, what: str) -> CacheError:
    return CacheError(f"head {folder} is malformed: {what}; retrain it with `pipeline head`")


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise _bad_head(folder, f"{path.name} is not JSON") from None
    if not isinstance(document, dict):
        raise _bad_head(folder, f"{path.name} holds a {type(document).__name__}, expected an object")
    return document


def _head_arrays(arrays_path: Path, folder: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of head.npz, each checked for presence, numeric dtype and the shape head.json implies."""
    dim, n_classes = meta["n_features"], len(meta["classes"])
    outputs = 1 if n_classes == 2 else n_classes
    shapes = {"coef": (outputs, dim), "intercept": (outputs,)}
    if meta["preprocessing"] == "standardize":
        shapes.update(mean=(dim,), scale=(dim,))
    try:
        with np.load(arrays_path, allow_pickle=False) as archive:
            found = {name: archive[name] for name in archive.files}
    except ValueError:
        raise _bad_head(
            folder, "head.npz holds pickled data (or is no .npz archive); nothing pickled is loaded"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError):
        raise _bad_head(folder, "head.npz is not a readable .npz archive") from None
    for name, shape in shapes.items():
        if name not in found:
            raise _bad_head(folder, f"head.npz has no array {name!r}")
        if found[name].dtype.kind not in "fiu" or found[name].shape != shape:
            raise _bad_head(folder, f"{name} is {found[name].shape} {found[name].dtype}, expected {shape} floats")
    return found


def load_head(path: str | Path) -> LinearProbe:
    """A saved head (its folder, or its head.json / head.npz) as a working estimator. Everything the
    files claim is checked: JSON, keys, array shapes, and that head.json, head.npz and result.json
    come from one run. Nothing is unpickled, so a head folder from anyone is safe to load."""
    path = Path(path)
    folder = path.parent if path.name in ("head.json", "head.npz") else path
    meta_path, arrays_path = folder / "head.json", folder / "head.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise MissingError(f"no saved head in {folder} (expected head.json and head.npz); run `pipeline head` first")
    meta = _read_json(meta_path, folder)
    if meta.get("schema") != HEAD_SCHEMA:
        raise CacheError(
            f"head {folder} has schema {meta.get('schema')!r}, this pipeline reads {HEAD_SCHEMA}; retrain it with "
            "`pipeline head`"
        )
    missing = [k for k in ("classes", "preprocessing", "n_features") if k not in meta]
    if missing:
        raise _bad_head(folder, f"head.json lacks {', '.join(missing)}")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise _bad_head(folder, "classes in head.json must be a list of at least two names")
    if meta["preprocessing"] not in PREPROCESSING or not isinstance(meta["n_features"], int) or meta["n_features"] < 1:
        raise _bad_head(folder, "preprocessing or n_features in head.json has an unexpected value")
    arrays = _head_arrays(arrays_path, folder, meta)
    run_ids = {"head.json": meta.get("run_id") or None, "head.npz": str(arrays.get("run_id", "")) or None}
    if (folder / "result.json").is_file():
        run_ids["result.json"] = _read_json(folder / "result.json", folder).get("run_id") or None
    if len(set(run_ids.values())) > 1:
        raise _bad_head(folder, f"its files come from different runs ({run_ids})")
    preprocessor = Preprocessor(meta["preprocessing"])
    if preprocessor.kind == "standardize":
        preprocessor.mean_, preprocessor.scale_ = arrays["mean"], arrays["scale"]
    probe = LinearProbe(preprocessor, arrays["coef"], arrays["intercept"], np.array(classes))
    probe.meta = meta
    return probe
