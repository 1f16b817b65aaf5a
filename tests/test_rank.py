"""Transferability scores (`pipeline.rank`): each equals an independent float64 reference written
here from the papers' formulas, behaves as a score should, and reads a cache's train rows only."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from pipeline import rank
from pipeline.errors import DataError

from helpers import make_folder, tiny, write_cache


def logme_reference(X, y):
    """You et al., Algorithm 1, with the matrices themselves: A = alpha I + beta X'X, m = beta A^-1
    X'y, gamma = D - alpha tr(A^-1), iterated to convergence; the mean over classes of the log
    evidence per row."""
    N, D = X.shape
    evidences = []
    for c in np.unique(y):
        t, alpha, beta = (y == c).astype(float), 1.0, 1.0
        for _ in range(10_000):
            A = alpha * np.eye(D) + beta * X.T @ X
            inverse = np.linalg.inv(A)
            m = beta * inverse @ X.T @ t
            gamma = D - alpha * np.trace(inverse)
            new = gamma / (m @ m), (N - gamma) / np.sum((t - X @ m) ** 2)
            done = abs(new[0] / new[1] - alpha / beta) <= 1e-13 * alpha / beta
            alpha, beta = new
            if done:
                break
        A = alpha * np.eye(D) + beta * X.T @ X
        m = beta * np.linalg.solve(A, X.T @ t)
        evidence = (
            D / 2 * np.log(alpha)
            + N / 2 * np.log(beta)
            - beta / 2 * np.sum((t - X @ m) ** 2)
            - alpha / 2 * (m @ m)
            - 0.5 * np.linalg.slogdet(A)[1]
            - N / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / N)
    return np.mean(evidences)


def hscore_reference(X, y):
    """Ibrahim et al.: tr(cov_a(f)^-1 (1 - a) cov(E[f|y])), cov_a by scikit-learn's Ledoit-Wolf."""
    lw = LedoitWolf().fit(X)
    conditional = np.zeros_like(X)
    for c in np.unique(y):
        conditional[y == c] = X[y == c].mean(axis=0)
    between = np.cov(conditional, rowvar=False, bias=True)
    return np.trace(np.linalg.pinv(lw.covariance_) @ ((1 - lw.shrinkage_) * between))


def leep_reference(logits, y):
    """Nguyen et al., eq. 1-2, row by row."""
    theta = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    classes, Z = np.unique(y), theta.shape[1]
    joint = np.array([[theta[y == c, z].sum() / len(y) for z in range(Z)] for c in classes])
    conditional = joint / joint.sum(axis=0)
    return np.mean(
        [np.log(sum(conditional[c, z] * theta[i, z] for z in range(Z))) for i, c in enumerate(y)]
    )


def nce_reference(logits, y):
    """Tran et al.: -H(Y | Z) from the counts of (y, argmax z)."""
    z, n, total = logits.argmax(axis=1), len(y), 0.0
    for c in np.unique(y):
        for s in np.unique(z):
            joint = np.sum((y == c) & (z == s)) / n
            if joint:
                total += joint * np.log(joint / (np.sum(z == s) / n))
    return total


def ncm_reference(X, y):
    """Each row against the unit class means of every other row."""
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    right = 0
    for i in range(len(U)):
        others = np.arange(len(U)) != i
        scores = []
        for c in np.unique(y):
            members = U[others & (y == c)]
            mean = members.sum(axis=0)
            scores.append(U[i] @ mean / np.linalg.norm(mean) if len(members) else -np.inf)
        right += np.unique(y)[int(np.argmax(scores))] == y[i]
    return right / len(U)


def knn_reference(X, y, k=20, T=0.07):
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    right = 0
    for i in range(len(U)):
        top = np.argsort(-S[i])[:k]
        votes = {c: np.exp(S[i, top][y[top] == c] / T).sum() for c in np.unique(y)}
        right += max(votes, key=votes.get) == y[i]
    return right / len(U)


