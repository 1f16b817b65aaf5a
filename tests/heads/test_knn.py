"""The kNN kind (`pipeline.heads.kinds.knn`): weighted votes, k chosen on val, the saved bank, and
`CosineKNN`; with the checks both cosine kinds share."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.config import HeadConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.heads import kinds, protocol
from pipeline.heads.kinds import knn
from pipeline.heads.kinds.knn import CosineKNN
from pipeline.heads.kinds.ncm import NearestClassMean
from pipeline.heads.saved import load_head

from helpers import write_cache


def _two_clusters_and_a_mislabelled_neighbour(
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 around e1, class 1 around e2 (cosine far apart), and one row at e1 exactly labelled
    1."""
    e1, e2 = np.eye(8)[0], np.eye(8)[1]
    X = np.vstack([e1 + rng.normal(0, 0.1, (20, 8)), e2 + rng.normal(0, 0.1, (20, 8)), e1[None]])
    y = np.array([0] * 20 + [1] * 20 + [1])
    return X.astype(np.float32), y


def test_knn_one_mislabelled_neighbour_fools_k1_and_not_k5():
    rng = np.random.default_rng(0)
    X, y = _two_clusters_and_a_mislabelled_neighbour(rng)
    queries = (np.eye(8)[0] + rng.normal(0, 0.001, (10, 8))).astype(np.float32)  # all of class 0
    assert (CosineKNN(n_neighbors=1).fit(X, y).predict(queries) == 1).all(), (
        "its nearest row is the mislabelled one"
    )
    assert (CosineKNN(n_neighbors=5).fit(X, y).predict(queries) == 0).all(), (
        "four of five neighbours are class 0"
    )


def test_knn_chooses_k_on_val_and_keeps_the_bank_as_the_head(tmp_path):
    rng = np.random.default_rng(1)
    X, y = _two_clusters_and_a_mislabelled_neighbour(rng)
    val = np.eye(8)[0] + rng.normal(0, 0.001, (10, 8))
    test = np.vstack(
        [np.eye(8)[0] + rng.normal(0, 0.02, (10, 8)), np.eye(8)[1] + rng.normal(0, 0.02, (10, 8))]
    )
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [len(X), 10, 20])
    cache = write_cache(
        tmp_path / "knn.h5",
        np.vstack([X, val, test]),
        np.r_[y, [0] * 10, [0] * 10 + [1] * 10],
        split,
    )
    cfg = HeadConfig(
        features=str(cache),
        head="knn",
        grid=(1, 5),
        select="top1",
        out=str(tmp_path / "run"),
        progress=False,
        bootstrap=0,
    )
    result = protocol.run(cfg)
    assert [row["k"] for row in result["curve"]] == [5, 1], (
        "strongest regularisation (most neighbours) first"
    )
    assert [row["val_top1"] for row in result["curve"]] == [1.0, 0.0]
    assert result["chosen"] == {"param": "k", "k": 5, "value": 5, "index": 0}
    assert result["final_fit"]["status"] == "exact" and result["test"]["top1"] == 1.0
    head = load_head(tmp_path / "run")
    assert head.kind.name == "knn" and head.settings["k"] == 5
    assert head.arrays["bank"].shape == (len(X) + 10, 8), "the refit's bank: train+val"
    assert (head.predict(test) == np.array(result["classes"])[[0] * 10 + [1] * 10]).all()


def test_knn_probabilities_are_smoothed_votes():
    X = np.eye(3, dtype=np.float32)
    knn = CosineKNN(n_neighbors=1, temperature=0.1).fit(X, ["a", "b", "c"])
    p = knn.predict_proba(np.array([[1.0, 0.1, 0.0]], dtype=np.float32))
    assert np.allclose(p, [[0.5 + 0.5 / 3, 0.5 / 3, 0.5 / 3]]), (
        "one vote, mixed with 1/(k+1) of uniform"
    )
    two = CosineKNN(n_neighbors=2, temperature=0.1).fit(X, ["a", "b", "c"])
    s = np.array([1.0, 0.1]) / np.linalg.norm([1.0, 0.1, 0.0])  # cosine to a and b
    w = np.exp(s / 0.1)
    votes = np.array([w[0], w[1], 0.0]) / w.sum()
    expected = (2 / 3) * votes + (1 / 3) / 3
    assert np.allclose(
        two.predict_proba(np.array([[1.0, 0.1, 0.0]], dtype=np.float32)), expected[None]
    )


