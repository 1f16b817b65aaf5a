"""Both heads: one regularisation scale, the scikit-learn contract, class weights, saving."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
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


def _trained(prep: Preprocessor, estimator: TorchLinearClassifier) -> TrainedHead:
    """A fitted estimator as the one trained-head type (what `pipeline head` saves)."""
    arrays = {"coef": estimator.coef_.astype(np.float32), "intercept": estimator.intercept_.astype(np.float32)}
    return TrainedHead(kinds.get("torch"), prep, estimator.classes_.astype(str), arrays)


def _data(n_classes=5, n=800, weights=None, seed=0):
    X, y = make_classification(
        n, 30, n_informative=12, n_classes=n_classes, weights=weights, class_sep=0.8, random_state=seed
    )
    return StandardScaler().fit_transform(X), y


@parametrize_with_checks([TorchLinearClassifier()])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("n_classes", [5, 2])
@pytest.mark.parametrize("C", [0.01, 1.0, 100.0])
def test_torch_and_scikit_learn_reach_the_same_optimum(n_classes, C):
    """lambda = 1 / (C n) on a mean cross-entropy is scikit-learn's C; the intercept is unpenalised in both."""
    X, y = _data(n_classes)
    sk = LogisticRegression(C=C, tol=1e-6, max_iter=5000).fit(X, y)
    th = TorchLinearClassifier(C=C, tol=1e-5).fit(X, y)
    assert th.converged_
    assert (th.predict(X) == sk.predict(X)).mean() >= 0.99
    np.testing.assert_allclose(th.coef_, sk.coef_, rtol=0, atol=2e-3 * max(1.0, np.abs(sk.coef_).max()))
    np.testing.assert_allclose(th.intercept_, sk.intercept_, rtol=0, atol=2e-3 * max(1.0, np.abs(sk.coef_).max()))
    np.testing.assert_allclose(th.predict_proba(X), sk.predict_proba(X), atol=2e-3)


def test_balanced_class_weight_matches_scikit_learn():
    X, y = _data(3, weights=[0.75, 0.2, 0.05])
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

    X, y = _data(3, weights=[0.7, 0.2, 0.1])
    w = np.random.default_rng(1).choice([0.25, 0.5, 1.0], len(y))
    per_row = balanced_weights(y, "balanced", w)
    counts = np.bincount(y, weights=w)
    np.testing.assert_allclose(per_row, w.sum() / (3 * counts[y]))
    np.testing.assert_allclose((per_row * w) @ np.eye(3)[y], w.sum() / 3)  # every class weighs the same
    th = TorchLinearClassifier(C=0.5, class_weight="balanced", tol=1e-6).fit(X, y, sample_weight=w)
    if parse_version(sklearn.__version__) >= parse_version("1.9"):
        sk = LogisticRegression(C=0.5, class_weight="balanced", tol=1e-8, max_iter=5000).fit(X, y, sample_weight=w)
        np.testing.assert_allclose(th.coef_, sk.coef_, atol=2e-3)


def test_weighted_cross_entropy_is_sample_weight():
    X, y = _data(3)
    w = np.random.default_rng(0).uniform(0.2, 3.0, len(y))
    sk = LogisticRegression(C=2.0, tol=1e-6, max_iter=5000).fit(X, y, sample_weight=w)
    th = TorchLinearClassifier(C=2.0, tol=1e-5).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(th.coef_, sk.coef_, atol=2e-3)