def problem(n, d, c, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    return rng.normal(size=(n, d)) + 0.5 * rng.normal(size=(c, d))[y] + offset, y


@pytest.mark.parametrize("n,d,c", [(300, 20, 4), (60, 100, 3), (500, 64, 10)])
def test_logme_and_hscore_equal_the_papers_formulas(n, d, c):
    X, y = problem(n, d, c)
    assert rank.logme(X, y) == pytest.approx(logme_reference(X, y), rel=1e-8)
    assert rank.hscore(X, y) == pytest.approx(hscore_reference(X, y), rel=1e-8)


def test_leep_and_nce_equal_the_papers_formulas():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 7)) + 2 * np.eye(7)[y % 7]
    assert rank.leep(logits, y) == pytest.approx(leep_reference(logits, y), rel=1e-8)
    assert rank.nce(logits, y) == pytest.approx(nce_reference(logits, y), rel=1e-8)
    # string labels are encoded as scikit-learn does
    assert rank.leep(logits, np.array(list("abcd"))[y]) == pytest.approx(rank.leep(logits, y))


def test_leave_one_out_accuracies_equal_brute_force():
    X, y = problem(150, 16, 5, offset=0.2)
    y[0] = 5  # a class of one row: never chosen for it, its mean is empty without it
    assert rank.ncm_loo(X, y) == pytest.approx(ncm_reference(X, y))
    assert rank.knn_loo(X, y) == pytest.approx(knn_reference(X, y))
    assert 0.3 < rank.ncm_loo(X, y) < 1


def test_logme_ignores_the_order_a_rotation_and_the_scale_of_the_features():
    X, y = problem(200, 24, 5)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(24, 24)))
    assert rank.logme(X[:, ::-1], y) == pytest.approx(rank.logme(X, y), rel=1e-10)
    assert rank.logme(X @ rotation, y) == pytest.approx(rank.logme(X, y), rel=1e-10)
    assert rank.logme(7.5 * X, y) == pytest.approx(rank.logme(X, y), rel=1e-10)  # alpha absorbs it
    assert rank.hscore(7.5 * X, y) == pytest.approx(rank.hscore(X, y), rel=1e-10)


@pytest.mark.parametrize("score", rank.FEATURE_SCORES)
def test_signal_beats_noise_and_true_labels_beat_shuffled_ones(score):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 240)
    noise = rng.normal(size=(240, 8))
    separable = noise.copy()
    separable[:, 0] = 4 * y + 0.1 * rng.normal(size=240)
    measure = getattr(rank, score)
    assert measure(separable, y) > measure(noise, y)
    assert measure(separable, y) > measure(separable, rng.permutation(y))


def test_arrays_of_the_wrong_shape_or_with_one_class_are_one_line():
    X, y = problem(20, 4, 2)
    with pytest.raises(DataError, match=r"y has shape \(19,\); expected \(20,\)"):
        rank.logme(X, y[1:])
    with pytest.raises(DataError, match=r"y holds 1 class; a score needs at least two"):
        rank.hscore(X, np.zeros(20))
    with pytest.raises(DataError, match=r"X holds NaN or infinite values"):
        rank.logme(np.where(X > 3, np.nan, X), y)


def _cache(tmp_path, n=90, d=12, c=3):
    X, y = problem(n, d, c, seed=4, offset=1.0)
    split = np.repeat(np.array([0, 1, 2], np.int8), [n - 30, 15, 15])
    return write_cache(tmp_path / "c.h5", X, y, split), X[: n - 30], y[: n - 30]