@pytest.mark.parametrize("budget", [4 * 7, 4 * 50 * 7, 2**30])
def test_neighbour_search_in_blocks_equals_numpy(budget):
    rng = np.random.default_rng(2)
    bank, Q = (
        rng.normal(size=(50, 6)).astype(np.float32),
        rng.normal(size=(23, 6)).astype(np.float32),
    )
    sims, rows = knn.top_neighbours(Q, bank, 7, budget)
    S = Q @ bank.T
    expected = np.argsort(-S, axis=1, kind="stable")[:, :7]
    assert (rows == expected).all() and np.allclose(
        sims, np.take_along_axis(S, expected, axis=1), atol=1e-6
    )
    assert knn.top_neighbours(Q, bank, 80, budget)[1].shape == (23, 50), (
        "k above the bank: every row"
    )


def test_kneighbors_rows_are_the_search_on_preprocessed_rows():
    rng = np.random.default_rng(6)
    X, Q = rng.normal(size=(30, 4)), rng.normal(size=(5, 4))
    knn = CosineKNN(n_neighbors=4, preprocess="center-l2").fit(X, np.arange(30) % 3)
    Z = X - X.mean(0)
    Z /= np.linalg.norm(Z, axis=1, keepdims=True)
    q = Q - X.mean(0)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    assert (knn.kneighbors_rows(Q) == np.argsort(-(q @ Z.T), axis=1)[:, :4]).all()


def test_neighbour_search_without_torch_gives_the_same_rows(monkeypatch):
    import builtins

    rng = np.random.default_rng(3)
    bank, Q = (
        rng.normal(size=(40, 5)).astype(np.float32),
        rng.normal(size=(9, 5)).astype(np.float32),
    )
    with_torch = knn.top_neighbours(Q, bank, 6)
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("no torch here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    without = knn.top_neighbours(Q, bank, 6)
    assert (without[1] == with_torch[1]).all() and np.allclose(without[0], with_torch[0], atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"head": "knn", "C": 1.0}, r"--C is a setting of the linear heads; the knn head has no C"),
        (
            {"head": "knn", "grid": (2.5,)},
            r"k value 2.5 is not allowed; the knn head's --grid takes whole numbers",
        ),
        ({"head": "knn", "grid": (0.0,)}, r"k value 0.0 is not allowed"),
        ({"head": "ncm", "grid": (1.0,)}, r"--grid is not used by the ncm head"),
        (
            {"head": "ncm", "preprocess": "standardize"},
            r"--preprocess standardize does not suit the ncm head.*l2, center-l2",
        ),
        (
            {"head": "knn", "class_weight": "balanced"},
            r"--class-weight balanced applies to the linear heads",
        ),
        (
            {"head": "knn", "temperature": 0.0},
            r"--temperature 0.0 is out of range; pass a number in \[0.0001, 10000\]",
        ),
    ],
)
def test_cosine_head_settings_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        kinds.validate(HeadConfig(features="cache.h5", **overrides))


def test_a_tampered_knn_head_is_refused(synthetic_cache, tmp_path):
    cfg = HeadConfig(
        features=str(synthetic_cache),
        head="knn",
        grid=(3,),
        out=str(tmp_path / "run"),
        progress=False,
        bootstrap=0,
    )
    protocol.run(cfg)
    folder = tmp_path / "run"
    with np.load(folder / "head.npz") as archive:
        arrays = dict(archive)
    np.savez(folder / "head.npz", **(arrays | {"bank_labels": arrays["bank_labels"] + 10}))
    with pytest.raises(
        CacheError, match=r"bank_labels must be one class index in 0\.\.3 per bank row"
    ):
        load_head(folder)
    meta = json.loads((folder / "head.json").read_text())
    np.savez(folder / "head.npz", **arrays)
    (folder / "head.json").write_text(json.dumps(meta | {"k": 0}))
    with pytest.raises(CacheError, match=r"a knn head needs k \(a whole number >= 1\)"):
        load_head(folder)


@parametrize_with_checks([CosineKNN(n_neighbors=3), NearestClassMean()])
def test_scikit_learn_estimator_contract(estimator, check):
    check(estimator)


def test_k_above_the_training_rows_means_all_of_them_and_is_scored_as_such(tmp_path, capsys):
    rng = np.random.default_rng(7)
    X, y = rng.normal(size=(60, 5)), np.repeat([0, 1, 2], 20)
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [18, 21, 21])
    cache = write_cache(tmp_path / "small.h5", X, np.r_[y[::3][:18], y[:21], y[:21]], split)
    said = []
    cfg = HeadConfig(
        features=str(cache),
        head="knn",
        grid=(3.0, 18.0, 36.0, 1e20),
        out=str(tmp_path / "run"),
        progress=False,
        bootstrap=0,
    )
    result = protocol.run(cfg, report_to=said.append)
    assert [row["k"] for row in result["curve"]] == [18, 3], (
        "36 and 1e20 mean all 18 train rows: one setting"
    )
    assert any(
        "k above the 18 training rows means all of them; k grid 18 3" in line for line in said
    )
    head = load_head(tmp_path / "run")
    assert head.settings["k"] == result["chosen"]["k"] <= 18, "the saved k is the k scored on val"


