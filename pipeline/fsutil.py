"""Files that are either whole or absent: locks, atomic writes and folder swaps, fsync, free space,
and OS errors turned into one-line messages. No torch, no h5py: every stage writes through here.

Locks are `flock` locks on ``PATH.lock``. A forked child (a DataLoader worker) shares the parent's
open file description, so it would keep the lock alive after a kill -9 of the parent; every
child therefore closes the lock descriptors it inherited (`os.register_at_fork`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import CacheError, PipelineError

_HELD: set[int] = set()  # lock descriptors this process holds


def _close_inherited_locks() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class WriteError(PipelineError, OSError):
    """A write that the file system refused: full disk, read-only mount, file size limit, I/O
    error."""


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def private_to_shared(path: Path, directory: bool = False) -> None:
    """Give a file from `tempfile` (0600, or 0700 for a folder) the mode any new file gets under the
    umask, so results on a shared server are as readable as the user's other files."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def explain(exc: BaseException, path: str | Path, needed: int | None = None) -> WriteError:
    """A one-line error for a failed write to `path`, with the free space when the disk is the
    problem."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None:  # HDF5 reports the OS error inside its message text
        match = re.search(r"errno = (\d+)", text)
        code = int(match.group(1)) if match else None
    reason = os.strerror(code) if code else text.splitlines()[0] if text else type(exc).__name__
    hint = {
        errno.ENOSPC: "free space there or write elsewhere",
        errno.EDQUOT: "free space within your quota or write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.EFBIG: "the file size limit (ulimit -f) is too small; raise it or write elsewhere",
        errno.EACCES: "you may not write there; fix the permissions or write elsewhere",
        errno.EPERM: "you may not write there; fix the permissions or write elsewhere",
        errno.EIO: "the device reported an I/O error; check the disk and write elsewhere",
    }.get(code or 0, "fix the destination and rerun")
    room = ""
    if needed is not None or code in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(Path(path).parent)
        room = (
            f" (needs about {_mb(needed)} MB, {_mb(free)} MB free)"
            if needed
            else f" ({_mb(free)} MB free)"
        )
    return WriteError(f"cannot write {path}: {reason}{room}; {hint}")


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f}"


def free_bytes(folder: Path) -> int | None:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def require_space(path: Path, needed: int) -> None:
    """Refuse up front when `needed` bytes cannot be written beside `path`: too little free space
    (with a 5% margin), or a limit that free space does not show (ulimit -f, a quota), found by
    reserving that much in a scratch file that is removed again."""
    free = free_bytes(path.parent)
    if free is not None and free < needed * 1.05:
        raise WriteError(
            f"cannot write {path}: it needs about {_mb(needed)} MB and {path.parent} has "
            f"{_mb(free)} MB free; "
            "free space there or pass another --out"
        )
    try:
        fd, scratch = tempfile.mkstemp(prefix=f".{path.name}.space-", dir=path.parent)
    except OSError as exc:
        raise explain(exc, path) from None
    try:
        os.posix_fallocate(fd, 0, max(1, needed))
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise explain(exc, path, needed) from None
    finally:
        os.close(fd)
        os.unlink(scratch)


def reserve(path: Path, size: int) -> None:
    """Allocate `path`'s blocks up to `size` now, so writes into it cannot meet a full disk later
    (HDF5 fails badly on a write error in the middle of a file)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise explain(exc, path, size) from None
    finally:
        os.close(fd)


def check_output_folder(path: Path, what: str = "output") -> None:
    """The folder that will hold `path` exists (or can be made) and accepts new files."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in (parent, *parent.parents) if p.exists() and not p.is_dir())
        raise WriteError(
            f"cannot write {what} {path}: {blocking} is a file, not a folder; pass another path"
        ) from None
    except OSError as exc:
        raise explain(exc, path) from None
    if not parent.is_dir():
        raise WriteError(f"cannot write {what} {path}: {parent} is not a folder; pass another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise explain(exc, path) from None


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (
            errno.EINVAL,
            errno.EBADF,
        ):  # some file systems cannot fsync folders
            raise
    finally:
        os.close(fd)


def replace(src: Path, dst: Path) -> None:
    """Move a finished file into place: data on disk first, then the name, then the folder entry."""
    fsync_path(src)
    os.replace(src, dst)
    fsync_path(dst.parent, directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in_folder(staging: Path, target: Path) -> None:
    """Make `staging` the folder `target` in one step; the previous `target` is removed
    afterwards."""
    for child in staging.iterdir():
        if child.is_file():
            fsync_path(child)
    if target.exists():
        if not _exchange(staging, target):  # no atomic exchange: move the old one aside first
            aside = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, aside)
            os.rename(staging, target)
            staging = aside
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous run
    else:
        os.rename(staging, target)
    fsync_path(target.parent, directory=True)


@contextlib.contextmanager
def locked(path: str | Path, what: str = "writing") -> Iterator[None]:
    """Hold ``PATH.lock`` exclusively; a second run fails at once with a clear message."""
    lock = Path(f"{path}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise explain(exc, lock) from None
    while True:
        # never through a link: a lock is written and removed, and must be this program's own file
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except IsADirectoryError:
            raise CacheError(
                f"lock file {lock} is a folder; remove that folder and rerun"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CacheError(
                    f"lock file {lock} is a symbolic link, not this program's lock; remove it"
                ) from None
            raise explain(exc, lock) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not re.fullmatch(
            rb"\d*", os.pread(fd, 64, 0).strip()
        ):
            os.close(fd)  # a FIFO, or a file of someone's that happens to carry the name
            raise CacheError(
                f"{lock} exists and is not a lock file of this program (those hold a process id); "
                "move it away"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheError(
                f"another run (pid {holder}) is {what} {path}; wait for it to finish or stop it, "
                "then rerun"
            ) from None
        # The previous holder may have unlinked the file between our open and flock: retry then.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
