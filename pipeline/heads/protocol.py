"""The head protocol, once for every fitter: select C on validation, refit on train+val, read and
score the test split once, write the results.

Split hygiene is structural: test features are read from the file only after every choice is made,
so nothing before the choice can see them; every result says which split chose, which trained the
final head, and which scored it. The rows come from a `Source`: in memory (`fitting`) or streamed
from the file in blocks (`stream`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from pipeline import outputs
from pipeline.cache.reader import CacheInfo, cache_info, check_rows
from pipeline.config import HeadConfig
from pipeline.errors import ConfigError, DataError
from pipeline.evaluate import metrics
from pipeline.heads import choice, kinds, posthoc, results
from pipeline.heads.estimators import Preprocessor
from pipeline.heads.fitting import MemorySource
from pipeline.heads.runs import ChoiceRows, Fit, FittedRun, Predictions, Timer

Report = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


class Source(Protocol):
    """Where the protocol's rows live, and how a fit is made on them (`MemorySource`,
    `StreamSource`)."""

    names: list[str]  # the classes the head learns: those with train rows
    selected_on: ChoiceRows  # val, or a holdout of train
    streams: bool
    views_per_image: int  # augmented views of each train image (--views), 0 without

    def describe(self) -> str: ...
    def __enter__(self) -> Source: ...
    def __exit__(self, *exc: object) -> None: ...
    def sweep(
        self, repeat: int, grid: list[float], tick: Callable[[int], None]
    ) -> tuple[Preprocessor, list[Fit], list[dict[str, Any]]]: ...
    def refit(self, C: float, init: Fit) -> tuple[Preprocessor, Fit]: ...
    def validate(self, fit: Fit, prep: Preprocessor) -> tuple[np.ndarray, np.ndarray]: ...

    sweep_counts: np.ndarray  # per class: the rows the last sweep trained on
    val_counts: np.ndarray  # per class: the validation rows (or holdout)

    def test(self, final: Fit, prep: Preprocessor) -> Predictions: ...


def _check_labels(path: Path, labels: dict[str, np.ndarray], classes: list[str]) -> None:
    """Before any features are read: every split a run needs has rows; every class can be
    learned."""
    if len(labels["train"]) == 0:
        raise DataError(f"cache {path} has no train rows; rebuild it from data with a train split")
    if len(labels["test"]) == 0:
        raise DataError(
            f"cache {path} has no test rows; rebuild it with --test-fraction > 0 (or a test split "
            "in the data)"
        )
    in_train = set(np.unique(labels["train"]).tolist())
    for split in ("val", "test"):
        missing = sorted(set(np.unique(labels[split]).tolist()) - in_train)
        if missing:
            names = ", ".join(repr(classes[c]) for c in missing[:5])
            raise DataError(
                f"class {names} has no train rows in {path} but appears in {split}; add training "
                "images for it "
                "or drop it from the data"
            )
    if len(in_train) < 2:
        raise DataError(f"cache {path} has one class in train; a classifier needs at least two")


def run(
    cfg: HeadConfig,
    report_to: Report = _quiet,
    cell: dict[str, Any] | None = None,
    scores: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train, select, refit and score a head on the cache ``cfg.features``; write ``cfg.out_path``.

    `cell` labels the run (dataset, backbone, head) for `pipeline compare`, and `scores` are the
    cache's transferability scores (`pipeline.rank`) recorded beside its accuracy. The output
    folder is checked before any fit, locked for the whole run, and replaced in one step at the
    end.
    """
    kinds.validate(cfg)  # every rule of the head's kind, before anything is read
    outputs.check_results_folder(cfg.out_path, cfg.force)
    with outputs.results_lock(cfg.out_path):
        return _run(cfg, report_to, cell, scores)


def in_memory_bytes(info: CacheInfo, n_classes: int) -> int:
    """What the in-memory head holds at its peak: train+val as float32 three times (raw,
    preprocessed, the train+val concatenation of the refit), test twice, and the test probabilities.
    """
    rows = info.rows
    trainval = rows["train"] + rows["val"]
    return 4 * info.dim * (3 * trainval + 2 * rows["test"]) + 4 * rows["test"] * n_classes


