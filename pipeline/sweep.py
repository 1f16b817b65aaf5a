"""The head stage: select C on validation, refit, score the test split once, write the results.

Reads only the cache file. Split hygiene is structural: test features are read from the file only
after every choice is made, so nothing before the choice can see them; every result says which
split chose, which trained the final head, and which scored it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import heads, metrics, outputs, report
from pipeline.config import HeadConfig, to_dict
from pipeline.errors import ConfigError, DataError
from pipeline.splits import draw_shots, stratified_holdout
from pipeline.store import Split, cache_info, read_features

DEFAULT_GRID = tuple(float(c) for c in np.logspace(-6, 5, 45))
# --select: the validation metric of each rule. `*-1se` take the strongest regularisation within one
# standard error of the best score, `top1` and `balanced` the plain argmax (the published protocol),
# `logloss` the lowest validation log-loss; see `selection`.
SELECT_KEYS = {
    "top1-1se": "top1",
    "balanced-1se": "balanced_accuracy",
    "top1": "top1",
    "balanced": "balanced_accuracy",
    "logloss": "log_loss",
}
Report = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


@dataclass
class Fit:
    """One trained linear model: (D, O) weights, (O,) intercept, and how its optimisation ended.

    `warm_start_only`: the solver took no step from the previous C's solution because its gradient
    there was already within tol, so these are that solution's weights, not a fit at this C.
    `penalty_gradient`: max |W| / (C * sum of row weights), the largest gradient the penalty adds
    on the stopping rule's (mean) scale. Below tol, the point where the solver stopped passes the
    rule whatever the penalty: the fit did not resolve its C (see `status`).
    """

    C: float
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int
    converged: bool
    warm_start_only: bool = False
    penalty_gradient: float = float("inf")
    tol: float = 0.0

    @property
    def status(self) -> str:
        """How far the weights are a fit at this C:

        - `not converged`: stopped at max_iter (mini-batch: the epochs ended above tol);
        - `warm start only`: the previous C's weights, no step taken (torch head);
        - `C not resolved`: converged, but the penalty's gradient is below tol, so this point passes the
          stopping rule for any larger C too: where the solver stopped on a loss that is flat to within tol,
          which differs between solvers, starts and BLAS threads, not the optimum at this C;
        - `converged`: the optimum at this C, to within tol.
        """
        if not self.converged:
            return "not converged"
        if self.warm_start_only:
            return "warm start only"
        return "C not resolved" if self.penalty_gradient <= self.tol else "converged"

    def decision(self, X: np.ndarray) -> np.ndarray:
        """Logits in float64, in row chunks (no float64 copy of all of X): exact inputs for the log-softmax."""
        coef, intercept = self.coef.astype(np.float64), self.intercept.astype(np.float64)
        step = max(1, 2_000_000 // max(X.shape[1], 1))  # ~16 MB of float64 rows at a time
        out = np.empty((len(X), coef.shape[1]))
        for a in range(0, len(X), step):
            out[a : a + step] = X[a : a + step].astype(np.float64) @ coef + intercept
        return out.ravel() if out.shape[1] == 1 else out

    def log_proba(self, X: np.ndarray) -> np.ndarray:
        return heads.log_proba_from_decision(self.decision(X))

    def proba(self, X: np.ndarray) -> np.ndarray:
        return np.exp(self.log_proba(X))


class Timer:
    def __init__(self) -> None:
        self.spans: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.spans[name] = self.spans.get(name, 0.0) + time.perf_counter() - start


# ------------------------------------------------------------------------------------- training


def fit_grid(
    cfg: HeadConfig,
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    Cs: list[float],
    tick: Callable[[int], None] = lambda n: None,
    init: Fit | None = None,
) -> list[Fit]:
    """One fit per C on the same rows: batched in torch, or parallel scikit-learn fits."""
    class_weight = None if cfg.class_weight == "none" else cfg.class_weight
    weights = heads.balanced_weights(y, class_weight)
    w_sum = float(len(y) if weights is None else weights.sum())

    def resolution(C: float, coef: np.ndarray) -> dict[str, float]:
        return {"penalty_gradient": float(np.abs(coef).max(initial=0.0)) / (C * w_sum), "tol": cfg.tol}

    if cfg.head == "torch":
        from pipeline import solver
        from pipeline.devices import choose_device

        device = choose_device(cfg.device)
        sol = solver.solve(
            X,
            y,
            Cs,
            n_classes=n_classes,
            sample_weight=weights,
            label_smoothing=cfg.label_smoothing,
            method=cfg.solver,
            max_iter=cfg.max_iter,
            tol=cfg.tol,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            seed=cfg.seed,
            balanced_sampler=cfg.balanced_sampler,
            device=str(device),
            init=None if init is None else (init.coef[None], init.intercept[None]),
            progress=tick,
            # Measured on CPU: the sequential warm-started path needs ~4x fewer data passes than
            # all settings at once; a GPU runs many settings for nearly the price of one.
            block=cfg.sweep_block or (len(Cs) if device.type == "cuda" else 1),
        )
        return [
            Fit(C, sol.coef[k], sol.intercept[k], int(sol.n_iter[k]), bool(sol.converged[k]), bool(sol.copied[k]),
                **resolution(C, sol.coef[k]))
            for k, C in enumerate(Cs)
        ]  # fmt: skip
    from joblib import Parallel, delayed

    def one(C: float) -> Fit:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # recorded per C instead
            model = heads.make_logreg(C, class_weight, cfg.max_iter, cfg.tol).fit(X, y)
        n_iter = int(model.n_iter_.max())
        coef = model.coef_.T.copy()
        return Fit(C, coef, model.intercept_.copy(), n_iter, n_iter < cfg.max_iter, **resolution(C, coef))

    fits = []
    if len(Cs) == 1:
        for fit in (one(C) for C in Cs):
            fits.append(fit)
            tick(1)
        return fits
    with joblib_backend(cfg.joblib_backend):
        for fit in Parallel(n_jobs=cfg.jobs or -1, return_as="generator")(delayed(one)(C) for C in Cs):
            fits.append(fit)
            tick(1)
    return fits


JOBLIB_BACKENDS = ("loky", "threading", "multiprocessing", "dask")


@contextmanager
def joblib_backend(name: str | None) -> Iterator[None]:
    """The joblib backend of the scikit-learn sweep; `dask` runs the fits on a dask.distributed cluster:
    the current client, else the scheduler at $DASK_SCHEDULER_ADDRESS, else a local cluster."""
    import joblib

    if name is None:
        yield
        return
    if name not in JOBLIB_BACKENDS:
        raise ConfigError(f"unknown joblib backend {name!r}; choose one of: {', '.join(JOBLIB_BACKENDS)}")
    if name != "dask":
        with joblib.parallel_config(backend=name):
            yield
        return
    try:
        from dask.distributed import Client, get_client
    except ImportError:
        raise ConfigError("--joblib-backend dask needs dask.distributed; pip install 'pipeline[dask]'") from None
    try:
        client, owned = get_client(), False
    except ValueError:  # no client yet: connect (or start a local cluster) for this sweep
        client, owned = Client(os.environ.get("DASK_SCHEDULER_ADDRESS")), True
    try:
        with joblib.parallel_config(backend="dask"):
            yield
    finally:
        if owned:
            client.close()


def selection(curve: list[dict[str, Any]], select: str) -> dict[str, Any]:
    """Which C the rule `select` takes from a validation curve, and the numbers that decided it.

    - `top1-1se` / `balanced-1se` (one-standard-error rule): among the fits that converged, find
      the best score p and its standard error SE (`val_*_se` of that row: sqrt(p (1 - p) / n_val)
      for top-1, sqrt(sum_c r_c (1 - r_c) / n_c) / K for balanced accuracy); take the smallest C
      whose score is >= p - SE. A one- or two-image spike on the flat, weakly regularised end
      cannot move the choice: every C it beats by less than its noise stays a candidate.
    - `top1` / `balanced`: plain argmax over every fit (the published protocol).
    - `logloss`: the converged fit with the lowest validation log-loss.

    The `*-1se` and `logloss` rules look only at fits whose status is `converged` (see
    `Fit.status`): a fit that did not converge, repeats the previous C's weights, or did not
    resolve its C is scored and shown, but neither sets the best score nor is chosen (unless no fit
    converged, and then every fit counts). Those are the points where the solvers stop on a flat
    loss, so their scores differ between the heads, solver starts and BLAS threads by a few
    images. Ties go to the smaller C (the stronger regularisation).
    """
    metric = SELECT_KEYS[select]
    values = np.array([row[f"val_{metric}"] for row in curve], dtype=np.float64)
    Cs = np.array([row["C"] for row in curve], dtype=np.float64)
    out: dict[str, Any] = {"select": select, "metric": metric}
    if select in ("top1", "balanced"):
        best = _smallest_C(Cs, values == values.max())
        return out | {"rule": "argmax", "best": float(values[best]), "index": best, "C": float(Cs[best])}
    eligible = np.array([row.get("status", "converged") == "converged" for row in curve])
    out["excluded"] = int((~eligible).sum()) if eligible.any() else 0  # fits not converged at their C
    eligible = eligible if eligible.any() else np.ones(len(curve), dtype=bool)
    if select == "logloss":
        lowest = values[eligible].min()
        index = _smallest_C(Cs, eligible & (values == lowest))
        return out | {"rule": "argmin", "best": float(lowest), "index": index, "C": float(Cs[index])}
    best = int(np.flatnonzero(eligible)[np.argmax(values[eligible])])
    se = float(curve[best][f"val_{metric}_se"])
    threshold = values[best] - se
    # A relative slack of 1e-12 keeps a score that equals the threshold up to rounding a candidate.
    index = _smallest_C(Cs, eligible & (values >= threshold - 1e-12))
    return out | {
        "rule": "one-SE",
        "best": float(values[best]),
        "best_C": float(Cs[best]),
        "se": se,
        "threshold": float(threshold),
        "index": index,
        "C": float(Cs[index]),
    }


def _smallest_C(Cs: np.ndarray, candidates: np.ndarray) -> int:
    """Index of the smallest C among the candidates: the strongest regularisation."""
    rows = np.flatnonzero(candidates)
    return int(rows[np.argmin(Cs[rows])])


def choose(curve: list[dict[str, Any]], select: str) -> int:
    """Index of the C the rule `select` chooses (see `selection`); shared by both heads and the streamed head."""
    return selection(curve, select)["index"]


def curve_row(fit: Fit, y: np.ndarray, log_proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """One row of the validation curve, from float64 log-probabilities (exact log-loss)."""
    proba = np.exp(log_proba)
    scores = metrics.evaluate(y, proba, classes, detail=False, log_proba=log_proba)
    return {
        "C": fit.C,
        "val_top1": scores["top1"],
        "val_top1_se": metrics.binomial_se(scores["top1"], len(y)),
        "val_balanced_accuracy": scores["balanced_accuracy"],
        "val_balanced_accuracy_se": metrics.balanced_accuracy_se(y, proba.argmax(axis=1)),
        "val_log_loss": scores["log_loss"],
        "n_iter": fit.n_iter,
        "converged": fit.converged,
        "status": fit.status,
    }


def _curve(fits: list[Fit], X_val: np.ndarray, y_val: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    return [curve_row(fit, y_val, fit.log_proba(X_val), classes) for fit in fits]


# ------------------------------------------------------------------------------------- checks


def _check_labels(path: Path, labels: dict[str, np.ndarray], classes: list[str]) -> None:
    """Before any features are read: every split a run needs has rows; every class can be learned."""
    if len(labels["train"]) == 0:
        raise DataError(f"cache {path} has no train rows; rebuild it from data with a train split")
    if len(labels["test"]) == 0:
        raise DataError(
            f"cache {path} has no test rows; rebuild it with --test-fraction > 0 (or a test split in the data)"
        )
    in_train = set(np.unique(labels["train"]).tolist())
    for split in ("val", "test"):
        missing = sorted(set(np.unique(labels[split]).tolist()) - in_train)
        if missing:
            names = ", ".join(repr(classes[c]) for c in missing[:5])
            raise DataError(
                f"class {names} has no train rows in {path} but appears in {split}; add training images for it "
                "or drop it from the data"
            )
    if len(in_train) < 2:
        raise DataError(f"cache {path} has one class in train; a classifier needs at least two")


def _check_finite(path: Path, name: str, split: Split) -> None:
    bad = ~np.isfinite(split.X).all(axis=1)
    if bad.any():
        examples = ", ".join(repr(str(i)) for i in split.ids[bad][:3])
        raise DataError(
            f"cache {path} has NaN or infinite features in {bad.sum()} {name} rows (e.g. {examples}); "
            "rebuild it with `pipeline features --force --precision fp32`"
        )


# ----------------------------------------------------------------------------------------- run


def _versions(head: str) -> dict[str, str]:
    names = ["pipeline", "numpy", "scikit-learn", "h5py"] + (["torch"] if head == "torch" else [])
    return {n: importlib.metadata.version(n) for n in names}


def test_set_digest(test: Split) -> str:
    """Identity of a test set (its ids and labels): paired comparisons need equal digests."""
    h = hashlib.sha256(np.ascontiguousarray(test.y, dtype="<i8").tobytes())
    for sample_id in test.ids:
        h.update(str(sample_id).encode() + b"\0")
    return f"sha256:{h.hexdigest()}"


def run(cfg: HeadConfig, report_to: Report = _quiet, cell: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train, select, refit and score a head on the cache ``cfg.features``; write ``cfg.out_path``.

    `cell` labels the run (dataset, backbone, head) for `pipeline compare`. The output folder is
    checked before any fit, locked for the whole run, and replaced in one step at the end.
    """
    outputs.check_results_folder(cfg.out_path, cfg.force)
    with outputs.results_lock(cfg.out_path):
        return _run(cfg, report_to, cell)


