"""`pipeline rank`: which backbone (and layer) suits these labels, scored from the cache in seconds,
without training a head. Every score is read from the **train rows only** (never val or test) and
is higher for features expected to transfer better.

- ``logme``: LogME (You et al., ICML 2021), the log maximum evidence of a Bayesian linear model
  from the features to each class's one-hot column, per row, averaged over the classes. The prior
  and noise precisions are found by MacKay's fixed point, iterated to convergence, through one
  eigendecomposition of the features' Gram matrix X'X (the squared singular values of X).
- ``hscore``: the H-score (Bao et al., 2019) with the shrinkage covariance of Ibrahim et al. (2022):
  tr(cov_a(f)^-1 (1 - a) cov(E[f | y])), cov_a the Ledoit-Wolf estimate with shrinkage a, both
  covariances over n (not n - 1).
- ``leep`` and ``nce``: from the backbone's own logits on the target images (`features --logits`):
  LEEP (Nguyen et al., ICML 2020), the mean log-likelihood of the empirical predictor that maps the
  source model's softmax through P(y | z); NCE (Tran et al., 2019), -H(Y | Z) with Z the source
  model's argmax.
- ``ncm_loo`` and ``knn_loo``: the leave-one-out top-1 of the nearest class mean by cosine (the
  ncm head) and of DINO's weighted kNN (k = 20, T = 0.07; up to 2,000 seeded query rows, each
  against every other train row): what a user would otherwise compute by hand.

The functions on arrays (`logme`, `hscore`, `leep`, `nce`, `ncm_loo`, `knn_loo`) take scikit-learn's
conventions: X of shape (n_samples, n_features), y any labels. `score_cache` computes them all on a
cache in two passes over blocks of its train rows, memory bounded by the feature dimension (a D x D
Gram matrix and per-class sums), never by the number of rows. Everything is float64.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.errors import ConfigError, DataError
from pipeline.registry import FEATURE_SCORES, TRANSFER_SCORES  # noqa: F401 (part of the API)

SCORES = TRANSFER_SCORES
KNN_K, KNN_TEMPERATURE, KNN_QUERIES = 20, 0.07, 2000
BLOCK_BYTES = 64 * 2**20  # float64 bytes of one block of rows
MAX_ITERATIONS, TOLERANCE = 1000, 1e-12  # LogME's fixed point
FIT_FLOOR, TINY, HUGE = 1e-12, np.finfo(float).tiny, 1e150
MATRICES = 3  # D x D float64 matrices held at once: the Gram matrix, its eigenvectors, a copy


def _labels(y: Any, n: int) -> tuple[np.ndarray, int]:
    """Class codes 0..C-1 of any labels (as scikit-learn encodes them) and the count C >= 2."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"y has shape {y.shape}; expected ({n},), one label per row of X")
    classes, codes = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"y holds {len(classes)} class; a score needs at least two classes")
    return codes.astype(np.int64), len(classes)


def _rows(X: Any, name: str = "X") -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1:
        raise DataError(f"{name} has shape {X.shape}; expected (n_samples >= 2, n_features)")
    if not np.isfinite(X).all():
        raise DataError(f"{name} holds NaN or infinite values; scores need finite features")
    return X


def _one_hot(codes: np.ndarray, n_classes: int) -> np.ndarray:
    members = np.zeros((n_classes, len(codes)))
    members[codes, np.arange(len(codes))] = 1.0
    return members


def _unit(X: np.ndarray) -> np.ndarray:
    """Each row over its length (a zero row stays zero), for rows of any magnitude: each is first
    divided by its largest entry, so squaring neither overflows nor underflows."""
    peak = np.abs(X).max(axis=1, keepdims=True)
    X = X / np.where(peak > 0, peak, 1.0)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))[:, None]
    return X / np.where(norms > 0, norms, 1.0)