def needs_streaming(cfg: HeadConfig, info: CacheInfo, n_classes: int) -> bool:
    """True when the in-memory head would hold more than --max-memory; then refuses what streaming
    does not offer, each with one line."""
    budget, need = cfg.max_memory_bytes, in_memory_bytes(info, n_classes)
    if budget is None or need <= budget:
        return False
    over = f"about {need / 1e9:.2f} GB here, above --max-memory {cfg.max_memory}"
    if not kinds.get(cfg.head).may_stream:
        streaming = ", ".join(name for name, kind in kinds.KINDS.items() if kind.may_stream)
        raise ConfigError(
            f"the {cfg.head} head holds the whole cache in memory, {over}; use --head {streaming}, "
            "which streams "
            "the cache from disk within the budget"
        )
    refused = {
        "--shots": cfg.shots,
        "--solver lbfgs (it needs every row for each step; use adam or sgd)": cfg.solver == "lbfgs",
        "--balanced-sampler": cfg.balanced_sampler,
        "--imbalance-ratio": cfg.imbalance_ratio is not None,
        "--views": cfg.views,
    }
    for flag, given in refused.items():
        if given:
            raise ConfigError(
                f"{flag} is not supported when the head streams the cache ({over}); raise "
                "--max-memory"
            )
    return True


def open_source(cfg: HeadConfig, info: CacheInfo, grid: list[float]) -> Source:
    """Rows in memory, or streamed from the file when they would not fit --max-memory (or as the
    head's kind reads them, `HeadKind.open_source`)."""
    own = kinds.get(cfg.head).open_source(cfg, info, grid)
    if own is not None:
        return own
    if needs_streaming(cfg, info, len(np.unique(info.labels["train"]))):
        from pipeline.heads import stream  # torch only when the rows stream

        return stream.StreamSource(cfg, info, grid)
    return MemorySource(cfg, info)


def _adjust(cfg: HeadConfig, source: Source, fit: Any, prep: Preprocessor) -> posthoc.Adjustment:
    """--logit-adjust and --calibrate, fitted on the validation rows (or the holdout) as scored by
    the chosen setting's sweep fit, which never trained on them; the identity when neither is asked
    for."""
    if cfg.logit_adjust_tau is None and cfg.calibrate == "none":
        return posthoc.Adjustment()
    y, log_proba = source.validate(fit, prep)
    final_counts = (
        source.sweep_counts + source.val_counts if cfg.refits_on_val else source.sweep_counts
    )
    train_prior, final_prior = (
        posthoc.log_prior(source.sweep_counts),
        posthoc.log_prior(final_counts),
    )
    adjustment = posthoc.fit(cfg, y, log_proba, train_prior, final_prior, source.names)
    adjustment.record["fitted_on"] = source.selected_on.name
    return adjustment


def _score_adjusted(
    runs: list[FittedRun], raw: list[Predictions], scored: list[dict], names: list[str]
) -> None:
    """Record the test scores before and after each run's post-hoc adjustment."""
    keys = ("top1", "balanced_accuracy", "log_loss", "ece")
    for run, p, after in zip(runs, raw, scored, strict=True):
        if run.adjustment.record:
            before = metrics.evaluate(p.y, p.proba, names, log_proba=p.log_proba)
            run.adjustment.record["test_before"] = {k: before[k] for k in keys}
            run.adjustment.record["test_after"] = {k: after[k] for k in keys}
            run.adjustment.record["reliability_before"] = before["reliability"]


