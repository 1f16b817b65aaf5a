"""`pipeline compare`: many head results -> one table with intervals, paired tests, few-shot curves.

Runs are paired only when they were scored on the same test rows (equal test-set digests over
ids and labels): then the accuracy difference gets a paired bootstrap interval and McNemar's
exact test, and "A beats B" is printed only when the difference is significant.

Reading the results first: one result folder as a `Run` (result.json checked against
`RESULT_SCHEMA`, predictions.npz read on demand, both refused in one line when they are not what a
head writes), labelled by dataset, backbone and head; `gather` collects every result under some
folders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from pipeline import outputs
from pipeline.errors import CacheError, ConfigError, DataError, MissingError, PipelineError
from pipeline.evaluate import report, transfer
from pipeline.npz import BadArchive, read_arrays
from pipeline.registry import FREQUENCY_GROUPS

RESULT_SCHEMA = 1
MAX_SCORE = 1e12  # no transferability score comes near it: a larger one is a crafted file


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
                arrays = read_arrays(path, ("ids", "y_true", "y_pred"))
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


# What a comparison reads from result.json: dotted path -> (expected type, required). A field that
# is absent where not required reads as missing; any other shape skips the file with its reason.
NUMBER = (int, float)
FIELDS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "test": (dict, True),
    "test.top1": (NUMBER, True),
    "test.balanced_accuracy": (NUMBER, True),
    "test.ci": (dict, False),
    "test.std": (dict, False),
    "test.groups": (dict, False),
    "chosen": (dict, True),
    "chosen.param": (str, False),
    "config": (dict, True),
    "config.head": (str, True),
    "config.imbalance_ratio": (NUMBER, False),
    "config.shots": (NUMBER, False),
    "cache": (dict, True),
    "cache.fingerprint": (dict, False),
    "cache.path": (str, False),
    "cache.data": (str, False),
    "cache.layer": (str, False),
    "cache.extract_seconds": (NUMBER, False),
    "protocol": (dict, True),
    "protocol.train_counts": (dict, False),
    "classes": (list, True),
    "cell": (dict, False),
    "timings": (dict, False),
    "test_set": (str, False),
    "scores": (dict, False),
}


def _check_fields(result: dict[str, Any]) -> None:
    """What a comparison reads from result.json, in the shape it reads it (KeyError or TypeError
    naming the field otherwise): a hand-edited or foreign file is skipped with its reason, never a
    traceback."""
    for path, (kind, required) in FIELDS.items():
        *parents, key = path.split(".")
        holder = result
        for parent in parents:
            holder = holder.get(parent) or {}
        if holder.get(key) is None:
            if required:
                raise KeyError(path)
            continue
        value = holder[key]
        if not isinstance(value, kind) or (kind is NUMBER and isinstance(value, bool)):
            raise TypeError(f"'{path}'")
    test, protocol = result["test"], result["protocol"]
    members = {
        "test.ci": lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v),
        "test.std": _number,
        "test.groups": lambda g: (
            isinstance(g, dict) and (g.get("top1") is None or _number(g["top1"]))
        ),
        "cell": lambda v: isinstance(v, str),
        "scores": lambda v: _number(v) and abs(v) <= MAX_SCORE,  # NaN and inf fail too
        "timings": _number,
        "protocol.train_counts": _number,
    }
    for path, fits in members.items():
        holder = {"test": test, "protocol": protocol}.get(path.split(".")[0], result)
        values = holder.get(path.split(".")[-1]) or {}
        if not all(fits(v) for v in values.values()):
            raise TypeError(f"'{path}'")
    if not all(isinstance(name, str) for name in result["classes"]):
        raise TypeError("'classes'")
    chosen = result["chosen"][result["chosen"].get("param", "C")]  # a list: one per few-shot draw
    if not (_number(chosen) or (isinstance(chosen, list) and chosen and all(map(_number, chosen)))):
        raise TypeError("'chosen'")


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


# ---------------------------------------------------------------------------------- statistics


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test: (A right & B wrong, A wrong & B right, two-sided p-value)."""
    b = int(np.sum(a_correct & ~b_correct))
    c = int(np.sum(~a_correct & b_correct))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)
    return b, c, p