def test_a_cache_scores_as_its_train_rows_do_in_blocks_and_reads_no_other(tmp_path, monkeypatch):
    from pipeline.cache import schema

    path, X, y = _cache(tmp_path)
    reads = []
    real = schema.read_columns

    def spy(datasets, start, stop, dtype=None):
        reads.append((start, stop))
        return real(datasets, start, stop, dtype)

    monkeypatch.setattr(schema, "read_columns", spy)
    per_row = 8 * (12 + rank.KNN_QUERIES + 3)  # a row, its similarities and its class scores
    scores = rank.score_cache(path, max_memory=4 * per_row * 7)  # blocks of 7 rows
    assert len(reads) == 2 * 9 and all(0 <= a < b <= 60 for a, b in reads)  # train: rows 0:60
    expected = {
        "logme": rank.logme(X, y),
        "hscore": rank.hscore(X, y),
        "ncm_loo": rank.ncm_loo(X, y),
        "knn_loo": rank.knn_loo(X, y),
    }
    X32 = X.astype(np.float32).astype(np.float64)  # the cache stores float32
    expected |= {"logme": rank.logme(X32, y), "hscore": rank.hscore(X32, y)}
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, rel=1e-8), name
    assert (scores["rows"], scores["dim"], scores["classes"]) == (60, 12, 3)
    assert "leep" not in scores  # no logits stored


def test_rank_writes_json_sorted_by_logme_and_keeps_files_it_did_not_write(tmp_path):
    from pipeline.errors import ConfigError

    good, _, _ = _cache(tmp_path)
    rng = np.random.default_rng(5)
    noise = write_cache(
        tmp_path / "noise.h5",
        rng.normal(size=(90, 12)),
        rng.integers(0, 3, 90),
        np.repeat(np.array([0, 1, 2], np.int8), [60, 15, 15]),
    )
    out = tmp_path / "scores.json"
    ranked = rank.run([str(noise), str(good)], out=out, progress=False)
    assert list(ranked) == [str(good), str(noise)]
    assert json.loads(out.read_text()) == ranked
    assert "logme" in rank.format_table(ranked).splitlines()[0]
    rank.run([str(good)], out=out, progress=False)  # its own file: replaced
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    with pytest.raises(ConfigError, match=r"notes\.json exists and was not written by this"):
        rank.run([str(good)], out=tmp_path / "notes.json", progress=False)
    assert json.loads((tmp_path / "notes.json").read_text()) == {"mine": 1}


def test_a_cache_without_two_classes_in_train_or_with_nan_rows_is_one_line(tmp_path):
    X, y = problem(40, 4, 2)
    split = np.repeat(np.array([0, 2], np.int8), [20, 20])
    one = write_cache(tmp_path / "one.h5", X, np.where(split == 0, 0, y), split)
    with pytest.raises(DataError, match=r"one\.h5 has 20 readable train rows of fewer than two"):
        rank.score_cache(one)
    X[3, 1] = np.inf
    bad = write_cache(tmp_path / "bad.h5", X, y, split)
    with pytest.raises(DataError, match=r"bad\.h5 holds NaN or infinite features among its train"):
        rank.score_cache(bad)


def test_scores_of_a_real_cache_with_logits_and_layers(tmp_path):
    from pipeline.features import stage

    data = make_folder(tmp_path / "img", classes=("a", "b", "c"), per_class=6)
    cfg = tiny(data=str(data), out=str(tmp_path / "r.h5"), logits=True, layers="layer3")
    stage.run_local(cfg)
    ranked = rank.run([cfg.out], layers=[None, "layer3"], progress=False)
    assert set(ranked) == {cfg.out, f"{cfg.out}@layer3"}
    for scores in ranked.values():
        assert {"logme", "hscore", "leep", "nce", "ncm_loo", "knn_loo"} <= scores.keys()
        assert all(np.isfinite(scores[name]) for name in rank.SCORES)
    assert ranked[f"{cfg.out}@layer3"]["dim"] == 256