def _run(
    cfg: HeadConfig,
    report_to: Report,
    cell: dict[str, Any] | None,
    scores: dict[str, float] | None = None,
) -> dict[str, Any]:
    timer = Timer()
    path = Path(cfg.features)  # type: ignore[arg-type]
    kind = kinds.get(cfg.head)
    grid = kind.grid(cfg)
    with timer("read"):
        info = cache_info(path, cfg.layer)
        check_rows(
            path
        )  # one pass over the stored rows: nothing edited since the cache was written
        _check_labels(path, info.labels, info.classes)
        source = open_source(cfg, info, grid)
    repeats = cfg.repeats if cfg.shots else 1
    runs: list[FittedRun] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(source)
        counts = (
            source.sweep_counts if not cfg.shots else np.minimum(source.sweep_counts, cfg.shots)
        )
        grid = kind.prepare_grid(grid, int(counts.sum()) * (1 + source.views_per_image), report_to)
        # The header first: a bar drawn before it would take the line it is printed on.
        report_to(
            f"head: {cfg.head} on {path} ({source.describe()}, {info.dim}-d, {len(source.names)} "
            "classes); "
            f"{len(grid)} {kind.setting} values, select by {cfg.select} on "
            f"{source.selected_on.name}"
        )
        # A streamed source shows its own bar (epochs over the file); in memory one tick per fit.
        bar = stack.enter_context(
            tqdm(
                total=len(grid) * repeats,
                unit="fit",
                desc="sweep",
                disable=not cfg.progress or source.streams,
            )
        )
        shots_note = ""
        short = source.sweep_counts < (cfg.shots or 0)
        if short.any():  # a class of fewer train images than --shots gives all of its own
            have = source.sweep_counts[short]
            span = f"{have.min()}" if have.min() == have.max() else f"{have.min()}-{have.max()}"
            fewer = f"{short.sum()} of {len(short)} classes have fewer train images ({span})"
            shots_note = f"; {fewer} and train on all of theirs"
            report_to(f"note: --shots {cfg.shots}: {fewer}; all of theirs are used")
        k = source.views_per_image
        views = (
            f", train images with {k} augmented views each (every view weighs 1/{k + 1})"
            if k
            else ""
        )
        for r in range(repeats):
            with timer("sweep" if cfg.C is None else "fit"):  # --C: one fit on train, scored on val
                prep, fits, curve = source.sweep(r, grid, bar.update)
                best = choice.choose(curve, cfg.select)
                adjustment = _adjust(cfg, source, fits[best], prep)
            if not cfg.refits_on_val:  # val never enters training: the sweep's fit is final
                trained_on = (
                    f"{cfg.shots} images per class from train{shots_note}"
                    if cfg.shots
                    else f"train, long-tailed (imbalance ratio {cfg.imbalance_ratio:g})"
                )
                trained_on += views
                runs.append(
                    FittedRun(
                        curve, best, fits[best], prep, trained_on, adjustment, source.sweep_counts
                    )
                )
                continue
            with timer("refit"):
                prep, final = source.refit(grid[best], init=fits[best])
            if getattr(final, "status", "") == "diverged":
                raise DataError(
                    f"the {cfg.head} head diverged (non-finite weights) when refitted at "
                    f"{final.param} = "
                    f"{final.value:g}; lower --lr, or use --solver lbfgs"
                )
            runs.append(
                FittedRun(
                    curve, best, final, prep, "train+val" + views, adjustment, source.sweep_counts
                )
            )
        # Every choice is made; only now are the test rows read, and scored once.
        with timer("test"):
            raw = [source.test(run.final, run.prep) for run in runs]
    with timer("test"):
        predictions = [p.adjusted(run.adjustment) for p, run in zip(raw, runs, strict=True)]
        scored = [
            metrics.evaluate(p.y, p.proba, source.names, log_proba=p.log_proba) for p in predictions
        ]
        _score_adjusted(runs, raw, scored, source.names)
        for run, p, s in zip(runs, predictions, scored, strict=True):
            s["groups"] = metrics.frequency_groups(p.y, p.pred, run.train_counts)
        if cfg.bootstrap and not cfg.shots:  # few-shot spread is the std over draws instead
            first = predictions[0]
            scored[0]["ci"] = metrics.bootstrap_ci(
                first.y, first.pred, len(source.names), cfg.bootstrap, cfg.seed
            )
    record = results.RunRecord(
        cfg=cfg,
        info=info,
        grid=grid,
        runs=runs,
        scored=scored,
        names=source.names,
        selected_on=source.selected_on if cfg.C is None else ChoiceRows("none"),
        solver=kind.solver(cfg, source.streams),
        streamed=source.streams,
        timer=timer,
        test=predictions[0],
        cell=cell or {},
        scores=scores or {},
    )
    return results.finish(record, report_to)
