"""Virtual caches over part files (what torchrun assembles) and `pipeline pack`, without torchrun."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from pipeline import cli, read_features
from pipeline.cache import virtual
from pipeline.errors import CacheError

from conftest import write_cache


def _parts(tmp_path, n: int = 2):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5)).astype(np.float32)
    y = np.tile([0, 1, 2], 4)
    split = np.repeat(np.array([0, 1, 2], np.int8), 4)
    whole = write_cache(tmp_path / "whole.h5", X, y, split, fingerprint={"t": 1})
    parts = [write_cache(tmp_path / f"v.h5.part-{r}", X[r * 6 : (r + 1) * 6], y[r * 6 : (r + 1) * 6],
                         split[r * 6 : (r + 1) * 6], classes=["c0", "c1", "c2"], fingerprint={"t": r})
             for r in range(n)]  # fmt: skip
    return whole, parts


def test_a_virtual_cache_reads_like_the_whole_one_and_packs_into_it(tmp_path):
    whole, parts = _parts(tmp_path)
    out = virtual.assemble(tmp_path / "v.h5", parts, {"t": 1}, {"source": "test"})
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
    out = virtual.assemble(tmp_path / "v.h5", parts, {"t": 1}, {})
    parts[0].rename(tmp_path / "away")
    with pytest.raises(CacheError, match=r"v\.h5 reads its rows from .*v\.h5\.part-0, which is missing or was moved"):
        read_features(out)
    (tmp_path / "away").rename(parts[0])
    assert cli.main(["pack", str(out), "--out", str(out)]) == 0  # packed in place: one file, parts no longer needed
    assert not parts[0].exists() and not parts[1].exists()
    assert read_features(out)["train"].X.shape == (4, 5)