def paired_bootstrap(
    a_correct: np.ndarray,
    b_correct: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Accuracy difference A - B and its percentile interval, resampling the same rows for both."""
    diff = a_correct.astype(np.float64) - b_correct.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(diff.mean()), float(lo), float(hi)


def pair(a: Run, b: Run, alpha: float = 0.05) -> dict[str, Any]:
    """Paired comparison of two runs on the same test rows; refuses runs scored on different
    rows."""
    if a.result.get("test_set") != b.result.get("test_set"):
        ids_a, ids_b = a.predictions()[0], b.predictions()[0]
        raise DataError(
            f"cannot pair {a.folder} and {b.folder}: they were scored on different test sets "
            f"({len(ids_a)} vs {len(ids_b)} rows, digests {str(a.result.get('test_set'))[:19]} vs "
            f"{str(b.result.get('test_set'))[:19]}); compare runs of the same cache split only"
        )
    _, ya, pa = a.predictions()
    _, yb, pb = b.predictions()
    ca, cb = pa == ya, pb == yb
    b_only, c_only, p = mcnemar(ca, cb)
    diff, lo, hi = paired_bootstrap(ca, cb)
    significant = p < alpha and (lo > 0 or hi < 0)
    better, worse = (a, b) if diff > 0 else (b, a)
    differing = [k for k in ("backbone", "head") if getattr(a, k) != getattr(b, k)]
    what = " / ".join(getattr(better, k) for k in differing) or better.name
    than = " / ".join(getattr(worse, k) for k in differing) or worse.name
    context = " / ".join(getattr(a, k) for k in ("backbone", "head") if k not in differing)
    where = f"{a.dataset}" + (f" ({context})" if context else "")
    interval = f"{diff * 100:+.2f} points [{lo * 100:+.2f}, {hi * 100:+.2f}]"
    statement = (
        f"{what} beats {than} on {where}: {abs(diff) * 100:.2f} points better, A-B = {interval}, "
        f"McNemar p = {p:.3g}"
        if significant
        else f"no significant difference between {a.name} and {b.name}: A-B = {interval}, McNemar "
        f"p = {p:.3g}"
    )
    return {
        "dataset": a.dataset,
        "a": a.name,
        "b": b.name,
        "groups": _paired_groups(a, b, ya, ca, cb, alpha),
        "diff_top1": diff,
        "ci": [lo, hi],
        "a_only_right": b_only,
        "b_only_right": c_only,
        "p_value": p,
        "significant": significant,
        "statement": statement,
    }


def group_classes(run: Run) -> dict[str, list[int]]:
    """Encoded classes of each frequency group, from the run's train counts ({} for older
    results)."""
    counts = run.result.get("protocol", {}).get("train_counts")
    if not counts:
        return {}
    n = np.array([counts.get(name, 0) for name in run.result["classes"]])
    return {
        group: np.flatnonzero((n >= low) & (n <= (np.inf if high is None else high))).tolist()
        for group, (low, high) in FREQUENCY_GROUPS.items()
    }


def _paired_groups(
    a: Run, b: Run, y: np.ndarray, ca: np.ndarray, cb: np.ndarray, alpha: float
) -> dict[str, Any]:
    """The paired test within each frequency group the two runs share (the same classes in it)."""
    ga, gb = group_classes(a), group_classes(b)
    out = {}
    for group, classes in ga.items():
        rows = np.isin(y, classes)
        if not classes or classes != gb.get(group) or not rows.any():
            continue
        *_, p = mcnemar(ca[rows], cb[rows])
        diff = float(ca[rows].mean() - cb[rows].mean())
        out[group] = {
            "classes": len(classes),
            "n": int(rows.sum()),
            "diff_top1": diff,
            "p_value": p,
            "significant": p < alpha,
        }
    return out


def comparisons(runs: list[Run], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Every pair of full (not few-shot) runs on the same test rows that differ in backbone or head
    only, and were trained on the same rows (not long-tailed at different ratios)."""
    full = [r for r in runs if r.shots is None]
    out = []
    for a, b in combinations(full, 2):
        if a.result.get("test_set") != b.result.get("test_set") or a.dataset != b.dataset:
            continue
        if a.result["protocol"].get("imbalance") != b.result["protocol"].get("imbalance"):
            continue
        if (a.backbone != b.backbone) + (a.head != b.head) == 1:
            out.append(pair(a, b, alpha))
    return out


# ------------------------------------------------------------------------------------- tables


