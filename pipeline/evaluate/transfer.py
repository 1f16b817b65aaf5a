"""How well the transferability scores (`pipeline rank`, recorded by a study beside each run's
accuracy) ranked the backbones and layers: per dataset and head kind, each score's Kendall tau and
weighted tau against the probe's test top-1 across the runs, their table and their scatter plot.

The weighted tau (Vigna, 2015; scipy's `weightedtau`, hyperbolic weights on the ranks by decreasing
value) is the one the transferability literature reports: swaps among the best-scored runs count
more than swaps among the worst. A correlation needs three runs with different values; with fewer it
is left out and the table says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.registry import TRANSFER_SCORES as SCORES

MIN_RUNS = 3


def score_rows(runs: list[Any]) -> list[dict[str, Any]]:
    """One row per run that carries scores (full data, not few-shot): its labels, layer, top-1."""
    rows = []
    for r in runs:
        scores = r.result.get("scores") or {}
        if not any(name in scores for name in SCORES) or r.shots is not None:
            continue
        layer = r.result["cache"].get("layer") or "penultimate"
        lo, hi = (r.result["test"].get("ci") or {}).get("top1", [None, None])
        rows.append(
            {
                "dataset": r.dataset,
                "backbone": r.backbone.removesuffix(f" @ {layer}"),  # its own column here
                "layer": layer,
                "head": r.result["config"]["head"],
                "test_top1": r.result["test"]["top1"],
                "top1_lo": lo,
                "top1_hi": hi,
                **{name: scores.get(name) for name in SCORES},
            }
        )
    return rows


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows per (dataset, head kind), one per (backbone, layer): a repeat is left out."""
    groups: dict[tuple[str, str], dict[tuple[str, str], dict[str, Any]]] = {}
    for row in rows:
        points = groups.setdefault((row["dataset"], row["head"]), {})
        points.setdefault((row["backbone"], row["layer"]), row)
    return {key: list(points.values()) for key, points in groups.items()}


def correlations(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, head kind, score): the runs compared and Kendall's and the weighted tau
    between the score and test top-1 (None where fewer than three runs or a constant side)."""
    from scipy.stats import kendalltau, weightedtau

    out = []
    for (dataset, head), points in sorted(_groups(rows).items()):
        for name in SCORES:
            pairs = [(p[name], p["test_top1"]) for p in points if p[name] is not None]
            tau = weighted = None
            if len(pairs) >= MIN_RUNS:
                x, y = np.array(pairs, dtype=float).T
                if np.ptp(x) > 0 and np.ptp(y) > 0:
                    tau = float(kendalltau(x, y)[0])  # [0]: the statistic, in every scipy
                    weighted = float(weightedtau(x, y)[0])
            if pairs:
                out.append(
                    {
                        "dataset": dataset,
                        "head": head,
                        "score": name,
                        "runs": len(pairs),
                        "kendall_tau": tau,
                        "weighted_tau": weighted,
                    }
                )
    return out


def markdown(rows: list[dict[str, Any]], taus: list[dict[str, Any]], md: Any) -> list[str]:
    """The report's section: the scores beside each run's top-1, then the rank correlations."""
    shown = [name for name in SCORES if any(r[name] is not None for r in rows)]
    lines = [
        "",
        "## Transferability scores (train rows, no training) against test top-1",
        "",
        "| dataset | backbone | layer | head | test top-1 | " + " | ".join(shown) + " |",
        "|---|---|---|---|---|" + "---|" * len(shown),
    ]
    for r in rows:
        cells = ["-" if r[n] is None else f"{r[n]:.4g}" for n in shown]
        lines.append(
            f"| {md(r['dataset'])} | {md(r['backbone'])} | {md(r['layer'])} | {md(r['head'])} | "
            f"{r['test_top1'] * 100:.2f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Rank correlation of each score with test top-1 across backbones and layers (1: the score "
        f"orders the runs as their accuracy does; needs {MIN_RUNS} runs):",
        "",
        "| dataset | head | score | runs | Kendall tau | weighted tau |",
        "|---|---|---|---|---|---|",
    ]
    few = sorted({f"{t['dataset']} / {t['head']}" for t in taus if t["runs"] < MIN_RUNS})
    for t in (t for t in taus if t["runs"] >= MIN_RUNS):
        tau = "-" if t["kendall_tau"] is None else f"{t['kendall_tau']:+.2f}"
        weighted = "-" if t["weighted_tau"] is None else f"{t['weighted_tau']:+.2f}"
        lines.append(
            f"| {md(t['dataset'])} | {md(t['head'])} | {t['score']} | {t['runs']} | {tau} | "
            f"{weighted} |"
        )
    if few:
        lines += ["", f"Too few runs to rank (fewer than {MIN_RUNS}): {md(', '.join(few))}."]
    return lines


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Each score (one panel) against test top-1 with its 95% interval, a marker per dataset /
    head, points labelled by backbone and layer."""
    from pipeline.evaluate.report import _pyplot

    plt = _pyplot()
    shown = [name for name in SCORES if any(r[name] is not None for r in rows)]
    columns = min(3, len(shown))
    lines = math.ceil(len(shown) / columns)
    fig, axes = plt.subplots(
        lines, columns, figsize=(4.2 * columns, 3.2 * lines + 0.4), squeeze=False
    )
    for ax, name in zip(axes.flat, shown, strict=False):
        for (dataset, head), points in sorted(_groups(rows).items()):
            points = [p for p in points if p[name] is not None]
            xs, ys = [p[name] for p in points], [p["test_top1"] * 100 for p in points]
            spread = [  # the probe's 95% interval, where recorded: how far apart runs truly are
                [(p["test_top1"] - (p["top1_lo"] or p["test_top1"])) * 100 for p in points],
                [((p["top1_hi"] or p["test_top1"]) - p["test_top1"]) * 100 for p in points],
            ]
            ax.errorbar(xs, ys, yerr=spread, fmt="o", ms=4, capsize=2, label=f"{dataset} / {head}")
            for p, x, y in zip(points, xs, ys, strict=True):
                ax.annotate(f"{p['backbone']}@{p['layer']}", (x, y), fontsize=6, alpha=0.7)
        ax.set(xlabel=name, ylabel="test top-1 (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Transferability scores against the probe's accuracy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
