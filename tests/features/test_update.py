"""Incremental caches: the same model on a changed image set reuses the rows of unchanged images,
extracts only new or changed ones, drops removed ones, and ends equal to a build from scratch;
carved splits stay put as images are added."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import reader
from pipeline.data.samples import finalize
from pipeline.data.sources import load_samples
from pipeline.features import stage, update
from pipeline.splits import hashed_holdout

from helpers import PALETTE, REPO, SLOW_WRITES, make_folder, tiny, write_image
from helpers.faults import rows_done, wait_rows


def _rows(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {k: f[k][...] for k in ("ids", "labels", "split", "ok", "features")} | {
            f"layers/{k}": f["layers"][k][...] for k in f.get("layers", {})
        }


def _grow(root, added: int = 10, modified: int = 2) -> None:
    """`added` new images per the first class, and `modified` existing ones rewritten (new bytes,
    new mtime)."""
    for n in range(added):
        write_image(root / "cat" / f"new{n:02d}.png", PALETTE[2], (30, 20))
    for path in sorted((root / "dog").glob("*.png"))[:modified]:
        write_image(path, PALETTE[3], (26, 24))
        os.utime(path, ns=(1, 1_000_000_000 + len(path.name)))


def test_a_grown_image_set_extracts_only_new_and_changed_images(tmp_path):
    root = make_folder(tmp_path / "img", per_class=50)  # 100 images
    cfg = tiny(data=str(root), layers="layer3", cut="layer4", out=str(tmp_path / "c.h5"))
    assert stage.run(cfg).computed == 100
    before = _rows(cfg.out)
    _grow(root, added=10, modified=2)
    said: list[str] = []
    result = stage.run(cfg, report=said.append)
    assert result.status == "updated" and result.computed == 12 and result.rows == 110
    assert any(
        "reused 98 rows, extracted 12 (10 new, 2 changed), dropped 0" in line for line in said
    ), said
    assert any("holds another image set" in line for line in said) and not any(
        "rebuilding" in m for m in said
    )
    assert not any("new-rows" in line for line in said), said  # a step, not a result to name
    scratch = stage.run(
        tiny(data=str(root), layers="layer3", cut="layer4", out=str(tmp_path / "scratch.h5"))
    )
    after, fresh = _rows(cfg.out), _rows(scratch.path)
    for key in ("ids", "labels", "split", "ok"):
        np.testing.assert_array_equal(after[key], fresh[key], err_msg=key)
    for key in ("features", "layers/layer3"):
        np.testing.assert_allclose(after[key], fresh[key], rtol=0, atol=1e-5, err_msg=key)
    # The cut (float16) keeps its rows as any layer does, to float16 rounding of the same values.
    assert after["layers/cut:layer4"].dtype == np.float16
    np.testing.assert_allclose(
        after["layers/cut:layer4"], fresh["layers/cut:layer4"], rtol=1e-3, atol=1e-3
    )
    kept = {i: s for i, s in zip(before["ids"], before["split"], strict=True)}
    moved = [
        i for i, s in zip(after["ids"], after["split"], strict=True) if i in kept and kept[i] != s
    ]
    assert moved == []  # adding images moved no existing image between train, val and test
    assert not update.delta_path(cfg.out_path).exists() and stage.run(cfg).status == "current"
    with reader.open_cache(cfg.out) as f:
        assert f.attrs["extract_rows"] == 12


def test_removed_images_are_dropped_and_a_changed_label_keeps_its_row(tmp_path):
    root = make_folder(tmp_path / "img", per_class=6)
    cfg = tiny(data=str(root), out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    (root / "cat" / "img00.png").unlink()
    (root / "dog" / "img01.png").rename(tmp_path / "moved.png")
    said: list[str] = []
    result = stage.run(cfg, report=said.append)
    assert result.computed == 0 and result.rows == 10
    assert any(
        "reused 10 rows, extracted 0 (0 new, 0 changed), dropped 2" in line for line in said
    ), said


def test_another_model_or_force_builds_from_scratch(tmp_path):
    root = make_folder(tmp_path / "img", per_class=5)
    cfg = tiny(data=str(root), out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    write_image(root / "cat" / "extra.png", PALETTE[0])
    assert (
        stage.run(tiny(data=str(root), seed=1, out=cfg.out)).status == "built"
    )  # other weights: every row
    write_image(root / "cat" / "extra2.png", PALETTE[0])
    assert stage.run(tiny(data=str(root), seed=1, out=cfg.out, force=True)).computed == 12


def test_images_without_file_facts_are_never_matched():
    samples = finalize(
        ["a", "b"], [0, 1], [0, 1], ["train", "train"], ["x", "y"], "memory", 0.0, 0.0, 0
    )
    old = {"ids": np.array(["a", "b"]), "ok": np.array([True, True])}
    assert (update.matching_rows(old, samples) == -1).all()


def test_an_update_killed_midway_resumes_and_ends_equal_to_a_build(tmp_path):
    root = make_folder(tmp_path / "img", per_class=12)
    cfg = tiny(data=str(root), out=str(tmp_path / "c.h5"), batch_size=2)
    stage.run(cfg)
    _grow(root, added=8, modified=0)
    args = [
        "features",
        "--data",
        str(root),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "32",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--val-fraction",
        "0.25",
        "--no-progress",
        "--out",
        str(cfg.out),
    ]
    job = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SLOW_WRITES + "from pipeline import cli; cli.main(sys.argv[1:])",
            *args,
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    delta = update.delta_path(cfg.out_path)
    wait_rows(
        job, Path(f"{delta}.partial"), 1
    )  # killed once the update writes its new rows, however late
    job.kill()
    job.wait()
    assert (
        reader.stored_fingerprint(cfg.out) is not None
    )  # the old cache is whole while the update runs
    assert rows_done(f"{delta}.partial") > 0  # killed while extracting the new images
    said: list[str] = []
    result = stage.run(cfg, report=said.append)
    assert (
        result.status == "updated"
        and result.rows == 32
        and any("resuming" in line for line in said)
    ), said
    scratch = stage.run(tiny(data=str(root), out=str(tmp_path / "scratch.h5"), batch_size=2))
    np.testing.assert_allclose(
        _rows(cfg.out)["features"], _rows(scratch.path)["features"], rtol=0, atol=1e-5
    )


def test_hash_carving_is_stable_as_images_are_added_and_keeps_every_class():
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(200)]
    labels = rng.integers(0, 5, 200)
    first = hashed_holdout(ids, labels, 0.2, seed=0)
    grown = hashed_holdout(
        [*ids, *(f"new{i}" for i in range(100))], np.r_[labels, rng.integers(0, 5, 100)], 0.2, 0
    )
    np.testing.assert_array_equal(grown[:200], first)
    assert (
        0.1 < first.mean() < 0.3
        and hashed_holdout(ids, labels, 0.2, seed=1).tolist() != first.tolist()
    )
    tiny_class = hashed_holdout(["a", "b", "c"], np.array([0, 0, 1]), 0.01, seed=0)
    assert (
        tiny_class.tolist().count(True) == 1 and not tiny_class[2]
    )  # class 0 gets one; a 1-image class none


@pytest.mark.parametrize("carve,stable", [("hash", True), ("stratified", False)])
def test_folders_carve_by_hash_and_named_datasets_stay_stratified(tmp_path, carve, stable):
    root = make_folder(tmp_path / "img", per_class=30)
    before = load_samples(data=str(root), carve=carve)
    make_folder(tmp_path / "img", per_class=30, ext=".jpg")  # 60 more images
    after = load_samples(data=str(root), carve=carve)
    split_of = dict(zip(after.ids, after.split, strict=True))
    moved = sum(split_of[i] != s for i, s in zip(before.ids, before.split, strict=True))
    assert (moved == 0) == stable
    assert load_samples(data=str(root)).carved["val"]["rule"].startswith("hash of each id")
    assert "rule" not in load_samples(dataset="digits", root=str(tmp_path / "d")).carved["val"]


def test_an_update_never_reuses_a_row_that_fails_its_checksum(tmp_path):
    root = make_folder(tmp_path / "img", per_class=6)
    cfg = tiny(data=str(root), layers="layer2", out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    with h5py.File(cfg.out, "r+") as f:  # bit rot after the cache was certified
        f["layers"]["layer2"][0, 0] = 123.0
        f["features"][1, 0] = 456.0
    write_image(root / "cat" / "extra.png", PALETTE[2], (30, 20))
    said: list[str] = []
    result = stage.run(cfg, report=said.append)
    assert result.computed == 3 and any(
        "2 rows of" in line and "fail their checksum" in line for line in said
    ), said
    scratch = stage.run(tiny(data=str(root), layers="layer2", out=str(tmp_path / "scratch.h5")))
    for key in ("features", "layers/layer2"):
        np.testing.assert_allclose(
            _rows(cfg.out)[key], _rows(scratch.path)[key], rtol=0, atol=1e-5, err_msg=key
        )


def _virtualize(path) -> list:
    """Turn the complete cache at `path` into a virtual cache over two parts, as torchrun leaves
    it."""
    from pipeline.cache import schema, virtual
    from pipeline.cache.writer import CacheWriter

    with reader.open_cache(path) as f:
        fp, n = schema.json_attr(f, "fingerprint"), f["features"].shape[0]
        rows = {k: f[k][...] for k in ("labels", "split", "features")} | {
            "ids": schema.read_ids(f["ids"])
        }
        classes, source = list(f["classes"].asstr()[...]), str(f.attrs["source"])
        identity = {k: f[k][...] for k in ("file_size", "file_mtime_ns") if k in f}
        layers = {k: f["layers"][k][...] for k in f.get("layers", {})}
    parts = []
    for rank, (a, b) in enumerate([(0, n // 2), (n // 2, n)]):
        part = schema.part_name(path, fp, rank, 2)
        writer = CacheWriter.open(
            part,
            fingerprint={**fp, "shard": f"rows {a}:{b}"},
            ids=list(rows["ids"][a:b]),
            labels=rows["labels"][a:b],
            split=rows["split"][a:b],
            classes=classes,
            dim=rows["features"].shape[1],
            store_dtype="float32",
            identity={k: v[a:b] for k, v in identity.items()},
            layer_dims={k: v.shape[1] for k, v in layers.items()},
        )
        writer.write(0, rows["features"][a:b], None, None, {k: v[a:b] for k, v in layers.items()})
        parts.append(writer.finish())
    virtual.assemble(path, parts, fp, {"source": source})
    return parts


def test_an_update_of_a_virtual_cache_retires_its_old_parts(tmp_path):
    root = make_folder(tmp_path / "img", per_class=6)
    cfg = tiny(data=str(root), out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    parts = _virtualize(cfg.out_path)
    assert stage.run(cfg).status == "current"
    _grow(root, added=2, modified=0)
    assert stage.run(cfg).status == "updated"
    assert not any(p.exists() for p in parts), "the parts of the replaced virtual cache are gone"
    with h5py.File(cfg.out_path) as f:
        assert not f["features"].is_virtual and f["features"].shape[0] == 14
