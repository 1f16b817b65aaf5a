"""Virtual caches over part files (what torchrun assembles) and `pipeline pack`, without
torchrun."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pipeline import cli, read_features
from pipeline.cache import virtual
from pipeline.cache.schema import part_name
from pipeline.errors import CacheError

from helpers import write_cache

FINGERPRINT = {"t": 1}


def _parts(tmp_path, n: int = 2, name: str = "v.h5"):
    """A whole cache of 12 rows, and its `n` parts named and fingerprinted as torchrun writes
    them."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5)).astype(np.float32)
    y = np.tile([0, 1, 2], 4)
    split = np.repeat(np.array([0, 1, 2], np.int8), 4)
    whole = write_cache(tmp_path / "whole.h5", X, y, split, fingerprint=FINGERPRINT)
    step = 12 // n
    parts = [
        write_cache(
            part_name(tmp_path / name, FINGERPRINT, r, n),
            X[r * step : (r + 1) * step],
            y[r * step : (r + 1) * step],
            split[r * step : (r + 1) * step],
            classes=["c0", "c1", "c2"],
            fingerprint={**FINGERPRINT, "shard": f"rank {r}"},
        )
        for r in range(n)
    ]
    return whole, parts


def test_a_virtual_cache_reads_like_the_whole_one_and_packs_into_it(tmp_path):
    whole, parts = _parts(tmp_path)
    out = virtual.assemble(tmp_path / "v.h5", parts, FINGERPRINT, {"source": "test"})
    with h5py.File(out) as f:
        assert f["features"].is_virtual and f["ids"].is_virtual and f.attrs["complete"]
    a, b = read_features(out), read_features(whole)
    for split in b.splits:
        np.testing.assert_array_equal(a[split].X, b[split].X)
        np.testing.assert_array_equal(a[split].y, b[split].y)
    assert out.stat().st_size < 40_000  # metadata only
    assert cli.main(["pack", str(out), "--out", str(tmp_path / "one.h5")]) == 0
    with h5py.File(tmp_path / "one.h5") as f, h5py.File(whole) as g:
        assert not f["features"].is_virtual
        for name in ("features", "labels", "split", "ok", "row_crc"):
            np.testing.assert_array_equal(f[name][...], g[name][...], err_msg=name)


def test_a_missing_part_is_refused_and_a_replacement_retires_the_parts(tmp_path):
    _, parts = _parts(tmp_path)
    out = virtual.assemble(tmp_path / "v.h5", parts, FINGERPRINT, {})
    parts[0].rename(tmp_path / "away")
    with pytest.raises(
        CacheError,
        match=r"v\.h5 reads its rows from .*v\.h5\.part-\w+-000-of-002, which is missing or was "
        r"moved",
    ):
        read_features(out)
    (tmp_path / "away").rename(parts[0])
    assert (
        cli.main(["pack", str(out), "--out", str(out)]) == 0
    )  # packed in place: one file, parts no longer needed
    assert not parts[0].exists() and not parts[1].exists()
    assert read_features(out)["train"].X.shape == (4, 5)


def _craft_virtual(path, sources, fingerprint=FINGERPRINT):
    """A virtual cache made by someone else: its datasets read `sources` (any paths, absolute
    too)."""
    with h5py.File(sources[0]) as g:
        names = [k for k in g if k != "classes" and g[k].shape[:1] == g["features"].shape[:1]]
        shapes = {k: (g[k].shape, g[k].dtype) for k in names}
        classes = g["classes"].asstr()[...]
    n = sum(h5py.File(s)["features"].shape[0] for s in sources)
    with h5py.File(path, "w") as f:
        for name in names:
            shape, dtype = shapes[name]
            layout, start = h5py.VirtualLayout(shape=(n, *shape[1:]), dtype=dtype), 0
            for source in sources:
                rows = h5py.File(source)[name].shape[0]
                layout[start : start + rows] = h5py.VirtualSource(
                    str(source), name, shape=(rows, *shape[1:])
                )
                start += rows
            f.create_virtual_dataset(name, layout)
        f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=h5py.string_dtype())
        f.attrs.update(
            {
                "schema_version": 1,
                "fingerprint": json.dumps(fingerprint),
                "complete": True,
                "rows_done": n,
            }
        )
    return path


