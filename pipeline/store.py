"""The cache file: one self-describing HDF5 file per (image set, backbone, weights, preprocessing,
precision). No torch here, so the head stage can read caches without importing it.

Datasets
    features (N, D) float32|float16, chunked by rows, allocated up front (writes touch no metadata)
    labels (N,) int64 · ids (N,) str · split (N,) int8 (attr ``names``) · classes (C,) str
    ok (N,) bool (False for images skipped as unreadable) · logits (N, K) when asked for
Attributes
    schema_version · fingerprint (JSON; equal fingerprints mean equal features) · config (JSON)
    versions (JSON) · created · complete · rows_done · carved (JSON) · source

A run writes ``NAME.partial`` and renames it to ``NAME`` only once complete; an interrupted run
resumes at ``rows_done``. ``NAME.lock`` keeps two runs from writing the same cache.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import CacheError, MissingError
from pipeline.splits import SPLITS

SCHEMA_VERSION = 1
CHUNK_BYTES = 4 << 20  # rows per chunk: ~4 MiB; read speed is flat from 1 to 64 MiB, writes a bit faster
FLOAT16_MAX = float(np.finfo(np.float16).max)


def partial_path(path: str | Path) -> Path:
    return Path(f"{path}.partial")


def _json_attr(f: h5py.File, key: str) -> Any:
    return json.loads(f.attrs[key]) if key in f.attrs else {}


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Every key whose value differs, as ``key: old -> new``."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys if old.get(k) != new.get(k)]


def _open_existing(path: Path, mode: str = "r") -> h5py.File:
    try:
        # No chunk cache when reading: whole-chunk reads then go straight into the caller's array.
        f = h5py.File(path, mode, rdcc_nbytes=0 if mode == "r" else 1 << 20)
    except OSError as exc:
        if "lock" in str(exc).lower():
            raise CacheError(f"cache {path} is open for writing by another process; wait for it to finish") from None
        raise CacheError(
            f"{path} is not a readable HDF5 cache ({exc}); delete it and rerun the features stage"
        ) from None
    version = f.attrs.get("schema_version")
    if version is None or "features" not in f:
        f.close()
        raise CacheError(
            f"{path} is an HDF5 file but not a feature cache; point at a file written by `pipeline features`"
        )
    if int(version) != SCHEMA_VERSION:
        f.close()
        raise CacheError(
            f"cache {path} has schema version {int(version)}, this pipeline reads version {SCHEMA_VERSION}; "
            "rebuild it with `pipeline features --force`"
        )
    return f


def stored_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint of a complete cache at `path`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with _open_existing(path) as f:
        return _json_attr(f, "fingerprint") if bool(f.attrs.get("complete")) else None


# ------------------------------------------------------------------------------------- locking


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold ``PATH.lock`` exclusively; a second writer fails at once with a clear message."""
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheError(
                f"another run (pid {holder}) is writing {path}; wait for it to finish or stop it, then rerun"
            ) from None
        # The previous holder may have unlinked the file between our open and flock: retry then.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.unlink(lock)
        os.close(fd)


# ------------------------------------------------------------------------------------- writing


