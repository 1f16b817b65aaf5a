"""Extraction under the real torchrun launcher: two CPU processes (gloo), against a single
process."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import cli, read_features
from pipeline.cache import reader as cache_reader
from pipeline.errors import CacheError
from pipeline.features import stage
from pipeline.features.distributed import World

from helpers import REPO, make_folder, tiny
from helpers.faults import rows_done

FLAGS = [
    "--backbone",
    "resnet18",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--batch-size",
    "2",
    "--no-progress",
]
FLAGS += ["--val-fraction", "0.25", "--precision", "fp32"]

# Under torchrun: each rank records its pid, and how many rows it writes (slowly, to be killable).
_WRAPPER = """
import os, sys, time
from pathlib import Path
from pipeline import cli
from pipeline.cache import reader as cache_reader
from pipeline.cache import schema
from pipeline.cache import writer as cache_writer
log = Path(sys.argv[1]); delay = float(sys.argv[2])
rank = os.environ["RANK"]
(log / f"pid-{rank}").write_text(str(os.getpid()))
write = cache_writer.CacheWriter.write
def counted(self, start, features, *args, **kwargs):
    write(self, start, features, *args, **kwargs)
    if ".part-" in str(self.path):
        with open(log / f"rows-{rank}", "a") as fh:
            fh.write(f"{len(features)}\\n")
        time.sleep(delay)
