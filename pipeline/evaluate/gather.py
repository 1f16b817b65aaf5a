"""Reading head results for comparison: one result folder as a `Run` (result.json checked against
`RESULT_SCHEMA`, predictions.npz read on demand), labelled by dataset, backbone and head; `gather`
collects every result under some folders."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import CacheError, MissingError, PipelineError
from pipeline.npz import BadArchive, read_arrays

RESULT_SCHEMA = 1


@dataclass
class Run:
    """One head result folder (result.json + predictions.npz)."""

    folder: Path
    result: dict[str, Any]
    dataset: str
    backbone: str
    head: str
    shots: int | None
    _pred: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.dataset} / {self.backbone} / {self.head}"

    def predictions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, y_true, y_pred) on the test split, checked: three arrays of one length, classes as
        whole numbers, nothing pickled."""
        if self._pred is None:
            path = self.folder / "predictions.npz"
            if not path.is_file():
                raise MissingError(
                    f"{path} is missing; rerun `pipeline head` for {self.folder} to write it"
                )
            try:
                arrays = read_arrays(path)
                ids, y_true, y_pred = arrays["ids"], arrays["y_true"], arrays["y_pred"]
            except (BadArchive, KeyError) as why:
                raise CacheError(
                    f"{path} is unreadable ({why}); rerun `pipeline head` for {self.folder}"
                ) from None
            shapes = {a.shape for a in (ids, y_true, y_pred)}
            if (
                len(shapes) != 1
                or ids.ndim != 1
                or y_true.dtype.kind not in "iu"
                or y_pred.dtype.kind not in "iu"
            ):
                raise CacheError(
                    f"{path} holds arrays of other shapes or kinds than a head writes; rerun "
                    "`pipeline head` for "
                    f"{self.folder}"
                )
            self._pred = (ids, y_true, y_pred)
        return self._pred


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    path = folder / "result.json" if folder.is_dir() else folder
    if not path.is_file():
        raise MissingError(f"no result.json in {folder}; pass folders written by `pipeline head`")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError, RecursionError) as exc:
        raise CacheError(
            f"result {path} is unreadable ({type(exc).__name__}); rerun `pipeline head` for it"
        ) from None
    if not isinstance(result, dict) or result.get("schema") != RESULT_SCHEMA:
        schema = result.get("schema") if isinstance(result, dict) else None
        raise CacheError(
            f"result {path} has schema {schema!r}, this pipeline reads {RESULT_SCHEMA}; rerun "
            "`pipeline head` for it"
        )
    try:
        _check_fields(result)
        cell, cache = result.get("cell") or {}, result["cache"]
        weights = str(cache["fingerprint"].get("weights", "?")).split(" (")[0]
        layer = cache.get("layer", "penultimate")
        at = (
            "" if layer == "penultimate" else f" @ {layer}"
        )  # a layer is another feature: a backbone row of its own
        return Run(
            folder=path.parent,
            result=result,
            dataset=cell.get("dataset") or cache.get("data") or Path(cache["path"]).stem,
            backbone=(
                cell.get("backbone") or f"{cache['fingerprint'].get('backbone', '?')} {weights}"
            )
            + at,
            head=cell.get("head") or head_label(result["config"]),
            shots=result["config"].get("shots"),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise CacheError(
            f"result {path} lacks {exc} or has it in another shape; rerun `pipeline head` for it"
        ) from None


def _check_fields(result: dict[str, Any]) -> None:
    """What a comparison reads from result.json, in the shape it reads it (KeyError or TypeError
    naming the field otherwise): a hand-edited or foreign file is skipped with its reason, never a
    traceback."""
    test, chosen = result["test"], result["chosen"]
    if (
        not isinstance(test, dict)
        or not isinstance(chosen, dict)
        or not isinstance(result["config"], dict)
    ):
        raise TypeError("'test', 'chosen' or 'config'")
    for key in ("top1", "balanced_accuracy"):
        if not isinstance(test[key], int | float):
            raise TypeError(f"'test.{key}'")
    for key in ("ci", "std", "groups"):
        if not isinstance(test.get(key) or {}, dict):
            raise TypeError(f"'test.{key}'")
    for name, interval in (test.get("ci") or {}).items():
        if not (
            isinstance(interval, list) and len(interval) == 2 and all(_number(v) for v in interval)
        ):
            raise TypeError(f"'test.ci.{name}'")
    for name, value in (test.get("std") or {}).items():
        if not _number(value):
            raise TypeError(f"'test.std.{name}'")
    for name, group in (test.get("groups") or {}).items():
        if not isinstance(group, dict) or not (group.get("top1") is None or _number(group["top1"])):
            raise TypeError(f"'test.groups.{name}'")
    cell = result.get("cell") or {}
    if not isinstance(cell, dict) or not all(isinstance(v, str) for v in cell.values()):
        raise TypeError("'cell'")
    config = result["config"]
    if not isinstance(config.get("head"), str) or not all(
        config.get(key) is None or _number(config[key]) for key in ("imbalance_ratio", "shots")
    ):
        raise TypeError("'config.head', 'config.imbalance_ratio' or 'config.shots'")
    if not isinstance(result["cache"], dict) or not isinstance(
        result["cache"].get("fingerprint", {}), dict
    ):
        raise TypeError("'cache'")
    chosen[chosen.get("param", "C")]
    timings = result.get("timings", {})
    if not isinstance(timings, dict) or not all(_number(v) for v in timings.values()):
        raise TypeError("'timings'")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def head_label(config: dict[str, Any]) -> str:
    """The head's name with what else changed its training or outputs: a long tail, logit
    adjustment, temperature scaling, augmented views (so two runs of one head that differ in them
    are told apart; a layer other than the features shows in the backbone's label instead)."""
    parts = [str(config["head"])]
    if config.get("imbalance_ratio"):
        parts.append(f"long tail R={config['imbalance_ratio']:g}")
    if config.get("logit_adjust") is not None:
        parts.append(f"logit adjust {config['logit_adjust']}")
    if config.get("calibrate", "none") != "none":
        parts.append(f"calibrated ({config['calibrate']})")
    if config.get("views"):
        parts.append("augmented views")
    return " + ".join(parts)


def gather(paths: list[str | Path], skipped: list[str] | None = None) -> list[Run]:
    """Every result under the given folders (searched recursively) or result.json files. An
    unreadable result is left out and its reason appended to `skipped`: one bad file does not stop a
    report."""
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise MissingError(
                f"{p} does not exist; pass result folders written by `pipeline head`"
            )
        files = [p] if p.is_file() else sorted(p.rglob("result.json"))
        for f in files:
            try:
                runs.append(load_run(f))
            except PipelineError as exc:
                if skipped is None:
                    raise
                skipped.append(str(exc))
    if not runs and skipped:
        raise CacheError(f"no readable result under {', '.join(map(str, paths))}: {skipped[0]}")
    if not runs:
        raise MissingError(
            f"no result.json under {', '.join(map(str, paths))}; run `pipeline head` or a study "
            "first"
        )
    return sorted(
        runs, key=lambda r: (r.dataset, r.backbone, r.shots is not None, r.shots or 0, r.head)
    )
