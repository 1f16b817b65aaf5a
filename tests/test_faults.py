"""Faults a careless or hostile user meets, driven through the real command line: disk full, kill -9,
SIGTERM, concurrent runs, odd file systems, malformed files. Each asserts the exit status, one line
on stderr (never a traceback), and that files already written are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import cli, outputs, read_features
from pipeline.cache import schema
from pipeline.cache import writer as cache_writer
from pipeline.errors import CacheError, DataError
from pipeline.features import stage

from conftest import REPO, SLOW_WRITES, make_folder, tiny, write_cache, write_image

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
FAST = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--workers", "0", "--no-progress"]

# The real entry (`python -m pipeline`), with each cache write slowed so a signal lands mid-run.
_SLOW_ENTRY = SLOW_WRITES + 'sys.argv[0] = "pipeline"\nfrom pipeline._entry import main\nmain()\n'


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*args: str, limit_bytes: int | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
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
        [sys.executable, "-c", _SLOW_ENTRY, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_rows(job: subprocess.Popen, partial: Path, rows: int) -> None:
    deadline = time.monotonic() + 90
    while rows_done(partial) < rows and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert rows_done(partial) >= rows, job.communicate()[1] if job.poll() is not None else "timed out"


@pytest.fixture
def tmpfs(tmp_path):
    """A 600 KiB tmpfs; skipped where this process may not mount."""
    point = tmp_path / "small"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(point)], capture_output=True)
    if done.returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


# ------------------------------------------------------------------- 1. a complete cache is correct


def test_a_file_size_limit_stops_the_run_up_front_and_keeps_the_old_cache(tmp_path):
    """`ulimit -f` (EFBIG, invisible to free-space checks): one line, exit 2, before any row is
    computed; the previous complete cache untouched; without the limit the same command builds it."""
    root = make_folder(tmp_path / "img", classes=("a", "b"), per_class=30, size=(24, 24))
    out = tmp_path / "c.h5"
    small = make_folder(tmp_path / "small", per_class=3)
    assert run_cli("features", "--data", str(small), *FAST, "--out", str(out)).returncode == 0
    before = digest(out)
    failed = run_cli("features", "--data", str(root), *FAST, "--out", str(out), limit_bytes=100_000)
    assert failed.returncode == 2
    assert_one_line_error(failed.stderr, r"cannot write .*c\.h5\.partial: File too large \(needs about [\d.]+ MB")
    assert digest(out) == before, "the complete cache was not replaced"
    assert "backbone:" not in failed.stderr, "refused before the model was built"
    rebuilt = run_cli("features", "--data", str(root), *FAST, "--out", str(out))
    assert rebuilt.returncode == 0, rebuilt.stderr
    reference = tmp_path / "ref.h5"
    stage.run(tiny(data=str(root), out=str(reference), val_fraction=0.1))
    ours, ref = read_features(out), read_features(reference)
    for split in ref.splits:
        np.testing.assert_array_equal(ours[split].X, ref[split].X)


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
        with pytest.raises(CacheError, match=r"failed verification: row 3 reads back different.*rerun the same"):
            stage.run(cfg)
    finally:
        cache_writer.CacheWriter.finish = original
    assert not out.exists() and rows_done(schema.partial_path(out)) == 3
    said = []
    assert stage.run(cfg, report=said.append).status == "resumed"
    assert any("at row 3 of" in m for m in said)
    cache_writer.verify(out)


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


def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(tmp_path):
    root = make_folder(tmp_path / "img", per_class=10)
    out = tmp_path / "c.h5"
    job = start_slow(out, root)
    wait_rows(job, schema.partial_path(out), 4)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130 and "Traceback" not in stderr
    assert_one_line_error(stderr, r"interrupted: \d+ of 20 rows are saved in .*c\.h5\.partial; rerun the same")
    rerun = run_cli("features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out))
    assert rerun.returncode == 0 and "resuming" in rerun.stderr


@pytest.mark.parametrize("delay", [0.15, 0.4, 1.0])
def test_a_signal_in_the_first_moments_prints_no_traceback(tmp_path, folder, delay):
    job = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "features", "--data", str(folder), *FAST, "--out", str(tmp_path / "c.h5")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert job.returncode in (0, 130, -signal.SIGINT)  # -SIGINT: stopped before Python's own handler


def test_an_interrupted_force_rebuild_is_resumed_by_force_and_named_without_it(tmp_path):
    root = make_folder(tmp_path / "img", per_class=10)
    out = tmp_path / "c.h5"
    assert run_cli("features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out)).returncode == 0
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
    forced = run_cli("features", "--data", str(root), *FAST, "--batch-size", "2", "--out", str(out), "--force")
    assert forced.returncode == 0 and f"resuming {out}.partial at row {done} of 20" in forced.stderr


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


# --------------------------------------------------------- 2. the cache describes exactly its images


def test_a_changed_image_is_detected_and_named(tmp_path):
    root = make_folder(tmp_path / "img", per_class=4)
    out = tmp_path / "c.h5"
    stage.run(tiny(data=str(root), out=str(out)))
    write_image(root / "dog" / "img01.png", (0, 0, 0))  # new pixels, new size and time
    said = []
    assert stage.run(tiny(data=str(root), out=str(out)), report=said.append).status == "built"
    assert any("changed 1: dog/img01.png (size, modified)" in m for m in said), said


def test_verify_content_catches_a_change_that_keeps_size_and_time(tmp_path):
    root = make_folder(tmp_path / "img", per_class=4, ext=".bmp")  # uncompressed: a pixel edit keeps the size
    out = tmp_path / "c.h5"
    cfg = tiny(data=str(root), out=str(out), verify_content=True)
    stage.run(cfg)
    image = root / "cat" / "img00.bmp"
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size; then the old modification time is put back
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert stage.run(tiny(data=str(root), out=str(out))).status == "built", "size+time alone: a different cache"
    said = []
    stage.run(cfg, report=said.append)
    assert stage.run(cfg).status == "current"
    data[-20] ^= 0x0F
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    said = []
    assert stage.run(cfg, report=said.append).status == "built"
    assert any("changed 1: cat/img00.bmp (content)" in m for m in said), said


def test_two_folders_with_the_same_names_do_not_share_a_cache(tmp_path):
    a = make_folder(tmp_path / "a", per_class=3)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    write_image(b / "cat" / "img00.png", (1, 2, 3))
    out = tmp_path / "c.h5"
    stage.run(tiny(data=str(a), out=str(out)))
    assert stage.run(tiny(data=str(b), out=str(out))).status == "built"


def test_a_symlink_loop_is_entered_once_and_a_linked_class_is_one_class(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    (root / "cat" / "loop").symlink_to(root, target_is_directory=True)
    external = make_folder(tmp_path / "ext", classes=("owl",), per_class=2)
    (root / "owl").symlink_to(external / "owl", target_is_directory=True)
    from pipeline.features.sources import scan_folder

    samples = scan_folder(root, 0.0, 0.0, 0)
    assert len(samples) == 8 and samples.classes == ["cat", "dog", "owl"]
    assert len(set(samples.items)) == 8


def test_a_file_listed_twice_through_links_is_an_error(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    (root / "dog" / "copy.png").symlink_to(root / "cat" / "img00.png")
    code, err = _main(["features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5")])
    assert code == 2 and "are the same file (a link); an image may appear once" in err


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        (["a.png,cat", "a.png,cat"], r"lines 2 and 3 name the same file 'a\.png'"),
        (["a.png,cat", "./a.png,dog"], r"lines 2 and 3 name the same file '\./a\.png'"),
    ],
)
def test_a_manifest_naming_a_file_twice_is_an_error(tmp_path, rows, pattern):
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / name, (9, 9, 9))
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(["path,label", *rows, "b.png,dog", "c.png,cat"]) + "\n")
    with pytest.raises(DataError, match=pattern):
        from pipeline.features.sources import read_manifest

        read_manifest(manifest, 0.0, 0.0, 0)


def test_a_manifest_may_point_outside_its_folder(tmp_path):
    make_folder(tmp_path / "elsewhere", per_class=2)
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.csv"
    rows = [f"../elsewhere/{c}/img{n:02d}.png,{c}" for c in ("cat", "dog") for n in range(2)]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")
    from pipeline.features.sources import read_manifest

    assert len(read_manifest(manifest, 0.0, 0.0, 0)) == 4


def test_an_unreadable_folder_or_file_is_named(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "img", per_class=3)
    from pipeline.features import sources

    real_scandir = os.scandir

    def refuse(path):
        if str(path).endswith("dog"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", refuse)
    with pytest.raises(DataError, match=r"cannot read folder .*img/dog: Permission denied"):
        sources.scan_folder(root, 0.0, 0.0, 0)
    monkeypatch.setattr(sources.os, "scandir", real_scandir)
    monkeypatch.setattr(sources.os, "access", lambda path, mode: not str(path).endswith("img01.png"))
    with pytest.raises(DataError, match=r"image .*cat/img01\.png is not readable \(permission denied\)"):
        sources.scan_folder(root, 0.0, 0.0, 0)


def test_a_fifo_named_like_an_image_is_refused_up_front(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    os.mkfifo(root / "cat" / "pipe.jpg")
    done = run_cli("features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5"), timeout=60)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, r"pipe\.jpg is not a regular file \(a FIFO")


def test_a_file_name_that_is_not_utf8_is_named(tmp_path):
    root = make_folder(tmp_path / "img", per_class=3)
    shutil.copy(root / "cat" / "img00.png", os.fsencode(root / "cat") + b"/caf\xe9.png")
    code, err = _main(["features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5")])
    assert code == 2 and r"file name b'caf\xe9.png'" in err and "is not valid UTF-8; rename it" in err


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("path,label\ncaf\xe9.png,cat\n".encode("latin-1"), r"is not UTF-8 text \(byte 0xe9 at offset \d+\)"),
        (b"path,label\na\0.png,cat\n", r"line \d+: contains a NUL byte"),
        (b"path,label\n" + b"x" * 200_000 + b",cat\n", r"line \d+: field larger than field limit"),
    ],
)
def test_csv_encoding_and_format_slips_are_one_line(tmp_path, content, pattern):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(content)
    code, err = _main(["features", "--data", str(manifest), *FAST, "--out", str(tmp_path / "c.h5")])
    assert code == 2 and re.search(pattern, err), err


def test_a_binary_config_file_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(bytes(range(256)))
    code, err = _main(["features", "--config", str(config)])
    assert code == 2 and f"config file {config} is not" in err


# ------------------------------------------------------------------- 3. outputs are all-or-nothing


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    root = make_folder(tmp / "img", classes=("cat", "dog", "owl"), per_class=8)
    out = tmp / "c.h5"
    stage.run(tiny(data=str(root), out=str(out), test_fraction=0.25))
    return out


def _main(argv: list[str]) -> tuple[int, str]:
    """`cli.main` in this process, returning (status, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(argv)
    assert "Traceback" not in err.getvalue()
    return code, err.getvalue()


HEAD = ["--grid", "0.1", "1", "--bootstrap", "0", "--no-progress"]


def _folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(folder.iterdir())}


