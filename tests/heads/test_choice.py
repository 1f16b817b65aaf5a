"""The rule that chooses C: half a standard error contiguous with the best (default), one standard
error, plain argmax (published protocol), log-loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.config import HeadConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import metrics, report
from pipeline.heads import choice

GRID = list(np.logspace(-3, 4, 29))
N_VAL = 160


def _curve(
    top1: list[float], status: list[str] | None = None, balanced: list[float] | None = None
) -> list[dict]:
    """A validation curve as `choice.curve_row` writes it, from accuracies on N_VAL rows."""
    rows = []
    for k, p in enumerate(top1):
        b = p if balanced is None else balanced[k]
        rows.append(
            {
                "C": GRID[k],
                "val_top1": p,
                "val_top1_se": metrics.binomial_se(p, N_VAL),
                "val_balanced_accuracy": b,
                "val_balanced_accuracy_se": metrics.binomial_se(b, N_VAL) / 2,
                "val_log_loss": 1.0 - p + 0.001 * k,
                "n_iter": 10,
                "converged": True,
                "status": "converged" if status is None else status[k],
            }
        )
    return rows


def _plateau_with_a_spike() -> list[float]:
    """Rises to 0.8 (128 of 160) at the 10th C, stays there; one image more at the 25th C (the
    spike)."""
    top1 = [min(0.8, 0.5 + 0.03 * k) for k in range(len(GRID))]
    top1[24] = 129 / N_VAL
    return top1


def test_argmax_takes_a_one_image_spike_and_the_one_se_rule_does_not():
    curve = _curve(_plateau_with_a_spike())
    assert choice.choose(curve, "top1") == 24, "argmax: the spike on the flat end"
    chosen = choice.selection(curve, "top1-1se")
    se = math.sqrt(129 / 160 * 31 / 160 / 160)
    assert chosen["se"] == pytest.approx(se) and chosen["threshold"] == pytest.approx(
        129 / 160 - se
    )
    assert chosen["best_C"] == GRID[24] and chosen["rule"] == "one-SE"
    # The smallest C within one SE of the best (0.806 - 0.031 = 0.775): 0.5 + 0.03 k >= 0.775 first
    # at k = 10.
    assert chosen["index"] == 10 and chosen["C"] == GRID[10]
    assert choice.choose(curve, "top1-1se") == 10
    # Without the spike argmax jumps 14 grid steps, to the plateau's first C; the one-SE choice
    # moves by one.
    curve[24]["val_top1"] = 0.8
    assert choice.choose(curve, "top1") == 10 and choice.choose(curve, "top1-1se") == 9


def test_the_default_rule_is_the_contiguous_half_se_rule_and_it_ignores_the_spike():
    assert HeadConfig(features="x.h5").select == "top1-0.5se"
    assert choice.choose(_curve(_plateau_with_a_spike()), "top1-0.5se") == 10, (
        "the start of the plateau, not the spike"
    )
    choices = "top1-1se, balanced-1se, top1-0.5se, balanced-0.5se, top1, balanced, logloss"
    with pytest.raises(
        ConfigError, match=rf"--select 'best' is not allowed; choose one of: {choices}"
    ):
        HeadConfig(features="x.h5", select="best")


def test_balanced_one_se_uses_the_balanced_accuracy_error():
    balanced = [min(0.7, 0.4 + 0.03 * k) for k in range(len(GRID))]
    curve = _curve(_plateau_with_a_spike(), balanced=balanced)
    chosen = choice.selection(curve, "balanced-1se")
    assert chosen["metric"] == "balanced_accuracy" and chosen["best"] == 0.7
    threshold = 0.7 - metrics.binomial_se(0.7, N_VAL) / 2
    assert chosen["threshold"] == pytest.approx(threshold)
    assert chosen["index"] == min(k for k, b in enumerate(balanced) if b >= threshold)
    assert choice.choose(curve, "balanced") == balanced.index(0.7)


@pytest.mark.parametrize("other", ["not converged", "warm start only", "C not resolved"])
def test_fits_that_are_not_the_optimum_at_their_C_are_not_candidates(other):
    top1 = _plateau_with_a_spike()
    status = [other if k < 12 or k == 24 else "converged" for k in range(len(GRID))]
    curve = _curve(top1, status)
    chosen = choice.selection(curve, "top1-1se")
    assert chosen["best"] == 0.8 and chosen["index"] == 12 and chosen["excluded"] == 13
    assert choice.choose(curve, "top1") == 24, "argmax is the published protocol: every fit counts"
    assert choice.choose(curve, "logloss") == 12
    unconverged = _curve(top1, [other] * len(GRID))  # nothing converged: every fit is a candidate
    assert choice.choose(unconverged, "top1-1se") == 10


def test_logloss_rule_and_ties_go_to_the_smaller_C():
    curve = _curve(_plateau_with_a_spike())
    assert choice.selection(curve, "logloss") | {"best": None} == {
        "select": "logloss",
        "metric": "log_loss",
        "excluded": 0,
        "rule": "argmin",
        "best": None,
        "index": 10,
        "C": GRID[10],
        "param": "C",
        "value": GRID[10],
        "at_edge": None,
    }
    flat = _curve([0.9] * len(GRID))
    assert choice.choose(flat, "top1") == 0 and choice.choose(flat, "top1-1se") == 0
    shuffled = [
        flat[k] for k in np.random.default_rng(0).permutation(len(GRID))
    ]  # rows in any order
    assert shuffled[choice.choose(shuffled, "top1-1se")]["C"] == GRID[0]


def test_a_perfect_validation_score_has_no_error_and_the_rule_is_argmax():
    top1 = [min(1.0, 0.6 + 0.05 * k) for k in range(len(GRID))]
    chosen = choice.selection(_curve(top1), "top1-1se")
    assert chosen["se"] == 0 and chosen["index"] == top1.index(1.0)


def test_standard_errors_by_hand():
    assert metrics.binomial_se(0.9, 100) == pytest.approx(0.03)
    y = np.array([0] * 10 + [1] * 40)
    pred = np.array(
        [0] * 5 + [1] * 5 + [1] * 36 + [0] * 4
    )  # recalls 0.5 on 10 rows, 0.9 on 40 rows
    assert metrics.balanced_accuracy_se(y, pred) == pytest.approx(
        math.sqrt(0.25 / 10 + 0.09 / 40) / 2
    )


def test_the_plot_marks_fits_that_are_not_fits_at_their_C(tmp_path):
    status = (
        ["converged"] * 18
        + ["C not resolved"] * 2
        + ["warm start only"] * 5
        + ["not converged"] * 4
    )
    curve = _curve(_plateau_with_a_spike(), status)
    for select in ("top1-1se", "top1", "logloss", "balanced-1se"):
        path = report.plot_validation_curve(
            curve, choice.selection(curve, select), tmp_path / f"{select}.png"
        )
        assert path.stat().st_size > 10_000


def test_the_contiguous_half_se_rule_never_jumps_to_a_far_flat_stretch():
    # High at the weakly fitted far end (C = 1e-3 .. 1e-2.5, where the intercept can outweigh tiny
    # weights),
    # a dip, then a rise to the best at the 20th C.
    top1 = [0.78] * 3 + [0.5] * 5 + [min(0.8, 0.6 + 0.02 * k) for k in range(len(GRID) - 8)]
    curve = _curve(top1)
    best = int(np.argmax(top1))
    assert choice.choose(curve, "top1-1se") == 0, "one SE: the far stretch is inside the band"
    chosen = choice.selection(curve, "top1-0.5se")
    assert chosen["rule"] == "half-SE, contiguous" and chosen["threshold"] == pytest.approx(
        0.8 - chosen["se"] / 2
    )
    index = chosen["index"]
    assert 8 <= index <= best and top1[index] >= chosen["threshold"], (
        "on the rise to the best, inside the band"
    )
    assert top1[index - 1] < chosen["threshold"], "the next stronger setting is outside the band"


def test_the_contiguous_rule_equals_an_independent_walk_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top1 = list(np.round(rng.uniform(0.3, 0.9, len(GRID)) * N_VAL) / N_VAL)
        status = list(rng.choice(["converged", "converged", "not converged"], len(GRID)))
        curve = _curve(top1, status)
        shuffled = [curve[k] for k in rng.permutation(len(GRID))]  # rows in any order
        got = shuffled[choice.choose(shuffled, "top1-0.5se")]["C"]
        ok = np.array([s == "converged" for s in status])
        acc = np.array(top1)
        best = int(np.flatnonzero(ok)[np.argmax(acc[ok])])
        band = acc[best] - 0.5 * metrics.binomial_se(acc[best], N_VAL)
        i = best
        while i > 0 and ok[i - 1] and acc[i - 1] >= band - 1e-12:
            i -= 1
        assert got == GRID[i]


def test_an_isolated_peak_and_a_choice_at_the_grids_edge_are_flagged():
    """A best that stands more than half an SE above both neighbours is chosen by the contiguous
    rule (its walk stops at once) and flagged; so is a choice at either end of the grid."""
    top1 = [min(0.6, 0.4 + 0.02 * k) for k in range(len(GRID))]
    top1[20] = 0.7  # 16 images above its neighbours: far outside half an SE (0.018)
    chosen = choice.selection(_curve(top1), "balanced-0.5se")
    assert chosen["index"] == 20 and chosen["isolated"] and chosen["at_edge"] is None
    result = {"protocol": {"selection": chosen}, "posthoc": None}
    assert any(
        "is an isolated peak: both neighbours score below the rule's band" in n
        for n in report.choice_notes(result)
    )
    plateau = choice.selection(_curve(_plateau_with_a_spike()), "top1-0.5se")
    assert (
        not plateau["isolated"] and report.choice_notes({"protocol": {"selection": plateau}}) == []
    )
    rising = choice.selection(_curve([0.1 + 0.02 * k for k in range(len(GRID))]), "top1")
    assert rising["at_edge"] == "weakest"
    notes = report.choice_notes({"protocol": {"selection": rising}})
    assert notes == [
        "the chosen C is the weakest-regularised end of the grid: the best may lie beyond it; "
        "widen --grid to see"
    ]
    falling = choice.selection(_curve([0.9 - 0.02 * k for k in range(len(GRID))]), "top1-0.5se")
    assert falling["at_edge"] == "strongest"


def test_features_from_random_weights_are_named_with_the_chance_level():
    result = {
        "protocol": {},
        "classes": ["a", "b", "c", "d"],
        "cache": {"fingerprint": {"weights": "none (random init, seed 0)"}},
        "test": {"confusion": [[5, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 2]]},
    }
    (note,) = report.choice_notes(result)
    assert note.startswith(
        "these features come from random weights (none (random init, seed 0)), not pretrained"
    )
    assert "chance is 25.0% for 4 classes, 50.0% always guessing test's largest class" in note
    result["cache"]["fingerprint"]["weights"] = "ResNet18_Weights.IMAGENET1K_V1"
    assert report.choice_notes(result) == []
