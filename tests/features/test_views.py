"""--views K: seeded augmented views of the train images in a companion cache, and `head --views`
training on them with each image's K+1 views weighing 1/(K+1)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from pipeline import cli, read_features
from pipeline.cache.schema import views_path
from pipeline.config import FeaturesConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.features import distributed, stage, views

from helpers import PALETTE, make_folder, tiny, write_image


def test_a_view_is_a_seeded_crop_resize_and_flip(tmp_path):
    image = write_image(tmp_path / "a.png", PALETTE[0], (60, 40))
    reader = views.AugmentedReader(
        lambda path: Image.open(path).convert("RGB"), 32, 0.08, views.InterpolationMode.BILINEAR
    )
    first, again = reader((str(image), "cat/a.png", 1)), reader((str(image), "cat/a.png", 1))
    assert first.size == (32, 32) and np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(reader((str(image), "cat/a.png", 2))))
    rng = np.random.default_rng(views.view_seed("cat/a.png", 1))
    box = views.random_resized_box(60, 40, 0.08, rng)
    expected = Image.open(image).convert("RGB").resize((32, 32), Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.array_equal(np.asarray(first), np.asarray(expected))


def test_crops_keep_the_area_and_ratio_ranges_and_fall_back_to_a_centre_crop():
    rng = np.random.default_rng(0)
    for _ in range(500):
        left, top, right, bottom = views.random_resized_box(300, 200, 0.08, rng)
        w, h = right - left, bottom - top
        assert left >= 0 and top >= 0 and right <= 300 and bottom <= 200
        assert 0.08 * 0.97 <= w * h / 60000 <= 1.0 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    assert views.random_resized_box(1000, 10, 0.9, rng) == (
        493,
        0,
        506,
        10,
    )  # no try fits: 4:3 at most, centred
    assert views.random_resized_box(10, 1000, 0.9, rng) == (0, 493, 10, 506)


def test_views_are_a_companion_cache_of_the_train_images_only(tmp_path):
    root = make_folder(
        tmp_path / "img", per_class=6, splits=("train", "val", "test"), size=(40, 30)
    )
    cfg = tiny(data=str(root), views=2, out=str(tmp_path / "c.h5"))
    said: list[str] = []
    result = stage.run(cfg, report=said.append)
    assert result.computed == 36 + 24  # 36 images, then 2 views of each of the 12 train images
    path = views_path(cfg.out)
    assert path.name == "c.views.h5"
    with h5py.File(path) as f:
        ids, split = list(f["ids"].asstr()[...]), f["split"][...]
        fingerprint = json.loads(f.attrs["fingerprint"])
    assert (
        len(ids) == 24
        and set(split) == {0}
        and ids[:2] == ["train/cat/train00.png#view1", "train/cat/train00.png#view2"]
    )
    assert fingerprint["preprocessing"].startswith(
        "2 views per train image: RandomResizedCrop(32, scale=(0.08, 1)"
    )
    assert stage.run(cfg).computed == 0  # both current
    write_image(root / "train" / "dog" / "train00.png", PALETTE[4], (41, 30))
    said.clear()
    assert (
        stage.run(cfg, report=said.append).computed == 1 + 2
    )  # the changed image and its two views
    assert sum("reused" in line for line in said) == 2, said


def test_head_views_weigh_each_image_one_over_its_views(tmp_path):
    root = make_folder(
        tmp_path / "img", per_class=8, splits=("train", "val", "test"), size=(40, 30)
    )
    cfg = tiny(data=str(root), views=3, out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    out = tmp_path / "r"
    args = [
        "head",
        "--features",
        str(cfg.out),
        "--views",
        "--C",
        "0.5",
        "--preprocess",
        "none",
        "--out",
        str(out),
    ]
    assert cli.main([*args, "--no-progress", "--bootstrap", "0"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert "3 augmented views each (every view weighs 1/4)" in result["protocol"]["trained_on"]
    # An independent fit: scikit-learn on train + views + val with weights 1/4, 1/4 and 1.
    fs, vs = read_features(cfg.out), read_features(views_path(cfg.out))
    X = np.concatenate([fs["train"].X, vs["train"].X, fs["val"].X])
    y = np.concatenate([fs["train"].y, vs["train"].y, fs["val"].y])
    w = np.r_[np.full(len(fs["train"].y) + len(vs["train"].y), 0.25), np.ones(len(fs["val"].y))]
    reference = LogisticRegression(C=0.5, max_iter=1000, tol=1e-4).fit(X, y, sample_weight=w)
    with np.load(out / "predictions.npz") as z:
        np.testing.assert_array_equal(z["y_pred"], reference.predict(fs["test"].X))


def test_views_of_held_out_images_stay_out_of_training(tmp_path):
    from pipeline.cache.reader import cache_info
    from pipeline.heads.fitting import MemorySource
    from pipeline.heads.protocol import HeadConfig

    root = make_folder(
        tmp_path / "img", per_class=10, size=(40, 30)
    )  # no val split: the head holds some out
    cfg = tiny(
        data=str(root), views=2, val_fraction=0.0, test_fraction=0.2, out=str(tmp_path / "c.h5")
    )
    stage.run(cfg)
    source = MemorySource(HeadConfig(features=str(cfg.out), views=True), cache_info(cfg.out))
    kept = {i.rsplit("#view", 1)[0] for i in source.views.ids}
    assert kept == set(source.train.ids) and len(source.views.ids) == 2 * len(source.train.ids)
    assert not kept & set(source.val.ids)  # no view of a held-out image trains
    rows = np.arange(3)
    _, y, w = source._train_rows(rows)
    assert len(y) == 3 * 3 and np.allclose(
        w, 1 / 3
    )  # --shots-like subsets take their images' views only


def test_view_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"--views -1 / --view-scale 0.08: expected 0 to 1000 views per image"
    ):
        FeaturesConfig(dataset="digits", views=-1)
    with pytest.raises(
        ConfigError, match=r"--views 100000 / --view-scale 0.08: expected 0 to 1000 views"
    ):
        FeaturesConfig(dataset="digits", views=100000)
    with pytest.raises(ConfigError, match=r"--views runs in one process, after the cache"):
        distributed.run(tiny(dataset="digits", views=2), print)
    root = make_folder(
        tmp_path / "img", per_class=6, splits=("train", "val", "test"), size=(40, 30)
    )
    stage.run(tiny(data=str(root), views=1, out=str(tmp_path / "a.h5")))
    stage.run(tiny(data=str(root), seed=3, out=str(tmp_path / "b.h5")))
    views_path(tmp_path / "a.h5").rename(
        views_path(tmp_path / "b.h5")
    )  # views of another model's features
    assert (
        cli.main(
            ["head", "--features", str(tmp_path / "b.h5"), "--views", "--out", str(tmp_path / "r")]
        )
        == 2
    )
    assert "views cache" in capsys.readouterr().err
    with pytest.raises(
        CacheError,
        match=r"views cache .*b\.views\.h5 was made for another state of cache .*b\.h5 "
        r"\(its images or settings changed since\); rerun `pipeline features`",
    ):
        from pipeline.heads import protocol

        protocol.run(
            protocol.HeadConfig(
                features=str(tmp_path / "b.h5"), views=True, out=str(tmp_path / "r")
            )
        )
    big = [
        "head",
        "--features",
        str(tmp_path / "a.h5"),
        "--views",
        "--head",
        "torch",
        "--max-memory",
        "1KB",
    ]
    assert cli.main([*big, "--out", str(tmp_path / "s")]) == 2
    assert "--views is not supported when the head streams the cache" in capsys.readouterr().err


def test_views_of_an_older_state_of_the_cache_are_refused(tmp_path):
    from pipeline.heads import protocol

    root = make_folder(
        tmp_path / "img", per_class=6, splits=("train", "val", "test"), size=(40, 30)
    )
    stage.run(tiny(data=str(root), views=1, out=str(tmp_path / "c.h5")))
    head = protocol.HeadConfig(
        features=str(tmp_path / "c.h5"), views=True, out=str(tmp_path / "r"), progress=False
    )
    protocol.run(head)  # fine while they match
    stage.run(
        tiny(data=str(root), image_size=48, out=str(tmp_path / "c.h5"))
    )  # rebuilt at 48 px, views left at 32
    with pytest.raises(CacheError, match=r"was made for another state of cache"):
        protocol.run(head)
    stage.run(tiny(data=str(root), views=1, out=str(tmp_path / "c.h5")))  # back in step
    write_image(root / "train" / "cat" / "train00.png", PALETTE[3], (41, 30))
    stage.run(
        tiny(data=str(root), out=str(tmp_path / "c.h5"))
    )  # one image changed, views not refreshed
    with pytest.raises(CacheError, match=r"was made for another state of cache"):
        protocol.run(head)


def test_ncm_weighs_each_image_one_with_its_views():
    from pipeline.heads.kinds.ncm import class_means

    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 0, 0, 0])
    w = np.array([1.0, 1 / 3, 1 / 3, 1 / 3])  # one val image, one train image with its 2 views
    coef, _ = class_means(X, y, 3, 1.0, w)
    np.testing.assert_allclose(
        coef[:, 0], np.array([1.0, 1.0]) / np.sqrt(2), rtol=1e-6
    )  # the two images alike
