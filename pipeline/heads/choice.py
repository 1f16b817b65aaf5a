"""Choosing a head's setting (C; k for knn) from a validation curve: one curve row per fit
(`curve_row`, from float64 log-probabilities) and the `--select` rules (`selection`), shared by
every fitter. The curve's first column is the setting; the strongest regularisation is the
smallest C, or the largest k (more neighbours vote), whatever the order of the rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import DataError
from pipeline.evaluate import metrics
from pipeline.heads.runs import Fit
from pipeline.registry import SELECT_RULES


def selection(curve: list[dict[str, Any]], select: str) -> dict[str, Any]:
    """Which C the rule `select` takes from a validation curve, and the numbers that decided it.

    - `top1-1se` / `balanced-1se` (one-standard-error rule): among the fits that converged, find the
      best score p and its standard error SE (`val_*_se` of that row: sqrt(p (1 - p) / n_val) for
      top-1, sqrt(sum_c r_c (1 - r_c) / n_c) / K for balanced accuracy); take the smallest C (the
      largest k) whose score is >= p - SE. A one- or two-image spike on the flat, weakly regularised
      end cannot move the choice: every C it beats by less than its noise stays a candidate.
    - `top1-0.5se` / `balanced-0.5se` (half an SE, contiguous): from the best fit, walk toward
      stronger regularisation while each next fit converged and scores >= p - SE / 2; take the last.
      A far, flat stretch of the curve that happens to score within the band (the weakly fitted end
      at C = 1e-6, where the unpenalised intercept can outweigh the weights) is never reached.
    - `top1` / `balanced`: plain argmax over every fit (the published protocol).
    - `logloss`: the converged fit with the lowest validation log-loss.

    The `*-1se` and `logloss` rules look only at fits whose status is `converged` (see
    `Fit.status`): a fit that did not converge, repeats the previous C's weights, or did not resolve
    its C is scored and shown, but neither sets the best score nor is chosen (unless no fit
    converged, and then every fit counts). Those are the points where the solvers stop on a flat
    loss, so their scores differ between the heads, solver starts and BLAS threads by a few images.
    Ties go to the stronger regularisation (smaller C, larger k).
    """
    metric, param = SELECT_RULES[select], setting(curve)
    values = np.array([row[f"val_{metric}"] for row in curve], dtype=np.float64)
    settings = [np.asarray(row[param]).item() for row in curve]  # plain Python numbers, for JSON
    out: dict[str, Any] = {"select": select, "metric": metric, "param": param}
    # The rows from the strongest regularisation to the weakest: smallest C first, largest k first.
    order = [
        int(i) for i in np.argsort([-s if param == "k" else s for s in settings], kind="stable")
    ]

    def first(candidates: np.ndarray) -> int:  # the strongest regularisation among the candidates
        return next(i for i in order if candidates[i])

    def chosen(index: int) -> dict[str, Any]:
        edge = None  # a choice at an end of a grid of several: the best may lie beyond it
        if len(order) > 1 and index in (order[0], order[-1]):
            edge = "strongest" if index == order[0] else "weakest"
        return {"index": index, param: settings[index], "value": settings[index], "at_edge": edge}

    usable = np.array(
        [row.get("status") != "diverged" for row in curve]
    )  # never chosen, by any rule
    if not usable.any():
        raise DataError(
            f"every fit diverged (non-finite weights) at every {param} tried; lower --lr, or use "
            "--solver lbfgs"
        )
    if select in ("top1", "balanced"):
        best = first(usable & (values == values[usable].max()))
        return out | {"rule": "argmax", "best": float(values[best])} | chosen(best)
    eligible = np.array([row.get("status", "converged") in FITTED for row in curve])
    out["excluded"] = (
        int((~eligible).sum()) if eligible.any() else int((~usable).sum())
    )  # not fits at their C
    eligible = eligible if eligible.any() else usable
    if select == "logloss":
        lowest = values[eligible].min()
        return (
            out
            | {"rule": "argmin", "best": float(lowest)}
            | chosen(first(eligible & (values == lowest)))
        )
    best = first(
        eligible & (values == values[eligible].max())
    )  # of tied bests, the strongest regularisation
    width = 0.5 if select.endswith("-0.5se") else 1.0
    se = float(curve[best][f"val_{metric}_se"])
    threshold = values[best] - width * se
    # A relative slack of 1e-12 keeps a score that equals the threshold up to rounding a candidate.
    inside = eligible & (values >= threshold - 1e-12)
    index = first(inside) if width == 1.0 else _walk(order, inside, best)
    at = order.index(index)
    neighbours = [order[j] for j in (at - 1, at + 1) if 0 <= j < len(order)]
    return (
        out
        | {
            "rule": "one-SE" if width == 1.0 else "half-SE, contiguous",
            "best": float(values[best]),
            f"best_{param}": settings[best],
            "se": se,
            "threshold": float(threshold),
            # Both neighbours below the band: a peak of one point, which may be noise (see the
            # docs).
            "isolated": bool(neighbours)
            and not any(values[j] >= threshold - 1e-12 for j in neighbours),
        }
        | chosen(index)
    )


def _walk(order: list[int], inside: np.ndarray, best: int) -> int:
    """From `best` toward stronger regularisation (`order`: strongest first), the last row before
    the first one outside the band."""
    at = order.index(best)
    while at > 0 and inside[order[at - 1]]:
        at -= 1
    return order[at]


FITTED = ("converged", "exact")  # statuses whose weights are the optimum at their setting


def setting(curve: list[dict[str, Any]]) -> str:
    """The name of the curve's setting: its first column (C, k or temperature)."""
    return next(iter(curve[0]))


def choose(curve: list[dict[str, Any]], select: str) -> int:
    """Index of the C the rule `select` chooses (see `selection`); shared by both heads and the
    streamed head."""
    return selection(curve, select)["index"]


def curve_row(fit: Fit, y: np.ndarray, log_proba: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """One row of the validation curve, from float64 log-probabilities (exact log-loss)."""
    proba = np.exp(log_proba)
    scores = metrics.evaluate(y, proba, classes, detail=False, log_proba=log_proba)
    return {
        fit.param: fit.value,
        **getattr(fit, "columns", {}),
        "val_top1": scores["top1"],
        "val_top1_se": metrics.binomial_se(scores["top1"], len(y)),
        "val_balanced_accuracy": scores["balanced_accuracy"],
        "val_balanced_accuracy_se": metrics.balanced_accuracy_se(y, proba.argmax(axis=1)),
        "val_log_loss": scores["log_loss"],
        "n_iter": fit.n_iter,
        "converged": fit.converged,
        "status": fit.status,
    }