def _run(cfg: HeadConfig, report_to: Report, cell: dict[str, Any] | None) -> dict[str, Any]:
    timer = Timer()
    path = Path(cfg.features)  # type: ignore[arg-type]
    grid = sorted(cfg.grid or ((cfg.C,) if cfg.C is not None else DEFAULT_GRID))
    with timer("read"):
        info = cache_info(path)
        labels, classes = info["labels"], info["classes"]
        _check_labels(path, labels, classes)
    if cfg.max_memory is not None:
        from pipeline import stream

        if stream.needs_streaming(cfg, info, len(np.unique(labels["train"]))):
            return stream.run(cfg, info, labels, classes, grid, timer, report_to, cell)
    with timer("read"):
        fs = read_features(path, splits=("train", "val"), dtype=np.float32)
        for name, split in fs.splits.items():
            _check_finite(path, name, split)
    train = fs["train"]
    if "val" in fs.splits:
        val, selected_on = fs["val"], "val"
    else:
        held = stratified_holdout(train.y, cfg.val_fraction, cfg.seed, salt=3)
        if not held.any():
            raise DataError(f"cache {path} has no val split and train is too small to hold out {cfg.val_fraction}")
        val = Split(train.X[held], train.y[held], train.ids[held])
        train = Split(train.X[~held], train.y[~held], train.ids[~held])
        selected_on = f"a stratified holdout of train ({cfg.val_fraction:.0%}, seed {cfg.seed}; no val split)"
    present = np.unique(train.y)  # the head's classes: those it can learn
    names = [classes[c] for c in present]
    encode = lambda y: np.searchsorted(present, y)  # noqa: E731
    y_train, y_val = encode(train.y), encode(val.y)
    report_to(
        f"head: {cfg.head} on {path} ({len(train)} train, {len(val)} val rows, {info['dim']}-d, {len(names)} classes); "
        f"{len(grid)} C values, select by {cfg.select} on {selected_on.split(' (')[0]}"
    )
    repeats = cfg.repeats if cfg.shots else 1
    bar = tqdm(total=len(grid) * repeats, unit="fit", desc="sweep", disable=not cfg.progress)
    runs = []  # per repeat: (curve, chosen index, final fit, preprocessor, trained_on)
    with bar:
        for r in range(repeats):
            rows = draw_shots(y_train, cfg.shots, cfg.seed + r) if cfg.shots else np.arange(len(y_train))
            prep = heads.Preprocessor(cfg.preprocess).fit(train.X[rows])
            X_fit, X_val = prep.transform(train.X[rows]), prep.transform(val.X)
            with timer("sweep"):
                fits = fit_grid(cfg, X_fit, y_train[rows], len(names), grid, tick=bar.update)
                curve = _curve(fits, X_val, y_val, names)
                best = choose(curve, cfg.select)
            if cfg.shots:  # few-shot: val never enters training, so the sweep's fit is final
                runs.append((curve, best, fits[best], prep, f"{cfg.shots} images per class from train"))
                continue
            with timer("refit"):  # the chosen C on train+val, preprocessing refitted on those rows
                X_all = np.concatenate([train.X, val.X])
                y_all = np.concatenate([y_train, y_val])
                prep = heads.Preprocessor(cfg.preprocess).fit(X_all)
                (final,) = fit_grid(cfg, prep.transform(X_all), y_all, len(names), [grid[best]], init=fits[best])
            runs.append((curve, best, final, prep, "train+val"))

    # Every choice is made; only now are the test features read, and scored once.
    with timer("read"):
        test = read_features(path, splits=("test",), dtype=np.float32)["test"]
        _check_finite(path, "test", test)
    with timer("test"):
        y_test = encode(test.y)
        probas = [fit.proba(prep.transform(test.X)) for _, _, fit, prep, _ in runs]
        scored = [metrics.evaluate(y_test, proba, names) for proba in probas]
        pred = probas[0].argmax(axis=1)
        if cfg.bootstrap and not cfg.shots:  # few-shot spread is the std over draws instead
            scored[0]["ci"] = metrics.bootstrap_ci(y_test, pred, len(names), cfg.bootstrap, cfg.seed)
    return finish(cfg, info, grid, runs, scored, names, selected_on, timer, Split(pred, y_test, test.ids), cell)


