"""The cache file: one self-describing HDF5 file per (image set, backbone, weights, preprocessing,
precision). No torch here, so the head stage can read caches without importing it.

Datasets
    features (N, D) float32|float16, chunked by rows, allocated up front (writes touch no metadata)
    labels (N,) int64 · ids (N,) str · split (N,) int8 (attr ``names``) · classes (C,) str
    ok (N,) bool (False for images skipped as unreadable) · logits (N, K) when asked for
    row_crc (N,) uint32: CRC-32 of each stored row, re-read and checked before `complete` is set
    file_size, file_mtime_ns (N,) int64 and file_sha256 (N,) with --verify-content: what each image
    file was when it was read, so a rebuild can name the files that changed
Attributes
    schema_version · fingerprint (JSON; equal fingerprints mean equal features) · config (JSON)
    versions (JSON) · created · complete · rows_done · carved (JSON) · source

A run writes ``NAME.partial`` and renames it to ``NAME`` only once every row has been read back
against its CRC and the file fsynced; an interrupted run resumes at ``rows_done``. ``NAME.lock``
keeps two runs from writing the same cache. `validate` checks the whole schema once, on open.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import fsutil
from pipeline.errors import CacheError, MissingError, PipelineError
from pipeline.fsutil import locked  # noqa: F401  (the cache's lock: `store.locked(path)`)
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
    """Open a cache file and check everything it claims (see `validate`), or say why it cannot be read."""
    if path.is_dir():
        raise CacheError(f"{path} is a folder, not a cache file; pass the .h5 file inside it or another path")
    try:
        # No chunk cache when reading: whole-chunk reads then go straight into the caller's array.
        f = h5py.File(path, mode, rdcc_nbytes=0 if mode == "r" else 1 << 20)
    except BlockingIOError:
        raise CacheError(f"cache {path} is open for writing by another process; wait for it to finish") from None
    except OSError as exc:
        reason = str(exc).split("(")[-1].rstrip(")") if "(" in str(exc) else str(exc)
        raise CacheError(
            f"{path} is not a readable HDF5 cache ({reason}); delete it and rerun the features stage"
        ) from None
    try:
        validate(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _malformed(path: Path, what: str) -> CacheError:
    return CacheError(f"cache {path} is malformed: {what}; rebuild it with `pipeline features --force`")


def validate(f: h5py.File, path: Path) -> None:
    """Check the whole schema once, where a cache is opened: every dataset with its shape, dtype and
    value range, and every JSON attribute. Readers after this can trust what the file says."""
    version = f.attrs.get("schema_version")
    if version is None or "features" not in f:
        raise CacheError(
            f"{path} is an HDF5 file but not a feature cache; point at a file written by `pipeline features`"
        )
    try:
        version = int(np.asarray(version).item())
    except (TypeError, ValueError):
        raise _malformed(path, f"schema_version {version!r} is not an integer") from None
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"cache {path} has schema version {version}, this pipeline reads version {SCHEMA_VERSION}; "
            "rebuild it with `pipeline features --force`"
        )
    missing = [
        k for k in ("features", "labels", "ids", "split", "classes", "ok") if not isinstance(f.get(k), h5py.Dataset)
    ]
    if missing:
        raise _malformed(path, f"dataset(s) {', '.join(missing)} missing")
    features = f["features"]
    if features.ndim != 2 or features.dtype.kind != "f" or features.shape[1] == 0:
        raise _malformed(path, f"features are {features.shape} {features.dtype}, expected (rows, dim) floats")
    n = features.shape[0]
    kinds = {"labels": "iu", "split": "iu", "ok": "b", "ids": "SOU"}
    optional = {"file_size": "iu", "file_mtime_ns": "iu", "file_sha256": "SO", "row_crc": "u"}
    for key, kind in [*kinds.items(), *((k, v) for k, v in optional.items() if k in f)]:
        d = f[key]
        if not isinstance(d, h5py.Dataset) or d.ndim != 1 or d.shape[0] != n or d.dtype.kind not in kind:
            shape = getattr(d, "shape", "a group")
            raise _malformed(path, f"{key} is {shape} {getattr(d, 'dtype', '')}, expected {n} rows to match features")
    classes = f["classes"]
    if classes.ndim != 1 or h5py.check_string_dtype(classes.dtype) is None:
        raise _malformed(path, f"classes is {classes.shape} {classes.dtype}, expected a list of names")
    if "logits" in f and (
        not isinstance(f["logits"], h5py.Dataset) or f["logits"].ndim != 2 or f["logits"].shape[0] != n
    ):
        raise _malformed(path, f"logits are {getattr(f['logits'], 'shape', 'a group')}, expected {n} rows")
    labels, split = f["labels"][...], f["split"][...]
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(classes)))[0])
        raise _malformed(path, f"label {labels[bad]} at row {bad} is outside the {len(classes)} class names")
    if n and (split.min() < 0 or split.max() >= len(SPLITS)):
        bad = int(np.flatnonzero((split < 0) | (split >= len(SPLITS)))[0])
        raise _malformed(path, f"split code {split[bad]} at row {bad} is not one of 0, 1, 2 ({', '.join(SPLITS)})")
    for key in ("fingerprint", "config", "carved", "versions"):
        if key in f.attrs:
            try:
                value = json.loads(f.attrs[key])
            except (TypeError, ValueError):
                raise _malformed(path, f"attribute {key} is not JSON") from None
            if not isinstance(value, dict):
                raise _malformed(path, f"attribute {key} is {type(value).__name__}, expected a JSON object")
    try:
        done = int(np.asarray(f.attrs.get("rows_done", 0)).item())
    except (TypeError, ValueError):
        raise _malformed(path, "rows_done is not an integer") from None
    if not 0 <= done <= n:
        raise _malformed(path, f"rows_done {done} is outside 0..{n}")


def stored_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint of a complete cache at `path`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with _open_existing(path) as f:
        return _json_attr(f, "fingerprint") if bool(f.attrs.get("complete")) else None


def partial_state(path: str | Path) -> tuple[dict[str, Any], int, int] | None:
    """(fingerprint, rows done, rows) of ``PATH.partial``, or None when there is none or it is unreadable."""
    partial = partial_path(path)
    if not partial.exists():
        return None
    try:
        with _open_existing(partial) as f:
            return _json_attr(f, "fingerprint"), int(f.attrs.get("rows_done", 0)), int(f["features"].shape[0])
    except CacheError:
        return None


def stored_rows(path: str | Path) -> dict[str, np.ndarray]:
    """Each row's identity as the cache recorded it: ids, labels, split, and file size, mtime, sha256
    where recorded. Lets a rebuild say which files changed."""
    with _open_existing(Path(path)) as f:
        rows = {"ids": read_ids(f["ids"]), "labels": f["labels"][...], "split": f["split"][...]}
        for key in ("file_size", "file_mtime_ns", "file_sha256"):
            if key in f:
                rows[key] = f[key][...]
        return rows


# ------------------------------------------------------------------------------------- writing


def row_crc(features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """(B,) CRC-32 of each row's stored bytes (features, then logits): what verification re-reads."""
    out = np.empty(len(features), dtype=np.uint32)
    for i, row in enumerate(features):
        crc = zlib.crc32(np.ascontiguousarray(row).tobytes())
        out[i] = crc if logits is None else zlib.crc32(np.ascontiguousarray(logits[i]).tobytes(), crc)
    return out


