"""Head outputs are all-or-nothing: killed runs, two heads into one folder, files the command did
not write, full disks, wrong kinds of output paths, invalid values and every malformed head folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import outputs
from pipeline.errors import CacheError

from helpers import make_folder
from helpers.faults import (
    ENV,
    FAST,
    HEAD,
    assert_one_line_error,
    digest,
    folder_digest,
    main_here,
    run_cli,
)


@pytest.fixture(scope="module")
def cache(faults_cache: Path) -> Path:
    """A small cache of three classes, shared by this module's tests (see conftest)."""
    return faults_cache


# ------------------------------------------------------------------- 3. outputs are all-or-nothing


@pytest.mark.slow
def test_a_head_killed_while_writing_leaves_the_previous_results_whole(
    cache, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    assert main_here(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
    before = folder_digest(out)
    from pipeline.evaluate import report

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_reliability", killed)
    assert (
        main_here(["head", "--features", str(cache), "--out", str(out), "--head", "torch", *HEAD])[
            0
        ]
        == 130
    )
    assert folder_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"], (
        "no staging folder or lock is left behind"
    )


def test_a_folder_mixing_two_runs_is_refused_by_load_head(cache, tmp_path):
    from pipeline.heads.saved import load_head

    for name in ("a", "b"):
        assert (
            main_here(["head", "--features", str(cache), "--out", str(tmp_path / name), *HEAD])[0]
            == 0
        )
    shutil.copy(tmp_path / "b" / "head.npz", tmp_path / "a" / "head.npz")
    with pytest.raises(
        CacheError, match=r"head .*a is malformed: its files come from different runs"
    ):
        load_head(tmp_path / "a")


def test_two_heads_into_one_folder_cannot_interleave(cache, tmp_path):
    out = tmp_path / "run"
    with outputs.results_lock(out):
        code, err = main_here(["head", "--features", str(cache), "--out", str(out), *HEAD])
    assert code == 2 and f"another run (pid {os.getpid()}) is writing results to {out}" in err


def test_outputs_never_replace_files_they_did_not_write(cache, tmp_path):
    head = tmp_path / "run"
    assert main_here(["head", "--features", str(cache), "--out", str(head), *HEAD])[0] == 0
    images = make_folder(tmp_path / "new", per_class=1)
    victim = tmp_path / "victim.h5"
    shutil.copy(cache, victim)
    before = digest(victim)
    code, err = main_here(
        ["predict", "--head", str(head), "--data", str(images), "--out", str(victim)]
    )
    assert (
        code == 2
        and "exists and was not written by this command; pass another --out, or --force" in err
    )
    assert digest(victim) == before
    csv_out = tmp_path / "p.csv"
    for _ in range(2):  # its own CSV is replaced without --force
        assert (
            main_here(
                ["predict", "--head", str(head), "--data", str(images), "--out", str(csv_out)]
            )[0]
            == 0
        )
    assert (
        main_here(
            ["predict", "--head", str(head), "--data", str(images), "--out", str(victim), "--force"]
        )[0]
        == 0
    )
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    code, err = main_here(["head", "--features", str(cache), "--out", str(notes), *HEAD])
    assert code == 2 and "holds files that `pipeline head` did not write (e.g. 'mine.txt')" in err
    assert "or --force to write the head's files beside them" in err
    report_path = tmp_path / "notes.md"
    report_path.write_text("my notes")
    code, err = main_here(["compare", str(head), "--out", str(report_path)])
    assert code == 2 and report_path.read_text() == "my notes"


def test_a_rerun_keeps_the_users_files_and_a_linked_out_keeps_its_link(cache, tmp_path):
    out = tmp_path / "run"
    assert main_here(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "figs").mkdir()
    (out / "figs" / "a.png").write_bytes(b"png")
    code, err = main_here(
        ["head", "--features", str(cache), "--out", str(out), "--head", "torch", *HEAD]
    )
    assert code == 0 and f"kept 2 entries of yours in {out}: figs, notes.txt" in err
    assert (out / "notes.txt").read_text() == "mine" and (
        out / "figs" / "a.png"
    ).read_bytes() == b"png"
    assert set(outputs.foreign_entries(out)) == {"figs", "notes.txt"}, (
        "every other file is one a head writes"
    )
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    assert (
        main_here(["head", "--features", str(cache), "--out", str(notes), "--force", *HEAD])[0] == 0
    )
    assert (notes / "mine.txt").read_text() == "keep me" and (notes / "result.json").exists()
    link = tmp_path / "latest"
    link.symlink_to(out, target_is_directory=True)
    assert main_here(["head", "--features", str(cache), "--out", str(link), *HEAD])[0] == 0
    assert link.is_symlink() and link.resolve() == out and (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "notes", "run"], (
        "no staging link or folder"
    )


@pytest.mark.parametrize(
    ("mask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)]
)
def test_outputs_follow_the_umask(cache, tmp_path, mask, folder_mode, file_mode):
    old = os.umask(mask)
    try:
        out = tmp_path / "run"
        assert main_here(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
        images = make_folder(tmp_path / "new", per_class=1)
        csv_out = tmp_path / "p.csv"
        assert (
            main_here(
                ["predict", "--head", str(out), "--data", str(images), "--out", str(csv_out)]
            )[0]
            == 0
        )
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == folder_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        (p.name for p in out.iterdir()), file_mode
    )
    assert csv_out.stat().st_mode & 0o777 == file_mode


@pytest.mark.slow
def test_a_full_disk_during_head_leaves_nothing_half_written(cache, tmp_path):
    out = tmp_path / "run"
    done = run_cli("head", "--features", str(cache), "--out", str(out), *HEAD, limit_bytes=20_000)
    assert done.returncode == 2
    assert_one_line_error(done.stderr, r"cannot write .*run: File too large")
    assert list(tmp_path.iterdir()) == []


def test_output_paths_of_the_wrong_kind(cache, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = main_here(["head", "--features", str(cache), "--out", str(a_file), *HEAD])
    assert code == 2 and "is a file; the head stage writes a folder there" in err
    code, err = main_here(["head", "--features", str(cache), "--out", str(a_file / "run"), *HEAD])
    assert code == 2 and "file.txt is a file, not a folder" in err
    code, err = main_here(["head", "--features", str(tmp_path), *HEAD])
    assert code == 2 and "is a folder, not a cache file" in err and "delete" not in err
    code, err = main_here(["features", "--data", str(tmp_path), *FAST, "--out", str(tmp_path)])
    assert code == 2 and "delete" not in err
    lock_dir = tmp_path / "c.h5.lock"
    lock_dir.mkdir()
    root = make_folder(tmp_path / "img", per_class=3)
    code, err = main_here(["features", "--data", str(root), *FAST, "--out", str(tmp_path / "c.h5")])
    assert code == 2 and "lock file" in err and "is a folder; remove that folder" in err


def test_compare_skips_an_unreadable_result_and_goes_on(cache, tmp_path):
    for name in ("a", "b"):
        assert (
            main_here(
                ["head", "--features", str(cache), "--out", str(tmp_path / "runs" / name), *HEAD]
            )[0]
            == 0
        )
    (tmp_path / "runs" / "b" / "result.json").write_text("{not json")
    code, err = main_here(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md")])
    assert code == 0 and "skipped: result" in err and "b/result.json is unreadable" in err
    assert (tmp_path / "r.md").read_text().startswith("# Comparison")
    import json

    good = json.loads((tmp_path / "runs" / "a" / "result.json").read_text())
    for name, change in (
        ("c", lambda r: r.pop("test")),
        ("d", lambda r: r["test"].update(top1="high")),
    ):
        shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / name)
        damaged = json.loads(json.dumps(good))
        change(damaged)
        (tmp_path / "runs" / name / "result.json").write_text(json.dumps(damaged))
    code, err = main_here(["compare", str(tmp_path / "runs"), "--out", str(tmp_path / "r.md")])
    assert code == 0 and "Traceback" not in err
    assert "c/result.json lacks 'test' or has it in another shape" in err
    assert "d/result.json lacks 'test.top1' or has it in another shape" in err


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
        (
            ["predict", "--head", "H", "--data", "D", "--top-k", "-1"],
            "--top-k -1 must be at least 1",
        ),
        (
            ["head", "--features", "C", "--jobs", "0"],
            "--jobs 0 is not allowed; pass a positive number, or -1",
        ),
        (
            ["features", "--dataset", "digits", "--image-size", "1"],
            "--image-size 1 is too small for these backbones",
        ),
        (["features", "--dataset", "digits", "--test-fraction", "0.95"], "leave no train images"),
        (
            ["head", "--features", "C", "--logit-adjust", "1e308"],
            "--logit-adjust '1e308' is not allowed; pass a number in [0, 100]",
        ),
        (
            ["head", "--features", "C", "--logit-adjust", "nan"],
            "--logit-adjust 'nan' is not allowed",
        ),
        (
            ["head", "--features", "C", "--head", "knn", "--temperature", "1e-300"],
            "--temperature 1e-300 is out of range; pass a number in [0.0001, 10000]",
        ),
    ],
)
def test_invalid_values_are_refused(argv, pattern):
    code, err = main_here(argv)
    assert code == 2 and pattern in err


def test_a_row_edited_after_the_cache_was_finished_is_refused_where_it_is_read(cache, tmp_path):
    import h5py

    edited = tmp_path / "edited.h5"
    shutil.copy(cache, edited)
    with h5py.File(edited, "r+") as f:
        f["features"][5] = f["features"][5] + 1.0  # the CRC stored with the row now disagrees
    pattern = r"edited\.h5: row 5 \(.*\) no longer reads back as it was written \(its CRC differs"
    for argv in (
        ["head", "--features", str(edited), "--out", str(tmp_path / "h"), *HEAD],
        ["pack", str(edited), "--out", str(tmp_path / "packed.h5")],
    ):
        code, err = main_here(argv)
        assert code == 2
        assert_one_line_error(err, pattern)
    assert not (tmp_path / "h").exists() and not (tmp_path / "packed.h5").exists()


def test_a_truncated_cache_is_not_called_busy(cache, tmp_path):
    broken = tmp_path / "t.h5"
    broken.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    code, err = main_here(["info", str(broken)])
    assert code == 2 and "is not a feature cache: not a readable HDF5 file (truncated file" in err
    assert "another process" not in err and "delete" not in err


# ------------------------------------------------------------------- malformed head folders


def head_folder(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "head"
    assert main_here(["head", "--features", str(cache), "--out", str(out), *HEAD])[0] == 0
    return out


def _rewrite_npz(folder: Path, **changes) -> None:
    with np.load(folder / "head.npz") as arrays:
        data = dict(arrays)
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    np.savez(folder / "head.npz", **data)


def _huge_coef(folder: Path) -> None:
    """head.npz whose coef header declares a 35 PiB array over a few bytes."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 42, 1024)}
    )
    with zipfile.ZipFile(folder / "head.npz") as src:
        entries = {name: src.read(name) for name in src.namelist()}
    entries["coef.npy"] = header.getvalue() + b"\0" * 64
    with zipfile.ZipFile(folder / "head.npz", "w") as dst:
        for name, data in entries.items():
            dst.writestr(name, data)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (
            _huge_coef,
            r"head\.npz: its coef\.npy declares a \(4398046511104, 1024\) float64 array, more than "
            r"its",
        ),
        (lambda d: (d / "head.json").write_text("{oops"), "head.json is not JSON"),
        (
            lambda d: (d / "head.json").write_text("[1, 2]"),
            "head.json holds a list, expected an object",
        ),
        (
            lambda d: (d / "head.json").write_text('{"schema": 1}'),
            "head.json lacks classes, preprocessing, n_features",
        ),
        (lambda d: _rewrite_npz(d, coef=None), "head.npz has no array 'coef'"),
        (
            lambda d: _rewrite_npz(d, coef=np.zeros((3, 7))),
            r"coef is \(3, 7\) float64, expected \(3, 512\)",
        ),
        (
            lambda d: _rewrite_npz(d, intercept=np.array([{"a": 1}], dtype=object)),
            "holds pickled data",
        ),
        (
            lambda d: (d / "head.npz").write_bytes(b"PK\x03\x04garbage"),
            "head.npz: it is not a readable .npz archive",
        ),
    ],
)
def test_every_malformed_head_folder_is_one_line(cache, tmp_path, damage, pattern):
    folder = head_folder(cache, tmp_path)
    damage(folder)
    images = make_folder(tmp_path / "new", per_class=1)
    code, err = main_here(
        ["predict", "--head", str(folder), "--data", str(images), "--out", str(tmp_path / "p.csv")]
    )
    assert code == 2 and re.search(f"head .*head is malformed: .*{pattern}", err), err
    assert not (tmp_path / "p.csv").exists()
