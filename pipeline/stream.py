"""Heads on caches larger than memory (`--max-memory`).

The torch head streams contiguous row blocks from the HDF5 file in a shuffled block order and
trains every C of the grid at once with a mini-batch optimiser (Adam or SGD, cosine schedule);
preprocessing statistics, the validation curve, the refit on train+val and the test predictions
all stream too. What stays in memory: labels, one block (and its preprocessed copy), the K
weight matrices with their optimiser state, and the test probabilities. The scikit-learn head
needs all rows at once, so above the budget it refuses and names the torch head.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import heads, metrics
from pipeline.config import HeadConfig, parse_size
from pipeline.errors import ConfigError, DataError
from pipeline.splits import stratified_holdout
from pipeline.store import Split, open_cache, read_block, read_ids

ADAM_STATE = 4  # parameter, gradient, two moments


def in_memory_bytes(info: dict[str, Any], n_classes: int) -> int:
    """What the in-memory head holds at its peak: train+val as float32 three times (raw, preprocessed,
    the train+val concatenation of the refit), test twice, and the test probabilities."""
    rows = info["rows"]
    trainval = rows["train"] + rows["val"]
    return 4 * info["dim"] * (3 * trainval + 2 * rows["test"]) + 4 * rows["test"] * n_classes


def needs_streaming(cfg: HeadConfig, info: dict[str, Any], n_classes: int) -> bool:
    budget, need = parse_size(cfg.max_memory), in_memory_bytes(info, n_classes)  # type: ignore[arg-type]
    if need <= budget:
        return False
    if cfg.head != "torch":
        raise ConfigError(
            f"the {cfg.head} head holds the whole cache in memory, about {need / 1e9:.2f} GB here, above "
            f"--max-memory {cfg.max_memory}; use --head torch, which streams the cache from disk within the budget"
        )
    if cfg.shots:
        raise ConfigError("--shots with --max-memory below the cache size is not supported; drop --max-memory")
    return True


class Blocks:
    """Contiguous row blocks of one split (optionally masked) read from the cache as float32."""

    def __init__(self, f: Any, start: int, stop: int, rows: int, keep: np.ndarray | None, labels: np.ndarray):
        self.f, self.start, self.stop, self.rows = f, start, stop, rows
        self.labels = labels  # encoded, over start:stop
        self.mask = f["ok"][start:stop] & (True if keep is None else keep)  # readable and selected rows

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
            X = read_block(self.f["features"], a, b, np.float32)  # (B, D), one contiguous read
            mask = self.mask[a - self.start : b - self.start]
            if not mask.all():
                X = X[mask]
            if not np.isfinite(X).all():
                raise DataError(
                    f"cache {self.f.filename} has NaN or infinite features in rows {a}:{b}; rebuild it with "
                    "`pipeline features --force --precision fp32`"
                )
            yield X, self.labels[a - self.start : b - self.start][mask]

    @property
    def n_blocks(self) -> int:
        return math.ceil((self.stop - self.start) / self.rows)


def fit_preprocessor(kind: str, parts: list[Blocks]) -> heads.Preprocessor:
    """Standardisation statistics accumulated block by block (float64 sums)."""
    prep = heads.Preprocessor(kind)
    if kind != "standardize":
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
    std = np.sqrt(np.maximum(squares / total - mean**2, 0))
    prep.mean_, prep.scale_ = mean.astype(np.float32), np.where(std > 1e-12, std, 1.0).astype(np.float32)
    return prep


def fit_stream(
    cfg: HeadConfig,
    parts: list[Blocks],
    prep: heads.Preprocessor,
    Cs: list[float],
    n_classes: int,
    bar: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """K settings at once over shuffled blocks: (K, D, O) weights, (K, O) intercepts."""
    import torch

    from pipeline import solver
    from pipeline.devices import choose_device

    device = choose_device(cfg.device)
    method = cfg.solver if cfg.solver != "lbfgs" else "adam"  # L-BFGS needs full passes: use Adam here
    lr = cfg.lr or (1e-3 if method == "adam" else 0.1)
    n = sum(b.n for b in parts)
    dim, outputs = parts[0].f["features"].shape[1], (1 if n_classes == 2 else n_classes)
    weight_of = np.ones(n_classes)
    if cfg.class_weight == "balanced":  # scikit-learn's n / (classes * n_c), over the rows of this fit
        counts = np.bincount(np.concatenate([b.kept_labels for b in parts]), minlength=n_classes)
        weight_of = counts.sum() / (n_classes * np.maximum(counts, 1))
    w_total = float(sum(weight_of[b.kept_labels].sum() for b in parts))
    lambdas = torch.as_tensor(1.0 / (np.asarray(Cs) * w_total), dtype=torch.float32, device=device)
    theta = torch.zeros(dim + 1, len(Cs), outputs, device=device)
    theta.grad = torch.zeros_like(theta)
    opt = (
        torch.optim.Adam([theta], lr=lr)
        if method == "adam"
        else torch.optim.SGD([theta], lr=lr, momentum=0.9, nesterov=True)
    )
    steps = cfg.epochs * math.ceil(n / cfg.batch_size) + cfg.epochs * sum(b.n_blocks for b in parts)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.epochs):
        for p in rng.permutation(len(parts)):
            blocks = parts[p]
            for X, y in blocks.iterate(rng.permutation(blocks.n_blocks)):
                if not len(y):
                    continue
                Xt = torch.from_numpy(_transform_inplace(prep, X)).to(device)
                w = torch.as_tensor(weight_of[y], dtype=torch.float32, device=device)
                problem = solver.Problem(Xt, torch.as_tensor(y, device=device), n_classes, w, cfg.label_smoothing)
                order = torch.as_tensor(rng.permutation(len(y)), device=device)
                for a in range(0, len(y), cfg.batch_size):
                    rows = order[a : a + cfg.batch_size]
                    # An unbiased estimate of the full objective's gradient: n / (batch * total weight).
                    _, grad = problem.loss_grad(theta, lambdas, rows=rows, scale=n / (len(rows) * w_total))
                    theta.grad.copy_(grad)
                    opt.step()
                    schedule.step()
        bar.update(1)
    theta = theta.detach()
    return theta[:-1].permute(1, 0, 2).cpu().numpy(), theta[-1].cpu().numpy()


def _transform_inplace(prep: heads.Preprocessor, X: np.ndarray) -> np.ndarray:
    """The preprocessing on a freshly read block, without a second block-sized array."""
    if prep.kind == "standardize":
        X -= prep.mean_
        X /= prep.scale_
        return X
    return prep.transform(X)


def _scores(blocks: Blocks, prep: heads.Preprocessor, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """(n, K, C) probabilities, block by block: only for val/test, whose size the budget covers."""
    out = []
    for X, _ in blocks:
        Z = _transform_inplace(prep, X)
        fits = [Z @ coef[k] + intercept[k] for k in range(len(coef))]
        out.append(np.stack([heads._proba_from_decision(z.ravel() if z.shape[1] == 1 else z) for z in fits], axis=1))
    return np.concatenate(out)


def _val_curve(val: Blocks, prep: heads.Preprocessor, fits: list[Any], names: list[str]) -> list[dict[str, Any]]:
    """The validation curve as in memory (`sweep.curve_row`): float64 logits of every fit, block by block."""
    from pipeline import sweep

    logits = np.empty((val.n, len(fits), fits[0].coef.shape[1]))  # (n_val, K, O): the val rows only
    y_val, at = np.empty(val.n, dtype=np.int64), 0
    for X, y in val:
        Z = _transform_inplace(prep, X)
        for k, fit in enumerate(fits):
            logits[at : at + len(y), k] = fit.decision(Z).reshape(len(y), -1)
        y_val[at : at + len(y)], at = y, at + len(y)
    return [
        sweep.curve_row(fit, y_val, heads.log_proba_from_decision(_squeeze(logits[:, k])), names)
        for k, fit in enumerate(fits)
    ]


def _squeeze(z: np.ndarray) -> np.ndarray:
    return z[:, 0] if z.shape[1] == 1 else z  # binomial heads have one logit


def _keep_block_buffers_returnable() -> None:
    """glibc raises its mmap threshold after each large free, so later block-sized buffers come from
    the heap and stay in the process after they are freed; a fixed 1 MiB threshold keeps them in
    their own mappings, returned to the system on free. A no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def run(cfg, info, labels, classes, grid, timer, report_to, cell) -> dict[str, Any]:
    """The head protocol of `sweep.run`, streaming: select on val, refit on train+val, test once."""
    from pipeline import sweep

    _keep_block_buffers_returnable()
    path = Path(info["path"])
    budget = parse_size(cfg.max_memory)
    present = np.unique(labels["train"])
    names = [classes[c] for c in present]
    dim, K = info["dim"], len(grid)
    state = 4 * (dim + 1) * K * len(names) * ADAM_STATE
    # A quarter of the budget for blocks: the block, its [X, 1] copy inside the solver, and slack for a
    # row-masked copy and minibatch temporaries (4 block-sized float32 arrays in all); the rest
    # covers labels, validation and test probabilities, metrics and the written outputs.
    rows = max(256, (budget // 4 - state) // (4 * dim * 4))
    if budget // 4 <= state:
        raise ConfigError(
            f"--max-memory {cfg.max_memory} does not cover the {K} weight matrices and their optimiser state "
            f"({state / 1e6:.0f} MB); raise it or sweep fewer C values (--grid)"
        )
    with open_cache(path) as f:
        ranges = info["ranges"]
        encoded = np.searchsorted(present, f["labels"][...])
        ok = f["ok"][...]
        (ta, tb), (va, vb), (sa, sb) = ranges["train"], ranges["val"], ranges["test"]
        if vb > va:
            train = Blocks(f, ta, tb, rows, None, encoded[ta:tb])
            val = Blocks(f, va, vb, rows, None, encoded[va:vb])
            selected_on = "val"
        else:  # a stratified holdout of train, exactly as in memory (the same rows, the same seed)
            readable = np.flatnonzero(ok[ta:tb])  # labels["train"] holds exactly these rows, in order
            held = np.zeros(tb - ta, dtype=bool)
            held[readable[stratified_holdout(labels["train"], cfg.val_fraction, cfg.seed, salt=3)]] = True
            train = Blocks(f, ta, tb, rows, ~held, encoded[ta:tb])
            val = Blocks(f, ta, tb, rows, held, encoded[ta:tb])
            selected_on = f"a stratified holdout of train ({cfg.val_fraction:.0%}, seed {cfg.seed}; no val split)"
        report_to(
            f"head: torch, streaming {path} in blocks of {rows} rows (--max-memory {cfg.max_memory}): {train.n} train, "
            f"{val.n} val rows, {dim}-d, {len(names)} classes; {K} C values, select by {cfg.select}"
        )
        bar = tqdm(total=2 * cfg.epochs, unit="epoch", desc="stream", disable=not cfg.progress)
        with bar:
            with timer("sweep"):
                prep = fit_preprocessor(cfg.preprocess, [train])
                coef, intercept = fit_stream(cfg, [train], prep, grid, len(names), bar)
                fits = [sweep.Fit(C, coef[k], intercept[k], cfg.epochs, True) for k, C in enumerate(grid)]
                curve = _val_curve(val, prep, fits, names)
                best = sweep.choose(curve, cfg.select)
            with timer("refit"):
                both = [train, val] if vb > va else [Blocks(f, ta, tb, rows, None, encoded[ta:tb])]
                prep = fit_preprocessor(cfg.preprocess, both)
                coef, intercept = fit_stream(cfg, both, prep, [grid[best]], len(names), bar)
                final = sweep.Fit(grid[best], coef[0], intercept[0], cfg.epochs, True)
        # Every choice is made; only now are test rows read, and scored once.
        with timer("test"):
            test = Blocks(f, sa, sb, rows, None, encoded[sa:sb])
            proba = _scores(test, prep, final.coef[None], final.intercept[None])[:, 0]
            y_test = np.concatenate([y for _, y in test])
            ids = read_ids(f["ids"], sa, sb)[ok[sa:sb]]
            scored = [metrics.evaluate(y_test, proba, names)]
            pred = proba.argmax(axis=1)
            if cfg.bootstrap:
                scored[0]["ci"] = metrics.bootstrap_ci(y_test, pred, len(names), cfg.bootstrap, cfg.seed)
    runs = [(curve, best, final, prep, "train+val")]
    result = sweep.finish(cfg, info, grid, runs, scored, names, selected_on, timer, Split(pred, y_test, ids), cell)
    return result
