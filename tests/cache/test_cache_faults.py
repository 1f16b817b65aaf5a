"""Faults of the cache stage, through the real command line: a full disk, a file size limit, kill
-9, SIGTERM, read-only file systems, rows that read back wrong, and every malformed cache file."""

from __future__ import annotations

import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import read_features
from pipeline.cache import schema
from pipeline.cache import writer as cache_writer
from pipeline.errors import CacheError
from pipeline.features import stage

from helpers import make_folder, tiny, write_cache
from helpers.faults import (
    ENV,
    FAST,
    HEAD,
    assert_one_line_error,
    digest,
    main_here,
    rows_done,
    run_cli,
    start_slow,
    wait_rows,
)


@pytest.fixture(scope="module")
def cache(faults_cache: Path) -> Path:
    """A small cache of three classes, shared by this module's tests (see conftest)."""
    return faults_cache


# ------------------------------------------------------------------- 1. a complete cache is correct


@pytest.mark.slow
def test_a_file_size_limit_stops_the_run_up_front_and_keeps_the_old_cache(tmp_path):
    """`ulimit -f` (EFBIG, invisible to free-space checks): one line, exit 2, before any row is
    computed; the previous complete cache untouched; without the limit the same command builds it.
    """
    root = make_folder(tmp_path / "img", classes=("a", "b"), per_class=30, size=(24, 24))
    out = tmp_path / "c.h5"
    small = make_folder(tmp_path / "small", per_class=3)
    assert run_cli("features", "--data", str(small), *FAST, "--out", str(out)).returncode == 0
    before = digest(out)
    failed = run_cli("features", "--data", str(root), *FAST, "--out", str(out), limit_bytes=100_000)
    assert failed.returncode == 2
    assert_one_line_error(
        failed.stderr, r"cannot write .*c\.h5\.partial: File too large \(needs about [\d.]+ MB"
    )
    assert digest(out) == before, "the complete cache was not replaced"
    assert "backbone:" not in failed.stderr, "refused before the model was built"
    rebuilt = run_cli("features", "--data", str(root), *FAST, "--out", str(out))
    assert rebuilt.returncode == 0, rebuilt.stderr
    reference = tmp_path / "ref.h5"
    stage.run(tiny(data=str(root), out=str(reference), val_fraction=0.1))
    ours, ref = read_features(out), read_features(reference)
    for split in ref.splits:
        np.testing.assert_array_equal(ours[split].X, ref[split].X)


@pytest.mark.slow
def test_a_cache_that_cannot_fit_is_refused_up_front_and_the_old_one_kept(tmp_path, tmpfs):
    root = make_folder(tmp_path / "img", classes=("a", "b"), per_class=150, size=(16, 16))
    out = tmpfs / "x.h5"
    small = make_folder(tmp_path / "small", per_class=3)
    assert run_cli("features", "--data", str(small), *FAST, "--out", str(out)).returncode == 0
    before = digest(out)
    failed = run_cli("features", "--data", str(root), *FAST, "--out", str(out), "--force")
    assert failed.returncode == 2
    assert_one_line_error(failed.stderr, r"x\.h5\.partial: it needs about 0\.\d+ MB and .* MB free")
    assert digest(out) == before


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_run_cannot_reach_the_reserved_rows(tmp_path, tmpfs):
    """The cache's blocks are claimed when it is created: another writer filling the disk during the
    run does not corrupt it, and it completes, verified row by row."""
    root = make_folder(tmp_path / "img", classes=("a", "b"), per_class=60, size=(16, 16))
    out = tmpfs / "x.h5"
    job = start_slow(out, root)
    wait_rows(job, schema.partial_path(out), 2)
    _fill(tmpfs)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr
    cache_writer.verify(out)  # every row reads back as written
    assert read_features(out)["train"].X.shape[0] > 0