def summary_rows(runs: list[Run]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        test, t = r.result["test"], r.result.get("timings", {})
        ci = test.get("ci", {})
        top1_ci, bal_ci = ci.get("top1", [None, None]), ci.get("balanced_accuracy", [None, None])
        param = r.result["chosen"].get("param", "C")
        chosen = r.result["chosen"][param]
        rows.append(
            {
                "dataset": r.dataset,
                "backbone": r.backbone,
                "head": r.head,
                "shots": r.shots or "all",
                "test_top1": test["top1"],
                "top1_lo": top1_ci[0],
                "top1_hi": top1_ci[1],
                "top1_std": test.get("std", {}).get("top1"),
                "test_balanced_accuracy": test["balanced_accuracy"],
                "balanced_lo": bal_ci[0],
                "balanced_hi": bal_ci[1],
                **{
                    f"{group}_top1": (test.get("groups") or {}).get(group, {}).get("top1")
                    for group in FREQUENCY_GROUPS
                },
                "setting": param,
                "chosen": chosen if not isinstance(chosen, list) else float(np.median(chosen)),
                "cache_seconds": r.result["cache"].get("extract_seconds"),
                "head_seconds": round(sum(t.values()), 3),
                "folder": str(r.folder),
            }
        )
    return rows


def fewshot_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Test top-1 (mean, std over draws) against shots per class, per dataset / backbone / head."""
    curves: dict[tuple[str, str, str], dict[Any, tuple[float, float]]] = {}
    for r in runs:
        if r.shots is None:
            continue
        key = (r.dataset, r.backbone, r.result["config"]["head"])
        curves.setdefault(key, {})[r.shots] = (
            r.result["test"]["top1"],
            r.result["test"].get("std", {}).get("top1", 0),
        )
    for r in runs:  # the full-data point, when a plain run of the same head exists
        key = (r.dataset, r.backbone, r.result["config"]["head"])
        if r.shots is None and key in curves:
            curves[key]["all"] = (r.result["test"]["top1"], 0.0)
    return [
        {"dataset": d, "backbone": b, "head": h, "shots": k, "top1_mean": m, "top1_std": s}
        for (d, b, h), points in sorted(curves.items())
        for k, (m, s) in sorted(
            points.items(), key=lambda kv: (kv[0] == "all", kv[0] if kv[0] != "all" else 0)
        )
    ]


def _pct(value: Any, lo: Any = None, hi: Any = None, std: Any = None) -> str:
    if value is None:
        return "-"
    text = f"{value * 100:.2f}"
    if lo is not None:
        text += f" [{lo * 100:.1f}, {hi * 100:.1f}]"
    if std:
        text += f" ± {std * 100:.1f}"
    return text


def markdown(
    rows: list[dict],
    pairs: list[dict],
    few: list[dict],
    images: list[str],
    scored: tuple[list[dict], list[dict]] = ([], []),
) -> str:
    """The report: every run's accuracy, the paired tests, frequency groups, few-shot curves, and
    `scored` (runs with transferability scores, and the scores' rank correlations)."""
    lines = [
        "# Comparison",
        "",
        f"{len(rows)} runs. Test accuracy in %, with 95% bootstrap intervals (± std over draws for "
        "few-shot).",
        "",
        "| dataset | backbone | head | shots | test top-1 | balanced accuracy | chosen | cache s | "
        "head s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cache_s = "-" if r["cache_seconds"] is None else f"{r['cache_seconds']:.1f}"
        lines.append(
            f"| {_md(r['dataset'])} | {_md(r['backbone'])} | {_md(r['head'])} | {r['shots']} | "
            f"{_pct(r['test_top1'], r['top1_lo'], r['top1_hi'], r['top1_std'])} | "
            f"{_pct(r['test_balanced_accuracy'], r['balanced_lo'], r['balanced_hi'])} | "
            f"{r['setting']} = {r['chosen']:.3g} | "
            f"{cache_s} | {r['head_seconds']:.1f} |"
        )
    lines += ["", "## Paired comparisons (same test rows)", ""]
    if not pairs:
        lines.append("No two runs share a test set and differ in exactly one of backbone or head.")
    for p in pairs:
        bold = "**" if p["significant"] else ""
        lines.append(f"- {bold}{_md(p['statement'])}{bold}")
        if len(p["groups"]) > 1:  # a long tail: the paired test within each frequency group too
            lines.append(
                "  - by group (A-B, McNemar p): "
                + "; ".join(
                    f"{'**' if g['significant'] else ''}{name} {g['diff_top1'] * 100:+.1f} points, "
                    f"p = {g['p_value']:.3g}"
                    f"{'**' if g['significant'] else ''}"
                    for name, g in p["groups"].items()
                )
            )
    grouped = [r for r in rows if r["medium_top1"] is not None or r["few_top1"] is not None]
    if grouped:
        lines += [
            "",
            "## Top-1 (%) by class frequency (train images: many > 100, medium 20-100, few < 20)",
            "",
        ]
        lines += [
            "| dataset | backbone | head | many | medium | few |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {_md(r['dataset'])} | {_md(r['backbone'])} | {_md(r['head'])} | "
            + " | ".join(
                "-" if r[f"{g}_top1"] is None else f"{r[f'{g}_top1'] * 100:.1f}"
                for g in FREQUENCY_GROUPS
            )
            + " |"
            for r in grouped
        ]
    if few:
        shots = sorted(
            {r["shots"] for r in few}, key=lambda s: (s == "all", s if s != "all" else 0)
        )
        lines += [
            "",
            "## Few-shot: test top-1 (%) against images per class, mean ± std over draws",
            "",
        ]
        lines += [
            "| dataset | backbone | head | " + " | ".join(map(str, shots)) + " |",
            "|---|---|---|" + "---|" * len(shots),
        ]
        by_curve: dict[tuple, dict] = {}
        for r in few:
            by_curve.setdefault((r["dataset"], r["backbone"], r["head"]), {})[r["shots"]] = r
        for (d, b, h), points in by_curve.items():
            cells = [
                _pct(points[s]["top1_mean"], std=points[s]["top1_std"]) if s in points else "-"
                for s in shots
            ]
            lines.append(f"| {_md(d)} | {_md(b)} | {_md(h)} | " + " | ".join(cells) + " |")
    if scored[0]:
        lines += transfer.markdown(*scored, _md)
    lines += [""] + [f"![{Path(i).stem}]({Path(i).name})" for i in images]
    return "\n".join(lines) + "\n"


def _md(text: Any) -> str:
    """A label as one Markdown table cell: its pipes escaped, its line breaks spaces."""
    return " ".join(str(text).replace("\\", "\\\\").replace("|", "\\|").splitlines())


REPORT_FILES = (
    "bars.png",
    "pairs.csv",
    "fewshot.csv",
    "fewshot.png",
    "scores.csv",
    "scores.png",
)  # beside REPORT.md and REPORT.csv


def check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:  # NaN fails too
        raise ConfigError(
            f"--alpha {alpha} is out of range; pass a significance level in (0, 1), e.g. 0.05"
        )


def check_report_target(out: Path, force: bool) -> None:
    """Before any work: the report and its siblings may be written (new, ours, or --force)."""
    outputs.check_file_output(out, "report", force)
    if force or out.exists():
        return
    # without its report, a sibling at these names is someone else's
    siblings = [out.with_suffix(".csv"), *(out.with_name(f"{out.stem}-{e}") for e in REPORT_FILES)]
    taken = [p for p in siblings if p.exists() or p.is_symlink()]
    if taken:
        raise ConfigError(
            f"--out {out}: {taken[0]} exists and was not written with this report; pass another "
            "--out, or --force to replace it"
        )


def write_report(
    paths: list[str | Path], out: str | Path, alpha: float = 0.05, force: bool = False
) -> dict[str, Any]:
    """Markdown + CSV tables and the plots, next to `out`; each file is written whole or not at
    all."""
    check_alpha(alpha)
    out = Path(out)
    check_report_target(out, force)
    skipped: list[str] = []
    runs = gather(paths, skipped)
    rows, pairs, few = summary_rows(runs), comparisons(runs, alpha), fewshot_rows(runs)
    files: dict[Path, Any] = {out.with_suffix(".csv"): lambda tmp: report.write_csv(rows, tmp)}
    images = [out.with_name(out.stem + "-bars.png")]
    files[images[0]] = lambda tmp: report.plot_grouped_bars(rows, tmp)
    if pairs:
        files[out.with_name(out.stem + "-pairs.csv")] = lambda tmp: report.write_csv(pairs, tmp)
    if few:
        files[out.with_name(out.stem + "-fewshot.csv")] = lambda tmp: report.write_csv(few, tmp)
        images.append(out.with_name(out.stem + "-fewshot.png"))
        files[images[-1]] = lambda tmp: report.plot_fewshot(few, tmp)
    scored = transfer.score_rows(runs)
    taus = transfer.correlations(scored)
    if scored:
        files[out.with_name(out.stem + "-scores.csv")] = lambda tmp: report.write_csv(scored, tmp)
        images.append(out.with_name(out.stem + "-scores.png"))
        files[images[-1]] = lambda tmp: transfer.plot(scored, tmp)
    text = markdown(rows, pairs, few, [str(image) for image in images], (scored, taus))
    files[out] = lambda tmp: tmp.write_text(text, encoding="utf-8")
    outputs.replace_files(files)
    return {
        "runs": len(runs),
        "rows": rows,
        "pairs": pairs,
        "fewshot": few,
        "scores": scored,
        "correlations": taus,
        "report": str(out),
        "skipped": skipped,
    }
