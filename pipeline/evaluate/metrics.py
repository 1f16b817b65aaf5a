"""Classification metrics on predicted probabilities, with bootstrap confidence intervals.

Everything takes integer labels `y` (n,) in 0..C-1 and probabilities `proba` (n, C). The log-loss
is taken from float64 log-probabilities (`log_proba`, a log-softmax of the logits) when given:
probabilities that underflow or are clipped would otherwise cap the loss of a confident mistake.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from pipeline.registry import FREQUENCY_GROUPS


def top_k_accuracy(y: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (ties broken by order)."""
    top = np.argpartition(-proba, kth=min(k, proba.shape[1]) - 1, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def log_loss(y: np.ndarray, proba: np.ndarray, log_proba: np.ndarray | None = None) -> float:
    """Mean negative log-likelihood of the labels, in float64, without clipping.

    From `log_proba` it is exact. From `proba` alone it is exact down to p(y) = 1e-300 when the
    probabilities are float64 (a float32 row that underflowed to 0 counts as the smallest float64).
    scikit-learn's `log_loss` clips at the input dtype's epsilon: 1.2e-7 for float32, which turns a
    loss of 27.6 (p = 1e-12) into 15.9.
    """
    rows = np.arange(len(y))
    if log_proba is not None:
        picked = np.asarray(log_proba, dtype=np.float64)[rows, y]
    else:
        tiny = np.finfo(np.float64).smallest_subnormal
        picked = np.log(np.maximum(np.asarray(proba, dtype=np.float64)[rows, y], tiny))
    return float(-picked.mean()) if len(y) else float("nan")


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n independent rows: sqrt(p (1 - p) / n)."""
    return float(np.sqrt(p * (1 - p) / n)) if n else float("nan")


def balanced_accuracy_se(y: np.ndarray, pred: np.ndarray) -> float:
    """Standard error of the balanced accuracy (mean recall over the classes present in y):
    sqrt(sum_c r_c (1 - r_c) / n_c) / K, each class's recall a binomial proportion on its n_c rows.
    """
    classes, counts = np.unique(y, return_counts=True)
    if not len(classes):
        return float("nan")
    recall = np.array([(pred[y == c] == c).mean() for c in classes])
    return float(np.sqrt(np.sum(recall * (1 - recall) / counts)) / len(classes))


def reliability(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Confidence histogram: per equal-width bin, mean confidence, accuracy and count; and the
    ECE."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    which = np.clip((confidence * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    acc_sum = np.bincount(which, weights=correct, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = conf_sum / count, acc_sum / count
    ece = float(np.nansum(np.abs(accuracy - mean_conf) * count) / max(len(y), 1))
    return {
        "edges": np.linspace(0, 1, bins + 1).tolist(),
        "confidence": np.nan_to_num(mean_conf).tolist(),
        "accuracy": np.nan_to_num(accuracy).tolist(),
        "count": count.tolist(),
        "ece": ece,
    }


def bootstrap_ci(
    y: np.ndarray,
    pred: np.ndarray,
    n_classes: int,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile intervals for top-1 and balanced accuracy over `resamples` resamplings of the
    rows."""
    if resamples <= 0 or len(y) == 0:
        return {}
    rng = np.random.default_rng(seed)
    n = len(y)
    top1, balanced = np.empty(resamples), np.empty(resamples)
    correct = (pred == y).astype(np.int64)
    block = max(1, 250_000 // n)  # (block, n) index arrays of ~2 MB each: memory stays flat in n
    for start in range(0, resamples, block):
        b = min(block, resamples - start)
        idx = rng.integers(0, n, size=(b, n))  # (b, n)
        hits = correct[idx]
        top1[start : start + b] = hits.mean(axis=1)
        # Per-resample, per-class counts of (label, correct) in one bincount.
        codes = (np.arange(b)[:, None] * n_classes + y[idx]) * 2 + hits
        table = np.bincount(codes.ravel(), minlength=b * n_classes * 2).reshape(b, n_classes, 2)
        totals = table.sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = table[..., 1] / totals
        balanced[start : start + b] = np.nanmean(np.where(totals > 0, recall, np.nan), axis=1)
    tail = (1 - level) / 2 * 100
    return {
        "top1": np.percentile(top1, [tail, 100 - tail]).tolist(),
        "balanced_accuracy": np.percentile(balanced, [tail, 100 - tail]).tolist(),
    }


def frequency_groups(y: np.ndarray, pred: np.ndarray, train_counts: np.ndarray) -> dict[str, Any]:
    """Top-1 within each frequency group of classes (`registry.FREQUENCY_GROUPS`: many > 100 train
    images, medium 20-100, few < 20), with how many classes and test rows each holds; a group
    without classes has top1 None."""
    counts = np.asarray(train_counts)
    out = {}
    for name, (low, high) in FREQUENCY_GROUPS.items():
        classes = np.flatnonzero(
            (counts >= low) & (counts <= (high if high is not None else np.inf))
        )
        rows = np.isin(y, classes)
        top1 = float((pred[rows] == y[rows]).mean()) if rows.any() else None
        out[name] = {"classes": len(classes), "n": int(rows.sum()), "top1": top1}
    return out


def evaluate(
    y: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    detail: bool = True,
    log_proba: np.ndarray | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 (5+ classes), balanced accuracy, macro-F1, log-loss, ECE; with `detail` also
    per-class precision/recall, the confusion matrix and the reliability table. `log_proba`
    (float64 log-softmax of the logits) makes the log-loss exact; see `log_loss`."""
    n_classes = len(classes)
    labels = np.arange(n_classes)
    pred = proba.argmax(axis=1)
    calib = reliability(y, proba)
    out: dict[str, Any] = {
        "n": len(y),
        "top1": float((pred == y).mean()),
        "top5": top_k_accuracy(y, proba, 5) if n_classes >= 5 else None,
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": log_loss(y, proba, log_proba),
        "ece": calib["ece"],
    }
    if detail:
        precision, recall, _, support = precision_recall_fscore_support(
            y, pred, labels=labels, zero_division=0
        )
        out["per_class"] = {
            name: {"precision": float(p), "recall": float(r), "support": int(s)}
            for name, p, r, s in zip(classes, precision, recall, support, strict=True)
        }
        out["confusion"] = confusion_matrix(y, pred, labels=labels).tolist()
        out["reliability"] = calib
    return out