class FeatureMoments:
    """What LogME, the H-score and LOO-NCM need from the rows, gathered block by block: counts,
    sums, the Gram matrix and fourth-moment terms about a shift K (the first block's mean, so that
    centring later cancels little), and per-class sums of the rows and of their unit vectors."""

    def __init__(self, dim: int, n_classes: int) -> None:
        self.n, self.dim, self.n_classes = 0, dim, n_classes
        self.shift: np.ndarray | None = None
        self.scale = 1.0
        self.counts = np.zeros(n_classes, np.int64)
        self.sum = np.zeros(dim)  # sum of (x - K)
        self.gram = np.zeros((dim, dim))  # sum of (x - K)(x - K)'
        self.sq_weighted = np.zeros(dim)  # sum of |x - K|^2 (x - K)
        self.fourth = 0.0  # sum of |x - K|^4
        self.class_sums = np.zeros((n_classes, dim))  # per class, sum of (x - K)
        self.unit_sums = np.zeros((n_classes, dim))  # per class, sum of x / |x|

    def add(self, X: np.ndarray, U: np.ndarray, codes: np.ndarray) -> None:
        """Rows X, their unit vectors U and their class codes. The rows are multiplied by a power
        of two (exact) set by the first block, so that features of any magnitude square without
        overflow or underflow; every score is unchanged by a rescaling of the features."""
        if self.shift is None:
            peak = float(np.abs(X).max())
            self.scale = 2.0 ** -math.floor(math.log2(peak)) if peak > 0 else 1.0
            self.shift = X.mean(axis=0) * self.scale
        X = X * self.scale
        Z = X - self.shift
        sq = np.einsum("ij,ij->i", Z, Z)
        self.n += len(Z)
        self.counts += np.bincount(codes, minlength=self.n_classes)
        self.sum += Z.sum(axis=0)
        self.gram += Z.T @ Z
        self.sq_weighted += sq @ Z
        self.fourth += float(sq @ sq)
        members = _one_hot(codes, self.n_classes)  # (C, n): one product instead of a scatter
        self.class_sums += members @ Z
        self.unit_sums += members @ U

    def raw_gram(self) -> np.ndarray:
        """X'X of the rows themselves (LogME models the features as they are, not centred)."""
        K, s = self.shift, self.sum
        return self.gram + np.outer(K, s) + np.outer(s, K) + self.n * np.outer(K, K)

    def logme(self) -> float:
        present = self.counts > 0
        K = self.shift
        targets = (self.class_sums + self.counts[:, None] * K)[present].T  # X'y per class (D, C)
        sigma, V = np.linalg.eigh(self.raw_gram())
        return logme_from_spectrum(
            np.clip(sigma, 0.0, None), V.T @ targets, self.counts[present].astype(float), self.n
        )

    def hscore(self) -> float:
        n, D = self.n, self.dim
        d = self.sum / n  # the mean, less the shift
        cov = self.gram / n - np.outer(d, d)
        # sum over rows of |x - mean|^4, from the moments about the shift (see module notes)
        c = float(d @ d)
        fourth = (
            self.fourth
            - 4 * float(self.sq_weighted @ d)
            + 4 * float(d @ self.gram @ d)
            + 2 * c * float(np.trace(self.gram))
            - 4 * c * n * c
            + n * c * c
        )
        shrinkage, mu = ledoit_wolf_shrinkage(cov, fourth, n)
        shrunk = (1 - shrinkage) * cov
        shrunk.flat[:: D + 1] += shrinkage * mu
        present = self.counts > 0
        means = self.class_sums[present] / self.counts[present, None] - d  # class mean - mean
        weights = self.counts[present] / n
        solved = _solve_psd(shrunk, means.T, shrinkage > 0)  # (D, C): cov_a^-1 (mean_c - mean)
        return (1 - shrinkage) * float(np.einsum("c,dc,cd->", weights, solved, means))


