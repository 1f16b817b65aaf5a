"""The head stage on caches: protocol (no test peeking, refit on train+val), few-shot, outputs,
errors."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from sklearn.datasets import make_classification

from pipeline import cli, read_features, registry
from pipeline.cache import schema
from pipeline.config import HeadConfig
from pipeline.errors import CacheError, ConfigError, DataError, MissingError
from pipeline.heads import choice, fitting, kinds, protocol
from pipeline.heads.saved import load_head
from pipeline.splits import draw_shots

from helpers import REPO, write_cache

FAST_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


def head_cfg(cache, tmp_path, **overrides) -> HeadConfig:
    settings = dict(
        features=str(cache),
        out=str(tmp_path / "run"),
        grid=FAST_GRID,
        progress=False,
        bootstrap=100,
    )
    settings.update(overrides)
    return HeadConfig(**settings)


MLP_FIVE = dict(
    grid=None, hidden=(4, 8, 16, 32, 64), dropout=(0.0,), weight_decay=(1e-4,), epochs=8
)


@pytest.mark.parametrize(
    ("head", "grid"),
    [
        ("logreg", FAST_GRID),
        ("torch", FAST_GRID),
        ("knn", (1, 3, 5, 10, 20)),
        ("mlp", MLP_FIVE),  # its early stopping watches val, never test
    ],
)
def test_test_split_is_read_only_after_the_choice(
    synthetic_cache, tmp_path, monkeypatch, head, grid
):
    events = []
    real_read, real_choose = fitting.read_features, choice.choose

    def read(path, splits, **kwargs):
        events.append(("read", tuple(splits)))
        return real_read(path, splits=splits, **kwargs)

    def choose(curve, metric):
        events.append(("choose", len(curve)))
        return real_choose(curve, metric)

    monkeypatch.setattr(fitting, "read_features", read)
    monkeypatch.setattr(choice, "choose", choose)
    settings = grid if isinstance(grid, dict) else {"grid": grid}
    result = protocol.run(head_cfg(synthetic_cache, tmp_path, head=head, **settings))
    assert events == [("read", ("train", "val")), ("choose", 5), ("read", ("test",))]
    selection = result["protocol"].pop("selection")
    param = {"knn": "k", "mlp": "candidate"}.get(head, "C")
    assert (
        selection["rule"] == "half-SE, contiguous"
        and selection[param] == result["chosen"][param] == result["chosen"]["value"]
    )
    assert result["protocol"].pop("train_counts") == {"c0": 91, "c1": 98, "c2": 82, "c3": 89}, (
        "per class, in train"
    )
    assert result["protocol"] | {"few_shot": None} == {
        "selected_on": "val",
        "selected_on_note": "val",
        "select_metric": "top1",
        "select": "top1-0.5se",
        "trained_on": "train+val",
        "scored_on": "test",
        "test_read_after_choice": True,
        "few_shot": None,
        "rows": "in memory",
        "imbalance": None,
    }


def test_refit_uses_train_plus_val_at_the_chosen_C(synthetic_cache, tmp_path, monkeypatch):
    calls = []
    real = fitting.fit_grid

    def spy(cfg, X, y, n_classes, Cs, **kwargs):
        calls.append((len(X), list(Cs)))
        return real(cfg, X, y, n_classes, Cs, **kwargs)

    monkeypatch.setattr(fitting, "fit_grid", spy)
    result = protocol.run(head_cfg(synthetic_cache, tmp_path, head="torch"))
    assert calls[0] == (360, list(FAST_GRID))
    assert calls[1] == (480, [result["chosen"]["C"]])
    assert result["cache"]["rows"] == {"train": 360, "val": 120, "test": 120}


@pytest.mark.slow
def test_outputs(synthetic_cache, tmp_path):
    result = protocol.run(
        head_cfg(synthetic_cache, tmp_path, head="torch", grid=None, bootstrap=200)
    )
    out = tmp_path / "run"
    for name in (
        "result.json",
        "curve.csv",
        "head.json",
        "head.npz",
        "validation_curve.png",
        "confusion_matrix.png",
        "reliability.png",
    ):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "result.json").read_text())
    assert saved["grid"] == list(registry.DEFAULT_GRID) and len(saved["grid"]) == 45
    assert saved["grid"][0] == pytest.approx(1e-6) and saved["grid"][-1] == pytest.approx(1e5)
    assert len(saved["curve"]) == 45 and len((out / "curve.csv").read_text().splitlines()) == 46
    assert saved["cache"]["fingerprint"] == read_features(synthetic_cache).fingerprint
    assert saved["chosen"]["C"] in saved["grid"]
    assert set(saved["timings"]) >= {"read", "sweep", "refit", "test"}
    test = saved["test"]
    lo, hi = test["ci"]["top1"]
    assert lo <= test["top1"] <= hi and 0.4 < test["top1"] < 1.0
    assert set(test) >= {
        "top1",
        "balanced_accuracy",
        "macro_f1",
        "log_loss",
        "ece",
        "per_class",
        "confusion",
    }
    assert test["top5"] is None  # four classes
    # The saved head reproduces the reported test score from the cache alone.
    head = load_head(out)
    fs = read_features(synthetic_cache)
    assert head.meta["cache_fingerprint"] == fs.fingerprint
    accuracy = (head.predict(fs["test"].X) == np.array(fs.classes)[fs["test"].y]).mean()
    assert accuracy == pytest.approx(test["top1"])
    assert result["test"]["top1"] == test["top1"]


def test_holdout_when_the_cache_has_no_val_split(tmp_path):
    X, y = make_classification(300, 10, n_informative=5, n_classes=3, random_state=1)
    split = np.repeat(np.array([0, 2], dtype=np.int8), [240, 60])
    cache = write_cache(tmp_path / "noval.h5", X, y, split)
    result = protocol.run(head_cfg(cache, tmp_path, val_fraction=0.25, seed=7))
    assert result["protocol"]["selected_on"] == "holdout"
    assert result["protocol"]["selected_on_note"].startswith(
        "a stratified holdout of train (25%, seed 7"
    )
    assert result["cache"]["rows"]["train"] == 240


@pytest.mark.slow
def test_few_shot_draws_k_per_class_and_never_trains_on_val(synthetic_cache, tmp_path, monkeypatch):
    y = np.repeat(np.arange(4), [10, 3, 7, 12])
    rows = draw_shots(y, 5, seed=0)
    assert np.bincount(y[rows]).tolist() == [5, 3, 5, 5]
    assert not np.array_equal(rows, draw_shots(y, 5, seed=1))
    calls = []
    real = fitting.fit_grid
    monkeypatch.setattr(
        fitting,
        "fit_grid",
        lambda cfg, X, y, *a, **k: calls.append(np.bincount(y)) or real(cfg, X, y, *a, **k),
    )
    result = protocol.run(head_cfg(synthetic_cache, tmp_path, head="torch", shots=4, repeats=3))
    assert [c.tolist() for c in calls] == [[4, 4, 4, 4]] * 3, "K per class, no refit on val"
    assert result["protocol"]["trained_on"] == "4 images per class from train"
    test = result["test"]
    assert len(test["repeats"]) == 3 and len(result["chosen"]["C"]) == 3
    assert test["top1"] == pytest.approx(np.mean([r["top1"] for r in test["repeats"]]))
    assert test["std"]["top1"] == pytest.approx(np.std([r["top1"] for r in test["repeats"]]))
    assert (tmp_path / "run" / "fewshot.csv").exists()


# ------------------------------------------------------------------------------------- errors


def test_no_cache(tmp_path):
    with pytest.raises(
        MissingError,
        match=r"no cache at .*missing\.h5; build it with `pipeline features --data YOUR_IMAGES",
    ):
        protocol.run(head_cfg(tmp_path / "missing.h5", tmp_path))


def test_incomplete_cache_says_it_can_be_resumed(synthetic_cache, tmp_path):
    partial = schema.partial_path(tmp_path / "half.h5")
    synthetic_cache.rename(partial)
    with h5py.File(partial, "r+") as f:
        f.attrs["complete"], f.attrs["rows_done"] = False, 100
    with pytest.raises(
        CacheError,
        match=r"cache .*half\.h5 is incomplete \(100 of 600 rows .*\); rerun the same "
        r"`pipeline features` command to resume it",
    ):
        protocol.run(head_cfg(tmp_path / "half.h5", tmp_path))


def test_unknown_schema_version(synthetic_cache, tmp_path):
    with h5py.File(synthetic_cache, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(
        CacheError, match=r"has schema version 99, this pipeline reads version 1; rebuild it"
    ):
        protocol.run(head_cfg(synthetic_cache, tmp_path))


def test_split_with_no_rows(tmp_path):
    X, y = make_classification(100, 5, n_informative=3, n_classes=2, random_state=0)
    cache = write_cache(tmp_path / "c.h5", X, y, np.zeros(100, dtype=np.int8))
    with pytest.raises(DataError, match=r"has no test rows; rebuild it with --test-fraction > 0"):
        protocol.run(head_cfg(cache, tmp_path))


def test_class_missing_from_train(tmp_path):
    X = np.random.default_rng(0).normal(size=(60, 4))
    y = np.array([0, 1] * 20 + [2] * 20)
    split = np.array([0] * 40 + [2] * 20, dtype=np.int8)
    cache = write_cache(tmp_path / "c.h5", X, y, split, classes=["cat", "dog", "bird"])
    with pytest.raises(
        DataError, match=r"class 'bird' has no train rows in .* but appears in test; add training"
    ):
        protocol.run(head_cfg(cache, tmp_path))


def test_non_finite_features(synthetic_cache, tmp_path):
    from pipeline.cache.schema import row_crc

    with h5py.File(
        synthetic_cache, "r+"
    ) as f:  # as a half-precision overflow writes them, CRCs included
        f["features"][5, 3] = np.nan
        f["features"][7, 0] = np.inf
        f["row_crc"][:] = row_crc(f["features"][...])
    with pytest.raises(
        DataError,
        match=r"has NaN or infinite features in 2 train rows \(e\.g\. 'row5', 'row7'\); "
        r"rebuild it with `pipeline features --force --precision fp32`",
    ):
        protocol.run(head_cfg(synthetic_cache, tmp_path))


def test_a_fixed_c_says_it_was_given_not_chosen(synthetic_cache, tmp_path):
    from pipeline.evaluate import report

    result = protocol.run(head_cfg(synthetic_cache, tmp_path, grid=None, C=0.5, head="torch"))
    assert result["protocol"]["select"] == "fixed" and result["protocol"]["selected_on"] == "none"
    assert (
        result["protocol"]["selection"]["rule"] == "fixed"
        and result["protocol"]["selection"]["C"] == 0.5
    )
    assert "sweep" not in result["timings"] and "fit" in result["timings"]
    table = report.format_table(result)
    assert (
        "C = 0.5 given (--C), nothing chosen; trained on train+val" in table
        and "chosen on" not in table
    )


def test_bad_head_options(capsys, synthetic_cache):
    with pytest.raises(
        ConfigError, match=r"--head 'svm' is not allowed; choose one of: torch, logreg, knn, ncm"
    ):
        kinds.validate(HeadConfig(features="x.h5", head="svm"))
    with pytest.raises(
        ConfigError, match=r"C value -1.0 is not allowed; C must be a positive, finite number"
    ):
        kinds.validate(HeadConfig(features="x.h5", C=-1.0))
    with pytest.raises(ConfigError, match=r"C value 0.0 is not allowed"):
        kinds.validate(HeadConfig(features="x.h5", grid=(1.0, 0.0)))
    with pytest.raises(
        ConfigError, match=r"no cache given; pass it: `pipeline head cache/NAME\.h5`"
    ):
        HeadConfig()
    assert cli.main(["head", "--features", str(synthetic_cache), "--C", "0"]) == 2
    assert "error: C value 0.0 is not allowed" in capsys.readouterr().err
    assert cli.main(["head", "--features", str(synthetic_cache.parent / "none.h5")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pipeline features --data YOUR_IMAGES" in err


@pytest.mark.slow
def test_logreg_head_imports_no_torch(synthetic_cache, tmp_path):
    code = (
        "import sys; from pipeline import cli; "
        f"rc = cli.main(['head', '--features', {str(synthetic_cache)!r}, '--out', "
        f"{str(tmp_path / 'r')!r}, "
        "'--head', 'logreg', '--grid', '0.1', '1', '--no-progress']); "
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]; "
        "print('imported:', bad); sys.exit(rc or bool(bad))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "imported: []" in done.stdout and "top-1" in done.stdout


def test_both_heads_agree_on_the_sweep(synthetic_cache, tmp_path):
    logreg = protocol.run(
        head_cfg(synthetic_cache, tmp_path, head="logreg", out=str(tmp_path / "a"))
    )
    torch_ = protocol.run(
        head_cfg(synthetic_cache, tmp_path, head="torch", out=str(tmp_path / "b"))
    )
    for a, b in zip(logreg["curve"], torch_["curve"], strict=True):
        assert abs(a["val_top1"] - b["val_top1"]) <= 2 / 120  # at most two of 120 val rows differ
    assert abs(logreg["test"]["top1"] - torch_["test"]["top1"]) <= 2 / 120


# ------------------------------------------------------------------------------- choosing C


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_both_heads_choose_C_within_one_grid_step(tmp_path, seed):
    """The default (half-SE, contiguous) rule on the full 45-value grid: the heads' curves differ by
    an image here and there, which must not move the choice by more than one grid step."""
    X, y = make_classification(
        800, 40, n_informative=10, n_classes=5, class_sep=0.8, random_state=seed
    )
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [480, 160, 160])
    cache = write_cache(tmp_path / "shared.h5", X, y, split)
    chosen = {}
    for head in ("logreg", "torch"):
        result = protocol.run(
            head_cfg(cache, tmp_path, head=head, grid=None, out=str(tmp_path / head), bootstrap=0)
        )
        assert result["config"]["select"] == "top1-0.5se"
        chosen[head] = result["chosen"]["index"]
    assert abs(chosen["logreg"] - chosen["torch"]) <= 1, chosen


@pytest.mark.slow
def test_curve_marks_fits_that_are_not_fits_at_their_C(synthetic_cache, tmp_path):
    """Torch: past some C the warm start is already within tol, so no step is taken (warm start
    only); any head: a fit stopped by max_iter is not converged, and one whose penalty gradient is
    below tol did not resolve its C. All are in curve.csv, and the default rule never chooses them.
    """
    logreg_run = protocol.run(
        head_cfg(synthetic_cache, tmp_path, head="logreg", grid=None, out=str(tmp_path / "l"))
    )
    status = [row["status"] for row in logreg_run["curve"]]
    first = status.index("C not resolved")
    assert set(status[:first]) == {"converged"} and set(status[first:]) == {"C not resolved"}, (
        status
    )
    assert logreg_run["chosen"]["index"] < first
    torch_run = protocol.run(
        head_cfg(synthetic_cache, tmp_path, head="torch", grid=None, out=str(tmp_path / "t"))
    )
    status = [row["status"] for row in torch_run["curve"]]
    assert "warm start only" in status and status[0] == "converged"
    assert (
        abs(
            status.index("C not resolved" if "C not resolved" in status else "warm start only")
            - first
        )
        <= 2
    )
    copied = [k for k, s in enumerate(status) if s == "warm start only"]
    for k in copied:  # the previous C's weights: the same scores
        assert torch_run["curve"][k]["val_log_loss"] == torch_run["curve"][k - 1]["val_log_loss"]
        assert torch_run["curve"][k]["n_iter"] == 0
    assert torch_run["chosen"]["index"] not in copied
    header = (tmp_path / "t" / "curve.csv").read_text().splitlines()[0]
    assert header == (
        "C,val_top1,val_top1_se,val_balanced_accuracy,val_balanced_accuracy_se,val_log_loss,n_iter,converged,status"
    )
    short = protocol.run(
        head_cfg(synthetic_cache, tmp_path, head="logreg", max_iter=3, out=str(tmp_path / "s"))
    )
    assert {row["status"] for row in short["curve"]} == {"not converged"}
    assert "not converged" in (tmp_path / "s" / "curve.csv").read_text()


@pytest.mark.slow
def test_select_rules_on_a_real_curve(synthetic_cache, tmp_path):
    runs = {
        s: protocol.run(head_cfg(synthetic_cache, tmp_path, select=s, out=str(tmp_path / s)))
        for s in registry.SELECT_RULES
    }
    curve = runs["top1"]["curve"]
    for select, result in runs.items():
        assert result["curve"] == curve, "the rule changes the choice, not the fits"
        assert result["chosen"]["index"] == choice.choose(curve, select)
        assert result["protocol"]["select_metric"] == registry.SELECT_RULES[select]
    assert runs["top1-1se"]["chosen"]["C"] <= runs["top1"]["chosen"]["C"], (
        "never weaker regularisation than argmax"
    )
