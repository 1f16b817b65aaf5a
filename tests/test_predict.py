"""predict and export agree with each other and with the head on cached features of the same
images."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline import cli, predict, read_features
from pipeline.config import HeadConfig
from pipeline.errors import CacheError, WeightsError
from pipeline.features import stage
from pipeline.heads import protocol
from pipeline.heads.saved import load_head

from helpers import make_folder, tiny, write_image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny cache (3 classes, train/test folders) and a logreg head trained on it."""
    tmp = tmp_path_factory.mktemp("trained")
    data = make_folder(
        tmp / "data",
        classes=("cat", "dog", "owl"),
        per_class=6,
        splits=("train", "test"),
        size=(40, 30),
    )
    cfg = tiny(data=str(data), out=str(tmp / "c.h5"), image_size=40)
    stage.run(cfg)
    protocol.run(
        HeadConfig(
            features=cfg.out,
            head="logreg",
            out=str(tmp / "head"),
            grid=(0.1, 1.0, 10.0),
            progress=False,
            bootstrap=0,
        )
    )
    cosine = dict(features=cfg.out, progress=False, bootstrap=0)
    knn = HeadConfig(
        head="knn", grid=(3, 5), calibrate="temperature", out=str(tmp / "knn"), **cosine
    )  # type: ignore[arg-type]
    protocol.run(knn)
    protocol.run(HeadConfig(head="ncm", preprocess="center-l2", out=str(tmp / "ncm"), **cosine))  # type: ignore[arg-type]
    mlp = dict(hidden=(16,), dropout=(0.0,), weight_decay=(1e-4,), epochs=5)
    protocol.run(HeadConfig(head="mlp", out=str(tmp / "mlp"), **cosine, **mlp))  # type: ignore[arg-type]
    return tmp, data


HEADS = [
    "head",
    "knn",
    "ncm",
    "mlp",
]  # the logreg head, the cosine heads (knn calibrated, ncm centred) and an mlp of one cache


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@pytest.mark.parametrize("folder", HEADS)
def test_predict_matches_the_head_on_cached_features(trained, folder):
    tmp, data = trained
    out = tmp / f"pred-{folder}.csv"
    result = predict.predict(tmp / folder, data / "test", out, top_k=3)
    rows = _rows(out)
    assert [r["path"] for r in rows] == [
        f"{c}/test{n:02d}.png" for c in ("cat", "dog", "owl") for n in range(6)
    ]
    assert list(rows[0]) == [
        "path",
        "prediction",
        "probability",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
        "error",
    ]
    head, fs = load_head(tmp / folder), read_features(tmp / "c.h5")
    cached = head.predict_proba(fs["test"].X)  # the same images, through the cache
    by_id = {f"{i.split('/', 1)[1]}": k for k, i in enumerate(fs["test"].ids)}
    order = [by_id[i] for i in result["ids"]]
    np.testing.assert_allclose(result["proba"], cached[order], atol=1e-5)
    assert [r["prediction"] for r in rows] == list(head.classes_[cached[order].argmax(1)])


@pytest.mark.slow
@pytest.mark.parametrize("folder", HEADS)
def test_export_loads_without_the_package_and_agrees_with_predict(trained, folder):
    tmp, data = trained
    exported = tmp / f"classifier-{folder}.pt2"
    assert cli.main(["export", "--head", str(tmp / folder), "--out", str(exported)]) == 0
    from pipeline import load_export

    load_export(exported)  # every kind's program passes the checks made for files from others
    result = predict.predict(tmp / folder, data / "test", tmp / f"pred-{folder}.csv", force=True)
    code = f"""
import sys, json, numpy as np, torch
sys.modules["pipeline"] = None  # any import of this package would fail here
from PIL import Image
import torchvision.transforms.functional as F
extra = {{"meta.json": ""}}
program = torch.export.load({str(exported)!r}, extra_files=extra)
meta = json.loads(extra["meta.json"])
paths = {[str(data / "test" / i) for i in result["ids"]]!r}
crops = []
for p in paths:
    image = Image.open(p).convert("RGB")
    mode = F.InterpolationMode(meta["interpolation"])
    image = F.resize(image, meta["resize_size"], interpolation=mode, antialias=True)
    crops.append(F.pil_to_tensor(F.center_crop(image, meta["crop_size"])))
proba = program.module()(torch.stack(crops))
np.save(sys.argv[1], proba.detach().numpy())
print(",".join(meta["classes"]))
"""
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp / "p.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "cat,dog,owl"
    np.testing.assert_allclose(np.load(tmp / "p.npy"), result["proba"], atol=1e-5)


