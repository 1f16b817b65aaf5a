"""Variants of the rule that chooses C, scored on the same fits: for each cache of
`benchmarks.selection` and each head, every C of the default grid is fitted on train (the sweep)
and, separately, on train+val (the refit), so any rule's choice can be looked up with its test
top-1. Prints each rule's mean test top-1 over the eight (cache, head) runs and the grid steps
between the two heads' choices per cache.

    python -m benchmarks.rules               # about five minutes on 2 cores; builds the caches
    python -m benchmarks.rules --tol 1e-6    # the same at a tighter solver tolerance (slower)
    python -m benchmarks.rules --seed 1      # four new caches of the same kinds, held out

The fits are saved to benchmarks/out/rules-tol<tol>.npz, so a rerun only re-scores the rules
(`--refit` fits again).

Only the C values some rule chooses are refitted. The argmax, one-SE and log-loss rows re-derive
`python -m benchmarks.selection`'s (whose refits warm-start from the sweep, so they can differ by a
test image); the other rows are variants a user might propose: the SE of the paired difference to
the best fit, a one-SE region that must be contiguous with the best, half an SE, and the argmax of a
curve smoothed over 5 grid points.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.selection import build_caches
from pipeline.cache import reader
from pipeline.config import HeadConfig
from pipeline.heads import fitting
from pipeline.heads.estimators import Preprocessor
from pipeline.registry import DEFAULT_GRID

HEADS = ("logreg", "torch")
Run = dict[str, np.ndarray]


def curves(path: str, head: str, tol: float, max_iter: int) -> Run:
    """(C, n_val) correctness and val log-loss of the sweep fits; test top-1 of a refit at each C
    that some rule chooses (NaN at the others)."""
    fs = reader.read_features(path, dtype=np.float32)
    train, val, test = fs["train"], fs["val"], fs["test"]
    k = int(max(train.y.max(), val.y.max(), test.y.max())) + 1
    cfg = HeadConfig(features=path, head=head, progress=False, tol=tol, max_iter=max_iter)
    prep = Preprocessor(cfg.preprocessing).fit(train.X)
    fits = fitting.fit_grid(cfg, prep.transform(train.X), train.y, k, list(DEFAULT_GRID))
    Z = prep.transform(val.X)
    correct = np.array([fit.decision(Z).argmax(1) == val.y for fit in fits])
    log_loss = np.array([-fit.log_proba(Z)[np.arange(len(val.y)), val.y].mean() for fit in fits])
    converged = np.array([fit.status == "converged" for fit in fits])
    X_all, y_all = np.concatenate([train.X, val.X]), np.concatenate([train.y, val.y])
    prep_all = Preprocessor(cfg.preprocessing).fit(X_all)
    Z_all, Z_test = prep_all.transform(X_all), prep_all.transform(test.X)
    run = {
        "correct": correct,
        "log_loss": log_loss,
        "converged": converged,
        "test": np.full(len(DEFAULT_GRID), np.nan),
    }
    for i in sorted({rule(run) for rule in RULES.values()}):
        fit = fitting.fit_grid(cfg, Z_all, y_all, k, [DEFAULT_GRID[i]])[0]
        run["test"][i] = float((fit.decision(Z_test).argmax(1) == test.y).mean())
    return run


def _eligible(run: Run) -> np.ndarray:
    return (
        run["converged"] if run["converged"].any() else np.ones(len(run["converged"]), dtype=bool)
    )


def _best(run: Run) -> int:
    eligible, acc = _eligible(run), run["correct"].mean(1)
    return int(np.flatnonzero(eligible)[np.argmax(acc[eligible])])


def _smallest(candidates: np.ndarray) -> int:
    return int(np.flatnonzero(candidates)[0])  # the grid is ascending: the strongest regularisation


def argmax(run: Run) -> int:
    acc = run["correct"].mean(1)
    return _smallest(acc == acc.max())


def one_se(run: Run, width: float = 1.0, paired: bool = False, contiguous: bool = False) -> int:
    correct, eligible = run["correct"].astype(float), _eligible(run)
    acc, n, best = correct.mean(1), correct.shape[1], _best(run)
    if paired:  # the standard error of each fit's difference to the best, on the same val rows
        se = (correct[best] - correct).std(1, ddof=1) / np.sqrt(n)
    else:
        se = np.full(len(acc), np.sqrt(acc[best] * (1 - acc[best]) / n))
    inside = eligible & (acc >= acc[best] - width * se - 1e-12)
    if not contiguous:
        return _smallest(inside)
    i = best
    while i > 0 and inside[i - 1]:
        i -= 1
    return i


def lowest_log_loss(run: Run) -> int:
    loss = np.where(_eligible(run), run["log_loss"], np.inf)
    return _smallest(loss == loss.min())


def smoothed_argmax(run: Run, half_width: int = 2) -> int:
    acc = run["correct"].mean(1)
    smooth = np.array(
        [acc[max(0, i - half_width) : i + half_width + 1].mean() for i in range(len(acc))]
    )
    smooth = np.where(_eligible(run), smooth, -1.0)
    return _smallest(smooth == smooth.max())


RULES: dict[str, Callable[[Run], int]] = {
    "argmax (top1)": argmax,
    "one-SE, binomial (top1-1se)": one_se,
    "log-loss (logloss)": lowest_log_loss,
    "one-SE, paired difference": lambda r: one_se(r, paired=True),
    "one-SE, contiguous with the best": lambda r: one_se(r, contiguous=True),
    "half-SE, contiguous with the best (top1-0.5se, the default)": lambda r: one_se(
        r, width=0.5, contiguous=True
    ),
    "argmax of a 5-point smoothed curve": smoothed_argmax,
}


def all_runs(
    tol: float, max_iter: int, refit: bool, seed: int = 0
) -> tuple[list[str], dict[tuple[str, str], Run]]:
    """Every (cache, head) run at this tolerance, from benchmarks/out when saved there before."""
    saved = Path(
        f"benchmarks/out/rules-tol{tol:g}-iter{max_iter}"
        + (f"-seed{seed}" if seed else "")
        + ".npz"
    )
    if saved.exists() and not refit:
        with np.load(saved) as data:
            keys = list(
                dict.fromkeys(tuple(name.split("/")[:2]) for name in data.files)
            )  # saved order
            runs = {
                (c, h): {
                    f: data[f"{c}/{h}/{f}"] for f in ("correct", "log_loss", "converged", "test")
                }
                for c, h in keys
            }
        return list(dict.fromkeys(c for c, _ in keys)), runs
    caches = build_caches(seed)
    runs = {
        (name, head): curves(str(path), head, tol, max_iter)
        for name, path in caches.items()
        for head in HEADS
    }
    np.savez(saved, **{f"{c}/{h}/{f}": v for (c, h), run in runs.items() for f, v in run.items()})
    return list(caches), runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tol", type=float, default=HeadConfig.tol)
    parser.add_argument("--max-iter", type=int, default=HeadConfig.max_iter)
    parser.add_argument("--refit", action="store_true", help="fit again even when saved fits exist")
    parser.add_argument(
        "--seed", type=int, default=0, help="> 0: four new caches of the same kinds (held out)"
    )
    args = parser.parse_args()
    caches, runs = all_runs(args.tol, args.max_iter, args.refit, args.seed)
    print("| rule | mean test top-1 | grid steps between the heads (" + ", ".join(caches) + ") |")
    print("|---|---|---|")
    for label, rule in RULES.items():
        chosen = {key: rule(run) for key, run in runs.items()}
        mean = np.mean([runs[key]["test"][i] for key, i in chosen.items()]) * 100
        gaps = [abs(chosen[(name, "logreg")] - chosen[(name, "torch")]) for name in caches]
        print(f"| {label} | {mean:.2f}% | {', '.join(map(str, gaps))} |")


if __name__ == "__main__":
    main()
