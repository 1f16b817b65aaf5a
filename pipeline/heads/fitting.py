"""The protocol's rows held as arrays (`MemorySource`): train, val or a holdout, few-shot draws, the
--views of train, and test, read last. Its fits are the head kind's (`fit_grid`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.reader import CacheInfo, Split, read_features
from pipeline.cache.schema import fingerprint_tag, views_path
from pipeline.config import HeadConfig
from pipeline.errors import CacheError, DataError, MissingError
from pipeline.heads import choice, kinds
from pipeline.heads.estimators import Preprocessor
from pipeline.heads.runs import ChoiceRows, Fit, Predictions
from pipeline.splits import draw_shots, long_tail, stratified_holdout


def fit_grid(
    cfg: HeadConfig,
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    Cs: list[float],
    tick: Callable[[int], None] = lambda n: None,
    init: Fit | None = None,
    sample_weight: np.ndarray | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[Any]:
    """One fit per setting on the same rows in memory, by the kind of ``cfg.head`` (see
    `pipeline.heads.kinds`); `sample_weight`: the --views weights; `val`: the validation rows, for
    a kind that watches them while it trains (`HeadKind.early_stops`)."""
    kind = kinds.get(cfg.head)
    watch = {"val": val} if val is not None and kind.early_stops else {}
    return kind.fit_grid(cfg, X, y, n_classes, Cs, tick, init, sample_weight, **watch)


def check_finite(path: Path | str, name: str, split: Split) -> None:
    bad = ~np.isfinite(split.X).all(axis=1)
    if bad.any():
        examples = ", ".join(repr(str(i)) for i in split.ids[bad][:3])
        raise DataError(
            f"cache {path} has NaN or infinite features in {bad.sum()} {name} rows (e.g. "
            f"{examples}); "
            "rebuild it with `pipeline features --force --precision fp32`"
        )


class MemorySource:
    """The protocol's rows as arrays: train and val (or a stratified holdout of train) read up
    front, test only when `test` is called, after every choice."""

    streams = False

    def __init__(self, cfg: HeadConfig, info: CacheInfo) -> None:
        self.cfg, self.path = cfg, Path(info.path)
        fs = read_features(  # its rows were checked where the protocol opened the cache
            self.path, splits=("train", "val"), dtype=np.float32, layer=cfg.layer, verify=False
        )
        for name, split in fs.splits.items():
            check_finite(self.path, name, split)
        train = fs["train"]
        if "val" in fs.splits:
            val, self.selected_on = fs["val"], ChoiceRows("val")
        else:
            held = stratified_holdout(train.y, cfg.val_fraction, cfg.seed, salt=3)
            if not held.any():
                raise DataError(
                    f"cache {self.path} has no val split and train is too small to hold out "
                    f"{cfg.val_fraction}"
                )
            val = Split(train.X[held], train.y[held], train.ids[held])
            train = Split(train.X[~held], train.y[~held], train.ids[~held])
            self.selected_on = ChoiceRows("holdout", cfg.val_fraction, cfg.seed)
        if (
            cfg.imbalance_ratio is not None
        ):  # long-tailed training rows; val (or the holdout) untouched
            keep = long_tail(train.y, cfg.imbalance_ratio, cfg.seed, cfg.imbalance_order)
            train = Split(train.X[keep], train.y[keep], train.ids[keep])
        self.views, self.view_image, self.view_weight, self.views_per_image = (
            None,
            np.zeros(0, np.int64),
            1.0,
            0,
        )
        if cfg.views:
            self._read_views(train.ids, info.fingerprint)
        self.present = np.unique(train.y)  # the head's classes: those it can learn
        self.names = [info.classes[c] for c in self.present]
        self.train, self.val = train, val
        self.y_train, self.y_val = self.encode(train.y), self.encode(val.y)
        self.sweep_counts = np.bincount(self.y_train, minlength=len(self.names))
        self.val_counts = np.bincount(self.y_val, minlength=len(self.names))
        self.kind = kinds.get(cfg.head)

    def encode(self, y: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.present, y)

    def _read_views(self, train: np.ndarray, fingerprint: dict) -> None:
        """The augmented views of the train images (NAME.views.h5), each tied to its image, from
        views made for this very state of the cache; kept for the images that train here (not held
        out, not left out)."""
        path = views_path(self.path)
        if not path.exists():
            raise MissingError(
                f"--views: no views cache {path}; run `pipeline features` with --views K for this "
                "cache"
            )
        vs = read_features(path, splits=("train",), dtype=np.float32, layer=self.cfg.layer)
        check_finite(path, "train", vs["train"])
        if vs.fingerprint.get("views_of") != fingerprint_tag(fingerprint):
            raise CacheError(
                f"views cache {path} was made for another state of cache {self.path} (its images "
                "or settings changed "
                "since); rerun `pipeline features` with --views K on the same settings"
            )
        base = np.array([i.rsplit("#view", 1)[0] for i in vs["train"].ids])
        k = int(np.unique(base, return_counts=True)[1].max(initial=0))
        index = {sample_id: row for row, sample_id in enumerate(train)}
        image = np.array([index.get(b, -1) for b in base], dtype=np.int64)
        kept = image >= 0
        self.views = Split(vs["train"].X[kept], vs["train"].y[kept], vs["train"].ids[kept])
        self.view_image, self.view_weight = (
            image[kept],
            1.0 / (k + 1),
        )  # each image weighs 1 over its K+1 views
        self.views_per_image = k

    def _train_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(X, y, weights) of train images `rows`, with their views after them when --views."""
        if self.views is None:
            return self.train.X[rows], self.y_train[rows], None
        chosen = np.isin(self.view_image, rows)
        X = np.concatenate([self.train.X[rows], self.views.X[chosen]])
        y = np.concatenate([self.y_train[rows], self.y_train[self.view_image[chosen]]])
        return X, y, np.full(len(y), self.view_weight)

    def describe(self) -> str:
        views = f" (+{self.views_per_image} views per image)" if self.views is not None else ""
        return f"{len(self.train)} train{views}, {len(self.val)} val rows"

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def sweep(self, repeat: int, grid: list[float], tick: Callable[[int], None]):
        """Fits of every C on train (or this repeat's few-shot draw), and their validation curve."""
        cfg = self.cfg
        rows = (
            draw_shots(self.y_train, cfg.shots, cfg.seed + repeat)
            if cfg.shots
            else np.arange(len(self.y_train))
        )
        self.sweep_counts = np.bincount(self.y_train[rows], minlength=len(self.names))
        X, y, w = self._train_rows(rows)
        prep = Preprocessor(self.kind.preprocessing(cfg)).fit(X)
        Z_val = prep.transform(self.val.X)
        fits = fit_grid(
            cfg,
            prep.transform(X),
            y,
            len(self.names),
            grid,
            tick=tick,
            sample_weight=w,
            val=(Z_val, self.y_val),
        )
        log_probas = self.kind.log_proba_all(fits, Z_val)
        return (
            prep,
            fits,
            [
                choice.curve_row(fit, self.y_val, lp, self.names)
                for fit, lp in zip(fits, log_probas, strict=True)
            ],
        )

    def refit(self, C: float, init: Fit) -> tuple[Preprocessor, Fit]:
        """The chosen C on train+val, preprocessing refitted on those rows."""
        X, y, w = self._train_rows(np.arange(len(self.y_train)))
        X_all, y_all = np.concatenate([X, self.val.X]), np.concatenate([y, self.y_val])
        w_all = (
            None if w is None else np.concatenate([w, np.ones(len(self.y_val))])
        )  # val: one view, weight 1
        prep = Preprocessor(self.kind.preprocessing(self.cfg)).fit(X_all)
        (final,) = fit_grid(
            self.cfg,
            prep.transform(X_all),
            y_all,
            len(self.names),
            [C],
            init=init,
            sample_weight=w_all,
        )
        return prep, final

    def validate(self, fit: Fit, prep: Preprocessor) -> tuple[np.ndarray, np.ndarray]:
        """Classes and log-probabilities of the validation rows (never trained on by `fit`)."""
        return self.y_val, self.kind.log_proba_all([fit], prep.transform(self.val.X))[0]

    @functools.cached_property
    def _test(self) -> Split:
        """The test rows, read once, on the first `test` call: after every choice."""
        test = read_features(
            self.path, splits=("test",), dtype=np.float32, layer=self.cfg.layer, verify=False
        )["test"]
        check_finite(self.path, "test", test)
        return test

    def test(self, final: Fit, prep: Preprocessor) -> Predictions:
        test = self._test
        return Predictions(test.ids, self.encode(test.y), final.log_proba(prep.transform(test.X)))
