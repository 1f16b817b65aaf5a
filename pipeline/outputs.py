"""Where results go: each command's output appears whole or not at all, and nothing the user did not
ask to overwrite is overwritten.

A head run's folder is written as a hidden staging sibling and swapped in when every file is there,
under a lock so two runs into one folder cannot interleave. A file output (a predictions CSV, an
export, a report) replaces an existing file only when this project wrote it (recognised by its
first bytes) or the user passed --force.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline import fsutil
from pipeline.errors import ConfigError

HEAD_FILES = ("result.json", "head.json")  # a folder holding one of these was written by `pipeline head`


def check_results_folder(out: Path, force: bool) -> None:
    """Before any work: `out` is absent, empty, a previous head run's folder, or --force was given."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the head stage writes a folder there: pass another --out")
    if out.is_dir() and not force:
        entries = sorted(p.name for p in out.iterdir())
        if entries and not any(name in entries for name in HEAD_FILES):
            raise ConfigError(
                f"--out {out} holds files that `pipeline head` did not write (e.g. {entries[0]!r}); "
                "pass another --out, or --force to replace that folder"
            )
    fsutil.check_output_folder(out, "results")


@contextlib.contextmanager
def results_lock(out: Path) -> Iterator[None]:
    """Held for a whole head run: the second run into the same folder fails at once."""
    with fsutil.locked(out, "writing results to"):
        for stale in out.parent.glob(f".{out.name}.staging-*"):  # left by a killed run: ours to remove
            shutil.rmtree(stale, ignore_errors=True)
        yield


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A fresh hidden sibling to write into; on success it becomes `out` in one step, on any error it
    is removed and the previous `out` stays as it was."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        fsutil.swap_in_folder(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise fsutil.explain(exc, out) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as fh:
        return fh.read(len(prefix)) == prefix


def _is_our_export(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("extra/meta.json")]
            return bool(names) and b"pipeline linear-probe" in archive.read(names[0])
    except (zipfile.BadZipFile, OSError, KeyError):
        return False


def _is_cache(path: Path) -> bool:
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return "schema_version" in f.attrs and "features" in f
    except OSError:
        return False


OURS: dict[str, Callable[[Path], bool]] = {
    "pack": _is_cache,
    "predictions": lambda p: _starts_with(p, b"path,prediction,probability"),
    "export": _is_our_export,
    "report": lambda p: _starts_with(p, b"# Comparison"),
}


def check_file_output(path: Path, kind: str, force: bool) -> None:
    """Before any work: `path` may be written (a new file, one of ours of this `kind`, or --force)."""
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; pass a file path inside it, e.g. {path / ('out.' + kind)}")
    if path.exists() and not force and not OURS[kind](path):
        raise ConfigError(
            f"--out {path} exists and was not written by this command; pass another --out, or --force to replace it"
        )
    fsutil.check_output_folder(path, kind)


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary sibling, then move it over `path` (fsynced); removed on any error."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fsutil.replace(Path(tmp), path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise fsutil.explain(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