cache_writer.CacheWriter.write = counted
sys.exit(cli.main(sys.argv[3:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path: Path, args: list[str], delay: float = 0.0) -> subprocess.Popen:
    log = tmp_path / "log"
    log.mkdir(exist_ok=True)
    script = tmp_path / "wrapper.py"
    script.write_text(_WRAPPER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        f"--master-port={_free_port()}",
        str(script),
        str(log),
        str(delay),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def rows_written(tmp_path: Path) -> dict[str, int]:
    return {
        p.name: sum(map(int, p.read_text().split()))
        for p in sorted((tmp_path / "log").glob("rows-*"))
    }


def test_shards_are_contiguous_and_cover_every_row():
    for n in (0, 1, 7, 10):
        shards = [World(r, 3, r, 3).shard(n) for r in range(3)]
        assert shards[0][0] == 0 and shards[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(shards))


@pytest.mark.slow
def test_two_ranks_match_a_single_process(tmp_path):
    data = make_folder(tmp_path / "img", classes=("a", "b", "c"), per_class=5)
    out = tmp_path / "dist.h5"
    job = torchrun(tmp_path, ["features", "--data", str(data), "--out", str(out), *FLAGS])
    _stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert stderr.count("data: 15 images") == 1, "rank 0 alone reports"
    assert "distributed: 2 ranks (gloo)" in stderr
    assert rows_written(tmp_path) == {"rows-0": 8, "rows-1": 7}
    parts = sorted(tmp_path.glob("dist.h5.part-*"))  # the virtual cache reads them where they are
    assert len(parts) == 2 and not list(tmp_path.glob("dist.h5.progress-*"))

    stage.run(tiny(data=str(data), out=str(tmp_path / "single.h5"), batch_size=2))
    ours, single = read_features(out), read_features(tmp_path / "single.h5")
    assert ours.fingerprint == single.fingerprint
    for split in single.splits:
        np.testing.assert_array_equal(ours[split].ids, single[split].ids)
        np.testing.assert_allclose(ours[split].X, single[split].X, rtol=0, atol=1e-5)
    assert cache_reader.summary(out)["complete"]

    again = torchrun(tmp_path, ["features", "--data", str(data), "--out", str(out), *FLAGS])
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0 and "is current (15 rows); nothing to do" in stderr

    # --assemble copy: one ordinary file, parts removed; `pipeline pack` of the virtual cache equals
    # it.
    copied = tmp_path / "copied.h5"
    job = torchrun(
        tmp_path,
        ["features", "--data", str(data), "--out", str(copied), "--assemble", "copy", *FLAGS],
    )
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert not list(tmp_path.glob("copied.h5.part-*"))
    assert cli.main(["pack", str(out), "--out", str(tmp_path / "packed.h5")]) == 0
    with h5py.File(copied) as a, h5py.File(tmp_path / "packed.h5") as b:
        assert not b["features"].is_virtual and sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
        same = {"fingerprint", "carved", "source", "schema_version", "complete", "rows_done"}
        assert {k: a.attrs[k] for k in same} == {k: b.attrs[k] for k in same}
        asked = [
            {k: v for k, v in json.loads(f.attrs["config"]).items() if k not in ("out", "assemble")}
            for f in (a, b)
        ]
        assert asked[0] == asked[1]  # the same request but for --out and --assemble
    vanished = parts[1].rename(tmp_path / "elsewhere")
    with pytest.raises(
        CacheError,
        match=r"reads its rows from .*dist\.h5\.part-.*-001-of-002, which is missing or was "
        r"moved; put the part files back beside the cache",
    ):
        read_features(out)
    vanished.rename(parts[1])
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in [out, *parts]:
        path.rename(moved / path.name)
    np.testing.assert_array_equal(
        read_features(moved / out.name)["train"].X, ours["train"].X
    )  # they move together


@pytest.mark.slow
def test_a_killed_rank_leaves_its_rows_and_the_rerun_resumes_every_shard(tmp_path):
    data = make_folder(tmp_path / "img", classes=("a", "b"), per_class=10)
    out = tmp_path / "dist.h5"
    job = torchrun(
        tmp_path, ["features", "--data", str(data), "--out", str(out), *FLAGS], delay=0.4
    )
    deadline = time.monotonic() + 120
    partials = []
    while time.monotonic() < deadline and job.poll() is None:
        partials = sorted(tmp_path.glob("dist.h5.part-*.partial"))
        if len(partials) == 2 and min(rows_done(p) for p in partials) >= 4:
            break
        time.sleep(0.05)
    os.kill(int((tmp_path / "log" / "pid-1").read_text()), signal.SIGKILL)  # rank 1 dies
    job.communicate(timeout=120)
    assert job.returncode != 0 and not out.exists()
    kept = [rows_done(p) for p in partials]
    assert all(rows >= 4 for rows in kept) and sum(kept) < 20

    for f in (tmp_path / "log").glob("rows-*"):
        f.unlink()
    rerun = torchrun(tmp_path, ["features", "--data", str(data), "--out", str(out), *FLAGS])
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    written = rows_written(tmp_path)
    assert written == {"rows-0": 10 - kept[0], "rows-1": 10 - kept[1]}, (
        "each shard resumed at its first missing row"
    )
    stage.run(tiny(data=str(data), out=str(tmp_path / "single.h5"), batch_size=2))
    ours, single = read_features(out), read_features(tmp_path / "single.h5")
    for split in single.splits:
        np.testing.assert_allclose(ours[split].X, single[split].X, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "rank,size,n,expected", [(0, 2, 5, (0, 3)), (1, 2, 5, (3, 5)), (2, 4, 2, (2, 2))]
)
def test_shard_bounds(rank, size, n, expected):
    assert World(rank, size, rank, size).shard(n) == expected


@pytest.mark.slow
def test_tar_shards_go_to_ranks_whole_and_the_virtual_cache_equals_one_process(tmp_path):
    pytest.importorskip("webdataset")
    from helpers.shards import make_shards

    shards, _ = make_shards(tmp_path, shards=4, per_shard=3)
    pattern = str(shards / "train-{000..003}.tar")
    out = tmp_path / "dist.h5"
    flags = [f for f in FLAGS if f not in ("--val-fraction", "0.25")] + [
        "--val-fraction",
        "0",
        "--test-fraction",
        "0",
    ]
    job = torchrun(tmp_path, ["features", "--data", pattern, "--out", str(out), *flags])
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert rows_written(tmp_path) == {"rows-0": 6, "rows-1": 6}  # two whole shards each
    single = stage.run(
        tiny(data=pattern, val_fraction=0.0, test_fraction=0.0, out=str(tmp_path / "one.h5"))
    )
    ours, theirs = read_features(out), read_features(single.path)
    np.testing.assert_array_equal(ours["train"].ids, theirs["train"].ids)
    np.testing.assert_allclose(ours["train"].X, theirs["train"].X, rtol=0, atol=1e-5)
