"""Studies, comparisons with paired tests, few-shot curves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli, study
from pipeline.backbones import backbone
from pipeline.config import FeaturesConfig
from pipeline.errors import ConfigError
from pipeline.evaluate import compare

from helpers import REPO, make_folder

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
cut = "layer3"

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

[[heads]]
head = "knn"
grid = [1, 3, 5]

[[heads]]
head = "ncm"

[[heads]]
head = "mlp"
hidden = [16]
epochs = 10

[[heads]]
head = "tail"
lr_grid = [0.001]
weight_decay = [0.0001]
epochs = 2

[fewshot]
head = "logreg"
shots = [1, 2]
repeats = 2
"""


def write_study(tmp_path, extra_dataset: str = "", **replace) -> str:
    data = make_folder(
        tmp_path / "data", classes=("cat", "dog", "owl"), per_class=8, splits=("train", "test")
    )
    text = STUDY.format(
        results=tmp_path / "results",
        cache=tmp_path / "cache",
        data=data,
        extra_dataset=extra_dataset,
    )
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_study_runs_every_cell_then_reuses_current_caches(tmp_path, monkeypatch):
    path = write_study(tmp_path)
    first = study.run(path, progress=False)
    assert len(first["computed"]) == 2 and first["reused"] == [] and first["failed"] == []
    assert len(first["runs"]) == 2 * (6 + 2)  # 2 caches x (6 heads + 2 few-shot runs)
    builds = []
    real = backbone.build
    monkeypatch.setattr(backbone, "build", lambda *a, **k: builds.append(a) or real(*a, **k))
    said = []
    second = study.run(path, report=said.append, progress=False)
    # Only the tail head builds the backbone again (for its pretrained tail), never an extraction:
    # an extraction's backbone keeps the cut.
    assert builds and all(not spec.layer_dims for (spec, *_) in builds), (
        "a current cache is reused, never recomputed"
    )
    assert len(second["reused"]) == 2 and second["computed"] == []
    assert "2 caches computed" not in said[-1] and "0 caches computed, 2 reused" in said[-1]

    # The study's table matches the individual result files.
    report = tmp_path / "results" / "tiny" / "report.md"
    assert report.exists() and (tmp_path / "results" / "tiny" / "report-bars.png").exists()
    rows = compare.summary_rows(compare.gather([tmp_path / "results" / "tiny"]))
    assert len(rows) == 16
    for row in rows:
        result = json.loads(
            (tmp_path / row["folder"].split(str(tmp_path) + "/")[-1] / "result.json").read_text()
        )
        assert row["test_top1"] == result["test"]["top1"]
        assert row["dataset"] == "shapes" and row["backbone"] in ("r18-a", "r18-b")
    few = compare.fewshot_rows(compare.gather([tmp_path / "results" / "tiny"]))
    assert {(r["backbone"], r["shots"]) for r in few} == {
        (b, s) for b in ("r18-a", "r18-b") for s in (1, 2, "all")
    }
    assert (tmp_path / "results" / "tiny" / "report-fewshot.png").exists()
    text = report.read_text()
    assert "| shapes | r18-a | logreg | all |" in text and "## Few-shot" in text
    assert (
        "| shapes | r18-a | knn | all |" in text
        and "| k = " in text
        and "| temperature = 0.07 |" in text
    )
    # The cosine heads and the mlp are compared with the linear heads on the same test rows.
    paired = text.split("## Paired comparisons")[1]
    assert all(head in paired for head in ("knn", "ncm", "mlp", "tail"))
    assert "| shapes | r18-a | mlp | all |" in text and "| candidate = " in text