def _fill(folder: Path) -> None:
    """Take every free byte of `folder`'s file system."""
    with open(folder / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_verification_catches_rows_that_read_back_wrong(tmp_path, folder):
    """A row silently lost (zeros) is caught before `complete` is set, and the rerun rewrites it."""
    out = tmp_path / "c.h5"
    cfg = tiny(data=str(folder), out=str(out))
    original = cache_writer.CacheWriter.finish

    def corrupt_then_finish(self, attrs=None):
        self.f["features"][3] = 0.0
        return original(self, attrs)

    cache_writer.CacheWriter.finish = corrupt_then_finish
    try:
        with pytest.raises(
            CacheError, match=r"failed verification: row 3 reads back different.*rerun the same"
        ):
            stage.run(cfg)
    finally:
        cache_writer.CacheWriter.finish = original
    assert not out.exists() and rows_done(schema.partial_path(out)) == 3
    said = []
    assert stage.run(cfg, report=said.append).status == "resumed"
    assert any("at row 3 of" in m for m in said)
    cache_writer.verify(out)


@pytest.mark.slow
def test_kill_9_of_the_main_process_does_not_leave_the_lock_with_its_workers(tmp_path):
    root = make_folder(tmp_path / "img", per_class=10)
    out = tmp_path / "c.h5"
    job = start_slow(out, root, "--workers", "2")
    wait_rows(job, schema.partial_path(out), 4)
    job.kill()
    job.wait()
    rerun = run_cli("features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "another run" not in rerun.stderr


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(tmp_path):
    root = make_folder(tmp_path / "img", per_class=10)
    out = tmp_path / "c.h5"
    job = start_slow(out, root)
    wait_rows(job, schema.partial_path(out), 4)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130 and "Traceback" not in stderr
    assert_one_line_error(
        stderr, r"interrupted: \d+ of 20 rows are saved in .*c\.h5\.partial; rerun the same"
    )
    rerun = run_cli("features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out))
    assert rerun.returncode == 0 and "resuming" in rerun.stderr


@pytest.mark.slow
@pytest.mark.parametrize("lines", [1, 2, 3])
def test_a_signal_in_the_first_moments_prints_no_traceback(tmp_path, folder, lines):
    """SIGINT as the run says its first, second or third line (listing the images, the weights, the
    backbone): events, not a clock, so a busy machine sends it at the same moment of the run."""
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "features",
            "--data",
            str(folder),
            *FAST,
            "--out",
            str(tmp_path / "c.h5"),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    said: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [said.put(line) for line in job.stderr], daemon=True)
    reader.start()
    seen = [said.get(timeout=120) for _ in range(lines)]
    job.send_signal(signal.SIGINT)
    job.wait(timeout=120)
    reader.join(timeout=120)
    stderr = "".join(seen) + "".join(said.queue)
    assert "Traceback" not in stderr, stderr
    assert job.returncode in (0, 130), stderr


@pytest.mark.slow
def test_an_interrupted_force_rebuild_is_resumed_by_force_and_named_without_it(tmp_path):
    root = make_folder(tmp_path / "img", per_class=10)
    out = tmp_path / "c.h5"
    assert (
        run_cli(
            "features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out)
        ).returncode
        == 0
    )
    before = digest(out)
    job = start_slow(out, root, "--force")
    wait_rows(job, schema.partial_path(out), 4)
    job.kill()
    job.wait()
    done = rows_done(schema.partial_path(out))
    plain = run_cli("features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out))
    assert plain.returncode == 0 and digest(out) == before
    assert f"an interrupted --force rebuild ({done} of 20 rows) waits in" in plain.stderr
    assert "is current" not in plain.stderr
    forced = run_cli(
        "features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out), "--force"
    )
    assert forced.returncode == 0 and f"resuming {out}.partial at row {done} of 20" in forced.stderr


@pytest.mark.slow
def test_a_current_cache_on_a_read_only_file_system_is_still_current(tmp_path, tmpfs):
    root = make_folder(tmp_path / "img", per_class=3)
    out = tmpfs / "c.h5"
    assert run_cli("features", "--data", str(root), *FAST, "--out", str(out)).returncode == 0
    assert subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)]).returncode == 0
    again = run_cli("features", "--data", str(root), *FAST, "--out", str(out))
    assert again.returncode == 0 and "is current" in again.stderr, again.stderr
    rebuild = run_cli("features", "--data", str(root), *FAST, "--out", str(out), "--force")
    assert rebuild.returncode == 2
    assert_one_line_error(rebuild.stderr, r"cannot write .*c\.h5\.lock: Read-only file system")


# ------------------------------------------------------------------- 4. every malformed cache


def _mutate(f: h5py.File, key: str) -> None:
    n = f["features"].shape[0]
    if key.startswith("del:"):
        del f[key[4:]]
    elif key == "fingerprint":
        f.attrs["fingerprint"] = "{not json"
    elif key == "schema":
        f.attrs["schema_version"] = "one"
    elif key == "features-1d":
        del f["features"]
        f["features"] = np.zeros(n, dtype=np.float32)
    elif key == "features-str":
        del f["features"]
        f["features"] = np.array([[b"x"]] * n)
    elif key == "features-short":
        del f["features"]
        f["features"] = np.zeros((n - 1, 4), dtype=np.float32)
    elif key in ("labels-high", "labels-negative"):
        f["labels"][0] = 99 if key == "labels-high" else -1
    elif key == "split":
        f["split"][0] = 5
    elif key == "classes":
        del f["classes"]
        f.create_dataset(
            "classes", data=np.array(["only"], dtype=object), dtype=h5py.string_dtype()
        )


MALFORMED = {
    "del:ids": "dataset\\(s\\) ids missing",
    "del:classes": "dataset\\(s\\) classes missing",
    "del:ok": "dataset\\(s\\) ok missing",
    "del:labels": "dataset\\(s\\) labels missing",
    "del:split": "dataset\\(s\\) split missing",
    "fingerprint": "attribute fingerprint is not JSON",
    "schema": "schema_version 'one' is not an integer",
    "features-1d": "features are \\(\\d+,\\) float32, expected \\(rows, dim\\) floats",
    "features-str": "features are .* expected \\(rows, dim\\) floats",
    "features-short": "\\w+ is \\(\\d+,\\) \\w+, expected \\d+ rows to match features",
    "labels-high": "label 99 at row 0 is outside the 3 class names",
    "labels-negative": "label -1 at row 0 is outside",
    "split": "split code 5 at row 0 is not one of 0, 1, 2",
    "classes": "label \\d at row \\d+ is outside the 1 class names",
}


@pytest.mark.parametrize("key", list(MALFORMED))
def test_every_malformed_cache_is_one_line_in_info_head_and_features(cache, tmp_path, key):
    bad = tmp_path / "bad.h5"
    shutil.copy(cache, bad)
    with h5py.File(bad, "r+") as f:
        _mutate(f, key)
    before = digest(bad)
    for argv in (
        ["info", str(bad)],
        ["head", "--features", str(bad), "--out", str(tmp_path / "r"), *HEAD],
    ):
        code, err = main_here(argv)
        assert code == 2, err
        assert re.search(f"cache .*bad\\.h5 is malformed: {MALFORMED[key]}", err), err
    assert digest(bad) == before


def test_a_random_cache_matches_the_synthetic_writer(tmp_path):
    """write_cache (the tests' writer) produces files that validate: the schema check is not too
    strict."""
    rng = np.random.default_rng(0)
    path = write_cache(
        tmp_path / "s.h5", rng.normal(size=(12, 3)), np.arange(12) % 3, np.repeat([0, 1, 2], 4)
    )
    assert read_features(path)["train"].X.shape == (4, 3)