def test_clone_gridsearch_and_pipeline_accept_the_torch_head():
    X, y = _data(3, n=300)
    head = TorchLinearClassifier(C=0.1, max_iter=200)
    assert clone(head).get_params() == head.get_params()
    search = GridSearchCV(make_pipeline(StandardScaler(), head), {"torchlinearclassifier__C": [0.01, 1.0]}, cv=3)
    search.fit(X, y)
    assert search.best_params_["torchlinearclassifier__C"] in (0.01, 1.0)
    assert search.score(X, y) > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_minibatch_solvers_approach_the_lbfgs_optimum_reproducibly(solver):
    X, y = _data(4)
    exact = TorchLinearClassifier(C=1.0).fit(X, y)
    lr = 0.01 if solver == "adam" else 0.05
    a = TorchLinearClassifier(C=1.0, solver=solver, epochs=60, batch_size=64, lr=lr).fit(X, y)
    b = TorchLinearClassifier(C=1.0, solver=solver, epochs=60, batch_size=64, lr=lr).fit(X, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert (a.predict(X) == exact.predict(X)).mean() >= 0.98
    assert exact.loss_ <= a.loss_ < exact.loss_ * 1.01, "the same objective, nearly minimised"


@pytest.mark.slow
def test_balanced_sampler_favours_rare_classes():
    X, y = _data(3, weights=[0.8, 0.15, 0.05], seed=1)
    kwargs = dict(C=1.0, solver="adam", epochs=20, batch_size=64, lr=0.01)
    plain = TorchLinearClassifier(**kwargs).fit(X, y)
    balanced = TorchLinearClassifier(balanced_sampler=True, **kwargs).fit(X, y)
    assert (balanced.predict(X) == 2).sum() > (plain.predict(X) == 2).sum()


def test_label_smoothing_lowers_confidence():
    X, y = _data(3)
    sharp = TorchLinearClassifier(C=10.0).fit(X, y).predict_proba(X).max(axis=1).mean()
    smooth = TorchLinearClassifier(C=10.0, label_smoothing=0.2).fit(X, y).predict_proba(X).max(axis=1).mean()
    assert smooth < sharp - 0.02


def test_preprocessing_is_fitted_on_the_rows_given():
    X = np.random.default_rng(0).normal(3.0, 2.0, (100, 4)).astype(np.float32)
    X[:, 3] = 5.0  # constant column: left centred, not divided by zero
    prep = Preprocessor("standardize").fit(X[:50])
    Z = prep.transform(X[:50])
    np.testing.assert_allclose(Z[:, :3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(Z[:, :3].std(0), 1, atol=1e-4)
    assert np.all(Z[:, 3] == 0)
    np.testing.assert_allclose(np.linalg.norm(Preprocessor("l2").fit_transform(X), axis=1), 1, atol=1e-6)


@pytest.mark.parametrize("n_classes", [4, 2])
def test_save_and_load_give_identical_predictions(tmp_path, n_classes):
    X, y = _data(n_classes)
    prep = Preprocessor("standardize").fit(X)
    head = TorchLinearClassifier(C=0.3).fit(prep.transform(X), y)
    probe = _trained(prep, head)
    save_head(probe, tmp_path / "run", {"head": "torch", "C": 0.3, "cache_fingerprint": {"k": "v"}})
    loaded = load_head(tmp_path / "run")
    np.testing.assert_array_equal(loaded.predict_proba(X), probe.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), head.predict(prep.transform(X)).astype(str))
    assert loaded.meta["cache_fingerprint"] == {"k": "v"} and (loaded.predict(X) == y.astype(str)).mean() > 0.5
    assert not list((tmp_path / "run").glob("*.pkl"))


def test_load_head_errors(tmp_path):
    with pytest.raises(MissingError, match=r"no saved head in .*nothing \(expected head\.json and head\.npz\); run"):
        load_head(tmp_path / "nothing")
    X, y = _data(3, n=100)
    save_head(_trained(Preprocessor("none"), TorchLinearClassifier().fit(X, y)), tmp_path / "old", {})
    (tmp_path / "old" / "head.json").write_text(
        (tmp_path / "old" / "head.json").read_text().replace('"schema": 1', '"schema": 0')
    )
    with pytest.raises(CacheError, match=r"head .*old has schema 0, this pipeline reads 1; retrain it"):
        load_head(tmp_path / "old")


@pytest.mark.slow
@pytest.mark.parametrize("block", [1, 4, 45])
def test_path_blocks_reach_scikit_learns_solutions(block):
    """Warm-started blocks (1 = sequential path, 45 = every C at once) all meet the same optimum."""
    from pipeline.heads import solver
    from pipeline.heads.options import SolverOptions

    X, y = _data(4, n=500)
    Cs = np.logspace(-6, 5, 45)
    sol = solver.solve(X, y, Cs, n_classes=4, options=SolverOptions(tol=1e-5), block=block)
    assert sol.converged.all()

    def objective(coef, intercept, C):  # mean cross-entropy + ||W||^2 / (2 C n), in float64
        z = X @ coef + intercept
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -log_p[np.arange(len(y)), y].mean() + (coef**2).sum() / (2 * C * len(y))

    for k in (0, 12, 20, 28, 44):
        sk = LogisticRegression(C=Cs[k], tol=1e-8, max_iter=10000).fit(X, y)
        if k <= 20:
            np.testing.assert_allclose(sol.coef[k].T, sk.coef_, atol=1e-3 * max(1.0, np.abs(sk.coef_).max()))
        # Nearly unregularised problems are flat: compare how well each minimises the objective.
        ours, theirs = objective(sol.coef[k], sol.intercept[k], Cs[k]), objective(sk.coef_.T, sk.intercept_, Cs[k])
        assert ours == pytest.approx(theirs, rel=1e-5)
        assert ((X @ sol.coef[k] + sol.intercept[k]).argmax(1) == sk.predict(X)).mean() >= 0.99
    if block == 1:  # along the flat, weakly regularised end a warm start is already converged: no data pass
        assert (sol.n_iter[-10:] == 0).any()


def test_lbfgs_reaches_tight_tolerance_in_float32_across_the_grid():
    """float32 logits, float64 sums: every C of the grid converges to max|grad| <= 1e-6 in few iterations,
    including strongly penalised ones, whose weights and unpenalised intercept differ in curvature ~1000x
    (there the line search used to halve steps to nothing and stop at max_iter)."""
    from pipeline.heads import solver
    from pipeline.heads.options import SolverOptions

    X, y = _data(5, n=480, seed=0)
    Cs = np.logspace(-6, 5, 45)
    sol = solver.solve(X.astype(np.float32), y, Cs, n_classes=5, options=SolverOptions(tol=1e-6, max_iter=300))
    assert sol.converged.all() and (sol.grad_max <= 1e-6).all()
    assert sol.n_iter.max() < 100, sol.n_iter
    single = solver.solve(X.astype(np.float32), y, [5.62e-5], n_classes=5, options=SolverOptions(tol=1e-6))
    assert single.converged[0] and single.n_iter[0] <= 20


def test_lbfgs_stops_a_setting_stuck_at_the_float32_floor_instead_of_running_to_max_iter():
    """Unstandardised features and weak penalties: large logits put the float32 gradient's noise near
    1e-6; where max|grad| stops shrinking, the setting ends stalled (not converged), not at max_iter."""
    from sklearn.datasets import make_classification

    from pipeline.heads import lbfgs, solver
    from pipeline.heads.options import SolverOptions

    X, y = make_classification(200, 8, n_informative=5, n_classes=3, random_state=0)
    sol = solver.solve(X.astype(np.float32), y, np.logspace(-6, 5, 45), n_classes=3,
                       options=SolverOptions(tol=1e-6, max_iter=1000), block=1)  # fmt: skip
    assert sol.n_iter.max() < lbfgs.PATIENCE + 100, sol.n_iter
    assert (sol.converged == (sol.grad_max <= 1e-6)).all()
    assert sol.grad_max.max() < 1e-5  # stuck within an order of magnitude of tol, at the precision floor


def test_a_binary_fit_with_one_minority_row_converges_from_the_log_prior_start():
    """Found by an outside check: from the log-prior start the first step leaves the intercept where it is,
    and a per-part scale of 1 then made its steps too short to resolve (1000 iterations, not converged)."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    rows = np.r_[np.flatnonzero(y == 1), 432]  # every positive and one negative
    model = TorchLinearClassifier(C=1e-4, tol=1e-6).fit(X[rows], y[rows])
    assert model.converged_ and model.n_iter_[0] <= 50


@pytest.mark.parametrize("n_classes", [5, 2])
def test_lbfgs_starts_the_intercept_at_the_class_log_priors(n_classes):
    """At W = 0 the optimal intercept is the log class frequencies (centred; the log-odds for two classes):
    under an overwhelming penalty the solution is that start, reached at once."""
    from pipeline.heads import solver

    X, y = _data(n_classes, weights=[0.7] + [0.3 / (n_classes - 1)] * (n_classes - 1))
    sol = solver.solve(X, y, [1e-9], n_classes=n_classes)
    p = np.bincount(y) / len(y)
    expected = np.log(p[1] / p[0])[None] if n_classes == 2 else np.log(p) - np.log(p).mean()
    np.testing.assert_allclose(sol.intercept[0], expected, atol=1e-5)
    assert sol.converged[0] and sol.n_iter[0] <= 2 and np.abs(sol.coef[0]).max() < 1e-4


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_solution_is_a_stationary_point_of_nn_linear_and_cross_entropy(smoothing):
    """Autograd through nn.Linear + F.cross_entropy + lambda/2 ||W||^2 checks the solver's hand-written gradient."""
    import torch

    X, y = _data(4, n=400)
    head = TorchLinearClassifier(C=0.5, tol=1e-6, label_smoothing=smoothing).fit(X, y)
    linear = head.to_module().double()
    lam = 1.0 / (0.5 * len(y))
    logits = linear(torch.as_tensor(X))
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y), label_smoothing=smoothing)
    (loss + 0.5 * lam * (linear.weight**2).sum()).backward()
    assert linear.weight.grad.abs().max() < 1e-5 and linear.bias.grad.abs().max() < 1e-5
    np.testing.assert_allclose(logits.detach().numpy(), head.decision_function(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"tol": -1}, r"The 'tol' parameter of TorchLinearClassifier must be a float in the range \(0(\.0)?, inf\)"),
        ({"solver": "newton"}, r"The 'solver' parameter of TorchLinearClassifier must be a str among \{.*'adam'"),
        ({"C": 0.0}, r"The 'C' parameter of TorchLinearClassifier must be a float in the range \(0(\.0)?, inf\)"),
        ({"epochs": 0}, r"The 'epochs' parameter of TorchLinearClassifier must be an int in the range \[1, inf\)"),
        ({"label_smoothing": 1.0}, r"The 'label_smoothing' parameter of TorchLinearClassifier must be a float in"),
        ({"class_weight": "even"}, r"The 'class_weight' parameter of TorchLinearClassifier must be"),
        ({"device": "tpu"}, r"The 'device' parameter of TorchLinearClassifier must be 'auto', 'cpu', 'cuda'"),
    ],
)
def test_torch_head_checks_every_parameter_before_fitting(params, message):
    X, y = _data(3, n=60)
    with pytest.raises(ValueError, match=message):
        TorchLinearClassifier(**params).fit(X, y)


