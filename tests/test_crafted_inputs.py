"""Files crafted by someone else, third round (found by an outside hostile check): a head folder,
a cache, a result or an --out path that lies is one line where it is read, a user's file that looks
like one of ours is still the user's, and a report is written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import pipeline
from pipeline.errors import CacheError

from helpers import make_folder
from helpers.faults import assert_one_line_error, main_here

NCM = ["--head", "ncm", "--bootstrap", "0", "--no-progress"]


@pytest.fixture(scope="module")
def cache(faults_cache: Path) -> Path:
    return faults_cache


@pytest.fixture(scope="module")
def head(cache: Path, tmp_path_factory) -> Path:
    """A trained ncm head (the quickest kind), copied by each test that edits it."""
    out = tmp_path_factory.mktemp("head") / "ncm"
    code, err = main_here(["head", str(cache), "--out", str(out), *NCM])
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("new"), per_class=1)


def _error(argv: list[str], pattern: str) -> None:
    code, err = main_here(argv)
    assert code == 2, err
    assert_one_line_error(err, pattern)


def _copy(head: Path, to: Path, change_json=None, change_arrays=None) -> Path:
    shutil.copytree(head, to)
    if change_json:
        meta = json.loads((to / "head.json").read_text())
        change_json(meta)
        (to / "head.json").write_text(json.dumps(meta))
    if change_arrays:
        with np.load(to / "head.npz") as archive:
            arrays = dict(archive)
        change_arrays(to / "head.npz", arrays)
    return to


def test_a_head_folder_with_values_of_other_types_or_extra_arrays_is_one_line(head, tmp_path):
    def extra(path, arrays):
        np.savez(path, **arrays, zzz=np.zeros(3))

    def bomb(path, arrays):  # compressed zeros: 800 MB from under a megabyte
        np.savez(path, **arrays)
        with (
            zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED) as archive,
            archive.open("zzz.npy", "w", force_zip64=True) as fh,
        ):
            np.lib.format.write_array(fh, np.zeros(100_000_000))

    def scale(path, arrays):
        np.savez(path, **(arrays | {"scale": np.zeros_like(arrays["scale"])}))

    cases = {
        "head": (dict(change_json=lambda m: m.update(head=[])), r"head in head\.json is a list"),
        "run": (dict(change_json=lambda m: m.update(run_id=[1])), r"run_id in head\.json is a"),
        "classes": (
            dict(change_json=lambda m: m.update(classes=["a"] * len(m["classes"]))),
            r"at least two distinct names",
        ),
        "schema": (dict(change_json=lambda m: m.update(schema=True)), r"has schema True"),
        "extra": (dict(change_arrays=extra), r"it holds an array 'zzz'; expected only"),
        "bomb": (dict(change_arrays=bomb), r"its entries unpack to 0\.8 GB from"),
    }
    if "scale" in np.load(head / "head.npz").files:
        cases["scale"] = (dict(change_arrays=scale), r"scale in head\.npz holds a value that is")
    for name, (change, pattern) in cases.items():
        folder = _copy(head, tmp_path / name, **change)
        with pytest.raises(CacheError, match=rf"head .*{name} (is malformed: .*)?{pattern}"):
            pipeline.load_head(folder)
    result = json.loads((head / "result.json").read_text())
    folder = _copy(head, tmp_path / "result")
    (folder / "result.json").write_text(json.dumps(result | {"run_id": {"a": 1}}))
    with pytest.raises(CacheError, match=r"run_id in result\.json is a dict"):
        pipeline.load_head(folder)


def test_a_head_json_whose_features_settings_no_run_writes_is_the_heads_fault(
    head, images, tmp_path
):
    cases = {
        "backbone": (lambda m: m["cache_fingerprint"].pop("backbone"), r"lacks 'backbone'"),
        "weights": (lambda m: m["features_config"].pop("weights"), r"lacks 'weights'"),
        "batch": (
            lambda m: m["features_config"].update(batch_size="x"),
            r"features_config holds a setting no run writes",
        ),
        "workers": (
            lambda m: m["features_config"].update(workers=100_000),
            r"features_config holds a setting no run writes \(--workers 100000 is out of range",
        ),
        "auto": (
            lambda m: m["features_config"].update(precision="auto"),
            r"features_config precision 'auto' is not the one its cache was computed in",
        ),
        "bf16": (
            lambda m: m["features_config"].update(precision="bf16"),
            r"features_config precision 'bf16' is not the one its cache was computed in \('fp32'\)",
        ),
    }
    for name, (change, pattern) in cases.items():
        folder = _copy(head, tmp_path / name, change_json=change)
        out = str(tmp_path / f"{name}.csv")
        _error(
            ["predict", "--head", str(folder), "--data", str(images), "--out", out],
            rf"head .*{name} is malformed: .*{pattern}.*; retrain it with `pipeline head`",
        )


def test_pipes_at_out_are_refused_before_any_work(head, images, tmp_path):
    for name in ("p.csv", "r.md", "x.pt2"):
        os.mkfifo(tmp_path / name)
    pattern = r"--out .*\.\w+ is not a regular file \(a pipe or a device\)"
    _error(
        ["predict", "--head", str(head), "--data", str(images), "--out", str(tmp_path / "p.csv")],
        pattern,
    )
    _error(["compare", str(head), "--out", str(tmp_path / "r.md")], pattern)
    _error(["export", "--head", str(head), "--out", str(tmp_path / "x.pt2")], pattern)


def test_a_users_folder_with_a_file_named_result_json_is_not_taken_for_a_head_run(
    cache, tmp_path, monkeypatch
):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "result.json").write_text('{"accuracy": 0.93}')
    (mine / "fewshot.csv").write_text("shots,top1\n")
    _error(
        ["head", str(cache), "--out", str(mine), *NCM],
        r"--out .*mine holds files that `pipeline head` did not write",
    )
    assert (mine / "result.json").read_text() == '{"accuracy": 0.93}'
    assert (mine / "fewshot.csv").exists()
    monkeypatch.chdir(mine)
    _error(["head", str(cache), "--out", ".", *NCM], r"--out \. is \(or holds\) the current folder")


def test_compare_skips_results_whose_fields_have_other_shapes_and_writes_all_or_nothing(
    head, tmp_path
):
    result = json.loads((head / "result.json").read_text())
    changes = [
        ("chosen", lambda r: r["chosen"].update({r["chosen"].get("param", "C"): "x"})),
        ("chosen", lambda r: r["chosen"].update({r["chosen"].get("param", "C"): ["x"]})),
        ("cache.extract_seconds", lambda r: r["cache"].update(extract_seconds="x")),
        ("protocol", lambda r: r.update(protocol="x")),
        ("protocol.train_counts", lambda r: r["protocol"].update(train_counts=[1])),
        ("classes", lambda r: r.pop("classes")),
    ]
    folders = []
    for i, (field, change) in enumerate(changes):
        damaged = json.loads(json.dumps(result))
        change(damaged)
        folder = tmp_path / f"{i}-{field}"
        shutil.copytree(head, folder)
        (folder / "result.json").write_text(json.dumps(damaged))
        folders.append(folder)
        _error(
            ["compare", str(folder), "--out", str(tmp_path / "r.md")],
            rf"no readable result .*lacks '{field}' or has it in another shape",
        )
    assert not list(tmp_path.glob("r*")), "nothing written when nothing was readable"
    labelled = tmp_path / "label"
    shutil.copytree(head, labelled)
    (labelled / "result.json").write_text(
        json.dumps(result | {"cell": {"dataset": "a|b\nc", "backbone": "x", "head": "ncm"}})
    )
    code, err = main_here(
        ["compare", str(labelled), *map(str, folders), "--out", str(tmp_path / "r.md")]
    )
    assert code == 0, err
    assert err.count("skipped:") == len(changes), err
    assert "| a\\|b c | x | ncm |" in (tmp_path / "r.md").read_text()


def _flipped(cache: Path, to: Path, dataset: str, at: int) -> Path:
    """`cache` with byte `at` of `dataset`'s object header inverted."""
    shutil.copy(cache, to)
    with h5py.File(to, "r") as f:
        address = h5py.h5o.get_info(f[dataset].id).addr + at
    with open(to, "r+b") as fh:
        fh.seek(address)
        byte = fh.read(1)[0]
        fh.seek(address)
        fh.write(bytes([byte ^ 0xFF]))
    return to


def test_a_cache_whose_hdf5_structure_is_damaged_is_one_line_wherever_it_is_read(cache, tmp_path):
    """Inverting bytes of the features' object header, one at a time, until h5py itself fails (a
    missing dataset or a wrong shape is the schema check's, tested elsewhere)."""
    pattern = r"cache .*d\.h5 is malformed: its HDF5 structure does not read back \("
    for at in range(0, 400):
        damaged = _flipped(cache, tmp_path / "d.h5", "features", at)
        try:
            pipeline.read_features(damaged)
        except CacheError as exc:
            if "does not read back" in str(exc):
                break
    else:
        pytest.fail("no byte of the object header made h5py fail")
    with pytest.raises(CacheError, match=pattern):
        pipeline.read_features(damaged)
    _error(["head", str(damaged), "--out", str(tmp_path / "h"), *NCM], pattern)
    code, err = main_here(["info", str(damaged)])  # reads no features: may well succeed
    assert "Traceback" not in err and code in (0, 2), err


def test_read_features_checks_the_rows_as_the_head_stage_does(cache, tmp_path):
    edited = tmp_path / "e.h5"
    shutil.copy(cache, edited)
    with h5py.File(edited, "r+") as f:
        f["features"][0] = f["features"][0] + 1
    with pytest.raises(CacheError, match=r"e\.h5: row 0 \(.*\) no longer reads back"):
        pipeline.read_features(edited)
    assert pipeline.read_features(edited, verify=False).splits  # asked not to: read as stored


def test_a_study_cannot_write_outside_its_results_or_over_a_users_report(tmp_path):
    from pipeline import study

    data = make_folder(tmp_path / "data", per_class=4)
    base = f"""
results = "{tmp_path / "results"}"
cache = "{tmp_path / "cache"}"
[[datasets]]
data = "{data}"
[[backbones]]
backbone = "resnet18"
weights = "none"
image_size = 32
[[heads]]
head = "ncm"
"""
    (tmp_path / "up.toml").write_text('[study]\nname = ".."' + base)
    assert study.plan(tmp_path / "up.toml").results == tmp_path / "results" / "x"
    (tmp_path / "s.toml").write_text('[study]\nname = "s"' + base)
    report = tmp_path / "results" / "s" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# my notes\n")
    _error(
        ["study", str(tmp_path / "s.toml"), "--no-progress"],
        r"report\.md exists and was not written by this command; move it away, or give the "
        r"study another name",
    )
    assert report.read_text() == "# my notes\n"
    assert not (tmp_path / "cache").exists(), "refused before any work"