class CacheWriter:
    """Rows arrive in order; each batch is flushed before `rows_done` says it is there, and each row's
    CRC is stored with it so `finish` can re-read the file and prove every row before marking it complete."""

    def __init__(self, f: h5py.File, path: Path) -> None:
        self.f = f
        self.path = path
        self.rows_done = int(f.attrs["rows_done"])
        self.n_rows = int(f["features"].shape[0])

    @property
    def partial(self) -> Path:
        return partial_path(self.path)

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
        identity: Mapping[str, np.ndarray] | None = None,
        report: Any = lambda message: None,
    ) -> CacheWriter:
        """Resume ``PATH.partial`` when it was started with the same fingerprint; else start it afresh.
        `identity` holds per-row file facts (``file_size``, ``file_mtime_ns``, ``file_sha256``)."""
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
                try:
                    return cls(h5py.File(partial, "r+", locking=False), path)
                except OSError as exc:
                    raise fsutil.explain(exc, partial) from None
            if old:
                report(f"discarding partial cache built differently ({'; '.join(fingerprint_diff(old, fingerprint))})")
        fsutil.check_output_folder(partial, "cache")
        partial.unlink(missing_ok=True)
        fsutil.require_space(partial, _file_bytes(ids, dim, logits_dim, np.dtype(store_dtype)))
        try:
            # HDF5's own lock would be inherited by forked DataLoader workers and outlive a kill -9 of
            # this process; writers are kept apart by ``PATH.lock`` instead, which workers never hold.
            f = h5py.File(partial, "w", locking=False)
        except OSError as exc:
            raise fsutil.explain(exc, partial) from None
        try:
            _create(f, fingerprint, ids, labels, split, classes, dim, store_dtype, logits_dim, attrs or {}, identity)
            # Every block the rows will use is claimed now: a disk that fills up later cannot reach them.
            fsutil.reserve(partial, f.id.get_filesize())
        except (OSError, RuntimeError) as exc:
            _close_quietly(f)
            partial.unlink(missing_ok=True)
            raise fsutil.explain(exc, partial) from None
        except BaseException:
            _close_quietly(f)
            partial.unlink(missing_ok=True)
            raise
        return cls(f, path)

    def write(self, start: int, features: np.ndarray, ok: np.ndarray | None = None, logits: np.ndarray | None = None):
        """Rows ``start .. start+len(features)``; rows with ``ok`` False hold NaN."""
        assert start == self.rows_done, f"rows must arrive in order: expected {self.rows_done}, got {start}"
        stop = start + len(features)
        dtype = self.f["features"].dtype
        if dtype == np.float16 and len(features):
            peak = float(np.nanmax(np.abs(features), initial=0.0))
            if peak > FLOAT16_MAX:
                raise CacheError(
                    f"feature values reach {peak:.3g}, beyond float16's {FLOAT16_MAX:.0f}; "
                    "rerun with --store-dtype float32"
                )
        features = np.asarray(features, dtype=dtype)
        logits = None if logits is None else np.asarray(logits, dtype=dtype)
        try:
            self.f["features"][start:stop] = features
            if logits is not None:
                self.f["logits"][start:stop] = logits
            if ok is not None and not ok.all():
                self.f["ok"][start:stop] = ok
            self.f["row_crc"][start:stop] = row_crc(features, logits)
            self.f.flush()  # data first, then the count that vouches for it
            self.f.attrs["rows_done"] = stop
            self.f.flush()
        except (OSError, RuntimeError) as exc:
            error = fsutil.explain(exc, self.partial, (self.n_rows - start) * features[:1].nbytes)
            error.hdf5_broken = True  # HDF5 may crash tearing this file down: see `cli.main`
            raise error from None
        self.rows_done = stop

    def finish(self, attrs: Mapping[str, Any] | None = None) -> Path:
        """Close, fsync, re-read every row against its CRC, mark complete, and move into place under
        the final name (then fsync the folder). Nothing is marked complete that was not read back."""
        assert self.rows_done == self.n_rows, "finish() before every row was written"
        partial = self.partial
        try:
            self.f.attrs.update(attrs or {})
            self.f.close()
            fsutil.fsync_path(partial)
            verify(partial)
            with h5py.File(partial, "r+", locking=False) as f:
                f.attrs["complete"] = True
            fsutil.replace(partial, self.path)
        except PipelineError:
            raise
        except (OSError, RuntimeError) as exc:
            raise fsutil.explain(exc, partial) from None
        return self.path

    def close(self) -> None:
        _close_quietly(self.f)