def test_a_crafted_virtual_cache_cannot_delete_what_it_names(tmp_path):
    """Replacing a virtual cache deletes only the parts written for it, never a file a crafted cache
    points at: not by absolute path, not beside it under another name, not another cache's part."""
    (tmp_path / "elsewhere").mkdir()
    _, victims = _parts(
        tmp_path / "elsewhere"
    )  # real parts of another folder's cache, same fingerprint
    plain = tmp_path / "notes.h5.part-00000000-000-of-001"  # a look-alike name, another fingerprint
    write_cache(
        plain,
        np.ones((3, 5), np.float32),
        np.array([0, 1, 2]),
        np.array([0, 1, 2], np.int8),
        fingerprint={"mine": True},
    )
    evil = _craft_virtual(tmp_path / "evil.h5", [p.resolve() for p in victims])
    before = {p: p.read_bytes() for p in victims}
    assert cli.main(["pack", str(evil), "--out", str(evil)]) == 0  # reads fine: the rows are real
    assert all(p.read_bytes() == before[p] for p in victims), (
        "a file outside the cache's own parts was deleted"
    )
    evil = _craft_virtual(tmp_path / "evil2.h5", [plain], fingerprint={"mine": True})
    assert (
        cli.main(["pack", str(tmp_path / "elsewhere" / "whole.h5"), "--out", str(evil), "--force"])
        == 0
    )
    assert plain.exists()


def test_a_part_shared_with_another_cache_is_kept_and_a_swapped_part_is_refused(tmp_path):
    _, parts = _parts(tmp_path)
    out = virtual.assemble(tmp_path / "v.h5", parts, FINGERPRINT, {})
    twin = _craft_virtual(
        tmp_path / "twin.h5", [parts[0]]
    )  # another cache in the folder reads part 0
    assert cli.main(["pack", str(out), "--out", str(out)]) == 0
    assert parts[0].exists() and not parts[1].exists(), (
        "only the part no other cache reads is retired"
    )
    assert read_features(twin)["train"].X.shape == (4, 5)

    (tmp_path / "b").mkdir()
    _, parts = _parts(tmp_path / "b")
    out = virtual.assemble(tmp_path / "b" / "v.h5", parts, FINGERPRINT, {})
    y, split = np.tile([0, 1, 2], 2), np.repeat(np.array([0, 1, 2], np.int8), 2)
    other = write_cache(
        tmp_path / "other.h5",
        np.zeros((6, 5), np.float32),
        y,
        split,
        fingerprint={"t": 2, "shard": "r0"},
    )
    parts[0].write_bytes(other.read_bytes())  # same shape, rows of another cache
    with pytest.raises(
        CacheError,
        match=r"v\.h5 reads its rows from .*-000-of-002, which holds rows of another cache \(t: 1 "
        r"-> 2\)",
    ):
        read_features(out)
    assert cli.main(["pack", str(out), "--out", str(tmp_path / "packed.h5")]) == 2


def test_pack_replaces_only_the_cache_itself_or_a_pack_of_it(tmp_path, capsys):
    whole, parts = _parts(tmp_path)
    out = virtual.assemble(tmp_path / "v.h5", parts, FINGERPRINT, {})
    other = write_cache(
        tmp_path / "other.h5",
        np.zeros((3, 5), np.float32),
        np.array([0, 1, 2]),
        np.array([0, 1, 2], np.int8),
        fingerprint={"t": 2},
    )
    before = other.read_bytes()
    assert cli.main(["pack", str(out), "--out", str(other)]) == 2
    assert (
        "--out " + str(other) + " exists and was not written by this command"
        in capsys.readouterr().err
    )
    assert other.read_bytes() == before
    assert cli.main(["pack", str(out), "--out", str(whole)]) == 0  # the same features: a pack of it
    assert cli.main(["pack", str(out), "--out", str(other), "--force"]) == 0
