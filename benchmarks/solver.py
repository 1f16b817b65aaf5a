"""The torch head's L-BFGS path alone: time, data passes and iterations of the 45-value sweep on the
sweep matrix's caches (`benchmarks/out/matrix-N-D-K.h5`, written when missing), without the
protocol around it (no scoring, no refit, no files).

    python -m benchmarks.solver 15000x512x100 --tol 1e-6 --block 1 3 6

A data pass is one (rows, D+1) @ (D+1, columns) product and its gradient for one setting; a block of
b settings evaluated together counts b. Run it against an older checkout of `pipeline` to compare
solvers (the module only needs `pipeline.heads.solver.solve`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.synthetic import matrix_cache

OUT = Path("benchmarks/out")


def sweep_rows(n: int, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The sweep's training rows of a matrix cache: train less the protocol's stratified holdout
    (the cache has no val split), standardised on those rows."""
    from pipeline import read_features
    from pipeline.heads.estimators import Preprocessor
    from pipeline.splits import stratified_holdout

    train = read_features(matrix_cache(OUT, n, d, k), splits=("train",), dtype=np.float32)["train"]
    held = stratified_holdout(train.y, 0.1, 0, salt=3)
    X = Preprocessor("standardize").fit(train.X[~held]).transform(train.X[~held])
    return X, train.y[~held]


def measure(X: np.ndarray, y: np.ndarray, n_classes: int, tol: float, block: int) -> dict:
    """One 45-value sweep (1e-6 .. 1e5) along the path: seconds, data passes, iterations."""
    from pipeline.heads import solver
    from pipeline.heads.objective import Problem
    from pipeline.heads.options import SolverOptions

    passes = [0]
    original = Problem.loss_grad

    def counted(self, theta, lambdas, *args, **kwargs):
        passes[0] += theta.shape[1]
        return original(self, theta, lambdas, *args, **kwargs)

    Problem.loss_grad = counted
    try:
        start = time.perf_counter()
        grid = np.logspace(-6, 5, 45)
        sol = solver.solve(
            X, y, grid, n_classes=n_classes, options=SolverOptions(tol=tol), block=block
        )
        seconds = time.perf_counter() - start
    finally:
        Problem.loss_grad = original
    return {
        "seconds": seconds,
        "passes": passes[0],
        "iterations": int(sol.n_iter.sum()),
        "converged": int(sol.converged.sum()),
        "grad_max": float(sol.grad_max.max()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("cells", nargs="+", help="NxDxK, e.g. 2000x512x10")
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-6])
    parser.add_argument("--block", type=int, nargs="+", default=[1])
    args = parser.parse_args(argv)
    for cell in args.cells:
        n, d, k = (int(v) for v in cell.lower().split("x"))
        X, y = sweep_rows(n, d, k)
        for tol in args.tol:
            for block in args.block:
                m = measure(X, y, k, tol, block)
                print(
                    f"{n:,} x {d} x {k}, tol {tol:g}, block {block}: {m['seconds']:.2f} s, "
                    f"{m['passes']} data passes, "
                    f"{m['iterations']} iterations, {m['converged']}/45 converged (max |grad| "
                    f"{m['grad_max']:.1e})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
