"""Where results go: each command's output appears whole or not at all, and nothing the user did not
ask to overwrite is overwritten.

A head run's folder is written as a hidden staging sibling and swapped in when every file is there,
under a lock so two runs into one folder cannot interleave. Whatever else the folder held (the
user's notes, figures) is carried into the new one; a symlinked --out keeps its link.

A file output (a predictions CSV, an export, a report) replaces an existing file only when this
project wrote it (recognised by its first bytes; a pack: the same cache) or the user passed --force.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline import fsutil
from pipeline.errors import ConfigError

# A folder holding one of these, with the run id a head run writes into it, is a head run's folder
HEAD_FILES = ("result.json", "head.json")
RUN_ID = re.compile(r"[0-9a-f]{32}")
# Every name a head run may write; anything else in a results folder is the user's and is kept.
HEAD_OUTPUTS = frozenset(
    {
        *HEAD_FILES,
        "head.npz",
        "curve.csv",
        "predictions.npz",
        "fewshot.csv",
        "validation_curve.png",
        "confusion_matrix.png",
        "reliability.png",
    }
)


def results_target(out: Path) -> Path:
    """The folder a head run writes: `out`, or the folder it links to (the link itself stays)."""
    return out.resolve() if out.is_symlink() else out


def check_results_folder(out: Path, force: bool) -> None:
    """Before any work: `out` is absent, empty, a previous head run's folder, or --force was
    given."""
    out = results_target(out)
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ConfigError(
            f"--out {out} is (or holds) the current folder; a head run replaces its folder whole: "
            "pass a folder of its own, e.g. --out results/NAME"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out} is a file; the head stage writes a folder there: pass another --out"
        )
    if out.is_dir() and not force:
        entries = sorted(p.name for p in out.iterdir())
        if entries and not is_head_folder(out):
            raise ConfigError(
                f"--out {out} holds files that `pipeline head` did not write (e.g. "
                f"{entries[0]!r}); "
                "pass another --out, or --force to write the head's files beside them"
            )
    fsutil.check_output_folder(out, "results")


def is_head_folder(folder: Path) -> bool:
    """`folder` was written by `pipeline head`: its result.json or head.json is a JSON object with
    the run id a head run gives (a file merely named so is the user's)."""
    for name in HEAD_FILES:
        path = folder / name
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 64 << 20:
            continue
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(document, dict) and RUN_ID.fullmatch(str(document.get("run_id", ""))):
            return True
    return False


@contextlib.contextmanager
def results_lock(out: Path) -> Iterator[None]:
    """Held for a whole head run: the second run into the same folder fails at once."""
    out = results_target(out)
    with fsutil.locked(out, "writing results to"):
        # Staging folders a killed run left are ours to remove: named as `tempfile.mkdtemp` names
        # them
        # (8 random characters), real folders, not links. Anything else of that look is someone's.
        ours = re.compile(re.escape(f".{out.name}.staging-") + r"[a-z0-9_]{8}")
        for stale in out.parent.glob(f".{out.name}.staging-*"):
            if ours.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        yield


def foreign_entries(folder: Path) -> list[str]:
    """What in `folder` a head run did not write (the user's notes, figures): kept across reruns."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in HEAD_OUTPUTS)


@contextlib.contextmanager
def staged_folder(
    out: Path, report: Callable[[str], None] = lambda message: None
) -> Iterator[Path]:
    """A fresh hidden sibling to write into; on success it becomes `out` in one step, on any error
    it is removed and the previous `out` stays as it was. Entries of `out` that a head run does not
    write are linked (or copied) into the new folder first, so nothing of the user's is lost."""
    out = results_target(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        fsutil.private_to_shared(staging, directory=True)
        yield staging
        kept = foreign_entries(out)
        for name in kept:
            _link_tree(out / name, staging / name)
        fsutil.swap_in_folder(staging, out)
        if kept:
            report(
                f"kept {len(kept)} entries of yours in {out}: {', '.join(kept[:5])}"
                + (", ..." if len(kept) > 5 else "")
            )
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise fsutil.explain(exc, out) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """`src` (a file, link or folder) at `dst` again: hard links where the file system allows, so
    the old folder can go without taking the data."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as fh:
        return fh.read(len(prefix)) == prefix


def _is_our_export(path: Path) -> bool:
    """An export's meta.json says `"format": "pipeline ... torch.export program"` (any head
    kind)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("extra/meta.json")]
            meta = json.loads(archive.read(names[0])) if names else {}
    except (zipfile.BadZipFile, OSError, KeyError, ValueError):
        return False
    text = str(meta.get("format", "")) if isinstance(meta, dict) else ""
    return text.startswith("pipeline ") and text.endswith("torch.export program")


def _is_our_ranking(path: Path) -> bool:
    """`pipeline rank --out` writes {cache: {"logme": ..., "rows": ..., ...}, ...}."""
    try:
        scores = json.loads(path.read_bytes()[: 2**24])
    except (OSError, ValueError):
        return False
    return (
        isinstance(scores, dict)
        and bool(scores)
        and all(
            isinstance(s, dict)
            and isinstance(s.get("logme"), float)
            and all(isinstance(s.get(key), int) for key in ("rows", "dim", "classes"))
            for s in scores.values()
        )
    )


OURS: dict[str, Callable[[Path], bool]] = {
    "pack": lambda p: (
        False
    ),  # only the cache being packed itself, or a pack of it: `virtual.same_cache`
    "predictions": lambda p: _starts_with(p, b"path,prediction,probability"),
    "export": _is_our_export,
    "report": lambda p: _starts_with(p, b"# Comparison"),
    "rank": _is_our_ranking,
}


def check_file_output(path: Path, kind: str, force: bool) -> None:
    """Before any work: `path` may be written (a new file, one of ours of this `kind`, or
    --force)."""
    if path.is_dir():
        raise ConfigError(
            f"--out {path} is a folder; pass a file path inside it, e.g. {path / ('out.' + kind)}"
        )
    if path.exists() and not path.is_file():
        raise ConfigError(
            f"--out {path} is not a regular file (a pipe or a device); pass a file path"
        )
    if path.exists() and not force and not OURS[kind](path):
        raise ConfigError(
            f"--out {path} exists and was not written by this command; pass another --out, or "
            "--force to replace it"
        )
    fsutil.check_output_folder(path, kind)


def replace_files(files: dict[Path, Callable[[Path], None]]) -> None:
    """Each `write(tmp)` into a temporary sibling of its path; only when every one is written are
    they moved over their paths, so a failure leaves none of them changed."""
    written: dict[Path, Path] = {}
    try:
        for path, write in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            written[path] = Path(tmp)
            fsutil.private_to_shared(Path(tmp))
            write(Path(tmp))
        for path, tmp in written.items():
            fsutil.replace(tmp, path)
    except OSError as exc:
        raise fsutil.explain(exc, path) from None
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` a temporary sibling, then move it over `path` (fsynced); removed on any
    error."""
    replace_files({path: write})
