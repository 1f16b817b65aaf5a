"""Helpers for the fault tests: the real command line in a child process (optionally under a file
size limit), slowed writes so a signal lands mid-run, one-line error checks, and file digests."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import h5py

from pipeline import cli

from helpers import REPO, SLOW_WRITES

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
FAST = [  # fp32: the same numbers on every CPU (--precision auto has its own tests)
    "--backbone",
    "resnet18",
    "--weights",
    "none",
    "--image-size",
    "32",
    "--workers",
    "0",
    "--precision",
    "fp32",
    "--no-progress",
]

# The real entry (`python -m pipeline`), with each cache write slowed so a signal lands mid-run.
SLOW_ENTRY = SLOW_WRITES + 'sys.argv[0] = "pipeline"\nfrom pipeline._entry import main\nmain()\n'


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(
    *args: str, limit_bytes: int | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a child process (optionally under `ulimit -f`)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit if limit_bytes else None,
    )


def assert_one_line_error(stderr: str, pattern: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert re.search(pattern, lines[0]), lines[0]


def rows_done(partial: Path) -> int:
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f.attrs["rows_done"])
    except (OSError, KeyError):
        return 0


def start_slow(out: Path, root: Path, *extra: str) -> subprocess.Popen:
    args = ["features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out), *extra]
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_ENTRY, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_rows(job: subprocess.Popen, partial: Path, rows: int) -> None:
    deadline = time.monotonic() + 90
    while rows_done(partial) < rows and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert rows_done(partial) >= rows, (
        job.communicate()[1] if job.poll() is not None else "timed out"
    )


def main_here(argv: list[str]) -> tuple[int, str]:
    """`cli.main` in this process, returning (status, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    assert "Traceback" not in err.getvalue()
    return code, err.getvalue()


HEAD = ["--grid", "0.1", "1", "--bootstrap", "0", "--no-progress"]


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir())}


def head_folder(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "head"
    assert main_here(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
    return out
