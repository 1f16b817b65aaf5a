"""Temperature scaling: fitted on held-out validation rows only, lowers their log-loss, keeps top-1,
and travels with the saved head."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import read_features
from pipeline.config import HeadConfig
from pipeline.errors import ConfigError
from pipeline.heads import calibration, fitting, protocol
from pipeline.heads.estimators import log_proba_from_decision
from pipeline.heads.probe import load_head


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    true_T = 2.5
    p = np.exp(log_proba_from_decision(logits / true_T))
    y = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)  # labels drawn from softmax(logits / T)
    T = calibration.fit_temperature(y, log_proba_from_decision(logits))
    assert abs(T - true_T) < 0.1
    # The minimum: the NLL at T is below its neighbours' and below T = 1.
    lp = log_proba_from_decision(logits)
    assert calibration.nll(y, lp, T) < min(calibration.nll(y, lp, T * 1.05), calibration.nll(y, lp, T / 1.05))
    assert calibration.nll(y, lp, T) < calibration.nll(y, lp, 1.0)


@pytest.mark.parametrize("head", ["logreg", "knn", "ncm"])
def test_calibration_lowers_val_log_loss_keeps_top1_and_is_saved(synthetic_cache, tmp_path, head):
    grid = {"logreg": (0.01, 0.1, 1.0), "knn": (5, 20), "ncm": None}[head]
    settings = dict(features=str(synthetic_cache), head=head, grid=grid, progress=False, bootstrap=0)
    plain = protocol.run(HeadConfig(out=str(tmp_path / "plain"), **settings))
    result = protocol.run(HeadConfig(out=str(tmp_path / "cal"), calibrate="temperature", **settings))
    cal = result["calibration"]
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val" and cal["temperature"] > 0
    assert cal["val_after"]["log_loss"] < cal["val_before"]["log_loss"]
    assert cal["test_before"]["log_loss"] == pytest.approx(plain["test"]["log_loss"], rel=1e-9)
    assert cal["test_after"]["log_loss"] == pytest.approx(result["test"]["log_loss"], rel=1e-9)
    assert result["test"]["top1"] == plain["test"]["top1"] and result["chosen"] == plain["chosen"]
    # The saved head predicts calibrated: its test log-loss is the reported one.
    test = read_features(synthetic_cache)["test"]
    loaded = load_head(tmp_path / "cal")
    log_proba = loaded.predict_log_proba(test.X)
    assert -log_proba[np.arange(len(test.y)), test.y].mean() == pytest.approx(result["test"]["log_loss"], rel=1e-5)
    saved = json.loads((tmp_path / "cal" / "head.json").read_text())
    assert saved["calibration"] == {"method": "temperature", "temperature": cal["temperature"]}


def test_the_temperature_is_fitted_before_the_test_split_is_read(synthetic_cache, tmp_path, monkeypatch):
    events = []
    real_read, real_fit = fitting.read_features, calibration.fit_temperature
    monkeypatch.setattr(
        fitting,
        "read_features",
        lambda path, splits, **kw: events.append(tuple(splits)) or real_read(path, splits, **kw),
    )
    monkeypatch.setattr(calibration, "fit_temperature", lambda y, lp: events.append(("fit", len(y))) or real_fit(y, lp))
    cfg = HeadConfig(features=str(synthetic_cache), grid=(0.1, 1.0), calibrate="temperature", out=str(tmp_path / "r"),
                     progress=False, bootstrap=0)  # fmt: skip
    protocol.run(cfg)
    assert events == [("train", "val"), ("fit", 120), ("test",)], "fitted on the 120 val rows, before test is read"


def test_few_shot_calibrates_each_draw_on_val(synthetic_cache, tmp_path):
    cfg = HeadConfig(features=str(synthetic_cache), grid=(0.1, 1.0), shots=5, repeats=3, calibrate="temperature",
                     out=str(tmp_path / "r"), progress=False, bootstrap=0)  # fmt: skip
    result = protocol.run(cfg)
    assert len(result["calibration"]) == 3 and all(c["fitted_on"] == "val" for c in result["calibration"])
    assert len({c["temperature"] for c in result["calibration"]}) == 3, "one temperature per draw"


def test_unknown_calibration_is_one_line():
    with pytest.raises(ConfigError, match=r"--calibrate 'platt' is not allowed; choose one of: none, temperature"):
        HeadConfig(features="c.h5", calibrate="platt")