def test_rank_correlations_count_concordant_pairs_and_weigh_the_top():
    from pipeline.evaluate import transfer

    def rows(scores, top1):
        return [
            {"dataset": "d", "backbone": f"b{i}", "layer": "penultimate", "head": "ncm",
             "test_top1": t, **dict.fromkeys(rank.SCORES), "logme": s}
            for i, (s, t) in enumerate(zip(scores, top1, strict=True))
        ]  # fmt: skip

    (same,) = transfer.correlations(rows([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4]))
    assert (same["runs"], same["kendall_tau"], same["weighted_tau"]) == (4, 1.0, pytest.approx(1))
    (one_swap,) = transfer.correlations(rows([1, 2, 3, 4], [0.1, 0.3, 0.2, 0.4]))
    assert one_swap["kendall_tau"] == pytest.approx(4 / 6)  # 5 concordant pairs, 1 discordant
    (top_swap,) = transfer.correlations(rows([1, 2, 3, 4], [0.1, 0.2, 0.4, 0.3]))
    assert top_swap["kendall_tau"] == pytest.approx(4 / 6)
    assert top_swap["weighted_tau"] < one_swap["weighted_tau"]  # a swap at the top costs more
    (two,) = transfer.correlations(rows([1, 2], [0.1, 0.2]))
    assert two["kendall_tau"] is None and two["runs"] == 2


STUDY = """
[study]
name = "layers"
results = "{results}"
cache = "{cache}"
{rank}
[features]
image_size = 32
batch_size = 8
workers = 0
val_fraction = 0.25
layers = "layer2,layer3"

[[datasets]]
name = "shapes"
data = "{data}"

[[backbones]]
name = "r18"
backbone = "resnet18"
weights = "none"

[[heads]]
head = "ncm"

[[heads]]
name = "ncm-layer3"
head = "ncm"
layer = "layer3"

[[heads]]
name = "ncm-layer2"
head = "ncm"
layer = "layer2"
"""


def test_a_study_records_the_scores_and_reports_how_they_ranked_its_layers(tmp_path):
    from pipeline import study

    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=8)
    file = tmp_path / "s.toml"
    values = dict(results=tmp_path / "results", cache=tmp_path / "cache", data=data)
    file.write_text(STUDY.format(**values, rank=""))
    summary = study.run(file, progress=False)
    assert len(summary["runs"]) == 3 and not summary["failed"]
    folder = tmp_path / "results" / "layers"
    result = json.loads((folder / "shapes__r18__ncm-layer3" / "result.json").read_text())
    cache = tmp_path / "cache" / "shapes-r18.h5"
    expected = rank.score_cache(cache, "layer3")
    assert result["scores"] == pytest.approx({k: expected[k] for k in rank.SCORES if k in expected})
    text = (folder / "report.md").read_text()
    assert "| shapes | r18 | layer3 | ncm | 100.00 |" in text  # every layer is told apart easily:
    assert "| shapes | ncm | logme | 3 | - | - |" in text  # no order to correlate with
    assert (folder / "report-scores.png").stat().st_size > 0
    assert (folder / "report-scores.csv").read_text().startswith("dataset,backbone,layer,head")

    file.write_text(STUDY.format(**values, rank="rank = false"))
    study.run(file, progress=False)
    result = json.loads((folder / "shapes__r18__ncm" / "result.json").read_text())
    assert "scores" not in result and "Transferability" not in (folder / "report.md").read_text()


