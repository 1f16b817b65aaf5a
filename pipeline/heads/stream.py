"""Heads on caches larger than memory (`--max-memory`): `StreamSource`, the protocol's rows read
from the HDF5 file in contiguous blocks.

The torch head trains every C of the grid at once with the one mini-batch loop
(`pipeline.heads.minibatch`), its batches drawn from blocks read in a shuffled order; preprocessing
statistics, the validation curve, the full-data gradient that measures convergence, the refit on
train+val and the test predictions all stream too. What stays in memory: labels, one block (and its
preprocessed copy), the K weight matrices with their optimiser state, and the test
log-probabilities. The scikit-learn head needs all rows at once, so above the budget it refuses and
names the torch head; so do the combinations the streamed loop does not offer (below).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache.reader import CacheInfo, open_cache
from pipeline.cache.schema import columns, read_columns, read_ids
from pipeline.config import HeadConfig
from pipeline.devices import choose_device
from pipeline.errors import ConfigError, DataError
from pipeline.heads import choice, kinds, minibatch
from pipeline.heads.estimators import Preprocessor, log_proba_from_decision
from pipeline.heads.objective import Problem
from pipeline.heads.options import SolverOptions, penalties
from pipeline.heads.runs import ChoiceRows, Fit, Predictions
from pipeline.splits import stratified_holdout

ADAM_STATE = 4  # parameter, gradient, two moments


class Blocks:
    """Contiguous row blocks of one split (optionally masked) read from the cache as float32."""

    def __init__(
        self,
        f: Any,
        start: int,
        stop: int,
        rows: int,
        keep: np.ndarray | None,
        labels: np.ndarray,
        layer: str | None,
    ):
        self.f, self.start, self.stop, self.rows = f, start, stop, rows
        self.columns = columns(
            f, layer
        )  # the features, or the stored layer(s) the head was asked to read
        self.labels = labels  # encoded, over start:stop
        self.mask = f["ok"][start:stop] & (
            True if keep is None else keep
        )  # readable and selected rows

    @property
    def n(self) -> int:
        return int(self.mask.sum())

    @property
    def kept_labels(self) -> np.ndarray:
        return self.labels[self.mask]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return self.iterate(None)

    def iterate(self, order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        starts = np.arange(self.start, self.stop, self.rows)
        for a in starts if order is None else starts[order]:
            b = min(a + self.rows, self.stop)
            X = read_columns(
                self.columns, a, b, np.float32
            )  # (B, D), one contiguous read per dataset
            mask = self.mask[a - self.start : b - self.start]
            if not mask.all():
                X = X[mask]
            if not np.isfinite(X).all():
                raise DataError(
                    f"cache {self.f.filename} has NaN or infinite features in rows {a}:{b}; "
                    "rebuild it with "
                    "`pipeline features --force --precision fp32`"
                )
            yield X, self.labels[a - self.start : b - self.start][mask]

    def steps(self, batch_size: int) -> int:
        """Optimiser steps in one pass: each block's kept rows in batches of `batch_size`."""
        starts = np.arange(0, self.stop - self.start, self.rows)
        kept = (
            np.add.reduceat(self.mask.astype(np.int64), starts)
            if len(starts)
            else np.zeros(0, np.int64)
        )
        return int(np.ceil(kept / batch_size).sum())

    @property
    def n_blocks(self) -> int:
        return math.ceil((self.stop - self.start) / self.rows)


def fit_preprocessor(kind: str, parts: list[Blocks]) -> Preprocessor:
    """Standardisation (or centring) statistics accumulated block by block (float64 sums)."""
    prep = Preprocessor(kind)
    if kind not in ("standardize", "center-l2"):
        return prep
    total, sums, squares = 0, 0.0, 0.0
    for blocks in parts:
        for X, _ in blocks:
            total += len(X)
            for i in range(0, len(X), 128):  # float64 sums over small slices: no block-sized copy
                part = X[i : i + 128].astype(np.float64)
                sums = sums + part.sum(axis=0)
                squares = squares + np.square(part).sum(axis=0)
    mean = sums / total
    if kind == "center-l2":
        prep.mean_ = mean.astype(np.float32)
        return prep
    std = np.sqrt(np.maximum(squares / total - mean**2, 0))
    prep.mean_, prep.scale_ = (
        mean.astype(np.float32),
        np.where(std > 1e-12, std, 1.0).astype(np.float32),
    )
    return prep


def _transform_inplace(prep: Preprocessor, X: np.ndarray) -> np.ndarray:
    """The preprocessing on a freshly read block, without a second block-sized array."""
    if prep.kind == "standardize":
        X -= prep.mean_
        X /= prep.scale_
        return X
    return prep.transform(X)


