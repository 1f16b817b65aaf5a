"""Split names and seeded, stratified row selection shared by the feature and head stages.

Carving val/test out of train: `stratified_holdout` (a seeded permutation per class: exact
fractions; adding images re-draws) and `hashed_holdout` (a seeded hash per id: stable as images are
added)."""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "val", "test")  # the codes 0, 1, 2 stored in a cache's `split` dataset


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int, salt: int = 0) -> np.ndarray:
    """Boolean mask taking `fraction` of each class (rounded half up), always leaving one row per
    class behind."""
    rng = np.random.default_rng([seed, salt])
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = min(int(np.floor(fraction * len(rows) + 0.5)), len(rows) - 1)
        mask[rng.permutation(rows)[: max(take, 0)]] = True
    return mask


def hashed_holdout(
    ids: list[str], labels: np.ndarray, fraction: float, seed: int, salt: int = 0
) -> np.ndarray:
    """Boolean mask of the rows whose seeded hash of their id falls under `fraction`: each row's
    fate depends on its own id only, so adding rows never moves an existing one. Per class, two
    guards: a class with no row under `fraction` (one smaller than about 1/fraction) gives its
    lowest-hash row, so every carved split sees every class; and one row per class (its
    highest-hash) always stays behind."""
    u = np.array([_unit_hash(f"{seed}:{salt}:{i}") for i in ids])
    mask = u < fraction
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2 or fraction <= 0:
            mask[rows] = False
            continue
        if not mask[rows].any():
            mask[rows[np.argmin(u[rows])]] = True
        if mask[rows].all():
            mask[rows[np.argmax(u[rows])]] = False
    return mask


def _unit_hash(text: str) -> float:
    """A number in [0, 1) from `text`, the same on every machine and Python (no PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2.0**64


def draw_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted row indices of `shots` rows per class (all of a class's rows when it has fewer)."""
    rng = np.random.default_rng([seed, 4])
    picked = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def long_tail(labels: np.ndarray, ratio: float, seed: int, order: str = "seeded") -> np.ndarray:
    """Sorted row indices of a long-tailed subset (CIFAR-LT): the class at place i of the order
    keeps int(n_max * ratio ** (-i / (K - 1))) of its rows (at least one, at most all it has), drawn
    with `seed`; n_max is the largest class's count. `order`: `seeded` (a permutation of the classes
    by `seed`) or `frequency` (the most frequent first, ties by class)."""
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng([seed, 5])
    ranked = (
        rng.permutation(len(classes)) if order == "seeded" else np.argsort(-counts, kind="stable")
    )
    n_max, last = int(counts.max()), max(len(classes) - 1, 1)
    picked = []
    for place, c in enumerate(ranked):
        keep = min(max(int(n_max * ratio ** (-place / last)), 1), int(counts[c]))
        picked.append(rng.permutation(np.flatnonzero(labels == classes[c]))[:keep])
    return np.sort(np.concatenate(picked))