def test_the_rank_command_prints_the_table_and_says_mistakes_in_one_line(tmp_path, capsys):
    from pipeline import cli

    from helpers.faults import assert_one_line_error

    path, _, _ = _cache(tmp_path)
    out = tmp_path / "scores.json"
    assert cli.main(["rank", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0].split()[:3] == ["cache", "logme", "hscore"]
    assert (
        f"scores in {out}" in printed.err and json.loads(out.read_text())[str(path)]["rows"] == 60
    )
    for argv, pattern in (
        (["rank", str(tmp_path / "none.h5")], r"no cache at .*none\.h5; build it with"),
        (["rank", str(path), "--layer", "layer3"], r"c\.h5 has no layer 'layer3'"),
        (["rank", str(path), "--max-memory", "1KB"], r"--max-memory 1,000 bytes is below the"),
        (["rank", str(path), "--max-memory", "lots"], r"--max-memory 'lots' is not a size"),
        (["rank"], r"the following arguments are required: CACHE"),
    ):
        assert cli.main(argv) == 2, argv
        assert_one_line_error(capsys.readouterr().err, pattern)


def test_an_out_that_is_a_cache_or_a_file_of_others_is_never_replaced(tmp_path):
    from pipeline.errors import ConfigError

    path, _, _ = _cache(tmp_path)
    other = write_cache(tmp_path / "other.h5", *problem(90, 12, 3)[:2], np.zeros(90, np.int8))
    for out in (path, other):  # even with --force: rank writes JSON, never over a cache
        with pytest.raises(ConfigError, match=r"\.h5 is a feature cache; rank writes JSON"):
            rank.run([str(path)], out=out, progress=False, force=True)
    assert rank.score_cache(path)["rows"] == 60 and rank.score_cache(other)["rows"] == 90
    for text in ("{}", '{"notes": {"logme": "keep me", "rows": "important"}}'):
        (tmp_path / "mine.json").write_text(text)
        with pytest.raises(ConfigError, match=r"mine\.json exists and was not written by this"):
            rank.run([str(path)], out=tmp_path / "mine.json", progress=False)
        assert (tmp_path / "mine.json").read_text() == text
    with pytest.raises(ConfigError, match=r"--layer 'penultimate,,' names an empty layer"):
        rank.run([str(path)], layers=["penultimate,,"], progress=False)
    assert list(rank.run([str(path)], layers=[" penultimate "], progress=False)) == [
        f"{path}@penultimate"
    ]


def test_logits_that_are_not_finite_or_missing_are_one_line(tmp_path):
    import h5py

    from pipeline.cache import schema
    from pipeline.errors import CacheError

    path, _, _ = _cache(tmp_path)
    with h5py.File(path, "r+") as f:
        logits = np.random.default_rng(6).normal(size=(90, 5)).astype(np.float32)
        logits[2, 1] = np.nan  # a train row
        f.create_dataset("logits", data=logits)
        f["row_crc"][...] = schema.row_crc(f["features"][...], logits, {})
    with pytest.raises(DataError, match=r"c\.h5 holds NaN or infinite logits among its train rows"):
        rank.score_cache(path)
    with h5py.File(path, "r+") as f:
        del f["logits"]
        f["row_crc"][...] = schema.row_crc(f["features"][...], None, {})
        claims = json.loads(f.attrs["fingerprint"]) | {"logits": True}
        f.attrs["fingerprint"] = json.dumps(claims)
    with pytest.raises(CacheError, match=r"its fingerprint says it holds logits, and it has no"):
        rank.score_cache(path)


def test_features_of_any_magnitude_score_alike():
    X, y = problem(120, 10, 3)
    expected = [getattr(rank, name)(X, y) for name in rank.FEATURE_SCORES]
    for scale in (1e200, 1e-200):
        found = [getattr(rank, name)(X * scale, y) for name in rank.FEATURE_SCORES]
        assert found == pytest.approx(expected, rel=1e-9), scale


def test_compare_skips_crafted_scores_in_one_line(tmp_path):
    from pipeline.config import HeadConfig
    from pipeline.evaluate import compare
    from pipeline.heads import protocol

    path, _, _ = _cache(tmp_path)
    run = tmp_path / "runs" / "a"
    protocol.run(HeadConfig(features=str(path), head="ncm", out=str(run), bootstrap=0))
    protocol.run(HeadConfig(features=str(path), head="knn", out=str(run.parent / "b"), bootstrap=0))
    result = json.loads((run / "result.json").read_text())
    for scores, skipped in (
        ({"foo": 1.0}, False),  # no score it knows: no scores section
        ({"logme": 1e308}, True),
        ({"logme": 10**400}, True),
        ({"logme": float("nan")}, True),
        ({"logme": "high"}, True),
    ):
        (run / "result.json").write_text(json.dumps(result | {"scores": scores}))
        done = compare.write_report([tmp_path / "runs"], tmp_path / "report.md", force=True)
        assert bool(done["skipped"]) == skipped, scores
        if skipped:
            assert "lacks 'scores' or has it in another shape" in done["skipped"][0]
        assert "Transferability" not in (tmp_path / "report.md").read_text()
