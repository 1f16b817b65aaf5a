"""Classification metrics on predicted probabilities, with bootstrap confidence intervals.

Everything takes integer labels `y` (n,) in 0..C-1 and probabilities `proba` (n, C).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)


def top_k_accuracy(y: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the k highest scores (ties broken by order)."""
    top = np.argpartition(-proba, kth=min(k, proba.shape[1]) - 1, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def reliability(y: np.ndarray, proba: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """Confidence histogram: per equal-width bin, mean confidence, accuracy and count; and the ECE."""
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
    y: np.ndarray, pred: np.ndarray, n_classes: int, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, list[float]]:
    """Percentile intervals for top-1 and balanced accuracy over `resamples` resamplings of the rows."""
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


def evaluate(y: np.ndarray, proba: np.ndarray, classes: list[str], detail: bool = True) -> dict[str, Any]:
    """Top-1, top-5 (5+ classes), balanced accuracy, macro-F1, log-loss, ECE; with `detail` also
    per-class precision/recall, the confusion matrix and the reliability table."""
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
        "log_loss": float(log_loss(y, np.clip(proba, 1e-15, 1), labels=labels)),
        "ece": calib["ece"],
    }
    if detail:
        precision, recall, _, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
        out["per_class"] = {
            name: {"precision": float(p), "recall": float(r), "support": int(s)}
            for name, p, r, s in zip(classes, precision, recall, support, strict=True)
        }
        out["confusion"] = confusion_matrix(y, pred, labels=labels).tolist()
        out["reliability"] = calib
    return out