def finish(
    cfg: HeadConfig,
    info: dict[str, Any],
    grid: list[float],
    runs: list[tuple],
    scored: list[dict[str, Any]],
    names: list[str],
    selected_on: str,
    timer: Timer,
    test: Split,
    cell: dict[str, Any] | None,
) -> dict[str, Any]:
    """Assemble result.json and write every output into a staging folder that replaces ``cfg.out_path``
    only once complete; `test` carries (predicted, true, ids) of the test rows."""
    result = _result(cfg, info, grid, runs, scored, names, selected_on)
    result["test_set"] = test_set_digest(Split(test.X, test.y, test.ids))
    result["cell"] = cell or {}
    result["run_id"] = uuid.uuid4().hex  # head.json and head.npz carry it too: `load_head` checks they match
    with outputs.staged_folder(cfg.out_path) as staging:
        with timer("write"):
            _write(cfg, result, runs[0][2], runs[0][3], info, runs[0][0], names, staging)
            np.savez(staging / "predictions.npz", ids=test.ids.astype(str), y_true=test.y, y_pred=test.X)
        result["timings"] = {k: round(v, 3) for k, v in timer.spans.items()}
        (staging / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _result(cfg, info, grid, runs, scored, names, selected_on) -> dict[str, Any]:
    curve, best, final, _, trained_on = runs[0]
    test: dict[str, Any] = dict(scored[0])
    if len(runs) > 1:  # few-shot repeats: mean and standard deviation over draws
        keys = ["top1", "balanced_accuracy", "macro_f1", "log_loss", "ece"] + (["top5"] if test["top5"] else [])
        test.update({k: float(np.mean([s[k] for s in scored])) for k in keys})
        test["std"] = {k: float(np.std([s[k] for s in scored])) for k in keys}
        test["repeats"] = [{k: s[k] for k in keys} for s in scored]
    chosen_C = [run[0][run[1]]["C"] for run in runs]
    return {
        "schema": 1,
        "out": str(cfg.out_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": to_dict(cfg),
        "cache": {
            "path": info["path"],
            "fingerprint": info["fingerprint"],
            "data": info["config"].get("dataset") or Path(str(info["config"].get("data") or info["path"])).stem,
            "extract_seconds": info["extract_seconds"],
            "features_config": info["config"],
            "dim": info["dim"],
            "rows": {name: n for name, n in info["rows"].items() if n},
        },
        "classes": names,
        "protocol": {
            "selected_on": selected_on,
            "select_metric": SELECT_KEYS[cfg.select],
            "select": cfg.select,
            "selection": selection(curve, cfg.select),  # the rule's best score, SE, threshold, choice
            "trained_on": trained_on,
            "scored_on": "test",
            "test_read_after_choice": True,
            "few_shot": {"shots": cfg.shots, "repeats": len(runs)} if cfg.shots else None,
        },
        "grid": grid,
        "curve": curve,
        "curves": [run[0] for run in runs] if len(runs) > 1 else None,
        "chosen": {"C": chosen_C if len(runs) > 1 else chosen_C[0], "index": best},
        "val_at_choice": {
            "top1": curve[best]["val_top1"],
            "balanced_accuracy": curve[best]["val_balanced_accuracy"],
            "log_loss": curve[best]["val_log_loss"],
        },
        "final_fit": {
            "n_iter": final.n_iter,
            "converged": final.converged,
            "status": final.status,
            "tol": cfg.tol,
            "max_iter": cfg.max_iter,
        },
        "test": test,
        "versions": _versions(cfg.head),
    }


def _write(cfg, result, final: Fit, prep, info, curve, names, out: Path) -> None:
    report.write_csv(curve, out / "curve.csv")
    probe = heads.LinearProbe(prep, final.coef.T, final.intercept, np.array(names))
    meta = {
        "head": cfg.head,
        "C": final.C,
        "cache": str(cfg.features),
        "cache_fingerprint": info["fingerprint"],
        "features_config": info["config"],
        "trained_on": result["protocol"]["trained_on"],
        "config": dataclasses.asdict(cfg),
        "run_id": result["run_id"],
    }
    heads.save_head(probe, out, meta)
    report.plot_validation_curve(curve, final.C, cfg.select, out / "validation_curve.png")
    report.plot_confusion(result["test"]["confusion"], names, out / "confusion_matrix.png")
    report.plot_reliability(result["test"]["reliability"], out / "reliability.png")
    if result["test"].get("repeats"):
        report.write_csv(result["test"]["repeats"], out / "fewshot.csv")