def ledoit_wolf_shrinkage(cov: np.ndarray, fourth: float, n: int) -> tuple[float, float]:
    """Ledoit and Wolf's (2004) shrinkage towards mu I, mu = tr(cov) / D, of the covariance `cov`
    (over n) of n rows whose centred squared norms have the sum of squares `fourth`."""
    D = cov.shape[0]
    mu = float(np.trace(cov)) / D
    frobenius = float(np.sum(cov * cov))
    beta = (fourth / n - frobenius) / (D * n)
    delta = (frobenius - 2 * mu * float(np.trace(cov)) + D * mu * mu) / D
    beta = min(beta, delta)
    return (0.0 if beta <= 0 or delta <= 0 else beta / delta), mu


def _solve_psd(S: np.ndarray, B: np.ndarray, definite: bool) -> np.ndarray:
    """S^+ B for a symmetric positive semi-definite S: by Cholesky when S is `definite` (any
    shrinkage makes it so), else through its pseudo-inverse."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    if definite:
        with contextlib.suppress(LinAlgError):  # definite in theory, not to rounding
            return cho_solve(cho_factor(S), B)
    w, V = np.linalg.eigh(S)
    keep = w > max(w.max(), 0.0) * S.shape[0] * np.finfo(float).eps
    return (V[:, keep] / w[keep]) @ (V[:, keep].T @ B)


def logme_from_spectrum(sigma: np.ndarray, z: np.ndarray, yy: np.ndarray, n: int) -> float:
    """LogME from the eigenvalues `sigma` (D,) of X'X, the targets' coordinates z = V'X'y (D, C)
    in its eigenvectors and the targets' squared norms `yy` (C,): per class, alpha and beta by the
    fixed point of MacKay's evidence approximation, then the log evidence over n; their mean.

    With t = alpha / beta: the posterior mean m has |m|^2 = sum z^2 / (sigma + t)^2, the residual
    |y - Xm|^2 = |y|^2 - sum z^2 (sigma + 2t) / (sigma + t)^2 and gamma = sum sigma / (sigma + t);
    then alpha = gamma / |m|^2 and beta = (n - gamma) / |y - Xm|^2. Features that fit a class
    exactly (fewer rows than dimensions, or identical rows per class) would drive beta to
    infinity: the residual is taken as at least 1e-12 |y|^2, so such features score high and
    finite. Features with no signal drive t to infinity, where the evidence tends to that of the
    model without features; t stops at 1e150, where it has reached it."""
    D = len(sigma)
    s, z2 = sigma[:, None], z * z

    def posterior(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mm = np.sum(z2 / (s + t) ** 2, axis=0)
        residual = np.maximum(yy - np.sum(z2 * (s + 2 * t) / (s + t) ** 2, axis=0), FIT_FLOOR * yy)
        return mm, residual, np.sum(s / (s + t), axis=0)

    alpha, beta = np.ones(z.shape[1]), np.ones(z.shape[1])
    t = alpha / beta
    for _ in range(MAX_ITERATIONS):
        mm, residual, gamma = posterior(t)
        alpha = np.maximum(gamma, TINY) / np.maximum(mm, TINY)
        beta = np.maximum(n - gamma, TINY) / residual
        t, before = np.clip(alpha / beta, TINY, HUGE), t
        if np.all(np.abs(t - before) <= TOLERANCE * before):
            break
    mm, residual, _ = posterior(t)
    evidence = (
        D / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * mm
        - 0.5 * np.sum(np.log(alpha + beta * s), axis=0)
    )
    return float(np.mean(evidence / n))


class NearestMeanLOO:
    """Leave-one-out top-1 of the nearest unit class mean by cosine, given each class's sum of unit
    rows and count: a row's own class mean is taken without it; a class whose only row it is cannot
    be chosen for it."""

    def __init__(self, unit_sums: np.ndarray, counts: np.ndarray) -> None:
        self.sums, self.counts = unit_sums, counts
        self.squares = np.sum(unit_sums**2, axis=1)  # |S_c|^2
        self.norms = np.sqrt(self.squares)
        self.right = self.seen = 0

    def add(self, U: np.ndarray, codes: np.ndarray) -> None:
        """Unit rows U and their class codes."""
        dots = U @ self.sums.T  # (n, C): u . S_c
        cos = dots / np.where(self.norms > 0, self.norms, 1.0)
        rows = np.arange(len(U))
        dot = dots[rows, codes]  # u . S_y
        unit = (np.einsum("ij,ij->i", U, U) > 0).astype(float)  # 1, or 0 for a zero row
        left = self.squares[codes] - 2 * dot + unit  # |S_y - u|^2
        own = np.where(
            (self.counts[codes] > 1) & (left > 0),
            (dot - unit) / np.sqrt(np.maximum(left, 1e-300)),
            -np.inf,
        )
        cos[rows, codes] = own
        self.right += int(np.sum(np.argmax(cos, axis=1) == codes))
        self.seen += len(U)

    def score(self) -> float:
        return self.right / self.seen


class NeighbourLOO:
    """Leave-one-out top-1 of DINO's weighted kNN by cosine for a seeded sample of query rows,
    each against every other row: the k most similar vote with weights exp(cosine / T)."""

    def __init__(self, queries: np.ndarray, n_classes: int, k: int, temperature: float) -> None:
        self.queries = np.sort(queries)  # row numbers among all rows
        self.n_classes, self.k, self.temperature = n_classes, k, temperature
        self.Q: np.ndarray | None = None
        self.q_codes = np.zeros(0, np.int64)
        self.best = np.full((len(queries), k), -np.inf)
        self.best_codes = np.zeros((len(queries), k), np.int64)

    def collect(self, U: np.ndarray, codes: np.ndarray, start: int) -> None:
        """First pass: keep the query rows among unit rows start:start+len(U)."""
        inside = self.queries[(self.queries >= start) & (self.queries < start + len(U))] - start
        Q = U[inside].astype(np.float32)
        self.Q = Q if self.Q is None else np.vstack([self.Q, Q])
        self.q_codes = np.concatenate([self.q_codes, codes[inside]])

    def add(self, U: np.ndarray, codes: np.ndarray, start: int) -> None:
        """Second pass: unit rows start:start+len(U) as the bank. Similarities are float32, as in
        the knn head: they only order the neighbours."""
        sims = self.Q @ U.astype(np.float32).T  # (q, b)
        inside = (self.queries >= start) & (self.queries < start + len(U))
        sims[np.flatnonzero(inside), self.queries[inside] - start] = -np.inf  # not itself
        k = min(self.k, sims.shape[1])
        top = np.argpartition(sims, sims.shape[1] - k, axis=1)[:, -k:]  # the block's k best
        both = np.hstack([self.best, np.take_along_axis(sims, top, axis=1)])
        pick = np.argpartition(-both, self.k - 1, axis=1)[:, : self.k]
        self.best = np.take_along_axis(both, pick, axis=1)
        self.best_codes = np.take_along_axis(np.hstack([self.best_codes, codes[top]]), pick, axis=1)

    def score(self) -> float:
        votes = np.zeros((len(self.best), self.n_classes))
        weights = np.where(np.isfinite(self.best), np.exp(self.best / self.temperature), 0.0)
        np.add.at(votes, (np.arange(len(votes))[:, None], self.best_codes), weights)
        return float(np.mean(np.argmax(votes, axis=1) == self.q_codes))


class LogitCounts:
    """LEEP and NCE from the source model's logits, in two passes: the joint distribution of the
    target label y and the source class z (soft for LEEP, argmax for NCE), then LEEP's mean
    log-likelihood of the empirical predictor sum_z P(y | z) theta(z)."""

    def __init__(self, n_classes: int, n_source: int) -> None:
        self.joint = np.zeros((n_classes, n_source))  # sum of softmax rows per target class
        self.hard = np.zeros((n_classes, n_source))  # counts of (y, argmax z)
        self.loglik, self.n = 0.0, 0

    @staticmethod
    def softmax(logits: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def add(self, logits: np.ndarray, codes: np.ndarray) -> None:
        theta = self.softmax(logits)
        self.joint += _one_hot(codes, len(self.joint)) @ theta
        np.add.at(self.hard, (codes, np.argmax(logits, axis=1)), 1.0)
        self.n += len(codes)

    def add_likelihood(self, logits: np.ndarray, codes: np.ndarray) -> None:
        source = self.joint.sum(axis=0)
        conditional = self.joint / np.where(source > 0, source, 1.0)  # P(y | z), (C, Z)
        p = np.einsum("iz,iz->i", self.softmax(logits), conditional[codes])
        self.loglik += float(np.sum(np.log(np.maximum(p, 1e-300))))

    def leep(self) -> float:
        return self.loglik / self.n

    def nce(self) -> float:
        joint = self.hard / self.n
        source = joint.sum(axis=0, keepdims=True)
        nonzero = joint > 0
        return float(
            np.sum(joint[nonzero] * np.log((joint / np.where(source > 0, source, 1))[nonzero]))
        )


# --- the scores on arrays ---------------------------------------------------------------------


def _moments(X: Any, y: Any) -> tuple[FeatureMoments, np.ndarray, np.ndarray]:
    """The moments of checked rows X, with X as float64 and the class codes of y."""
    X = _rows(X)
    codes, n_classes = _labels(y, len(X))
    moments = FeatureMoments(X.shape[1], n_classes)
    moments.add(X, _unit(X), codes)
    return moments, X, codes


def logme(X: Any, y: Any) -> float:
    """LogME of features X (n_samples, n_features) for labels y: higher transfers better."""
    return _moments(X, y)[0].logme()


def hscore(X: Any, y: Any) -> float:
    """The shrinkage H-score of features X for labels y: higher transfers better."""
    return _moments(X, y)[0].hscore()


def ncm_loo(X: Any, y: Any) -> float:
    """Leave-one-out top-1 of the nearest class mean by cosine."""
    moments, X, codes = _moments(X, y)
    loo = NearestMeanLOO(moments.unit_sums, moments.counts)
    loo.add(_unit(X), codes)
    return loo.score()


def knn_loo(
    X: Any,
    y: Any,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    queries: int = KNN_QUERIES,
    seed: int = 0,
) -> float:
    """Leave-one-out top-1 of the weighted kNN by cosine on up to `queries` seeded rows."""
    X = _rows(X)
    codes, n_classes = _labels(y, len(X))
    loo = NeighbourLOO(
        _query_rows(len(X), queries, seed), n_classes, min(k, len(X) - 1), temperature
    )
    U = _unit(X)
    loo.collect(U, codes, 0)
    loo.add(U, codes, 0)
    return loo.score()


def _logit_counts(logits: Any, y: Any) -> LogitCounts:
    L = _rows(logits, "logits")
    codes, n_classes = _labels(y, len(L))
    counts = LogitCounts(n_classes, L.shape[1])
    counts.add(L, codes)
    counts.add_likelihood(L, codes)
    return counts


def leep(logits: Any, y: Any) -> float:
    """LEEP of the source model's logits (n_samples, n_source_classes) for target labels y."""
    return _logit_counts(logits, y).leep()