def test_a_head_killed_while_writing_leaves_the_previous_results_whole(cache, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert _main(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
    before = _folder_digest(out)
    from pipeline.evaluate import report

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_reliability", killed)
    assert _main(["head", "--features", str(cache), "--out", str(out), "--head", "torch", *HEAD])[0] == 130
    assert _folder_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"], "no staging folder or lock is left behind"


def test_a_folder_mixing_two_runs_is_refused_by_load_head(cache, tmp_path):
    from pipeline.heads.probe import load_head

    for name in ("a", "b"):
        assert _main(["head", "--features", str(cache), "--out", str(tmp_path / name), *HEAD])[0] == 0
    shutil.copy(tmp_path / "b" / "head.npz", tmp_path / "a" / "head.npz")
    with pytest.raises(CacheError, match=r"head .*a is malformed: its files come from different runs"):
        load_head(tmp_path / "a")


def test_two_heads_into_one_folder_cannot_interleave(cache, tmp_path):
    out = tmp_path / "run"
    with outputs.results_lock(out):
        code, err = _main(["head", "--features", str(cache), "--out", str(out), *HEAD])
    assert code == 2 and f"another run (pid {os.getpid()}) is writing results to {out}" in err


def test_outputs_never_replace_files_they_did_not_write(cache, tmp_path):
    head = tmp_path / "run"
    assert _main(["head", "--features", str(cache), "--out", str(head), *HEAD])[0] == 0
    images = make_folder(tmp_path / "new", per_class=1)
    victim = tmp_path / "victim.h5"
    shutil.copy(cache, victim)
    before = digest(victim)
    code, err = _main(["predict", "--head", str(head), "--data", str(images), "--out", str(victim)])
    assert code == 2 and "exists and was not written by this command; pass another --out, or --force" in err
    assert digest(victim) == before
    csv_out = tmp_path / "p.csv"
    for _ in range(2):  # its own CSV is replaced without --force
        assert _main(["predict", "--head", str(head), "--data", str(images), "--out", str(csv_out)])[0] == 0
    assert _main(["predict", "--head", str(head), "--data", str(images), "--out", str(victim), "--force"])[0] == 0
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    code, err = _main(["head", "--features", str(cache), "--out", str(notes), *HEAD])
    assert code == 2 and "holds files that `pipeline head` did not write (e.g. 'mine.txt')" in err
    report_path = tmp_path / "notes.md"
    report_path.write_text("my notes")
    code, err = _main(["compare", str(head), "--out", str(report_path)])
    assert code == 2 and report_path.read_text() == "my notes"


def test_a_full_disk_during_head_leaves_nothing_half_written(cache, tmp_path):
    out = tmp_path / "run"
    done = run_cli("head", "--features", str(cache), "--out", str(out), *HEAD, limit_bytes=20_000)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, r"cannot write .*run: File too large")
    assert list(tmp_path.iterdir()) == []


def test_output_paths_of_the_wrong_kind(cache, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = _main(["head", "--features", str(cache), "--out", str(a_file), *HEAD])
    assert code == 2 and "is a file; the head stage writes a folder there" in err
    code, err = _main(["head", "--features", str(cache), "--out", str(a_file / "run"), *HEAD])
    assert code == 2 and "file.txt is a file, not a folder" in err
    code, err = _main(["head", "--features", str(tmp_path), *HEAD])
    assert code == 2 and "is a folder, not a cache file" in err and "delete" not in err
    code, err = _main(["features", "--data", str(tmp_path), *FAST, "--out", str(tmp_path)])
    assert code == 2 and "delete" not in err
    lock_dir = tmp_path / "c.h5.lock"
    lock_dir.mkdir()
    root = make_folder(tmp_path / "img", per_class=3)
    code, err = _main(["features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5")])
    assert code == 2 and "lock file" in err and "is a folder; remove that folder" in err


def test_compare_skips_an_unreadable_result_and_goes_on(cache, tmp_path):
    for name in ("a", "b"):
        assert _main(["head", "--features", str(cache), "--out", str(tmp_path / "runs" / name), *HEAD])[0] == 0
    (tmp_path / "runs" / "b" / "result.json").write_text("{not json")
    code, err = _main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md")])
    assert code == 0 and "skipped: result" in err and "b/result.json is unreadable" in err
    assert (tmp_path / "r.md").read_text().startswith("# Comparison")


def test_info_into_a_closed_pipe_prints_no_traceback(cache):
    done = subprocess.run(
        f"{sys.executable} -m pipeline info {cache} | head -c 10",
        shell=True,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["predict", "--head", "H", "--data", "D", "--top-k", "0"], "--top-k 0 must be at least 1"),
        (["predict", "--head", "H", "--data", "D", "--top-k", "-1"], "--top-k -1 must be at least 1"),
        (["head", "--features", "C", "--jobs", "0"], "--jobs 0 is not allowed; pass a positive number, or -1"),
        (["features", "--dataset", "digits", "--image-size", "1"], "--image-size 1 is too small for a ResNet"),
        (["features", "--dataset", "digits", "--test-fraction", "0.95"], "leave no train images"),
    ],
)
def test_invalid_values_are_refused(argv, pattern):
    code, err = _main(argv)
    assert code == 2 and pattern in err


