"""The torch solver's options as the solver reads them (`SolverOptions`, declared once in
`pipeline.config`, where `HeadConfig` inherits them) and the one definition of the penalty scale."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.config import SolverOptions

DEFAULTS = SolverOptions()

__all__ = ["DEFAULTS", "SolverOptions", "penalties"]


def penalties(Cs: Sequence[float] | np.ndarray, weight_sum: float) -> np.ndarray:
    """lambda = 1 / (C * sum of row weights): scikit-learn's C on the solver's mean scale."""
    return 1.0 / (np.asarray(Cs, dtype=np.float64) * weight_sum)