def nce(logits: Any, y: Any) -> float:
    """NCE, -H(Y | Z) with Z the source model's argmax class, for target labels y."""
    return _logit_counts(logits, y).nce()


def _query_rows(n: int, queries: int, seed: int) -> np.ndarray:
    if n <= queries:
        return np.arange(n)
    return np.random.default_rng(seed).choice(n, size=queries, replace=False)


# --- the scores of a cache --------------------------------------------------------------------


class TrainRows(NamedTuple):
    """The file rows a:b of the train split, which of them are readable, and their labels."""

    a: int
    b: int
    ok: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, f: Any) -> TrainRows:
        from pipeline.cache.schema import row_ranges

        a, b = row_ranges(f["split"][...]).get("train", (0, 0))
        return cls(a, b, f["ok"][a:b], f["labels"][a:b])

    @property
    def readable_labels(self) -> np.ndarray:
        return self.labels[self.ok]


def _train_blocks(
    rows: TrainRows, datasets: list[Any], block_rows: int
) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray, int]]]:
    """A re-iterable of (rows, class codes, index of the first among train rows) over the cache's
    readable train rows, in blocks: only the train range of the file is ever read."""
    from pipeline.cache.schema import read_columns

    a, b, ok, labels = rows

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        seen = 0
        for start in range(a, b, block_rows):
            stop = min(start + block_rows, b)
            keep = ok[start - a : stop - a]
            X = read_columns(datasets, start, stop)[keep].astype(
                np.float64
            )  # numpy converts faster
            yield X, labels[start - a : stop - a][keep], seen
            seen += len(X)

    return blocks


