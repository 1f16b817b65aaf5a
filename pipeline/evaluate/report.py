"""Plots and tables of head results. The only module that imports matplotlib (Agg, no display)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_validation_curve(
    curve: list[dict[str, Any]], selection: dict[str, Any], path: str | Path, run: str = ""
) -> Path:
    """Validation top-1 (with its binomial standard error), balanced accuracy and log-loss against
    C.

    `selection` is what the --select rule decided (`pipeline.heads.choice.selection`): the rule, the
    chosen C and, for the SE rules, the threshold. Fits that did not converge are crossed out in
    red, warm-start-only fits (the previous C's weights) are hollow grey circles and fits that did
    not resolve their C (the penalty's gradient below tol) hollow grey diamonds, so none reads as
    the optimum at its C; the SE rules also show their threshold.
    """
    plt = _pyplot()
    metric, param = selection["select"], selection.get("param", "C")
    chosen_C, name = selection[param], {"C": "C", "k": "k", "temperature": "T"}.get(param, param)
    Cs = np.array([row[param] for row in curve], dtype=float)
    top1 = np.array([row["val_top1"] for row in curve])
    fig, ax = plt.subplots(figsize=(6.4, 4))
    se = [row.get("val_top1_se", 0.0) for row in curve]
    ax.errorbar(
        Cs, top1, yerr=se, fmt="o-", ms=3, lw=1, capsize=1.5, elinewidth=0.6, label="val top-1 ± SE"
    )
    ax.plot(
        Cs,
        [row["val_balanced_accuracy"] for row in curve],
        "s-",
        ms=3,
        lw=1,
        label="val balanced accuracy",
    )
    if param == "candidate":  # numbered candidates (mlp): no scale to plot them on
        ax.set_xticks(Cs)
    else:
        ax.set_xscale("log")
    if param != "candidate" and (
        len(set(Cs)) == 1
    ):  # a fixed C: give the log axis some width (before a twin axis autoscales it)
        ax.set_xlim(Cs[0] / 10, Cs[0] * 10)
    _mark_status(ax, curve, Cs, top1)
    # the rule's validation metric (registry.SELECT_RULES)
    key = f"val_{selection.get('metric', 'top1')}"
    target = ax
    if all("val_log_loss" in row for row in curve):
        loss_ax = ax.twinx()
        loss_ax.plot(Cs, [row["val_log_loss"] for row in curve], "-", color="0.55", lw=1)
        loss_ax.set_ylabel("val log-loss (grey)", color="0.4")
        target = loss_ax if key == "val_log_loss" else ax
    if "threshold" in selection and all(f"{key}_se" in row for row in curve):
        band = "best − 1 SE" if metric.endswith("-1se") else "best − SE/2 (contiguous)"
        ax.axhline(selection["threshold"], color="tab:red", ls=":", lw=1, label=band)
    best = (
        curve[selection["index"]]
        if "index" in selection
        else next(r for r in curve if r[param] == chosen_C)
    )
    ax.axvline(chosen_C, color="0.6", ls="--", lw=1)
    target.plot(
        [chosen_C], [best[key]], "r*", ms=14, label=f"chosen {name} = {chosen_C:.3g} ({metric})"
    )
    xlabel = {
        "C": "C (inverse regularisation strength)",
        "k": "k (neighbours)",
        "candidate": "candidate (strongest regularisation first; see curve.csv)",
    }.get(param, f"{param} (fixed)")
    ax.set(xlabel=xlabel, ylabel="accuracy", title=_title("Validation curve", run))
    ax.grid(alpha=0.3)
    handles = [h for a in {ax, target} for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _mark_status(ax: Any, curve: list[dict[str, Any]], Cs: np.ndarray, top1: np.ndarray) -> None:
    """Mark the fits whose scores are not those of the optimum at their C (see
    `pipeline.heads.runs.Fit.status`)."""
    status = np.array([row.get("status", "converged") for row in curve])
    styles = {
        "not converged": dict(
            marker="x", color="tab:red", ms=8, mew=1.5, label="not converged (max_iter)"
        ),
        "warm start only": dict(
            marker="o", mfc="white", mec="0.5", ms=6, label="warm start only (no step)"
        ),
        "C not resolved": dict(
            marker="D", mfc="white", mec="0.5", ms=5, label="C not resolved (penalty < tol)"
        ),
    }
    for name, style in styles.items():
        if (status == name).any():
            ax.plot(Cs[status == name], top1[status == name], ls="none", **style)


def _title(what: str, run: str) -> str:
    """A plot's title: what it shows, and which run (dataset / backbone / head) on a line below."""
    return f"{what}\n{run}" if run else what


def plot_confusion(
    confusion: list[list[int]], classes: list[str], path: str | Path, run: str = ""
) -> Path:
    """Row-normalised confusion matrix (recall on the diagonal); names shown up to 30 classes."""
    plt = _pyplot()
    counts = np.asarray(confusion, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    size = min(4 + 0.3 * n, 14)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    ax.set(xlabel="predicted", ylabel="true", title=_title("Test confusion matrix", run))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_reliability(
    table: dict[str, Any], path: str | Path, before: dict[str, Any] | None = None, run: str = ""
) -> Path:
    """Accuracy against confidence on test; with `before` (the table before a post-hoc adjustment)
    that too. Each bar's count sits above it inside the frame; the legend sits below the axes,
    covering nothing."""
    plt = _pyplot()
    edges = np.asarray(table["edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    counts = np.asarray(table["count"])
    shown = counts > 0
    fig, ax = plt.subplots(figsize=(4.8, 5.4))
    accuracy = np.asarray(table["accuracy"])
    ax.bar(
        centers[shown],
        accuracy[shown],
        width=width * 0.9,
        alpha=0.8,
        label="accuracy (n above the bar)",
    )
    for x, a, n in zip(centers[shown], accuracy[shown], counts[shown], strict=True):
        ax.text(x, a + 0.015, str(n), ha="center", va="bottom", fontsize=6)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    title = f"Reliability (test), ECE = {table['ece']:.3f}"
    if before is not None:
        held = np.asarray(before["count"]) > 0
        ax.plot(
            np.asarray(before["confidence"])[held],
            np.asarray(before["accuracy"])[held],
            "o-",
            color="tab:red",
            ms=3,
            lw=1,
            label=f"before the post-hoc adjustment (ECE {before['ece']:.3f})",
        )
        title = f"Reliability (test), ECE {before['ece']:.3f} -> {table['ece']:.3f}"
    ax.set(xlim=(0, 1), ylim=(0, 1.1), xlabel="confidence (max probability)", ylabel="accuracy")
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(_title(title, run))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=7, ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _fmt(value: Any, ci: Sequence[float] | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def choice_notes(result: dict[str, Any]) -> list[str]:
    """What the reader of a result should know about its choices: one at a grid's edge (the best may
    lie beyond it), an isolated peak, a logit adjustment at the end of its grid."""
    notes = []
    selection = result["protocol"].get("selection") or {}
    param = selection.get("param", "C")
    edge = selection.get("at_edge")
    if edge:
        widen = {
            "candidate": "add candidates (mlp: --hidden, --dropout, --weight-decay; tail: "
            "--lr-grid, --weight-decay)"
        }.get(param, "widen --grid")
        notes.append(
            f"the chosen {param} is the {edge}-regularised end of the grid: the best may lie "
            f"beyond it; {widen} to see"
        )
    if selection.get("isolated"):
        notes.append(
            f"the chosen {param} is an isolated peak: both neighbours score below the rule's band, "
            "so it may be "
            "a few lucky val images; compare validation_curve.png, or try --select top1-1se or "
            "logloss"
        )
    posthoc = result.get("posthoc")
    if isinstance(posthoc, dict) and (posthoc.get("logit_adjust") or {}).get("at_edge"):
        notes.append(
            "logit adjustment TAU = 2 is the end of its grid (0, 0.25, ..., 2): the best may be "
            "larger"
        )
    weights = str(((result.get("cache") or {}).get("fingerprint") or {}).get("weights", ""))
    if weights.startswith("none"):
        n_classes = len(result.get("classes") or []) or 1
        confusion = np.asarray((result.get("test") or {}).get("confusion") or [[1]], dtype=float)
        majority = confusion.sum(axis=1).max() / max(confusion.sum(), 1)
        notes.append(
            f"these features come from random weights ({weights}), not pretrained ones, so they "
            "say little about "
            f"transfer; chance is {1 / n_classes:.1%} for {n_classes} classes, {majority:.1%} "
            "always guessing "
            "test's largest class (pretrained: --weights DEFAULT)"
        )
    return notes


def format_table(result: dict[str, Any]) -> str:
    """The short summary printed at the end of a head run."""
    test, val, ci = result["test"], result.get("val_at_choice", {}), result["test"].get("ci", {})
    std = result["test"].get("std", {})
    rows = [
        ("top-1", "top1"),
        ("top-5", "top5"),
        ("balanced accuracy", "balanced_accuracy"),
        ("macro-F1", "macro_f1"),
        ("log-loss", "log_loss"),
        ("ECE", "ece"),
    ]
    protocol = result["protocol"]
    chosen = result["chosen"]
    param = chosen.get("param", "C")
    Cs = chosen[param] if isinstance(chosen[param], list) else [chosen[param]]
    values = ", ".join(f"{c:.3g}" for c in Cs)
    how = (
        f"{param} = {values} given (--C), nothing chosen"
        if protocol.get("select") == "fixed"
        else f"{param} = {values} chosen on "
        f"{protocol.get('selected_on_note', protocol['selected_on'])} by "
        f"{protocol.get('select', protocol['select_metric'])} from {len(result['grid'])} values"
    )
    lines = [
        f"run        {result['out']}",
        f"cache      {result['cache']['path']} "
        f"({result['cache']['fingerprint'].get('backbone', '?')}, "
        f"{result['cache']['dim']}-d, {len(result['classes'])} classes)",
        f"head       {result['config']['head']}; {how}; "
        f"trained on {protocol['trained_on']}; scored once on {protocol['scored_on']}",
        *(f"note       {note}" for note in choice_notes(result)),
        "",
        f"{'metric':<19}{f'val (chosen {param})':>16}   "
        + "test"
        + (" [95% CI]" if ci else "")
        + (" ± std" if std else ""),
    ]
    for label, key in rows:
        test_text = _fmt(test.get(key), ci.get(key))
        if key in std:
            test_text += f" ± {std[key]:.4f}"
        lines.append(f"{label:<19}{_fmt(val.get(key)):>16}   {test_text}")
    groups = test.get("groups")
    if groups:
        shown = [
            f"{name} {_fmt(g['top1'])} ({g['classes']} classes)"
            for name, g in groups.items()
            if g["classes"]
        ]
        lines.append(
            f"{'top-1 by group':<19}{'':>16}   "
            + ", ".join(shown)
            + " (train images: >100, 20-100, <20)"
        )
    adjusted = result.get("posthoc")
    if isinstance(adjusted, dict):
        before, after = adjusted["test_before"], adjusted["test_after"]
        done = (
            [f"logit adjustment TAU = {adjusted['logit_adjust']['tau']:g}"]
            if "logit_adjust" in adjusted
            else []
        )
        calibration = adjusted.get("calibration")
        if calibration:
            done.append(
                f"temperature T = {calibration['temperature']:.3g}"
                if calibration.get("fitted", True)
                else "temperature not fitted (no minimum on val)"
            )
        lines += [
            "",
            f"post-hoc   {', '.join(done)} (fitted on {adjusted['fitted_on']}); test before -> "
            "after: " + ", ".join(f"{k} {before[k]:.4f} -> {after[k]:.4f}" for k in before),
        ]
    t = result["timings"]
    lines += ["", "time       " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items())]
    return "\n".join(lines)


def plot_grouped_bars(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Test top-1 per dataset, one bar per backbone / head, with the 95% interval as error bars."""
    plt = _pyplot()
    full = [r for r in rows if r["shots"] == "all"] or rows
    datasets = sorted({r["dataset"] for r in full})
    series = sorted({(r["backbone"], r["head"]) for r in full})
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(
        figsize=(max(5, 1.6 * len(datasets) + 0.4 * len(series)), 4.4 + 0.12 * len(series))
    )
    tops: list[float] = []
    bottoms: list[float] = []
    for k, (backbone, head) in enumerate(series):
        xs, ys, errs = [], [], [[], []]
        for i, d in enumerate(datasets):
            match = [
                r for r in full if (r["dataset"], r["backbone"], r["head"]) == (d, backbone, head)
            ]
            if not match:
                continue
            r = match[0]
            xs.append(i - 0.4 + width * (k + 0.5))
            ys.append(r["test_top1"] * 100)
            lo, hi = r["top1_lo"], r["top1_hi"]
            errs[0].append((r["test_top1"] - lo) * 100 if lo is not None else 0)
            errs[1].append((hi - r["test_top1"]) * 100 if hi is not None else 0)
        bars = ax.bar(
            xs, ys, width=width * 0.95, yerr=errs, capsize=3, label=f"{backbone} / {head}"
        )
        for bar, y in zip(
            bars, ys, strict=True
        ):  # the value inside the bar's top, clear of its interval
            ax.text(
                bar.get_x() + bar.get_width() * 0.97,
                y,
                f"{y:.1f} ",
                ha="right",
                va="top",
                fontsize=6,
            )
        tops += [y + hi for y, hi in zip(ys, errs[1], strict=True)]
        bottoms += [y - lo for y, lo in zip(ys, errs[0], strict=True)]
    # Zoom to the data and its intervals: from 0, 97.1% and 95.6% would look the same.
    span = max(max(tops, default=100) - min(bottoms, default=0), 1.0)
    ax.set_ylim(
        max(0.0, min(bottoms, default=0) - 0.25 * span),
        min(100.0, max(tops, default=100) + 0.2 * span),
    )
    ax.set_xticks(range(len(datasets)), datasets)
    what = "Test top-1, 95% intervals (axis zoomed)"
    ax.set(ylabel="test top-1 (%)", title=_title(what, ", ".join(datasets)))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_fewshot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Test top-1 against images per class (log2 axis), mean ± std over draws; 'all' at the
    right."""
    plt = _pyplot()
    curves: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        curves.setdefault((r["dataset"], r["backbone"], r["head"]), []).append(r)
    numeric = [r["shots"] for r in rows if r["shots"] != "all"]
    all_x = 2 * max(numeric) if numeric else 1
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for (d, b, h), points in sorted(curves.items()):
        xs = [all_x if p["shots"] == "all" else p["shots"] for p in points]
        ax.errorbar(
            xs,
            [p["top1_mean"] * 100 for p in points],
            yerr=[p["top1_std"] * 100 for p in points],
            marker="o",
            ms=4,
            capsize=3,
            label=f"{d} / {b} / {h}",
        )
    ticks = sorted(set(numeric)) + ([all_x] if any(r["shots"] == "all" for r in rows) else [])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) if t != all_x or all_x in numeric else "all" for t in ticks])
    ax.set(
        xlabel="training images per class", ylabel="test top-1 (%)", title="Few-shot linear probes"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