def _squeeze(z: np.ndarray) -> np.ndarray:
    return z[:, 0] if z.shape[1] == 1 else z  # binomial heads have one logit


def _keep_block_buffers_returnable() -> None:
    """glibc raises its mmap threshold after each large free, so later block-sized buffers come from
    the heap and stay in the process after they are freed; a fixed 1 MiB threshold keeps them in
    their own mappings, returned to the system on free. A no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def fit_stream(
    options: SolverOptions,
    parts: list[Blocks],
    prep: Preprocessor,
    Cs: list[float],
    n_classes: int,
    class_weight: str,
    bar: Any,
    init: Fit | None = None,
) -> list[Fit]:
    """K settings at once over shuffled blocks, then one more pass for the full gradient: a fit per
    C."""
    device = choose_device(options.device)
    n = sum(b.n for b in parts)
    dim, outputs = sum(d.shape[1] for d in parts[0].columns), (1 if n_classes == 2 else n_classes)
    weight_of = np.ones(n_classes)
    if class_weight == "balanced":  # scikit-learn's n / (classes * n_c), over the rows of this fit
        counts = np.bincount(np.concatenate([b.kept_labels for b in parts]), minlength=n_classes)
        weight_of = counts.sum() / (n_classes * np.maximum(counts, 1))
    w_total = float(sum(weight_of[b.kept_labels].sum() for b in parts))
    lambdas = torch.as_tensor(penalties(Cs, w_total), dtype=torch.float32, device=device)
    rng = np.random.default_rng(options.seed)

    def problems(shuffle: bool) -> Iterator[Problem]:
        """Each block of `parts` as an in-memory problem (preprocessed, weighted), shuffled or in
        order."""
        for p in rng.permutation(len(parts)) if shuffle else range(len(parts)):
            blocks = parts[p]
            for X, y in blocks.iterate(rng.permutation(blocks.n_blocks) if shuffle else None):
                if len(y):
                    Xt = torch.from_numpy(_transform_inplace(prep, X)).to(device)
                    w = torch.as_tensor(weight_of[y], dtype=torch.float32, device=device)
                    yield Problem(
                        Xt, torch.as_tensor(y, device=device), n_classes, w, options.label_smoothing
                    )

    def epoch(_: int) -> Iterator[minibatch.Batch]:
        for problem in problems(shuffle=True):
            order = torch.as_tensor(rng.permutation(problem.n), device=device)
            for a in range(0, problem.n, options.batch_size):
                yield problem, order[a : a + options.batch_size]

    theta = torch.zeros(dim + 1, len(Cs), outputs, device=device)
    if init is not None:  # warm start from the sweep's fit, as in memory
        theta[:-1] = torch.as_tensor(init.coef, dtype=torch.float32, device=device)[:, None]
        theta[-1] = torch.as_tensor(init.intercept, dtype=torch.float32, device=device)
    steps = options.epochs * sum(
        b.steps(options.batch_size) for b in parts
    )  # exact: the schedule ends at 0
    theta = minibatch.train(
        epoch, theta, lambdas, options, n, w_total, steps, on_epoch=lambda _: bar.update(1)
    )
    solution = minibatch.measured(theta, problems(shuffle=False), lambdas, w_total, options)
    return Fit.from_solution(Cs, solution, w_total, options.tol)


def _logits(blocks: Blocks, prep: Preprocessor, fits: list[Fit]) -> tuple[np.ndarray, np.ndarray]:
    """(n, K, O) float64 logits of every fit and the (n,) labels, block by block (val and test only,
    whose size the budget covers)."""
    out = np.empty((blocks.n, len(fits), fits[0].coef.shape[1]))
    labels, at = np.empty(blocks.n, dtype=np.int64), 0
    for X, y in blocks:
        Z = _transform_inplace(prep, X)
        for k, fit in enumerate(fits):
            out[at : at + len(y), k] = fit.decision(Z).reshape(len(y), -1)
        labels[at : at + len(y)], at = y, at + len(y)
    return out, labels


class StreamSource:
    """The protocol's rows streamed from the cache in blocks that fit a quarter of --max-memory."""

    streams = True
    views_per_image = 0  # --views is refused when the rows stream

    def __init__(self, cfg: HeadConfig, info: CacheInfo, grid: list[float]) -> None:
        _keep_block_buffers_returnable()
        self.cfg, self.info = cfg, info
        labels = info.labels
        self.present = np.unique(labels["train"])
        self.names = [info.classes[c] for c in self.present]
        self.options = SolverOptions.for_head(cfg, streaming=True)
        budget = cfg.max_memory_bytes or 0
        dim, K = info.dim, len(grid)
        state = 4 * (dim + 1) * K * len(self.names) * ADAM_STATE
        if budget // 4 <= state:
            raise ConfigError(
                f"--max-memory {cfg.max_memory} does not cover the {K} weight matrices and their "
                "optimiser state "
                f"({state / 1e6:.0f} MB); raise it or sweep fewer C values (--grid)"
            )
        # A quarter of the budget for blocks: the block, its [X, 1] copy inside the solver, and
        # slack for a
        # row-masked copy and minibatch temporaries (4 block-sized float32 arrays in all); the rest
        # covers labels, validation and test probabilities, metrics and the written outputs.
        self.rows = max(256, (budget // 4 - state) // (4 * dim * 4))

    def __enter__(self) -> StreamSource:
        cfg, info = self.cfg, self.info
        self.f = open_cache(info.path)
        self.encoded = np.searchsorted(self.present, self.f["labels"][...])
        (ta, tb), (va, vb) = info.ranges["train"], info.ranges["val"]
        train_labels, val_labels = info.labels["train"], info.labels["val"]
        if vb > va:
            self.train = self._blocks(ta, tb, None)
            self.val = self._blocks(va, vb, None)
            self.selected_on = ChoiceRows("val")
            self.both = [self.train, self.val]
        else:  # a stratified holdout of train, exactly as in memory (the same rows, the same seed)
            readable = np.flatnonzero(
                self.f["ok"][ta:tb]
            )  # labels["train"] holds exactly these rows, in order
            holdout = stratified_holdout(train_labels, cfg.val_fraction, cfg.seed, salt=3)
            held = np.zeros(tb - ta, dtype=bool)
            held[readable[holdout]] = True
            self.train = self._blocks(ta, tb, ~held)
            self.val = self._blocks(ta, tb, held)
            self.selected_on = ChoiceRows("holdout", cfg.val_fraction, cfg.seed)
            self.both = [self._blocks(ta, tb, None)]
            train_labels, val_labels = train_labels[~holdout], train_labels[holdout]
        K = len(self.names)
        self.sweep_counts = np.bincount(np.searchsorted(self.present, train_labels), minlength=K)
        self.val_counts = np.bincount(np.searchsorted(self.present, val_labels), minlength=K)
        self.bar = tqdm(total=2 * cfg.epochs, unit="epoch", desc="stream", disable=not cfg.progress)
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        self.f.close()

    def _blocks(self, start: int, stop: int, keep: np.ndarray | None) -> Blocks:
        return Blocks(
            self.f, start, stop, self.rows, keep, self.encoded[start:stop], self.cfg.layer
        )

    def describe(self) -> str:
        return (
            f"{self.train.n} train, {self.val.n} val rows, streaming from the file in blocks of "
            f"{self.rows} rows "
            f"(--max-memory {self.cfg.max_memory}), solver {self.options.solver}"
        )

    def sweep(self, repeat: int, grid: list[float], tick: Callable[[int], None]):
        prep = fit_preprocessor(kinds.get(self.cfg.head).preprocessing(self.cfg), [self.train])
        fits = fit_stream(
            self.options, [self.train], prep, grid, len(self.names), self.cfg.class_weight, self.bar
        )
        logits, y_val = _logits(self.val, prep, fits)
        curve = [
            choice.curve_row(
                fit, y_val, log_proba_from_decision(_squeeze(logits[:, k])), self.names
            )
            for k, fit in enumerate(fits)
        ]
        return prep, fits, curve

    def validate(self, fit: Fit, prep: Preprocessor) -> tuple[np.ndarray, np.ndarray]:
        logits, y_val = _logits(self.val, prep, [fit])
        return y_val, log_proba_from_decision(_squeeze(logits[:, 0]))

    def refit(self, C: float, init: Fit) -> tuple[Preprocessor, Fit]:
        prep = fit_preprocessor(kinds.get(self.cfg.head).preprocessing(self.cfg), self.both)
        (final,) = fit_stream(
            self.options,
            self.both,
            prep,
            [C],
            len(self.names),
            self.cfg.class_weight,
            self.bar,
            init=init,
        )
        return prep, final

    def test(self, final: Fit, prep: Preprocessor) -> Predictions:
        sa, sb = self.info.ranges["test"]
        logits, y_test = _logits(self._blocks(sa, sb, None), prep, [final])
        ids = read_ids(self.f["ids"], sa, sb)[self.f["ok"][sa:sb]]
        return Predictions(ids, y_test, log_proba_from_decision(_squeeze(logits[:, 0])))