def test_a_truncated_cache_is_not_called_busy(cache, tmp_path):
    broken = tmp_path / "t.h5"
    broken.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    code, err = _main(["info", str(broken)])
    assert code == 2 and "is not a readable HDF5 cache (truncated file" in err and "another process" not in err


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
        f.create_dataset("classes", data=np.array(["only"], dtype=object), dtype=h5py.string_dtype())


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
    for argv in (["info", str(bad)], ["head", "--features", str(bad), "--out", str(tmp_path / "r"), *HEAD]):
        code, err = _main(argv)
        assert code == 2, err
        assert re.search(f"cache .*bad\\.h5 is malformed: {MALFORMED[key]}", err), err
    assert digest(bad) == before


def test_a_random_cache_matches_the_synthetic_writer(tmp_path):
    """write_cache (the tests' writer) produces files that validate: the schema check is not too strict."""
    rng = np.random.default_rng(0)
    path = write_cache(tmp_path / "s.h5", rng.normal(size=(12, 3)), np.arange(12) % 3, np.repeat([0, 1, 2], 4))
    assert read_features(path)["train"].X.shape == (4, 3)


# ------------------------------------------------------------------- malformed head folders


def _head_folder(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "head"
    assert _main(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
    return out


def _rewrite_npz(folder: Path, **changes) -> None:
    with np.load(folder / "head.npz") as arrays:
        data = dict(arrays)
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    np.savez(folder / "head.npz", **data)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda d: (d / "head.json").write_text("{oops"), "head.json is not JSON"),
        (lambda d: (d / "head.json").write_text("[1, 2]"), "head.json holds a list, expected an object"),
        (lambda d: (d / "head.json").write_text('{"schema": 1}'), "head.json lacks classes, preprocessing, n_features"),
        (lambda d: _rewrite_npz(d, coef=None), "head.npz has no array 'coef'"),
        (lambda d: _rewrite_npz(d, coef=np.zeros((3, 7))), r"coef is \(3, 7\) float64, expected \(3, 512\)"),
        (lambda d: _rewrite_npz(d, intercept=np.array([{"a": 1}], dtype=object)), "holds pickled data"),
        (lambda d: (d / "head.npz").write_bytes(b"PK\x03\x04garbage"), "head.npz is not a readable .npz archive"),
    ],
)
def test_every_malformed_head_folder_is_one_line(cache, tmp_path, damage, pattern):
    folder = _head_folder(cache, tmp_path)
    damage(folder)
    images = make_folder(tmp_path / "new", per_class=1)
    code, err = _main(["predict", "--head", str(folder), "--data", str(images), "--out", str(tmp_path / "p.csv")])
    assert code == 2 and re.search(f"head .*head is malformed: .*{pattern}", err), err
    assert not (tmp_path / "p.csv").exists()