class CacheWriter:
    """Rows arrive in order; each batch is flushed before `rows_done` says it is there."""

    def __init__(self, f: h5py.File, path: Path) -> None:
        self.f = f
        self.path = path
        self.rows_done = int(f.attrs["rows_done"])
        self.n_rows = int(f["features"].shape[0])

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        fingerprint: Mapping[str, Any],
        ids: list[str],
        labels: np.ndarray,
        split: np.ndarray,
        classes: list[str],
        dim: int,
        store_dtype: str,
        logits_dim: int | None = None,
        attrs: Mapping[str, Any] | None = None,
        report: Any = lambda message: None,
    ) -> CacheWriter:
        """Resume ``PATH.partial`` when it was started with the same fingerprint; else start it afresh."""
        path = Path(path)
        partial = partial_path(path)
        if partial.exists():
            try:
                with _open_existing(partial) as f:
                    old = _json_attr(f, "fingerprint")
                    done = int(f.attrs.get("rows_done", 0))
            except CacheError as exc:
                report(f"discarding unreadable partial cache: {exc}")
                old, done = {}, 0
            if old == dict(fingerprint) and done <= len(ids):
                report(f"resuming {partial} at row {done} of {len(ids)}")
                return cls(h5py.File(partial, "r+"), path)
            if old:
                report(f"discarding partial cache built differently ({'; '.join(fingerprint_diff(old, fingerprint))})")
        partial.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(partial, "w")
        try:
            _create(f, fingerprint, ids, labels, split, classes, dim, store_dtype, logits_dim, attrs or {})
        except BaseException:
            f.close()
            partial.unlink(missing_ok=True)
            raise
        return cls(f, path)

    def write(self, start: int, features: np.ndarray, ok: np.ndarray | None = None, logits: np.ndarray | None = None):
        """Rows ``start .. start+len(features)``; rows with ``ok`` False hold NaN."""
        assert start == self.rows_done, f"rows must arrive in order: expected {self.rows_done}, got {start}"
        stop = start + len(features)
        if self.f["features"].dtype == np.float16 and len(features):
            peak = float(np.nanmax(np.abs(features), initial=0.0))
            if peak > FLOAT16_MAX:
                raise CacheError(
                    f"feature values reach {peak:.3g}, beyond float16's {FLOAT16_MAX:.0f}; "
                    "rerun with --store-dtype float32"
                )
        self.f["features"][start:stop] = features
        if logits is not None:
            self.f["logits"][start:stop] = logits
        if ok is not None and not ok.all():
            self.f["ok"][start:stop] = ok
        self.f.flush()  # data first, then the count that vouches for it
        self.rows_done = stop
        self.f.attrs["rows_done"] = stop
        self.f.flush()

    def finish(self, attrs: Mapping[str, Any] | None = None) -> Path:
        """Mark complete (with any last attributes), close, and move into place under the final name."""
        assert self.rows_done == self.n_rows, "finish() before every row was written"
        self.f.attrs.update(attrs or {})
        self.f.attrs["complete"] = True
        self.f.close()
        os.replace(partial_path(self.path), self.path)
        return self.path

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def _create(
    f: h5py.File,
    fingerprint: Mapping[str, Any],
    ids: list[str],
    labels: np.ndarray,
    split: np.ndarray,
    classes: list[str],
    dim: int,
    store_dtype: str,
    logits_dim: int | None,
    attrs: Mapping[str, Any],
) -> None:
    n = len(ids)
    dtype = np.dtype(store_dtype)

    def rows(width: int) -> tuple[tuple[int, int], tuple[int, int], h5py.h5p.PropDCID]:
        # Chunks of ~1 MiB of whole rows; early allocation so row writes never change metadata.
        chunk = (max(1, min(n, CHUNK_BYTES // (width * dtype.itemsize))), width)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        return (n, width), chunk, dcpl

    shape, chunks, dcpl = rows(dim)
    f.create_dataset("features", shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl, fill_time="never")
    if logits_dim:
        shape, chunks, dcpl = rows(logits_dim)
        f.create_dataset("logits", shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl, fill_time="never")
    text = h5py.string_dtype()
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    # Fixed-length UTF-8: read in one block, ~4x faster than variable-length strings.
    encoded = [i.encode() for i in ids]
    width = max(map(len, encoded), default=1) or 1
    f.create_dataset("ids", data=np.array(encoded, dtype=h5py.string_dtype("utf-8", width)))
    f.create_dataset("split", data=np.asarray(split, dtype=np.int8)).attrs["names"] = list(SPLITS)
    f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=text)
    f.create_dataset("ok", data=np.ones(n, dtype=bool))
    f.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": json.dumps(dict(fingerprint), sort_keys=True),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "complete": False,
            "rows_done": 0,
        }
    )
    for key, value in attrs.items():
        f.attrs[key] = value if isinstance(value, str | int | float | bool) else json.dumps(value, sort_keys=True)
    f.flush()


# ------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Split:
    """One split's rows: features, labels and sample ids."""

    X: np.ndarray  # (n, D)
    y: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n,) str

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FeatureSet:
    """What `read_features` returns: per-split arrays plus everything the file says about itself."""

    path: Path
    classes: list[str]
    splits: dict[str, Split]
    fingerprint: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Split:
        return self.splits[name]

    @property
    def dim(self) -> int:
        return next(iter(self.splits.values())).X.shape[1]


def _no_cache(path: Path) -> MissingError:
    return MissingError(f"no cache at {path}; run `make features` (or `pipeline features --out {path}`) first")


def open_cache(path: str | Path) -> h5py.File:
    """Open a complete cache for reading, or say precisely why it cannot be read."""
    path = Path(path)
    if not path.exists():
        partial = partial_path(path)
        if partial.exists():
            with _open_existing(partial) as f:
                done, n = int(f.attrs.get("rows_done", 0)), f["features"].shape[0]
            raise CacheError(
                f"cache {path} is incomplete ({done} of {n} rows in {partial}); "
                "rerun the same `pipeline features` command to resume it"
            )
        raise _no_cache(path)
    f = _open_existing(path)
    if not bool(f.attrs.get("complete")):
        done, n = int(f.attrs.get("rows_done", 0)), f["features"].shape[0]
        f.close()
        raise CacheError(f"cache {path} is incomplete ({done} of {n} rows); rerun `pipeline features` to resume it")
    return f


