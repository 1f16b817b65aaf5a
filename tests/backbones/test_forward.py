"""DataLoader workers that die or cannot hand over a batch end the run in one line, within seconds;
signals to the whole process group print no worker traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cache import schema

from helpers import make_folder
from helpers.faults import ENV, assert_one_line_error, rows_done, run_cli

WORKERS = [
    "--backbone",
    "resnet18",
    "--weights",
    "none",
    "--image-size",
    "64",
    "--batch-size",
    "16",
    "--workers",
    "1",
    "--no-progress",
]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _start(root: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "features",
            "--data",
            str(root),
            *WORKERS,
            "--out",
            str(out),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(job: subprocess.Popen, ready, what: str) -> None:
    """Until `ready()` holds (a state of files or processes, never a fixed time); 120 s at most."""
    deadline = time.monotonic() + 120
    while not ready() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready(), f"never saw {what}: " + (
        job.communicate()[1] if job.poll() is not None else "timed out"
    )


@pytest.mark.slow
def test_a_batch_that_cannot_be_shared_under_ulimit_is_one_line_not_a_hang(tmp_path):
    root = make_folder(tmp_path / "img", classes=("a", "b"), per_class=20, size=(64, 64))
    # The cache fits under 400 kB; one batch of 16 decoded 64 px images (786 kB) does not.
    done = run_cli(
        "features",
        "--data",
        str(root),
        *WORKERS,
        "--out",
        str(tmp_path / "c.h5"),
        limit_bytes=400_000,
    )
    assert done.returncode == 2
    assert_one_line_error(
        done.stderr, r"DataLoader workers cannot hand a batch .* File too large.* --workers 0"
    )


@pytest.mark.slow
def test_a_worker_killed_mid_run_ends_the_run_in_one_line(tmp_path):
    root = make_folder(tmp_path / "img", classes=("a", "b"), per_class=200, size=(64, 64))
    out = tmp_path / "c.h5"
    job = _start(root, out)
    _wait_for(
        job,
        lambda: rows_done(schema.partial_path(out)) >= 16 and _children(job.pid),
        "a worker and rows",
    )
    for child in _children(job.pid):
        os.kill(child, signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 2, stderr
    assert_one_line_error(
        stderr, r"a DataLoader worker died \(DataLoader worker \(pid \d+\) is killed by signal"
    )
    assert rows_done(schema.partial_path(out)) >= 16, "finished rows are kept"


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_prints_one_line(tmp_path, signum):
    root = make_folder(tmp_path / "img", classes=("a", "b"), per_class=200, size=(64, 64))
    out = tmp_path / "c.h5"
    job = _start(root, out)
    _wait_for(job, lambda: rows_done(schema.partial_path(out)) >= 16, "rows")
    os.killpg(job.pid, signum)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130 and "Traceback" not in stderr, stderr
    assert_one_line_error(stderr, r"interrupted: \d+ of 400 rows are saved in .*c\.h5\.partial")