# ------------------------------------------------------------------- 5. loading what others send


def test_a_tampered_export_is_refused_and_runs_no_code(tmp_path):
    import io
    import json
    import pickle
    import zipfile

    import torch

    from pipeline import load_export

    module = torch.nn.Linear(3, 2)
    program = torch.export.export(module, (torch.zeros(2, 3),))
    good = tmp_path / "good.pt2"
    torch.export.save(program, str(good), extra_files={"meta.json": "{}"})
    x = torch.ones(2, 3)
    torch.testing.assert_close(load_export(good).module()(x), module(x))

    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def tamper(name_filter, replace):
        bad = tmp_path / "bad.pt2"
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                dst.writestr(item, replace(item.filename, data) if name_filter(item.filename) else data)
        return bad

    def pickled_weights(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        buffer = io.BytesIO()
        torch.save(Payload(), buffer)
        return buffer.getvalue()

    bad = tamper(lambda n: "data/weights/" in n, pickled_weights)
    with pytest.raises(Exception, match=r"refusing to load .*bad\.pt2: .*declares pickled payloads"):
        load_export(bad)
    bad = tamper(lambda n: "sample_inputs" in n, lambda n, d: pickle.dumps(Payload()))
    with pytest.raises(Exception, match=r"refusing to load .*bad\.pt2: .*model\.pt is not plain tensors"):
        load_export(bad)
    assert not marker.exists(), "no code ran"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "extra.pt2", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("good/data/constants/custom_obj_0", pickle.dumps(Payload()))
    with pytest.raises(Exception, match=r"unexpected entry 'good/data/constants/custom_obj_0'"):
        load_export(tmp_path / "extra.pt2")


def test_the_readme_loaders_exist_on_the_package(cache, tmp_path):
    import pipeline

    folder = _head_folder(cache, tmp_path)
    head = pipeline.load_head(folder)
    X = pipeline.read_features(cache)["test"].X
    assert head.predict_proba(X).shape == (len(X), 3)
    assert callable(pipeline.load_export)
