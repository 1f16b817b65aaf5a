"""The nearest class mean kind (`pipeline.heads.kinds.ncm`) and `NearestClassMean`."""

from __future__ import annotations

import json

import numpy as np

from pipeline.config import HeadConfig
from pipeline.heads import protocol
from pipeline.heads.kinds.ncm import NearestClassMean
from pipeline.heads.saved import load_head


def test_ncm_equals_a_hand_computation():
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(30, 5)), np.repeat([0, 1, 2], 10)
    Q = rng.normal(size=(7, 5))
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    means = np.stack([unit[y == c].mean(0) for c in range(3)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    cos = (Q / np.linalg.norm(Q, axis=1, keepdims=True)) @ means.T
    logits = cos / 0.5
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ncm = NearestClassMean(temperature=0.5).fit(X, y)
    assert np.allclose(ncm.predict_proba(Q), expected, atol=1e-6)
    assert (ncm.predict(Q) == cos.argmax(1)).all()


def test_ncm_two_classes_is_one_logit_and_centring_subtracts_the_training_mean():
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(20, 4)) + 3.0, np.repeat([0, 1], 10)
    ncm = NearestClassMean(preprocess="center-l2").fit(X, y)
    assert ncm.coef_.shape == (1, 4)
    Z = X - X.mean(0)
    unit = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    means = np.stack([unit[y == c].mean(0) for c in (0, 1)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    assert (ncm.predict(X) == (unit @ means.T).argmax(1)).all()


def test_ncm_head_through_the_protocol(synthetic_cache, tmp_path):
    cfg = HeadConfig(
        features=str(synthetic_cache),
        head="ncm",
        out=str(tmp_path / "run"),
        progress=False,
        bootstrap=0,
    )
    result = protocol.run(cfg)
    assert result["curve"][0]["temperature"] == 0.07 and result["chosen"]["param"] == "temperature"
    assert result["final_fit"]["solver"] == "exact (class means)"
    head = load_head(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "head.json").read_text())["model"] == "linear"
    from pipeline import read_features

    test = read_features(synthetic_cache)["test"]
    assert np.isclose(
        (head.predict(test.X) == np.array(result["classes"])[test.y]).mean(), result["test"]["top1"]
    )