def test_a_study_never_replaces_a_hand_made_cache_and_reuses_an_identical_one(tmp_path, capsys):
    from pipeline.features import stage

    path = write_study(tmp_path, **{'[[backbones]]\nname = "r18-b"': '[[skip]]\nname = "r18-b"'})
    path = Path(path)
    text = path.read_text().split("[[skip]]")[0] + '[[heads]]\nhead = "ncm"\n'
    text = text.replace(
        '[[heads]]\nhead = "logreg"\n\n[[heads]]\nhead = "torch"\n\n[[heads]]\nhead = "knn"\n', ""
    )
    path.write_text(text)
    data = tmp_path / "data"
    mine = (
        tmp_path / "cache" / "shapes-r18-a.h5"
    )  # the study's own name, made by hand at another size
    stage.run(
        FeaturesConfig(
            data=str(data),
            backbone="resnet18",
            weights="none",
            image_size=48,
            workers=0,
            progress=False,
            out=str(mine),
            val_fraction=0.25,
        )
    )
    before = mine.read_bytes()
    assert cli.main(["study", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{mine} holds other features (" in err and "'ImageClassification(crop_size=[48]" in err
    assert "a study never replaces a cache" in err and mine.read_bytes() == before
    mine.rename(
        tmp_path / "cache" / "hand-made.h5"
    )  # the same features as the study's, under another name
    stage.run(
        FeaturesConfig(
            data=str(data),
            backbone="resnet18",
            weights="none",
            image_size=32,
            workers=0,
            progress=False,
            out=str(mine),
            val_fraction=0.25,
            batch_size=8,
            cut="layer3",
        )
    )
    twin = mine.rename(tmp_path / "cache" / "twin.h5")
    said: list[str] = []
    summary = study.run(str(path), report=said.append, progress=False)
    assert summary["failed"] == [] and summary["reused"] == [str(twin)] and not mine.exists()
    result = json.loads((Path(summary["runs"][0]) / "result.json").read_text())
    assert result["cache"]["path"] == str(twin)


@pytest.mark.slow
def test_a_failing_cell_is_reported_and_the_rest_go_on(tmp_path, capsys):
    path = write_study(
        tmp_path, extra_dataset=f'\n[[datasets]]\nname = "gone"\ndata = "{tmp_path / "missing"}"\n'
    )
    summary = study.run(path, progress=False)
    assert {f["cell"] for f in summary["failed"]} == {
        "gone / r18-a: features",
        "gone / r18-b: features",
    }
    assert all("does not exist" in f["error"] for f in summary["failed"])
    assert len(summary["runs"]) == 16, "the good cells all ran"
    assert cli.main(["study", path, "--no-progress"]) == 2
    assert (
        "error: 2 cell(s) failed: gone / r18-a: features; gone / r18-b: features"
        in capsys.readouterr().err
    )


def test_study_file_errors(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown table 'model'; valid ones: study, features, head, datasets"
    ):
        study.plan(write_study(tmp_path, extra_dataset="[model]\nx = 1"))
    with pytest.raises(
        ConfigError, match=r"\[\[datasets\]\] #1: unknown key 'folder'; valid keys: name, data"
    ):
        study.plan(write_study(tmp_path, **{"data = ": "folder = "}))
    with pytest.raises(
        ConfigError, match=r"unknown dataset 'CIFAR11'; choose one of: digits, CIFAR10, CIFAR100"
    ):
        study.plan(write_study(tmp_path, extra_dataset='\n[[datasets]]\ndataset = "CIFAR11"\n'))
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet9'; did you mean resnet50"):
        study.plan(
            write_study(
                tmp_path,
                **{'backbone = "resnet18"\nweights = "none"\nseed = 1': 'backbone = "resnet9"'},
            )
        )
    with pytest.raises(
        ConfigError, match=r"\[fewshot\]: shots = \[0\]; expected positive whole numbers"
    ):
        study.plan(write_study(tmp_path, **{"shots = [1, 2]": "shots = [0]"}))
    twin = '\n[[datasets]]\nname = "shapes"\ndata = "elsewhere"\n'
    with pytest.raises(
        ConfigError,
        match=r"\[\[datasets\]\] #1 and #2 are both named 'shapes'; give each a distinct",
    ):
        study.plan(write_study(tmp_path, extra_dataset=twin))
    with pytest.raises(ConfigError, match=r"\[\[backbones\]\] #1 and #2 are both named 'r18-a'"):
        study.plan(write_study(tmp_path, **{'name = "r18-b"': 'name = "r18-a"'}))
    with pytest.raises(ConfigError, match=r"\[\[heads\]\] #1 and #4 are both named 'logreg'"):
        study.plan(
            write_study(
                tmp_path,
                extra_dataset="",
                **{'head = "knn"': 'head = "knn"\n\n[[heads]]\nhead = "logreg"'},
            )
        )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_study_runs_the_offline_demo(tmp_path):
    make = ["make", "-s", "-f", str(REPO / "Makefile"), f"PY={sys.executable}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "demo-study.toml", tmp_path / "configs")
    done = subprocess.run(
        [*make, "study"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "results" / "demo"
    for name in (
        "report.md",
        "report.csv",
        "report-bars.png",
        "report-fewshot.png",
        "report-fewshot.csv",
        "report-scores.png",
        "report-scores.csv",
    ):
        assert (out / name).exists(), name
    assert "2 caches computed, 0 reused, 20 head runs, 0 failed" in done.stderr
    text = (out / "report.md").read_text()
    assert "resnet34-random" in text
    assert "| digits | logreg | logme | 6 | " in text  # two backbones x three layers, ranked


def test_the_long_tail_study_file_is_valid_and_mixes_heads_safely(tmp_path):
    plan = study.plan(REPO / "configs" / "long-tail.toml")
    labels = [label for label, _ in plan.heads]
    assert labels == [
        f"R{r}-{m}"
        for r in (1, 10, 100)
        for m in ("none", "class-weight", "sampler", "logit-adjust")
    ]
    values = dict(plan.heads)
    assert (
        values["R100-sampler"]["balanced_sampler"] is True
        and values["R10-logit-adjust"]["logit_adjust"] == "auto"
    )
    # [head] defaults that only suit the linear heads are left out of a cosine head's cell.
    path = tmp_path / "mixed.toml"
    path.write_text(
        '[head]\ngrid = [0.1, 1.0]\nclass_weight = "balanced"\npreprocess = "standardize"\n'
        '[[datasets]]\ndataset = "digits"\n[[backbones]]\nbackbone = "resnet18"\nweights = "none"\n'
        '[[heads]]\nhead = "logreg"\n[[heads]]\nhead = "knn"\n[[heads]]\nhead = "ncm"\n'
    )
    heads = dict(study.plan(path).heads)
    assert heads["logreg"]["grid"] == [0.1, 1.0] and heads["logreg"]["class_weight"] == "balanced"
    assert (
        not {"grid", "class_weight", "preprocess"} & set(heads["knn"])
        and "grid" not in heads["ncm"]
    )


def test_the_backbone_suite_names_five_families_that_all_resolve():
    plan = study.plan(REPO / "configs" / "backbone-suite.toml")
    names = {cfg.backbone for _, _, cfg in plan.extractions}
    assert names == {"resnet50", "convnext_tiny", "vit_b_16", "efficientnet_b0", "swin_t"}
    assert len(plan.extractions) == 25 and [label for label, _ in plan.heads] == ["logreg", "knn"]


def test_a_study_sweeps_layers_as_head_entries(tmp_path):
    path = tmp_path / "layers.toml"
    path.write_text(
        '[[datasets]]\ndataset = "digits"\n[[backbones]]\nbackbone = "resnet18"\nweights = '
        '"none"\nlayers = "layer3"\n'
        '[[heads]]\nname = "penultimate"\n[[heads]]\nname = "layer3"\nlayer = "layer3"\n'
    )
    plan = study.plan(path)
    assert [label for label, _ in plan.heads] == ["penultimate", "layer3"] and dict(plan.heads)[
        "layer3"
    ]["layer"] == "layer3"
    assert plan.extractions[0][2].layers == "layer3"
