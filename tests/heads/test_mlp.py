"""The mlp kind (`pipeline.heads.kinds.mlp`): candidates chosen on val, early stopping on val, the
refit for the chosen epochs, saving without pickle, and its one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import cli, read_features
from pipeline.config import HeadConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.heads import protocol
from pipeline.heads.kinds import mlp
from pipeline.heads.saved import load_head

SMALL = dict(hidden=(8, 32), dropout=(0.0, 0.3), weight_decay=(1e-4,), epochs=12)


def mlp_cfg(cache, tmp_path, **overrides) -> HeadConfig:
    settings = dict(
        features=str(cache),
        head="mlp",
        out=str(tmp_path / "run"),
        progress=False,
        bootstrap=0,
        **SMALL,
    )
    return HeadConfig(**(settings | overrides))


def test_candidates_are_the_product_strongest_regularisation_first(synthetic_cache):
    cfg = HeadConfig(features=str(synthetic_cache), head="mlp", **SMALL)
    assert [(c.number, c.hidden, c.dropout, c.weight_decay) for c in mlp.candidates(cfg)] == [
        (1, 8, 0.3, 1e-4),
        (2, 8, 0.0, 1e-4),
        (3, 32, 0.3, 1e-4),
        (4, 32, 0.0, 1e-4),
    ]
    default = HeadConfig(features=str(synthetic_cache), head="mlp")
    assert len(mlp.candidates(default)) == 8  # 2 widths x 2 rates x 2 decays


def test_early_stopping_keeps_the_epoch_of_lowest_val_log_loss(synthetic_cache, tmp_path):
    fs = read_features(synthetic_cache)
    mean, std = fs["train"].X.mean(0), fs["train"].X.std(0)
    Z, Zv = (fs["train"].X - mean) / std, (fs["val"].X - mean) / std
    cfg = mlp_cfg(synthetic_cache, tmp_path, epochs=40, lr=0.01, batch_size=32)
    candidate = mlp.Candidate(1, 256, 0.0, 0.0)  # wide, unregularised: it overfits, stops early
    fit = mlp.train(cfg, candidate, Z, fs["train"].y, 4, val=(Zv, fs["val"].y))
    losses = fit.val_log_loss
    assert fit.n_iter == int(np.argmin(losses)) + 1 < fit.epochs_run <= 40
    assert fit.epochs_run - fit.n_iter == mlp.PATIENCE or fit.epochs_run == 40
    # The kept weights are that epoch's: their val log-loss is the minimum, recomputed in numpy.
    log_proba = fit.log_proba(Zv)
    assert -log_proba[np.arange(len(Zv)), fs["val"].y].mean() == pytest.approx(min(losses), 1e-5)
    # Seeded: the same candidate trains to the same weights.
    again = mlp.train(cfg, candidate, Z, fs["train"].y, 4, val=(Zv, fs["val"].y))
    assert all(np.array_equal(fit.arrays[k], again.arrays[k]) for k in fit.arrays)


def test_the_protocol_chooses_on_val_and_refits_train_plus_val_for_the_chosen_epochs(
    synthetic_cache, tmp_path, monkeypatch
):
    calls = []
    real = mlp.train

    def spy(cfg, candidate, X, y, n_classes, sample_weight=None, val=None, stop_at=None):
        calls.append((candidate.number, len(X), val is not None, stop_at))
        return real(cfg, candidate, X, y, n_classes, sample_weight, val, stop_at)

    monkeypatch.setattr(mlp, "train", spy)
    result = protocol.run(mlp_cfg(synthetic_cache, tmp_path))
    chosen = result["chosen"]["candidate"]
    row = next(r for r in result["curve"] if r["candidate"] == chosen)
    assert calls[:4] == [(n, 360, True, None) for n in (1, 2, 3, 4)]
    assert calls[4] == (chosen, 480, False, row["epochs"])  # train+val, the chosen epoch count
    assert set(row) >= {"hidden", "dropout", "weight_decay", "epochs", "val_top1"}
    assert result["final_fit"]["solver"].startswith("AdamW, cosine schedule over 12 epochs")
    meta = json.loads((tmp_path / "run" / "head.json").read_text())
    assert meta["model"] == "mlp" and meta["head"] == "mlp" and meta["candidate"] == chosen
    assert (meta["hidden"], meta["dropout"], meta["epochs"]) == (
        row["hidden"],
        row["dropout"],
        row["epochs"],
    )
    assert result["test"]["top1"] > 0.5  # 4 classes: twice chance


@pytest.mark.parametrize("posthoc", [{}, {"calibrate": "temperature", "logit_adjust": "1"}])
def test_a_saved_mlp_predicts_as_the_run_did_and_its_module_agrees(
    synthetic_cache, tmp_path, posthoc
):
    protocol.run(mlp_cfg(synthetic_cache, tmp_path, **posthoc))
    head = load_head(tmp_path / "run")
    test = read_features(synthetic_cache)["test"]
    with np.load(tmp_path / "run" / "predictions.npz") as saved:
        proba = head.predict_proba(test.X)
        np.testing.assert_array_equal(proba.argmax(1), saved["y_pred"])
    with torch.no_grad():
        exported = head.to_module()(torch.from_numpy(test.X.astype(np.float32))).numpy()
    np.testing.assert_allclose(exported, proba, atol=1e-5)
    assert not list((tmp_path / "run").glob("*.pkl"))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"grid": (1.0, 2.0)}, r"--grid is not used by the mlp head"),
        ({"solver": "lbfgs"}, r"--solver lbfgs does not apply to the mlp head"),
        ({"hidden": (0,)}, r"--hidden 0 is not allowed; pass whole numbers"),
        ({"hidden": (2.5,)}, r"--hidden 2.5 is not allowed"),
        ({"dropout": (1.0,)}, r"--dropout 1 is not allowed; pass rates in \[0, 1\)"),
        ({"weight_decay": (-1.0,)}, r"--weight-decay -1 is not allowed"),
        ({"C": 1.0}, r"--C is a setting of the linear heads; the mlp head has no C"),
        (
            {"lr_grid": (0.5,)},
            r"--lr-grid is a setting of the tail head; the mlp head does not use",
        ),
    ],
)
def test_mlp_settings_are_refused_in_one_line(synthetic_cache, tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        protocol.run(mlp_cfg(synthetic_cache, tmp_path, **settings))
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_a_bad_mlp_setting_with_exit_2(synthetic_cache, tmp_path, capsys):
    args = ["head", str(synthetic_cache), "--head", "mlp", "--dropout", "1.5"]
    assert cli.main([*args, "--out", str(tmp_path / "r")]) == 2
    assert "--dropout 1.5 is not allowed" in capsys.readouterr().err


def test_a_saved_mlp_whose_files_disagree_is_refused(synthetic_cache, tmp_path):
    protocol.run(mlp_cfg(synthetic_cache, tmp_path))
    meta_path = tmp_path / "run" / "head.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"hidden": meta["hidden"] + 1}))
    with pytest.raises(CacheError, match=r"malformed: w1 is \(20, \d+\) float32, expected"):
        load_head(tmp_path / "run")
    meta_path.write_text(json.dumps(meta | {"hidden": "many"}))
    with pytest.raises(CacheError, match=r"an mlp head needs hidden"):
        load_head(tmp_path / "run")


def test_kind_options_given_to_another_kind_are_refused(synthetic_cache, tmp_path):
    base = dict(features=str(synthetic_cache), out=str(tmp_path / "r"), progress=False)
    with pytest.raises(ConfigError, match=r"--hidden is a setting of the mlp head; the torch head"):
        protocol.run(HeadConfig(head="torch", hidden=(8,), **base))
    with pytest.raises(
        ConfigError, match=r"--weight-decay is a setting of the mlp and tail heads; the knn head"
    ):
        protocol.run(HeadConfig(head="knn", weight_decay=(0.1,), **base))