def _row_ranges(split: np.ndarray) -> dict[str, tuple[int, int]]:
    """Rows are sorted by split, so each split is one contiguous range."""
    if np.any(np.diff(split) < 0):
        raise CacheError("cache rows are not ordered by split; rebuild it with `pipeline features --force`")
    return {
        name: (int(np.searchsorted(split, code, "left")), int(np.searchsorted(split, code, "right")))
        for code, name in enumerate(SPLITS)
    }


def read_ids(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Sample ids ``start:stop`` as a str array, from fixed-length (fast path) or variable-length storage."""
    rows = np.s_[start:stop]
    if dataset.dtype.kind == "S":
        raw = dataset[rows]
        try:
            return raw.astype("U")  # plain ASCII: one C-level conversion
        except UnicodeDecodeError:
            return np.char.decode(raw, "utf-8")
    return dataset.asstr()[rows]


def read_block(dataset: h5py.Dataset, start: int, stop: int, dtype: Any = None) -> np.ndarray:
    """Rows ``start:stop`` in one contiguous hyperslab read, straight into the result array."""
    out = np.empty((stop - start, *dataset.shape[1:]), dtype=dtype or dataset.dtype)
    if stop > start:
        dataset.read_direct(out, np.s_[start:stop], np.s_[0 : stop - start])
    return out


def read_features(
    path: str | Path, splits: tuple[str, ...] = SPLITS, dtype: Any = None, include_logits: bool = False
) -> FeatureSet:
    """Load a complete cache: arrays per split (skipped images left out) plus its metadata.

    ``dtype`` converts features while reading (e.g. ``np.float32`` from float16 storage).
    """
    with open_cache(path) as f:
        split_codes = f["split"][...]
        ok = f["ok"][...]
        out: dict[str, Split] = {}
        for name, (a, b) in _row_ranges(split_codes).items():
            if name not in splits or a == b:
                continue
            X = read_block(f["logits" if include_logits else "features"], a, b, dtype)
            y, ids = f["labels"][a:b], read_ids(f["ids"], a, b)
            keep = ok[a:b]
            if not keep.all():
                X, y, ids = X[keep], y[keep], ids[keep]
            out[name] = Split(X=X, y=y, ids=ids)
        return FeatureSet(
            path=Path(path),
            classes=list(f["classes"].asstr()[...]),
            splits=out,
            fingerprint=_json_attr(f, "fingerprint"),
            config=_json_attr(f, "config"),
            skipped=[] if ok.all() else list(read_ids(f["ids"])[~ok]),
            attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
        )


def cache_info(path: str | Path) -> dict[str, Any]:
    """What the head stage needs to know about a cache before reading any features: its identity,
    shape and row ranges, and the labels per split (readable rows only) with the class names."""
    with open_cache(path) as f:
        split_codes, ok, labels = f["split"][...], f["ok"][...], f["labels"][...]
        return {
            "labels": {name: labels[(split_codes == code) & ok] for code, name in enumerate(SPLITS)},
            "classes": list(f["classes"].asstr()[...]),
            "path": str(path),
            "fingerprint": _json_attr(f, "fingerprint"),
            "config": _json_attr(f, "config"),
            "extract_seconds": float(f.attrs["extract_seconds"]) if "extract_seconds" in f.attrs else None,
            "dim": int(f["features"].shape[1]),
            "ranges": _row_ranges(split_codes),
            "rows": {name: int((ok & (split_codes == code)).sum()) for code, name in enumerate(SPLITS)},
        }


def summary(path: str | Path) -> dict[str, Any]:
    """What `pipeline info` shows; for a cache still being written, the partial file's state."""
    path = Path(path)
    if not path.exists() and partial_path(path).exists():
        path = partial_path(path)
    if not path.exists():
        raise _no_cache(path)
    with _open_existing(path) as f:
        split_codes = f["split"][...]
        counts = np.bincount(split_codes, minlength=len(SPLITS))
        ok = f["ok"][...]
        return {
            "path": str(path),
            "bytes": path.stat().st_size,
            "complete": bool(f.attrs.get("complete")),
            "rows_done": int(f.attrs.get("rows_done", 0)),
            "shape": tuple(f["features"].shape),
            "dtype": str(f["features"].dtype),
            "logits": tuple(f["logits"].shape) if "logits" in f else None,
            "classes": list(f["classes"].asstr()[...]),
            "splits": {name: int(n) for name, n in zip(SPLITS, counts, strict=True)},
            "skipped": list(read_ids(f["ids"])[~ok]),
            "fingerprint": _json_attr(f, "fingerprint"),
            "carved": _json_attr(f, "carved"),
            "versions": _json_attr(f, "versions"),
            "created": str(f.attrs.get("created", "")),
            "source": str(f.attrs.get("source", "")),
        }