def test_unreadable_images_are_listed_unless_strict(trained, capsys):
    tmp, _ = trained
    new = tmp / "new"
    write_image(new / "a.png", (200, 40, 40), size=(40, 30))
    (new / "b.jpg").write_text("not an image")
    result = predict.predict(tmp / "head", new, tmp / "new.csv")
    assert result["unreadable"] == ["b.jpg"] and result["classified"] == 1
    rows = _rows(tmp / "new.csv")
    assert (
        rows[1]["path"] == "b.jpg"
        and rows[1]["prediction"] == ""
        and "cannot identify image" in rows[1]["error"]
    )
    code = cli.main(
        [
            "predict",
            "--head",
            str(tmp / "head"),
            "--data",
            str(new),
            "--out",
            str(tmp / "x.csv"),
            "--strict",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "b.jpg: cannot identify image file" in err and "Traceback" not in err


def test_predict_prints_one_images_classes_and_a_folders_summary(trained, tmp_path, capsys):
    tmp, data = trained
    one = data / "test" / "dog" / "test00.png"
    assert (
        cli.main(
            [
                "predict",
                "--head",
                str(tmp / "head"),
                "--data",
                str(one),
                "--out",
                str(tmp_path / "one.csv"),
                "--top-k",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.strip()
    row = _rows(tmp_path / "one.csv")[0]
    assert printed.startswith(f"test00.png: {row['prediction']} ") and printed.count("%") == 2
    assert (
        cli.main(
            [
                "predict",
                "--head",
                str(tmp / "head"),
                "--data",
                str(data / "test"),
                "--out",
                str(tmp_path / "all.csv"),
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = _rows(tmp_path / "all.csv")
    assert printed.startswith(
        f"18 images classified ({tmp_path / 'all.csv'} has each one's top 5):"
    )
    counts = {
        name: [r["prediction"] for r in rows].count(name)
        for name in {r["prediction"] for r in rows}
    }
    top = min(counts, key=lambda name: (-counts[name], name))  # most images; ties by name
    assert f"  {top}" in printed.splitlines()[1]


def test_predict_refuses_weights_that_do_not_match(trained, tmp_path):
    tmp, data = trained
    other = tmp_path / "other.pth"
    torch.save(__import__("torchvision").models.resnet18(weights=None).state_dict(), other)
    pattern = (
        r"cannot rebuild the backbone of head .*: its features came from weights "
        r"'none \(random init, seed 0\)', these are 'checkpoint sha256:.*'; pass --weights"
    )
    with pytest.raises(WeightsError, match=pattern):
        predict.predict(tmp / "head", data / "test", tmp_path / "p.csv", weights=str(other))


def test_head_without_feature_settings_is_refused(trained, tmp_path):
    tmp, data = trained
    old = tmp_path / "old"
    old.mkdir()
    for name in ("head.npz", "head.json"):
        (old / name).write_bytes((tmp / "head" / name).read_bytes())
    meta = json.loads((old / "head.json").read_text())
    del meta["features_config"]
    (old / "head.json").write_text(json.dumps(meta))
    with pytest.raises(
        CacheError, match=r"head .*old does not record how its features were made .*; retrain it"
    ):
        predict.predict(old, data / "test", tmp_path / "p.csv")