def test_a_tiny_temperature_does_not_underflow_the_votes():
    rng = np.random.default_rng(8)
    X, y, Q = rng.normal(size=(40, 6)), np.arange(40) % 4, rng.normal(size=(25, 6))
    tiny = CosineKNN(n_neighbors=5, temperature=1e-300).fit(X, y)
    nearest = CosineKNN(n_neighbors=1).fit(X, y)
    assert (tiny.predict(Q) == nearest.predict(Q)).all(), "T -> 0: the nearest row's vote alone"
    assert np.isfinite(tiny.predict_proba(Q)).all()


def test_estimator_parameters_are_checked():
    X, y = np.eye(4), [0, 1, 0, 1]
    CosineKNN(n_neighbors=2, temperature=np.float32(0.1)).fit(X, y)  # numpy scalars are numbers too
    with pytest.raises(ValueError, match=r"n_neighbors must be a positive integer, got True"):
        CosineKNN(n_neighbors=True).fit(X, y)
    with pytest.raises(ValueError, match=r"calibration must be a positive temperature, got 0"):
        CosineKNN(calibration=0).fit(X, y)
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got nan"):
        NearestClassMean(temperature=float("nan")).fit(X, y)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda a, m: a | {"bank": np.full_like(a["bank"], np.nan)},
            r"bank holds NaN or infinite values",
        ),
        (
            lambda a, m: a | {"bank": a["bank"][:0], "bank_labels": a["bank_labels"][:0]},
            r"at least one row",
        ),
        (lambda a, m: a | {"bank": a["bank"] * 1e30}, r"each of unit length"),
        (
            lambda a, m: a | {"offsets": np.zeros(5)},
            r"offsets is \(5,\) float64, expected \(4,\) numbers",
        ),
        (lambda a, m: a | {"offsets": np.array([0.0, np.nan, 0.0, 0.0])}, r"offsets holds NaN"),
        (
            lambda a, m: (a, m | {"preprocessing": "none"}),
            r"a knn head does not take preprocessing 'none'",
        ),
        (lambda a, m: (a, m | {"k": 10**30}), r"k = 10{30} exceeds its bank of 480 rows"),
        (lambda a, m: (a, m | {"k": 10**400}), r"a knn head needs k \(a whole number >= 1\)"),
        (
            lambda a, m: (a, m | {"model": "forest"}),
            r"model 'forest' in head.json is no head kind this pipeline knows",
        ),
    ],
)
def test_a_knn_head_with_bad_values_is_refused(synthetic_cache, tmp_path, change, message):
    folder = tmp_path / "run"
    protocol.run(
        HeadConfig(
            features=str(synthetic_cache),
            head="knn",
            grid=(3,),
            out=str(folder),
            progress=False,
            bootstrap=0,
        )
    )
    with np.load(folder / "head.npz") as archive:
        arrays = dict(archive)
    meta = json.loads((folder / "head.json").read_text())
    changed = change(arrays, meta)
    arrays, meta = changed if isinstance(changed, tuple) else (changed, meta)
    np.savez(folder / "head.npz", **arrays)
    (folder / "head.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=message):
        load_head(folder)


@pytest.mark.parametrize("head", ["knn", "ncm"])
def test_cosine_heads_in_few_shot_runs_and_from_the_command_line(synthetic_cache, tmp_path, head):
    from pipeline import cli

    args = [
        "head",
        "--features",
        str(synthetic_cache),
        "--head",
        head,
        "--shots",
        "3",
        "--repeats",
        "2",
        "--out",
        str(tmp_path / "few"),
        "--no-progress",
        "--bootstrap",
        "0",
    ]
    if head == "knn":
        args += ["--grid", "1", "3", "5"]
    assert cli.main(args) == 0
    result = json.loads((tmp_path / "few" / "result.json").read_text())
    assert result["protocol"]["few_shot"] == {"shots": 3, "repeats": 2}
    assert result["protocol"]["trained_on"] == "3 images per class from train"
    assert len(result["test"]["repeats"]) == 2
    if head == "knn":  # the bank of a 3-shot draw of 4 classes has 12 rows: k up to 12
        assert (
            all(row["k"] <= 12 for row in result["curve"])
            and load_head(tmp_path / "few").arrays["bank"].shape[0] == 12
        )