def test_a_trained_head_predicts_as_the_estimator_it_came_from():
    X, y = _data(3, n=120)
    fitted = TorchLinearClassifier(C=1.0).fit(X, y)
    head = _trained(Preprocessor("none"), fitted)
    assert repr(head) == "TrainedHead(torch, 3 classes, 30-d)"
    np.testing.assert_array_equal(head.predict(X), fitted.predict(X).astype(str))
    np.testing.assert_allclose(head.predict_proba(X), fitted.predict_proba(X), atol=1e-5)
    assert head.n_features_in_ == X.shape[1]
    with pytest.raises(ValueError, match=r"X has 29 features, but this head expects 30"):
        head.predict(X[:, :29])


@pytest.mark.parametrize("block", [2, 17])
def test_lbfgs_blocks_converge_where_one_at_a_time_does(block):
    """Settings trained together (--sweep-block, the CUDA default) reach the tolerance on every C, with
    the objective of one-at-a-time: objectives are compared only between products of the same width
    (BLAS rounds float32 logits differently per width), and a fit whose objective still falls is not
    stalled because its max|grad| has not set a new low (breast_cancer at C = 1000 took 384 iterations)."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    from pipeline.heads import solver
    from pipeline.heads.options import SolverOptions

    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    Cs, options = np.logspace(-5, 3, 17), SolverOptions(tol=1e-6, max_iter=1000)
    one = solver.solve(X, y, Cs, n_classes=2, options=options, block=1)
    together = solver.solve(X, y, Cs, n_classes=2, options=options, block=block)
    assert one.converged.all() and together.converged.all(), (Cs[~together.converged], together.grad_max)
    np.testing.assert_allclose(together.loss, one.loss, rtol=1e-5)  # the stopping rule leaves ~1e-6


@pytest.mark.parametrize(
    "weights", [np.zeros(6), np.array([1.0, 1, 1, -1, 1, 1]), np.full(6, np.nan), np.full(6, np.inf), np.ones(5)]
)
def test_solve_refuses_sample_weights_it_cannot_use(weights):
    """All-zero weights used to divide by zero deep in the solver (the heads refuse them earlier)."""
    from pipeline.heads import solver

    X, y = np.eye(6, 3, dtype=np.float32), np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match=r"sample_weight: expected 6 finite non-negative weights, not all zero"):
        solver.solve(X, y, [1.0], n_classes=3, sample_weight=weights)


def test_lbfgs_lengthens_a_first_step_that_is_too_short_instead_of_halving_it_to_nothing():
    """Features scaled ~1e-4 and a weak penalty: the first step's decrease is below float32's rounding while
    the slope is still steep. Halving used to shrink it until x no longer moved, and that empty step passed
    Armijo (f + 1e-4 t slope rounded back to f): 50 empty iterations, W ~ 1e-7, 1.5% above the optimum.
    Found by an outside check; scikit-learn's fit is the reference."""
    from sklearn.datasets import load_wine

    from pipeline.heads import solver
    from pipeline.heads.options import SolverOptions

    X, y = load_wine(return_X_y=True)
    X = (StandardScaler().fit_transform(X) * 1e-4).astype(np.float32)
    sk = LogisticRegression(C=1e4, tol=1e-10, max_iter=10000).fit(X.astype(np.float64), y)
    one = solver.solve(X, y, [1e4], n_classes=3, options=SolverOptions(tol=1e-6))
    assert one.converged[0] and one.n_iter[0] <= 20, (one.n_iter, one.grad_max)
    X64 = X.astype(np.float64)

    def objective(coef, intercept):  # (O, D), (O,): the mean cross-entropy + ||W||^2 / (2 C n), in float64
        z = X64 @ coef.T + intercept
        z -= z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -log_p[np.arange(len(y)), y].mean() + (coef**2).sum() / (2 * 1e4 * len(y))

    ours, reference = objective(one.coef[0].T.astype(np.float64), one.intercept[0]), objective(sk.coef_, sk.intercept_)
    assert ours <= reference * (1 + 1e-5), (ours, reference)  # was 1.5% above it
    path = solver.solve(X, y, np.logspace(-6, 5, 45), n_classes=3, options=SolverOptions(tol=1e-6), block=45)
    assert path.converged.all(), np.logspace(-6, 5, 45)[~path.converged]
