"""`--head knn`: weighted k-nearest neighbours by cosine (DINO's kNN), and `CosineKNN`, the same
with the scikit-learn estimator contract.

The k most similar rows of a bank (train; train+val after the refit) vote with weights exp(s / T).
One neighbour search, in blocks of queries within a memory budget, serves every k of the grid
(`log_proba_grid`). Votes become probabilities as p = (1 - e) v / sum(v) + e / K with e = 1 / (k +
1): as if one more neighbour of unknown class had voted uniformly, so a class no neighbour voted for
keeps a finite log-loss. The argmax is the vote's. k is chosen on val like C; the strongest
regularisation is the largest k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.heads import posthoc
from pipeline.heads.estimators import CosineHead, Preprocessor, is_real
from pipeline.heads.kinds.registry import HeadKind, check_temperature, register
from pipeline.heads.posthoc import Adjustment
from pipeline.registry import COSINE_PREPROCESSING, DEFAULT_K_GRID

if TYPE_CHECKING:
    from pipeline.config import HeadConfig
    from pipeline.heads.trained import TrainedHead

DEFAULT_BUDGET = 256 * 2**20  # bytes of similarities per block of queries


def top_neighbours(
    Q: np.ndarray, bank: np.ndarray, k: int, budget: int = DEFAULT_BUDGET
) -> tuple[np.ndarray, np.ndarray]:
    """Similarities (n, k) in descending order and bank rows (n, k) of each query's k most similar
    rows.

    Q @ bank.T is formed for blocks of queries, at most `budget` bytes of float32 at a time, in the
    bank's dtype; torch does the products and the top-k when installed, numpy otherwise."""
    k = min(k, len(bank))
    step = max(1, budget // (4 * max(len(bank), 1)))
    sims, rows = np.empty((len(Q), k), bank.dtype), np.empty((len(Q), k), np.int64)
    try:
        import torch
    except ImportError:
        torch = None
    for a in range(0, len(Q), step):
        block = np.ascontiguousarray(Q[a : a + step], dtype=bank.dtype)
        if torch is not None:
            s, r = torch.topk(torch.from_numpy(block) @ torch.from_numpy(bank).T, k, dim=1)
            sims[a : a + step], rows[a : a + step] = s.numpy(), r.numpy()
            continue
        S = block @ bank.T
        part = (
            np.argpartition(-S, k - 1, axis=1)[:, :k]
            if k < S.shape[1]
            else np.broadcast_to(np.arange(k), S.shape)
        )
        order = np.take_along_axis(-S, part, axis=1).argsort(axis=1, kind="stable")
        rows[a : a + step] = np.take_along_axis(part, order, axis=1)
        sims[a : a + step] = np.take_along_axis(S, rows[a : a + step], axis=1)
    return sims, rows


def vote_log_proba(
    sims: np.ndarray, labels: np.ndarray, k: int, n_classes: int, temperature: float
) -> np.ndarray:
    """float64 log-probabilities (n, K) from the first k neighbours' similarities and labels."""
    n, k = len(sims), min(k, sims.shape[1])
    s = sims[:, :k].astype(np.float64)
    weights = np.exp(
        (s - s[:, :1]) / temperature
    )  # exp(s / T) over its row's largest: no underflow to 0
    flat = (np.arange(n)[:, None] * n_classes + labels[:, :k]).ravel()
    votes = np.bincount(flat, weights=weights.ravel(), minlength=n * n_classes).reshape(
        n, n_classes
    )
    total = votes.sum(axis=1, keepdims=True)
    share = votes / np.where(total > 0, total, 1.0)
    share[total[:, 0] == 0] = 1.0 / n_classes  # no neighbour at all (an empty bank)
    smoothing = 1.0 / (k + 1)
    return np.log((1 - smoothing) * share + smoothing / n_classes)


@dataclass
class KNNFit:
    """The protocol's kNN fit at one k: a reference to the bank (shared by the grid, not copied)."""

    value: int
    bank: np.ndarray  # (N, D) float32 unit rows
    labels: np.ndarray  # (N,) encoded classes
    n_classes: int
    temperature: float
    budget: int = DEFAULT_BUDGET
    param = "k"
    n_iter = 0
    converged = True
    status = "exact"

    def log_proba(self, X: np.ndarray) -> np.ndarray:
        return log_proba_grid([self], X)[0]


def log_proba_grid(fits: list[KNNFit], X: np.ndarray) -> list[np.ndarray]:
    """Every fit's log-probabilities on X from one search (the fits share their bank)."""
    first = fits[0]
    sims, rows = top_neighbours(X, first.bank, max(f.value for f in fits), first.budget)
    labels = first.labels[rows]
    return [vote_log_proba(sims, labels, f.value, f.n_classes, f.temperature) for f in fits]


@register
class KNNHead(HeadKind):
    """The knn kind: a bank of unit rows, k chosen on val, votes weighed by exp(cosine / T)."""

    name = "knn"
    setting = "k"
    model = "knn"
    preprocessings = COSINE_PREPROCESSING
    default_preprocessing = "l2"
    setting_keys = ("k", "temperature", "calibration_temperature")

    def check(self, cfg: HeadConfig) -> None:
        super().check(cfg)
        for k in cfg.grid or ():
            if not (k >= 1 and float(k).is_integer()):
                raise ConfigError(
                    f"k value {k} is not allowed; the knn head's --grid takes whole numbers of "
                    "neighbours >= 1"
                )
        check_temperature(cfg)

    def grid(self, cfg: HeadConfig) -> list[float]:
        return sorted({int(k) for k in cfg.grid or DEFAULT_K_GRID}, reverse=True)

    def prepare_grid(
        self, grid: list[float], train_rows: int, report: Callable[[str], None]
    ) -> list[float]:
        """k values above the sweep's bank (its training rows) all mean "every row": one setting,
        the bank size, so the k that is chosen is the k that was scored on val (and the refit's
        bigger bank keeps it)."""
        capped = sorted({min(int(k), train_rows) for k in grid}, reverse=True)
        if capped != grid:
            report(
                f"note: k above the {train_rows} training rows means all of them; k grid "
                f"{' '.join(map(str, capped))}"
            )
        return capped

    def solver(self, cfg: HeadConfig, streaming: bool) -> str:
        return "exact (neighbour search)"

    def fit_grid(
        self, cfg, X, y, n_classes, grid, tick=lambda n: None, init=None, sample_weight=None
    ) -> list[KNNFit]:
        """One `KNNFit` per k, all on the same bank; every row of the bank votes alike (its --views
        too)."""
        tick(len(grid))
        bank = np.ascontiguousarray(X, dtype=np.float32)
        budget = cfg.max_memory_bytes or DEFAULT_BUDGET
        return [KNNFit(int(k), bank, y, n_classes, cfg.temperature, budget) for k in grid]

    def log_proba_all(self, fits: list[KNNFit], X: np.ndarray) -> list[np.ndarray]:
        return log_proba_grid(fits, X)

    # ------------------------------------------------------------------ the trained head

    def trained(
        self, fit: KNNFit, prep: Preprocessor, classes: np.ndarray, adjustment: Adjustment
    ) -> TrainedHead:
        from pipeline.heads.trained import TrainedHead

        arrays = {"bank": fit.bank, "bank_labels": np.asarray(fit.labels, np.int64)}
        if adjustment.offsets is not None:
            arrays["offsets"] = np.asarray(adjustment.offsets, dtype=np.float64)
        settings = {
            "k": int(fit.value),
            "temperature": float(fit.temperature),
            "calibration_temperature": float(adjustment.temperature),
        }
        return TrainedHead(self, prep, classes, arrays, settings)

    def array_shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
        return {"bank": (None, meta["n_features"]), "bank_labels": (None,)}

    def optional_shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
        return {"offsets": (len(meta["classes"]),)}  # the logit adjustment, when one was fitted

    def n_features(self, arrays: dict[str, np.ndarray]) -> int:
        return int(arrays["bank"].shape[1])

    def check_saved(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
        from pipeline.heads.trained import is_number

        n_classes = len(meta["classes"])
        settings = [meta.get("temperature"), meta.get("calibration_temperature", 1.0)]
        if not (
            is_number(meta.get("k"), integer=True)
            and meta["k"] >= 1
            and all(is_number(t) and t > 0 for t in settings)
        ):
            return (
                "a knn head needs k (a whole number >= 1), temperature and calibration_temperature "
                "(> 0) in head.json"
            )
        norms = np.linalg.norm(arrays["bank"].astype(np.float64), axis=1)
        if len(norms) == 0 or not np.all((np.abs(norms - 1) < 1e-3) | (norms == 0)):
            return "its bank must hold at least one row, each of unit length (L2-normalised)"
        if meta["k"] > len(norms):
            return f"k = {meta['k']} exceeds its bank of {len(norms)} rows"
        labels = arrays["bank_labels"]
        if (
            len(labels) != len(norms)
            or labels.dtype.kind not in "iu"
            or not np.all((labels >= 0) & (labels < n_classes))
        ):
            return f"bank_labels must be one class index in 0..{n_classes - 1} per bank row"
        return None

    def log_proba(self, head: TrainedHead, Z: np.ndarray) -> np.ndarray:
        bank = np.asarray(head.arrays["bank"], dtype=np.float32)
        fit = KNNFit(
            int(head.settings["k"]),
            bank,
            np.asarray(head.arrays["bank_labels"], np.int64),
            len(head.classes_),
            float(head.settings["temperature"]),
        )
        log_proba = fit.log_proba(Z.astype(np.float32, copy=False))
        calibration, offsets = (
            float(head.settings.get("calibration_temperature", 1.0)),
            head.arrays.get("offsets"),
        )
        if calibration == 1.0 and offsets is None:
            return log_proba
        return posthoc.apply(
            log_proba, calibration, 0.0 if offsets is None else np.asarray(offsets, np.float64)
        )

    def module(self, head: TrainedHead) -> Any:
        import torch
        from torch import nn

        n_classes = len(head.classes_)
        bank = np.ascontiguousarray(head.arrays["bank"], dtype=np.float32)
        offsets = head.arrays.get("offsets")

        class Votes(nn.Module):
            """`vote_log_proba` in torch: the bank's classes one-hot, so the votes are a product, no
            scatter."""

            def __init__(self) -> None:
                super().__init__()
                self.k = min(int(head.settings["k"]), len(bank))
                self.temperature = float(head.settings["temperature"])
                self.calibration = float(head.settings.get("calibration_temperature", 1.0))
                onehot = np.eye(n_classes, dtype=np.float32)[
                    np.asarray(head.arrays["bank_labels"], np.int64)
                ]
                shift = (
                    np.zeros(n_classes, np.float32)
                    if offsets is None
                    else np.asarray(offsets, np.float32)
                )
                for name, array in (("bank", bank), ("bank_onehot", onehot), ("offsets", shift)):
                    self.register_buffer(name, torch.tensor(np.ascontiguousarray(array)))

            def forward(self, z: torch.Tensor) -> torch.Tensor:
                sims, rows = torch.topk(z @ self.bank.T, self.k, dim=1)  # (B, k)
                weights = torch.exp(
                    (sims - sims[:, :1]) / self.temperature
                )  # over the row's largest: no underflow
                votes = torch.einsum("bk,bkc->bc", weights, self.bank_onehot[rows])
                share = votes / votes.sum(dim=1, keepdim=True).clamp_min(1e-30)
                smoothing = 1.0 / (self.k + 1)
                proba = (1 - smoothing) * share + smoothing / self.bank_onehot.shape[1]
                # The post-hoc adjustment: logit adjustment offsets, then the temperature.
                return torch.softmax((torch.log(proba) + self.offsets) / self.calibration, dim=1)

        return Votes()


class CosineKNN(CosineHead):
    """Weighted kNN by cosine: the `n_neighbors` most similar training rows vote with exp(s /
    `temperature`).

    `max_memory` bounds the similarities held at once (bytes), by answering the queries in blocks;
    `offsets` (per class, or None) are added to the votes' log-probabilities and `calibration`
    divides them before a softmax (`pipeline.heads.posthoc`: logit adjustment, temperature)."""

    def __init__(
        self,
        n_neighbors: int = 20,
        temperature: float = 0.07,
        preprocess: str = "l2",
        max_memory: int = DEFAULT_BUDGET,
        calibration: float = 1.0,
        offsets: np.ndarray | None = None,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.preprocess = preprocess
        self.max_memory = max_memory
        self.calibration = calibration
        self.offsets = offsets

    def fit(self, X: Any, y: Any) -> CosineKNN:
        if isinstance(self.n_neighbors, bool) or not (
            isinstance(self.n_neighbors, Integral) and self.n_neighbors >= 1
        ):
            raise ValueError(f"n_neighbors must be a positive integer, got {self.n_neighbors!r}")
        if not (is_real(self.calibration) and 0 < self.calibration < np.inf):
            raise ValueError(
                f"calibration must be a positive temperature, got {self.calibration!r}"
            )
        Z, codes = self._prepare(X, y)
        self.bank_, self.bank_labels_ = np.ascontiguousarray(Z), codes.astype(np.int64)
        return self

    def predict_log_proba(self, X: Any) -> np.ndarray:
        Z = self._transform(X)
        fit = KNNFit(
            int(self.n_neighbors),
            self.bank_,
            self.bank_labels_,
            len(self.classes_),
            self.temperature,
            int(self.max_memory),
        )
        log_proba = fit.log_proba(Z)
        if self.calibration == 1.0 and self.offsets is None:
            return log_proba
        offsets = 0.0 if self.offsets is None else np.asarray(self.offsets, dtype=np.float64)
        return posthoc.apply(log_proba, self.calibration, offsets)

    def kneighbors_rows(self, X: Any) -> np.ndarray:
        """(n, k) bank rows of each query's k most similar rows, most similar first."""
        return top_neighbours(
            self._transform(X), self.bank_, int(self.n_neighbors), int(self.max_memory)
        )[1]

    def predict(self, X: Any) -> np.ndarray:
        index = self.predict_log_proba(X).argmax(axis=1)
        return self.classes_[index]