def score_cache(
    path: str | Path,
    layer: str | None = None,
    max_memory: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Every score of the cache's train rows (at `layer`, see `pipeline head --layer`): those from
    its logits where it stores them. Returns {score: value, ..., rows, dim, classes, seconds}."""
    from tqdm import tqdm

    from pipeline.cache.reader import check_rows, open_cache
    from pipeline.cache.schema import columns, reading

    started = time.perf_counter()
    path = Path(path)
    check_rows(path)  # a damaged or edited row is refused here too, as in the heads
    with open_cache(path) as f, reading(path):
        datasets = columns(f, layer)
        dim = sum(int(d.shape[1]) for d in datasets)
        classes = len(f["classes"])
        rows = TrainRows.of(f)
        labels = rows.readable_labels
        if len(labels) and not 0 <= labels.min() <= labels.max() < classes:
            raise DataError(
                f"cache {path} has train labels outside 0..{classes - 1} (its {classes} class "
                "names); rebuild it with `pipeline features --force`"
            )
        train = len(labels)
        if train < 2 or len(np.unique(labels)) < 2:
            raise DataError(
                f"cache {path} has {train} readable train rows of fewer than two classes; the "
                "scores need train rows of at least two classes"
            )
        _check_memory(path, dim, max_memory)
        budget = BLOCK_BYTES if max_memory is None else max(max_memory // 4, 8 * dim)
        # a block's rows, their similarities to the kNN queries and their class scores in budget
        blocks = _train_blocks(
            rows, datasets, max(1, budget // (8 * (dim + KNN_QUERIES + classes)))
        )
        try:
            moments = FeatureMoments(dim, classes)
        except MemoryError:
            raise _too_big(path, dim) from None
        knn = NeighbourLOO(
            _query_rows(train, KNN_QUERIES, 0), classes, min(KNN_K, train - 1), KNN_TEMPERATURE
        )
        counts = None
        total = 2 * train + (2 * train if "logits" in f else 0)
        with tqdm(total=total, unit="row", desc=f"rank {path.name}", disable=not progress) as bar:
            for X, codes, start in blocks():
                _check_finite(path, X, "features")
                U = _unit(X)
                moments.add(X, U, codes)
                knn.collect(U, codes, start)
                bar.update(len(X))
            ncm = NearestMeanLOO(moments.unit_sums, moments.counts)
            for X, codes, start in blocks():
                U = _unit(X)
                ncm.add(U, codes)
                knn.add(U, codes, start)
                bar.update(len(X))
            if "logits" in f:
                width = int(f["logits"].shape[1])
                logits = _train_blocks(rows, [f["logits"]], max(1, budget // (8 * width)))
                counts = LogitCounts(classes, width)
                for L, codes, _ in logits():
                    _check_finite(path, L, "logits")
                    counts.add(L, codes)
                    bar.update(len(L))
                for L, codes, _ in logits():
                    counts.add_likelihood(L, codes)
                    bar.update(len(L))
    try:  # the file is closed: what fails now is the arithmetic, never the cache's structure
        scores: dict[str, Any] = {
            "logme": moments.logme(),
            "hscore": moments.hscore(),
            "ncm_loo": ncm.score(),
            "knn_loo": knn.score(),
        }
        if counts is not None:
            scores |= {"leep": counts.leep(), "nce": counts.nce()}
    except np.linalg.LinAlgError as exc:
        raise DataError(
            f"cache {path}: the scores cannot be computed from its train rows ({exc}); check its "
            "features with `pipeline info`"
        ) from None
    except MemoryError:
        raise _too_big(path, dim) from None
    return scores | {
        "rows": train,
        "dim": dim,
        "classes": int(np.sum(moments.counts > 0)),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _check_memory(path: Path, dim: int, max_memory: int | None) -> None:
    """The D x D matrices fit in --max-memory, or in the machine's memory when none is given."""
    need = MATRICES * 8 * dim * dim
    if max_memory is not None and need > max_memory:
        raise ConfigError(
            f"--max-memory {max_memory:,} bytes is below the {need:,} the scores need for features "
            f"of dimension {dim} ({MATRICES} {dim} x {dim} float64 matrices); raise it"
        )
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return
    if need > physical:
        raise _too_big(path, dim)


def _too_big(path: Path, dim: int) -> DataError:
    return DataError(
        f"cache {path}: features of dimension {dim:,} need {MATRICES} {dim:,} x {dim:,} float64 "
        f"matrices ({MATRICES * 8 * dim * dim / 1e9:,.1f} GB), more than this machine has; score "
        "a smaller stored layer (--layer)"
    )


def _check_finite(path: Path, X: np.ndarray, what: str) -> None:
    if not np.isfinite(X).all():
        raise DataError(
            f"cache {path} holds NaN or infinite {what} among its train rows; rebuild it with "
            "`pipeline features --force` (--precision fp32 if it was built in fp16)"
        )


def key(path: str | Path, layer: str | None) -> str:
    """How a (cache, layer) is named in the output: `cache.h5`, or `cache.h5@layer3`."""
    return f"{path}@{layer}" if layer else str(path)


def layer_names(layer: str | None) -> str | None:
    """A --layer value as `columns` reads it, spaces around its commas dropped; an empty or
    repeated name is a ConfigError."""
    if layer is None:
        return None
    names = [name.strip() for name in layer.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise ConfigError(
            f"--layer {layer!r} names an empty layer or one twice; join distinct stored layers "
            "with commas, e.g. layer3,penultimate"
        )
    return ",".join(names)


def run(
    paths: Sequence[str],
    layers: Sequence[str | None] = (None,),
    out: str | Path | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> dict[str, dict[str, Any]]:
    """Scores of every cache at every layer, sorted by LogME (best first), written to `out` as JSON
    when given (a file the project did not write is replaced only with `force`; a cache never)."""
    from pipeline import outputs
    from pipeline.cache.schema import is_hdf5

    layers = [layer_names(layer) for layer in layers]
    if out is not None:
        out = Path(out)
        if is_hdf5(out) or any(_same_file(out, Path(p)) for p in paths):
            raise ConfigError(
                f"--out {out} is a feature cache; rank writes JSON: pass another path, e.g. "
                "results/scores.json"
            )
        outputs.check_file_output(out, "rank", force=force)
    found = {
        key(p, layer): score_cache(p, layer, max_memory, progress)
        for p in paths
        for layer in layers
    }
    ranked = dict(sorted(found.items(), key=lambda item: -item[1]["logme"]))
    if out is not None:
        text = json.dumps(ranked, indent=2) + "\n"
        outputs.replace_file(out, lambda tmp: tmp.write_text(text))
    return ranked


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def format_table(ranked: dict[str, dict[str, Any]]) -> str:
    """The scores as a text table, one row per cache (and layer), best LogME first."""
    shown = [name for name in SCORES if any(name in s for s in ranked.values())]
    width = max(len("cache"), *map(len, ranked))
    lines = [f"{'cache':<{width}}  " + "  ".join(f"{n:>9}" for n in shown) + "       rows   dim"]
    for name, s in ranked.items():
        cells = "  ".join(f"{s[n]:>9.4f}" if n in s else f"{'-':>9}" for n in shown)
        lines.append(f"{name:<{width}}  {cells}  {s['rows']:>9,} {s['dim']:>5}")
    return "\n".join(lines)