def _chunk_rows(n: int, width: int, dtype: np.dtype) -> int:
    return max(1, min(n, CHUNK_BYTES // (width * dtype.itemsize)))


def _file_bytes(ids: list[str], dim: int, logits_dim: int | None, dtype: np.dtype) -> int:
    """What a new cache file will take: row blocks rounded up to whole chunks, the per-row
    datasets, and 64 KiB of HDF5 metadata."""
    n, total = len(ids), 64 << 10
    for width in (dim, logits_dim or 0):
        if width:
            chunk = _chunk_rows(n, width, dtype)
            total += -(-n // chunk) * chunk * width * dtype.itemsize
    id_width = max((len(i.encode()) for i in ids), default=1)
    return total + n * (8 + 1 + 1 + 4 + 16 + 64 + id_width)


def _close_quietly(f: h5py.File) -> None:
    """Close after a failed write: HDF5 may fail to flush its own metadata then; the partial file's
    `rows_done` still only counts rows flushed before the failure."""
    if f.id.valid:
        with contextlib.suppress(OSError, RuntimeError):
            f.close()


def verify(path: Path, block_rows: int = 8192) -> None:
    """Re-read every row and compare it with the CRC stored when it was written. On a mismatch the
    file's `rows_done` goes back to the first bad row, so the rerun rewrites from there."""
    with _open_existing(path) as f:
        if "row_crc" not in f:
            return
        n, stored = f["features"].shape[0], f["row_crc"][...]
        for a in range(0, n, block_rows):
            b = min(n, a + block_rows)
            logits = read_block(f["logits"], a, b) if "logits" in f else None
            bad = np.flatnonzero(row_crc(read_block(f["features"], a, b), logits) != stored[a:b])
            if bad.size:
                first = a + int(bad[0])
                break
        else:
            return
    with contextlib.suppress(OSError, RuntimeError), h5py.File(path, "r+", locking=False) as f:
        f.attrs["rows_done"] = first
    raise CacheError(
        f"cache {path} failed verification: row {first} reads back different from what was written "
        "(a full or failing disk?); check the disk and rerun the same command to rewrite from that row"
    )


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
    identity: Mapping[str, np.ndarray] | None = None,
) -> None:
    n = len(ids)
    dtype = np.dtype(store_dtype)

    def rows(width: int) -> tuple[tuple[int, int], tuple[int, int], h5py.h5p.PropDCID]:
        # Chunks of ~1 MiB of whole rows; early allocation so row writes never change metadata.
        chunk = (_chunk_rows(n, width, dtype), width)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        return (n, width), chunk, dcpl

    shape, chunks, dcpl = rows(dim)
    f.create_dataset("features", shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl, fill_time="never")
    if logits_dim:
        shape, chunks, dcpl = rows(logits_dim)
        f.create_dataset("logits", shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl, fill_time="never")
    f.create_dataset("row_crc", data=np.zeros(n, dtype=np.uint32))
    text = h5py.string_dtype()
    f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    # Fixed-length UTF-8: read in one block, ~4x faster than variable-length strings.
    encoded = [i.encode() for i in ids]
    width = max(map(len, encoded), default=1) or 1
    f.create_dataset("ids", data=np.array(encoded, dtype=h5py.string_dtype("utf-8", width)))
    f.create_dataset("split", data=np.asarray(split, dtype=np.int8)).attrs["names"] = list(SPLITS)
    f.create_dataset("classes", data=np.array(classes, dtype=object), dtype=text)
    f.create_dataset("ok", data=np.ones(n, dtype=bool))
    for key, values in (identity or {}).items():
        f.create_dataset(key, data=values)
    f.attrs.update(
        {
            "schema_version": SCHEMA_VERSION,
            "fingerprint": json.dumps(dict(fingerprint), sort_keys=True),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "complete": False,
            "rows_done": 0,
            # Set by `finish`; created now so that finishing rewrites values in place and never
            # needs new file space.
            "extract_seconds": 0.0,
            "extract_rows": 0,
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
