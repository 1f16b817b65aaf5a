"""The torch solver's options, declared once: `SolverOptions` carries them from the config (or the
estimator's parameters) to the solver, with the one definition of the penalty scale."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class SolverOptions:
    """How the torch head optimises. `tol` is on the mean scale (see `pipeline.heads.solver`)."""

    solver: str = "lbfgs"  # lbfgs (full batch) | adam | sgd (mini-batch, cosine schedule)
    max_iter: int = 1000  # L-BFGS iterations at most
    # Stop when max |gradient| <= tol. Tighter than scikit-learn's 1e-4: at 1e-4 both heads stop on
    # the flat, weakly regularised part of the curve wherever their start leaves them, and which C is
    # chosen can follow (README, "Choosing C"); at 1e-6 the heads choose the same C.
    tol: float = 1e-6
    epochs: int = 30  # mini-batch: passes over the data
    batch_size: int = 512  # mini-batch: rows per step
    lr: float | None = None  # mini-batch: peak learning rate (default 1e-3 adam, 0.1 sgd)
    label_smoothing: float = 0.0
    balanced_sampler: bool = False  # mini-batch: draw every class equally often
    device: str = "cpu"
    seed: int = 0  # mini-batch order

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> SolverOptions:
        """The options of any object with these attribute names (a `HeadConfig`), plus `overrides`."""
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)}
        return cls(**(values | overrides))

    @classmethod
    def for_head(cls, config: Any, streaming: bool, **overrides: Any) -> SolverOptions:
        """The options of a `HeadConfig`, its solver resolved: `auto` is L-BFGS with every row in memory
        and Adam when the rows stream from the file (L-BFGS needs full passes)."""
        solver = config.solver if config.solver != "auto" else ("adam" if streaming else "lbfgs")
        return cls.from_config(config, **({"solver": solver} | overrides))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.solver == "adam" else 0.1)


DEFAULTS = SolverOptions()


def penalties(Cs: Sequence[float] | np.ndarray, weight_sum: float) -> np.ndarray:
    """lambda = 1 / (C * sum of row weights): scikit-learn's C on the solver's mean scale."""
    return 1.0 / (np.asarray(Cs, dtype=np.float64) * weight_sum)
