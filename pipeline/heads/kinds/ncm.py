"""`--head ncm`: the nearest class mean (prototype) classifier by cosine, the few-shot baseline, and
`NearestClassMean`, the same with the scikit-learn estimator contract.

Its logits cos(x, m_c) / T, with m_c the unit mean of class c's unit rows, are linear in the
normalised x, so once trained it is stored, predicted and exported as a linear head. It has nothing
to choose: its one "setting" is its temperature T, and its fit is exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.heads.estimators import CosineHead, LinearDecision
from pipeline.heads.kinds.linear import LinearStorage
from pipeline.heads.kinds.registry import check_temperature, register
from pipeline.heads.runs import Fit
from pipeline.registry import COSINE_PREPROCESSING

if TYPE_CHECKING:
    from pipeline.config import HeadConfig


def class_means(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    temperature: float,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(D, O) weights and (O,) intercept of cos(x, m_c) / T for unit rows x: the unit (weighted)
    mean of each class over T; two classes as one logit (the difference), like the linear heads."""
    sums = np.zeros((n_classes, X.shape[1]))
    rows = (
        X.astype(np.float64)
        if sample_weight is None
        else X.astype(np.float64) * sample_weight[:, None]
    )
    np.add.at(sums, y, rows)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = sums / np.where(norms > 0, norms, 1.0)
    coef = means.T / temperature
    if n_classes == 2:
        coef = coef[:, 1:] - coef[:, :1]
    return coef.astype(np.float32), np.zeros(coef.shape[1], dtype=np.float32)


@register
class NearestClassMeanHead(LinearStorage):
    """The ncm kind: class means of the training rows (weighed by `--views`), exact."""

    name = "ncm"
    setting = "temperature"
    preprocessings = COSINE_PREPROCESSING
    default_preprocessing = "l2"

    def check(self, cfg: HeadConfig) -> None:
        super().check(cfg)
        if cfg.grid:
            raise ConfigError(
                "--grid is not used by the ncm head, which has nothing to choose (drop --grid)"
            )
        check_temperature(cfg)

    def grid(self, cfg: HeadConfig) -> list[float]:
        return [cfg.temperature]

    def solver(self, cfg: HeadConfig, streaming: bool) -> str:
        return "exact (class means)"

    def fit_grid(
        self, cfg, X, y, n_classes, grid, tick=lambda n: None, init=None, sample_weight=None
    ) -> list[Fit]:
        tick(len(grid))
        coef, intercept = class_means(X, y, n_classes, cfg.temperature, sample_weight)
        return [Fit(cfg.temperature, coef, intercept, 0, True, exact=True, param="temperature")]


class NearestClassMean(LinearDecision, CosineHead):
    """Nearest class mean by cosine: logits cos(x, m_c) / `temperature` on `preprocess`ed rows."""

    def __init__(self, temperature: float = 0.07, preprocess: str = "l2") -> None:
        self.temperature = temperature
        self.preprocess = preprocess

    def fit(self, X: Any, y: Any) -> NearestClassMean:
        Z, codes = self._prepare(X, y)
        if len(self.classes_) < 2:
            raise ValueError(
                "needs samples of at least 2 classes, but the data has 1 class: "
                f"{self.classes_[0]!r}"
            )
        coef, intercept = class_means(Z, codes, len(self.classes_), self.temperature)
        self.coef_, self.intercept_ = coef.T.astype(Z.dtype), intercept.astype(Z.dtype)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        scores = self._transform(X) @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores
