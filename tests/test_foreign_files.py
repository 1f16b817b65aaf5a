"""What a stranger's files and flags meet, second round (found by an outside hostile check): a file
of someone else's at a name the program uses is never replaced or deleted, a cache or shard that
lies is refused where it is read, and every extreme value is one line, never a traceback or a hang.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache import virtual
from pipeline.cache.schema import part_name

from helpers import make_folder, write_cache
from helpers.faults import HEAD, assert_one_line_error, main_here


@pytest.fixture(scope="module")
def cache(faults_cache: Path) -> Path:
    """A small cache of three classes, shared by this module's tests (see conftest)."""
    return faults_cache


def _error(argv: list[str], pattern: str) -> None:
    code, err = main_here(argv)
    assert code == 2, err
    assert_one_line_error(err, pattern)


def test_files_at_the_programs_own_names_are_left_alone(cache, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    out = tmp_path / "F.h5"
    Path(f"{out}.lock").symlink_to(precious)
    _error(
        ["pack", str(cache), "--out", str(out)],
        r"lock file .*F\.h5\.lock is a symbolic link, not this program's",
    )
    assert precious.read_text() == "mine" and Path(f"{out}.lock").is_symlink()
    Path(f"{out}.lock").unlink()
    Path(f"{out}.lock").write_text("my notes")
    _error(
        ["pack", str(cache), "--out", str(out)],
        r"F\.h5\.lock exists and is not a lock file of this program",
    )
    Path(f"{out}.lock").unlink()
    Path(f"{out}.partial").write_text("my draft")
    _error(
        ["pack", str(cache), "--out", str(out)],
        r"F\.h5\.partial exists and is not a partial cache of this program",
    )
    assert Path(f"{out}.partial").read_text() == "my draft"
    mine = tmp_path / ".hd.staging-mine"
    mine.mkdir()
    assert (
        main_here(["head", "--features", str(cache), "--out", str(tmp_path / "hd"), *HEAD])[0] == 0
    )
    assert mine.is_dir(), "a folder of the user's that looks like a staging folder is not removed"
    report = tmp_path / "cmp"
    report.mkdir()
    (report / "summary.csv").write_text("mine")
    _error(
        ["compare", str(tmp_path / "hd"), "--out", str(report / "summary.md")],
        r"summary\.csv exists and was not written with this report",
    )
    assert (report / "summary.csv").read_text() == "mine"


def test_a_cache_whose_labels_or_ids_changed_is_refused_where_read(cache, tmp_path):
    for name, change in (
        ("labels", lambda f: f["labels"].__setitem__(0, (f["labels"][0] + 1) % 3)),
        ("ok", lambda f: f["ok"].__setitem__(1, False)),
    ):
        edited = tmp_path / f"{name}.h5"
        shutil.copy(cache, edited)
        with h5py.File(edited, "r+") as f:
            change(f)
        pattern = (
            rf"{name}\.h5: its labels, splits, ids or class names no longer read back "
            "as they were written"
        )
        _error(
            ["head", "--features", str(edited), "--out", str(tmp_path / f"h-{name}"), *HEAD],
            pattern,
        )
        _error(["pack", str(edited), "--out", str(tmp_path / f"p-{name}.h5")], pattern)


def test_a_virtual_cache_reading_one_part_twice_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 5)).astype(np.float32), np.tile([0, 1, 2], 4)
    split = np.repeat(np.array([0, 1, 2], np.int8), 4)
    parts = [
        write_cache(
            part_name(tmp_path / "v.h5", {"t": 1}, r, 2),
            X[r * 6 : (r + 1) * 6],
            y[r * 6 : (r + 1) * 6],
            split[r * 6 : (r + 1) * 6],
            classes=["c0", "c1", "c2"],
            fingerprint={"t": 1, "shard": f"rank {r}"},
        )
        for r in range(2)
    ]
    out = virtual.assemble(tmp_path / "v.h5", parts, {"t": 1}, {})
    shutil.copy(parts[0], parts[1])
    _error(
        ["pack", str(out), "--out", str(tmp_path / "one.h5")],
        r"v\.h5 reads the same shard \(rank 0\) from",
    )


def test_shards_joined_with_cat_are_one_line(tmp_path):
    pytest.importorskip("webdataset")
    from pipeline.data.sources import load_samples

    image = (make_folder(tmp_path / "img", per_class=1) / "cat" / "img00.png").read_bytes()
    archives = []
    for n in range(2):
        path = tmp_path / f"part{n}.tar"
        with tarfile.open(path, "w") as tar:
            for key, label in ((f"a{n}", b"0"), (f"b{n}", b"1")):
                for name, data in ((f"{key}.png", image), (f"{key}.cls", label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, __import__("io").BytesIO(data))
        archives.append(path.read_bytes())
    (tmp_path / "joined.tar").write_bytes(b"".join(archives))
    with pytest.raises(
        Exception, match=r"joined\.tar holds data after its end-of-archive block \(tar files joined"
    ):
        load_samples(data=str(tmp_path / "joined.tar"))


def test_shard_patterns_that_expand_wrongly_are_one_line(tmp_path):
    for pattern, named in (
        ("s-{0..999999999..1}.tar", "1,000,000,000"),
        ("{a..z}{a..z}{a..z}{a..z}.tar", "456,976"),
    ):
        _error(
            ["features", "--data", str(tmp_path / pattern)],
            rf"names {named} shards, more than 100,000",
        )
    pytest.importorskip("webdataset")
    _error(["features", "--data", str(tmp_path / "x${NOPE}-{0..1}.tar")], r"cannot be expanded \(")


def test_a_study_whose_names_run_into_each_other_is_refused(tmp_path):
    from pipeline import study
    from pipeline.errors import ConfigError

    data = make_folder(tmp_path / "data", per_class=4)
    text = f"""
[study]
name = "s1"
results = "{tmp_path / "results"}"
cache = "{tmp_path / "cache"}"
[[datasets]]
name = "a__b"
data = "{data}"
[[datasets]]
name = "a"
data = "{data}"
[[backbones]]
name = "c"
backbone = "resnet18"
weights = "none"
[[backbones]]
name = "b__c"
backbone = "resnet18"
weights = "none"
seed = 1
[[heads]]
head = "logreg"
"""
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(
        ConfigError,
        match=r"a__b / c / logreg and a / b__c / logreg would both write .*a__b__c__logreg",
    ):
        study.plan(tmp_path / "s.toml")


def test_extreme_values_are_one_line(cache, tmp_path):
    fifo = tmp_path / "pipe.h5"
    os.mkfifo(fifo)
    for argv in (
        ["info", str(fifo)],
        ["head", "--features", str(fifo), "--out", str(tmp_path / "h")],
    ):
        _error(argv, r"pipe\.h5 is not a regular file")
    _error(["pack", str(fifo), "--out", str(tmp_path / "x.h5")], r"pipe\.h5 is not a regular file")
    for flags, pattern in (
        (["--workers", "1000000"], r"--workers 1000000 is out of range; expected \[0, 256\]"),
        (
            ["--image-size", "100000"],
            r"--image-size 100000 is out of range; expected \[16, 4,096\]",
        ),
        (
            ["--batch-size", "99999999999999999999"],
            r"--batch-size 99999999999999999999 is out of range",
        ),
    ):
        _error(["features", "--dataset", "digits", *flags], pattern)
    for flags, pattern in (
        (
            ["--bootstrap", "99999999999999999999"],
            r"--bootstrap 99999999999999999999 is out of range",
        ),
        (["--C", "1e308"], r"C value 1e\+308 is out of range; pass C in \[1e-12, 1e\+12\]"),
        (["--C", "1e-320"], r"C value 9\.99989e-321 is out of range"),
        (["--lr", "1e30", "--solver", "adam"], r"--lr 1e\+30 is out of range; expected \(0, 100\]"),
    ):
        _error(["head", "--features", str(cache), "--out", str(tmp_path / "h"), *flags], pattern)
    for alpha in ("2", "inf", "nan"):
        _error(
            ["compare", str(tmp_path), "--alpha", alpha],
            r"--alpha \S+ is out of range; pass a significance",
        )


def test_crafted_head_and_result_files_are_one_line(cache, tmp_path):
    out = tmp_path / "h"
    assert main_here(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
    images = make_folder(tmp_path / "new", per_class=1)
    meta = json.loads((out / "head.json").read_text())
    for key, value in (("cache_fingerprint", [1]), ("features_config", "x")):
        (out / "head.json").write_text(json.dumps(meta | {key: value}))
        _error(
            [
                "predict",
                "--head",
                str(out),
                "--data",
                str(images),
                "--out",
                str(tmp_path / "p.csv"),
            ],
            rf"{key} in head\.json is a (list|str), expected an object",
        )
    (out / "head.json").write_text("[" * 100_000 + "]" * 100_000)
    _error(
        ["export", "--head", str(out), "--out", str(tmp_path / "x.pt2")], r"head\.json is not JSON"
    )
    (out / "head.json").write_text(json.dumps(meta))
    with np.load(out / "head.npz") as archive:
        arrays = dict(archive)
    np.savez(out / "head.npz", **(arrays | {"coef": np.full_like(arrays["coef"], 3e38)}))
    code, err = main_here(
        ["predict", "--head", str(out), "--data", str(images), "--out", str(tmp_path / "p.csv")]
    )
    assert code == 0 and "0 images classified" in err, err
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    assert all("the head gave no finite probability for this image" in row for row in rows)
    np.savez(out / "head.npz", **arrays)
    result = json.loads((out / "result.json").read_text())
    changes = (
        lambda r: r["test"].update(ci={"top1": "x"}),
        lambda r: r["test"].update(groups={"few": "x"}),
        lambda r: r.update(cell={"dataset": 3}),
        lambda r: r["config"].update(imbalance_ratio="x"),
    )
    for change in changes:
        damaged = json.loads(json.dumps(result))
        change(damaged)
        (out / "result.json").write_text(json.dumps(damaged))
        _error(
            ["compare", str(out), "--out", str(tmp_path / "r.md"), "--force"],
            r"no readable result .*: .* lacks",
        )
    (out / "result.json").write_text(json.dumps(result))
    other = tmp_path / "h2"
    shutil.copytree(out, other)
    (other / "predictions.npz").write_bytes(b"PK\x03\x04junk")
    _error(
        ["compare", "--pair", str(out), str(other)],
        r"predictions\.npz is unreadable \(it is not a readable \.npz",
    )
