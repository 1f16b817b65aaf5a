"""The linear kinds (`pipeline.heads.kinds.linear`): one regularisation scale for both heads, the
scikit-learn contract of `TorchLinearClassifier`, class and sample weights, preprocessing, and
saving and loading a trained head."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.errors import CacheError, MissingError
from pipeline.heads import kinds
from pipeline.heads.estimators import Preprocessor
from pipeline.heads.kinds.linear import TorchLinearClassifier
from pipeline.heads.saved import load_head, save_head
from pipeline.heads.trained import TrainedHead

from helpers import classification


def _trained(prep: Preprocessor, estimator: TorchLinearClassifier) -> TrainedHead:
    """A fitted estimator as the one trained-head type (what `pipeline head` saves)."""
    arrays = {
        "coef": estimator.coef_.astype(np.float32),
        "intercept": estimator.intercept_.astype(np.float32),
    }
    return TrainedHead(kinds.get("torch"), prep, estimator.classes_.astype(str), arrays)


@parametrize_with_checks([TorchLinearClassifier()])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("n_classes", [5, 2])
@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_torch_and_scikit_learn_reach_the_same_optimum(n_classes, C):
    """lambda = 1 / (C n) on a mean cross-entropy is scikit-learn's C; the intercept is unpenalised
    in both."""
    X, y = classification(n_classes)
    sk = LogisticRegression(C=C, tol=1e-6, max_iter=5000).fit(X, y)
    th = TorchLinearClassifier(C=C, tol=1e-5).fit(X, y)
    assert th.converged_
    assert (th.predict(X) == sk.predict(X)).mean() >= 0.99
    np.testing.assert_allclose(
        th.coef_, sk.coef_, rtol=0, atol=2e-3 * max(1.0, np.abs(sk.coef_).max())
    )
    np.testing.assert_allclose(
        th.intercept_, sk.intercept_, rtol=0, atol=2e-3 * max(1.0, np.abs(sk.coef_).max())
    )
    np.testing.assert_allclose(th.predict_proba(X), sk.predict_proba(X), atol=2e-3)


def test_balanced_class_weight_matches_scikit_learn():
    X, y = classification(3, weights=[0.75, 0.2, 0.05])
    sk = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-6, max_iter=5000).fit(X, y)
    th = TorchLinearClassifier(C=0.5, class_weight="balanced", tol=1e-5).fit(X, y)
    plain = TorchLinearClassifier(C=0.5, tol=1e-5).fit(X, y)
    np.testing.assert_allclose(th.coef_, sk.coef_, atol=2e-3)
    # Weighting moves predictions towards the rare class, exactly as scikit-learn's does.
    rare = 2
    assert (th.predict(X) == rare).sum() > (plain.predict(X) == rare).sum()
    assert (th.predict(X) == sk.predict(X)).mean() >= 0.99


def test_balanced_class_weight_counts_weighted_rows():
    """'balanced' with sample weights (the --views weights): classes counted by their weight, as in
    scikit-learn 1.9, so both heads solve the same problem with both options."""
    import sklearn
    from sklearn.utils.fixes import parse_version

    from pipeline.heads.estimators import balanced_weights

    X, y = classification(3, weights=[0.7, 0.2, 0.1])
    w = np.random.default_rng(1).choice([0.25, 0.5, 1.0], len(y))
    per_row = balanced_weights(y, "balanced", w)
    counts = np.bincount(y, weights=w)
    np.testing.assert_allclose(per_row, w.sum() / (3 * counts[y]))
    np.testing.assert_allclose(
        (per_row * w) @ np.eye(3)[y], w.sum() / 3
    )  # every class weighs the same
    th = TorchLinearClassifier(C=0.5, class_weight="balanced", tol=1e-6).fit(X, y, sample_weight=w)
    if parse_version(sklearn.__version__) >= parse_version("1.9"):
        sk = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-8, max_iter=5000).fit(
            X, y, sample_weight=w
        )
        np.testing.assert_allclose(th.coef_, sk.coef_, atol=2e-3)


def test_weighted_cross_entropy_is_sample_weight():
    X, y = classification(3)
    w = np.random.default_rng(0).uniform(0.2, 3.0, len(y))
    sk = LogisticRegression(C=2.0, tol=1e-6, max_iter=5000).fit(X, y, sample_weight=w)
    th = TorchLinearClassifier(C=2.0, tol=1e-5).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(th.coef_, sk.coef_, atol=2e-3)


def test_clone_gridsearch_and_pipeline_accept_the_torch_head():
    X, y = classification(3, n=300)
    head = TorchLinearClassifier(C=0.1, max_iter=200)
    assert clone(head).get_params() == head.get_params()
    search = GridSearchCV(
        make_pipeline(StandardScaler(), head), {"torchlinearclassifier__C": [0.01, 1.0]}, cv=3
    )
    search.fit(X, y)
    assert search.best_params_["torchlinearclassifier__C"] in (0.01, 1.0)
    assert search.score(X, y) > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_minibatch_solvers_approach_the_lbfgs_optimum_reproducibly(solver):
    X, y = classification(4)
    exact = TorchLinearClassifier(C=1.0).fit(X, y)
    lr = 0.01 if solver == "adam" else 0.05
    a = TorchLinearClassifier(C=1.0, solver=solver, epochs=60, batch_size=64, lr=lr).fit(X, y)
    b = TorchLinearClassifier(C=1.0, solver=solver, epochs=60, batch_size=64, lr=lr).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert (a.predict(X) == exact.predict(X)).mean() >= 0.98
    assert exact.loss_ <= a.loss_ < exact.loss_ * 1.01, "the same objective, nearly minimised"


@pytest.mark.slow
def test_balanced_sampler_favours_rare_classes():
    X, y = classification(3, weights=[0.8, 0.15, 0.05], seed=1)
    kwargs = dict(C=1.0, solver="adam", epochs=20, batch_size=64, lr=0.01)
    plain = TorchLinearClassifier(**kwargs).fit(X, y)
    balanced = TorchLinearClassifier(balanced_sampler=True, **kwargs).fit(X, y)
    assert (balanced.predict(X) == 2).sum() > (plain.predict(X) == 2).sum()


def test_label_smoothing_lowers_confidence():
    X, y = classification(3)
    sharp = TorchLinearClassifier(C=10.0).fit(X, y).predict_proba(X).max(axis=1).mean()
    smooth = (
        TorchLinearClassifier(C=10.0, label_smoothing=0.2)
        .fit(X, y)
        .predict_proba(X)
        .max(axis=1)
        .mean()
    )
    assert smooth < sharp - 0.02


def test_preprocessing_is_fitted_on_the_rows_given():
    X = np.random.default_rng(0).normal(3.0, 2.0, (100, 4)).astype(np.float32)
    X[:, 3] = 5.0  # constant column: left centred, not divided by zero
    prep = Preprocessor("standardize").fit(X[:50])
    Z = prep.transform(X[:50])
    np.testing.assert_allclose(Z[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Z[:, :3].std(0), 1, atol=1e-4)
    assert np.all(Z[:, 3] == 0)
    np.testing.assert_allclose(
        np.linalg.norm(Preprocessor("l2").fit_transform(X), axis=1), 1, atol=1e-6
    )


@pytest.mark.parametrize("n_classes", [4, 2])
def test_save_and_load_give_identical_predictions(tmp_path, n_classes):
    X, y = classification(n_classes)
    prep = Preprocessor("standardize").fit(X)
    head = TorchLinearClassifier(C=0.3).fit(prep.transform(X), y)
    probe = _trained(prep, head)
    save_head(probe, tmp_path / "run", {"head": "torch", "C": 0.3, "cache_fingerprint": {"k": "v"}})
    loaded = load_head(tmp_path / "run")
    np.testing.assert_array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), head.predict(prep.transform(X)).astype(str))
    assert (
        loaded.meta["cache_fingerprint"] == {"k": "v"}
        and (loaded.predict(X) == y.astype(str)).mean() > 0.5
    )
    assert not list((tmp_path / "run").glob("*.pkl"))


def test_load_head_errors(tmp_path):
    with pytest.raises(
        MissingError, match=r"no saved head in .*nothing \(expected head\.json and head\.npz\); run"
    ):
        load_head(tmp_path / "nothing")
    X, y = classification(3, n=100)
    save_head(
        _trained(Preprocessor("none"), TorchLinearClassifier().fit(X, y)), tmp_path / "old", {}
    )
    (tmp_path / "old" / "head.json").write_text(
        (tmp_path / "old" / "head.json").read_text().replace('"schema": 1', '"schema": 0')
    )
    with pytest.raises(
        CacheError, match=r"head .*old has schema 0, this pipeline reads 1; retrain it"
    ):
        load_head(tmp_path / "old")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"tol": -1},
            r"The 'tol' parameter of TorchLinearClassifier must be a float in the range \(0(\.0)?, "
            r"inf\)",
        ),
        (
            {"solver": "newton"},
            r"The 'solver' parameter of TorchLinearClassifier must be a str among \{.*'adam'",
        ),
        (
            {"C": 0.0},
            r"The 'C' parameter of TorchLinearClassifier must be a float in the range \(0(\.0)?, "
            r"inf\)",
        ),
        (
            {"epochs": 0},
            r"The 'epochs' parameter of TorchLinearClassifier must be an int in the range \[1, "
            r"100000\]",
        ),
        (
            {"label_smoothing": 1.0},
            r"The 'label_smoothing' parameter of TorchLinearClassifier must be a float in",
        ),
        (
            {"class_weight": "even"},
            r"The 'class_weight' parameter of TorchLinearClassifier must be",
        ),
        (
            {"device": "tpu"},
            r"The 'device' parameter of TorchLinearClassifier must be 'auto', 'cpu', 'cuda'",
        ),
    ],
)
def test_torch_head_checks_every_parameter_before_fitting(params, message):
    X, y = classification(3, n=60)
    with pytest.raises(ValueError, match=message):
        TorchLinearClassifier(**params).fit(X, y)


def test_a_trained_head_predicts_as_the_estimator_it_came_from():
    X, y = classification(3, n=120)
    fitted = TorchLinearClassifier(C=1.0).fit(X, y)
    head = _trained(Preprocessor("none"), fitted)
    assert repr(head) == "TrainedHead(torch, 3 classes, 30-d)"
    np.testing.assert_array_equal(head.predict(X), fitted.predict(X).astype(str))
    np.testing.assert_allclose(head.predict_proba(X), fitted.predict_proba(X), atol=1e-5)
    assert head.n_features_in_ == X.shape[1]
    with pytest.raises(ValueError, match=r"X has 29 features, but this head expects 30"):
        head.predict(X[:, :29])
