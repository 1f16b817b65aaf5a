"""Studies, comparisons with paired tests, few-shot curves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline import cli, study
from pipeline.config import HeadConfig
from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.evaluate import compare
from pipeline.features import backbone
from pipeline.heads import protocol

from conftest import REPO, make_folder, write_cache

STUDY = """
[study]
name = "tiny"
results = "{results}"
cache = "{cache}"

[features]
image_size = 32
batch_size = 8
workers = 0
val_fraction = 0.25

[head]
grid = [0.01, 0.1, 1.0, 10.0]
bootstrap = 200

[[datasets]]
name = "shapes"
data = "{data}"
{extra_dataset}

[[backbones]]
name = "r18-a"
backbone = "resnet18"
weights = "none"
seed = 0

[[backbones]]
name = "r18-b"
backbone = "resnet18"
weights = "none"
seed = 1

[[heads]]
head = "logreg"

[[heads]]
head = "torch"

[fewshot]
head = "logreg"
shots = [1, 2]
repeats = 2
"""


def write_study(tmp_path, extra_dataset: str = "", **replace) -> str:
    data = make_folder(tmp_path / "data", classes=("cat", "dog", "owl"), per_class=8, splits=("train", "test"))
    text = STUDY.format(results=tmp_path / "results", cache=tmp_path / "cache", data=data, extra_dataset=extra_dataset)
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return str(path)


def test_study_runs_every_cell_then_reuses_current_caches(tmp_path, monkeypatch):
    path = write_study(tmp_path)
    first = study.run(path, progress=False)
    assert len(first["computed"]) == 2 and first["reused"] == [] and first["failed"] == []
    assert len(first["runs"]) == 2 * (2 + 2)  # 2 caches x (2 heads + 2 few-shot runs)
    builds = []
    real = backbone.build
    monkeypatch.setattr(backbone, "build", lambda *a, **k: builds.append(a) or real(*a, **k))
    said = []
    second = study.run(path, report=said.append, progress=False)
    assert builds == [], "a current cache is reused, never recomputed"
    assert len(second["reused"]) == 2 and second["computed"] == []
    assert "2 caches computed" not in said[-1] and "0 caches computed, 2 reused" in said[-1]

    # The study's table matches the individual result files.
    report = tmp_path / "results" / "tiny" / "report.md"
    assert report.exists() and (tmp_path / "results" / "tiny" / "report-bars.png").exists()
    rows = compare.summary_rows(compare.gather([tmp_path / "results" / "tiny"]))
    assert len(rows) == 8
    for row in rows:
        result = json.loads((tmp_path / row["folder"].split(str(tmp_path) + "/")[-1] / "result.json").read_text())
        assert row["test_top1"] == result["test"]["top1"]
        assert row["dataset"] == "shapes" and row["backbone"] in ("r18-a", "r18-b")
    few = compare.fewshot_rows(compare.gather([tmp_path / "results" / "tiny"]))
    assert {(r["backbone"], r["shots"]) for r in few} == {(b, s) for b in ("r18-a", "r18-b") for s in (1, 2, "all")}
    assert (tmp_path / "results" / "tiny" / "report-fewshot.png").exists()
    text = report.read_text()
    assert "| shapes | r18-a | logreg | all |" in text and "## Few-shot" in text


def test_a_failing_cell_is_reported_and_the_rest_go_on(tmp_path, capsys):
    path = write_study(tmp_path, extra_dataset=f'\n[[datasets]]\nname = "gone"\ndata = "{tmp_path / "missing"}"\n')
    summary = study.run(path, progress=False)
    assert {f["cell"] for f in summary["failed"]} == {"gone / r18-a: features", "gone / r18-b: features"}
    assert all("does not exist" in f["error"] for f in summary["failed"])
    assert len(summary["runs"]) == 8, "the good cells all ran"
    assert cli.main(["study", path, "--no-progress"]) == 2
    assert "error: 2 cell(s) failed: gone / r18-a: features; gone / r18-b: features" in capsys.readouterr().err


def test_study_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown table 'model'; valid ones: study, features, head, datasets"):
        study.plan(write_study(tmp_path, extra_dataset="[model]\nx = 1"))
    with pytest.raises(ConfigError, match=r"\[\[datasets\]\] #1: unknown key 'folder'; valid keys: name, data"):
        study.plan(write_study(tmp_path, **{"data = ": "folder = "}))
    with pytest.raises(ConfigError, match=r"unknown dataset 'CIFAR11'; choose one of: digits, CIFAR10, CIFAR100"):
        study.plan(write_study(tmp_path, extra_dataset='\n[[datasets]]\ndataset = "CIFAR11"\n'))
    with pytest.raises(ConfigError, match=r"--backbone 'resnet9' is not allowed; choose one of: resnet18"):
        study.plan(
            write_study(tmp_path, **{'backbone = "resnet18"\nweights = "none"\nseed = 1': 'backbone = "resnet9"'})
        )
    with pytest.raises(ConfigError, match=r"\[fewshot\]: shots = \[0\]; expected positive whole numbers"):
        study.plan(write_study(tmp_path, **{"shots = [1, 2]": "shots = [0]"}))


def test_mcnemar_and_paired_bootstrap_by_hand():
    # 10 rows only A gets right, 2 only B gets right, 88 both right:
    # p = 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    a = np.array([True] * 10 + [False] * 2 + [True] * 88)
    b = np.array([False] * 10 + [True] * 2 + [True] * 88)
    assert compare.mcnemar(a, b) == (10, 2, pytest.approx(2 * 79 / 4096))
    diff, lo, hi = compare.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert diff == pytest.approx(0.08) and 0 < lo < 0.08 < hi
    assert compare.mcnemar(a, a)[2] == 1.0


def _two_runs(tmp_path, same_test: bool):
    from sklearn.datasets import make_classification

    X, y = make_classification(400, 12, n_informative=6, n_classes=3, random_state=0)
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [240, 80, 80])
    other = split if same_test else np.repeat(np.array([0, 1, 2], dtype=np.int8), [200, 80, 120])
    a = write_cache(tmp_path / "a.h5", X, y, split, fingerprint={"backbone": "A"})
    b = write_cache(tmp_path / "b.h5", X + np.random.default_rng(1).normal(0, 6.0, X.shape), y, other,
                    fingerprint={"backbone": "B"})  # fmt: skip
    runs = []
    for name, cache in (("a", a), ("b", b)):
        cfg = HeadConfig(features=str(cache), out=str(tmp_path / "runs" / name), grid=(0.1, 1.0), progress=False)
        protocol.run(cfg, cell={"dataset": "toy", "backbone": name.upper(), "head": "logreg"})
        runs.append(compare.load_run(tmp_path / "runs" / name))
    return runs


def test_paired_comparison_says_who_wins_only_when_significant(tmp_path):
    a, b = _two_runs(tmp_path, same_test=True)
    result = compare.pair(a, b)
    _, ya, pa = a.predictions()
    _, yb, pb = b.predictions()
    assert result["a_only_right"] == int(((pa == ya) & (pb != yb)).sum())
    assert result["significant"] and result["p_value"] < 0.05
    assert result["statement"].startswith("A beats B on toy (logreg): ")
    [auto] = compare.comparisons([a, b])
    assert auto["statement"] == result["statement"]


def test_runs_on_different_test_sets_are_not_paired(tmp_path, capsys):
    a, b = _two_runs(tmp_path, same_test=False)
    with pytest.raises(
        DataError, match=r"cannot pair .*a and .*b: they were scored on different test sets \(80 vs 120"
    ):
        compare.pair(a, b)
    assert compare.comparisons([a, b]) == []
    assert cli.main(["compare", "--pair", str(a.folder), str(b.folder)]) == 2
    assert "scored on different test sets" in capsys.readouterr().err


def test_compare_errors(tmp_path):
    with pytest.raises(Exception, match=r"no result\.json under .*; run `pipeline head` or a study first"):
        compare.gather([tmp_path])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "result.json").write_text(json.dumps({"schema": 0}))
    with pytest.raises(CacheError, match=r"result .*old/result\.json has schema 0, this pipeline reads 1; rerun"):
        compare.gather([tmp_path])


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_study_runs_the_offline_demo(tmp_path):
    make = ["make", "-s", "-f", str(REPO / "Makefile"), f"PY={sys.executable}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "demo-study.toml", tmp_path / "configs")
    done = subprocess.run([*make, "study"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "results" / "demo"
    for name in ("report.md", "report.csv", "report-bars.png", "report-fewshot.png", "report-fewshot.csv"):
        assert (out / name).exists(), name
    assert "2 caches computed, 0 reused, 14 head runs, 0 failed" in done.stderr
    assert "resnet34-random" in (out / "report.md").read_text()
