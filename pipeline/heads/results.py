"""What a head run leaves behind: result.json (schema `RESULT_SCHEMA`), curve.csv, the head files,
predictions and plots, written into a staging folder that replaces the results folder in one step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import outputs
from pipeline.cache.reader import CacheInfo
from pipeline.config import HeadConfig
from pipeline.evaluate import report
from pipeline.evaluate.compare import RESULT_SCHEMA
from pipeline.heads import choice, kinds
from pipeline.heads.runs import ChoiceRows, FittedRun, Predictions, Timer
from pipeline.heads.saved import save_head
from pipeline.registry import SELECT_RULES
from pipeline.settings import to_dict


def _versions(head: str) -> dict[str, str]:
    names = ["pipeline", "numpy", "scikit-learn", "h5py", *kinds.get(head).packages]
    return {n: importlib.metadata.version(n) for n in names}


def test_set_digest(ids: np.ndarray, y: np.ndarray) -> str:
    """Identity of a test set (its ids and labels): paired comparisons need equal digests."""
    h = hashlib.sha256(np.ascontiguousarray(y, dtype="<i8").tobytes())
    for sample_id in ids:
        h.update(str(sample_id).encode() + b"\0")
    return f"sha256:{h.hexdigest()}"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """Everything a head run decided and measured, as the protocol hands it over to be written."""

    cfg: HeadConfig
    info: CacheInfo
    grid: list[float]
    runs: list[FittedRun]  # one per few-shot draw, else one
    scored: list[dict[str, Any]]  # each run's test metrics
    names: list[str]  # the classes the head learned
    selected_on: ChoiceRows
    solver: str
    streamed: bool
    timer: Timer
    test: Predictions  # the first run's test predictions
    cell: dict[str, Any]  # a study's labels: dataset, backbone, head
    scores: dict[str, float] = dataclasses.field(default_factory=dict)  # `pipeline.rank`'s


def finish(record: RunRecord, say: Any = lambda message: None) -> dict[str, Any]:
    """Assemble result.json and write every output into a staging folder that replaces
    ``cfg.out_path`` only once complete."""
    cfg, test = record.cfg, record.test
    result = _result(record)
    result["test_set"] = test_set_digest(test.ids, test.y)
    result["cell"] = record.cell
    if record.scores:
        result["scores"] = record.scores
    result["run_id"] = (
        uuid.uuid4().hex
    )  # head.json and head.npz carry it too: `load_head` checks they match
    with outputs.staged_folder(cfg.out_path, say) as staging:
        with record.timer("write"):
            _write(cfg, result, record.runs[0], record.info, record.names, staging)
            np.savez(
                staging / "predictions.npz",
                ids=test.ids.astype(str),
                y_true=test.y,
                y_pred=test.pred,
            )
        result["timings"] = {k: round(v, 3) for k, v in record.timer.spans.items()}
        (staging / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _result(record: RunRecord) -> dict[str, Any]:
    cfg, info, runs, scored = record.cfg, record.info, record.runs, record.scored
    first = runs[0]
    curve, best, final = first.curve, first.best, first.final
    test: dict[str, Any] = dict(scored[0])
    if len(runs) > 1:  # few-shot repeats: mean and standard deviation over draws
        keys = ["top1", "balanced_accuracy", "macro_f1", "log_loss", "ece"] + (
            ["top5"] if test["top5"] else []
        )
        test.update({k: float(np.mean([s[k] for s in scored])) for k in keys})
        test["std"] = {k: float(np.std([s[k] for s in scored])) for k in keys}
        test["repeats"] = [{k: s[k] for k in keys} for s in scored]
    param, chosen = runs[0].final.param, [run.value for run in runs]
    return {
        "schema": RESULT_SCHEMA,
        "out": str(cfg.out_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": to_dict(cfg),
        "cache": {
            "path": info.path,
            "fingerprint": info.fingerprint,
            "data": info.config.get("dataset")
            or Path(str(info.config.get("data") or info.path)).stem,
            "extract_seconds": info.extract_seconds,
            "features_config": info.config,
            "dim": info.dim,
            "layer": cfg.layer
            or "penultimate",  # what the head read: the penultimate features or stored layer(s)
            "rows": {name: n for name, n in info.rows.items() if n},
        },
        "classes": record.names,
        "protocol": {
            # With --C, nothing is chosen: the one C is trained on train, scored on val, refitted.
            "selected_on": record.selected_on.on,
            "selected_on_note": record.selected_on.note,
            "select_metric": SELECT_RULES[cfg.select],
            "select": "fixed" if cfg.C is not None else cfg.select,
            "selection": (
                {
                    "select": "fixed",
                    "metric": SELECT_RULES[cfg.select],
                    "rule": "fixed",
                    "param": param,
                    "index": 0,
                    param: cfg.C,
                    "value": cfg.C,
                    "at_edge": None,
                }
                if cfg.C is not None
                else choice.selection(
                    curve, cfg.select
                )  # the rule's best score, SE, threshold, choice
            ),
            "trained_on": first.trained_on,
            "scored_on": "test",
            "test_read_after_choice": True,
            "train_counts": dict(zip(record.names, first.train_counts.tolist(), strict=True)),  # type: ignore[union-attr]
            "imbalance": (
                {"ratio": cfg.imbalance_ratio, "order": cfg.imbalance_order}
                if cfg.imbalance_ratio
                else None
            ),
            "few_shot": {"shots": cfg.shots, "repeats": len(runs)} if cfg.shots else None,
            "rows": "streamed from the cache in blocks" if record.streamed else "in memory",
        },
        "grid": record.grid,
        "curve": curve,
        "curves": [run.curve for run in runs] if len(runs) > 1 else None,
        # The chosen setting under its name (C, k or temperature) and as `value`; a list over
        # few-shot draws.
        "chosen": {"param": param, param: chosen if len(runs) > 1 else chosen[0], "index": best}
        | {"value": chosen if len(runs) > 1 else chosen[0]},
        "val_at_choice": {
            "top1": curve[best]["val_top1"],
            "balanced_accuracy": curve[best]["val_balanced_accuracy"],
            "log_loss": curve[best]["val_log_loss"],
        },
        "final_fit": {
            "solver": record.solver,
            "n_iter": final.n_iter,
            "converged": final.converged,
            "status": final.status,
            "tol": cfg.tol,
            "max_iter": cfg.max_iter,
        },
        "test": test,
        "posthoc": _posthoc(runs),
        "versions": _versions(cfg.head),
    }


def _posthoc(runs: list[FittedRun]) -> dict[str, Any] | list[dict[str, Any]] | None:
    """How each run's logit adjustment and temperature were fitted, and the test scores before and
    after them (None without --logit-adjust or --calibrate)."""
    if not runs[0].adjustment.record:
        return None
    records = [
        {k: v for k, v in run.adjustment.record.items() if k != "reliability_before"}
        for run in runs
    ]
    return records[0] if len(records) == 1 else records


def _write(
    cfg: HeadConfig, result: dict[str, Any], run: FittedRun, info: CacheInfo, names, out: Path
) -> None:
    report.write_csv(run.curve, out / "curve.csv")
    head = kinds.get(cfg.head).trained(run.final, run.prep, np.array(names), run.adjustment)
    meta = {
        "head": cfg.head,
        run.final.param: run.final.value,
        "cache": str(cfg.features),
        "cache_fingerprint": info.fingerprint,
        "features_config": info.config,
        "trained_on": result["protocol"]["trained_on"],
        "config": dataclasses.asdict(cfg),
        "run_id": result["run_id"],
        "posthoc": _saved_adjustment(run),
    }
    save_head(head, out, meta)
    label = _run_label(result)
    report.plot_validation_curve(
        run.curve, result["protocol"]["selection"], out / "validation_curve.png", label
    )
    report.plot_confusion(result["test"]["confusion"], names, out / "confusion_matrix.png", label)
    before = run.adjustment.record.get("reliability_before")
    report.plot_reliability(
        result["test"]["reliability"], out / "reliability.png", before=before, run=label
    )
    if result["test"].get("repeats"):
        report.write_csv(result["test"]["repeats"], out / "fewshot.csv")


def _run_label(result: dict[str, Any]) -> str:
    """dataset / backbone / head, as the plots' titles name the run (a study's cell labels win)."""
    cell, cache = result.get("cell") or {}, result["cache"]
    weights = str(cache["fingerprint"].get("weights", "?")).split(" (")[0]
    backbone = cell.get("backbone") or f"{cache['fingerprint'].get('backbone', '?')} {weights}"
    head = cell.get("head") or result["config"]["head"]
    return f"{cell.get('dataset') or cache['data']} / {backbone} / {head}"


def _saved_adjustment(run: FittedRun) -> dict[str, Any] | None:
    """What head.json says about the post-hoc adjustment inside the saved head."""
    record = run.adjustment.record
    if not record:
        return None
    tau = record.get("logit_adjust", {}).get("tau", 0.0)
    return {"logit_adjust_tau": tau, "temperature": run.adjustment.temperature}
