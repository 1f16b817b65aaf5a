"""Writing a cache: `CacheWriter` opens (or resumes) ``NAME.partial`` with its space reserved, takes
rows in order with their CRC-32, and `finish` verifies every row, marks the file complete and
renames it into place."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import fsutil
from pipeline.cache.schema import (
    CHUNK_BYTES,
    FLOAT16_MAX,
    LAYERS,
    SCHEMA_VERSION,
    discard_partial,
    fingerprint_diff,
    first_bad_row,
    is_hdf5,
    json_attr,
    layer_dtype,
    meta_crc,
    open_existing,
    owned_parts,
    partial_path,
    row_crc,
)
from pipeline.errors import CacheError, PipelineError
from pipeline.splits import SPLITS


class CacheWriter:
    """Rows arrive in order; each batch is flushed before `rows_done` says it is there, and each
    row's CRC is stored with it so `finish` can re-read the file and prove every row before marking
    it complete."""

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
        layer_dims: Mapping[str, int] | None = None,
    ) -> CacheWriter:
        """Resume ``PATH.partial`` when it was started with the same fingerprint; else start it
        afresh. `identity` holds per-row file facts (``file_size``, ``file_mtime_ns``,
        ``file_sha256``); `layer_dims` the width of each extra layer stored under ``layers/``."""
        path = Path(path)
        partial = partial_path(path)
        if partial.exists():
            try:
                with open_existing(partial) as f:
                    old = json_attr(f, "fingerprint")
                    done = int(f.attrs.get("rows_done", 0))
            except CacheError as exc:
                if not is_hdf5(partial):
                    raise CacheError(
                        f"{partial} exists and is not a partial cache of this program; move it "
                        "away (or pass "
                        "another --out)"
                    ) from None
                report(f"discarding unreadable partial cache: {exc}")
                old, done = {}, 0
            if old == dict(fingerprint) and done <= len(ids):
                report(f"resuming {partial} at row {done} of {len(ids)}")
                try:
                    return cls(h5py.File(partial, "r+", locking=False), path)
                except OSError as exc:
                    raise fsutil.explain(exc, partial) from None
            if old:
                report(
                    "discarding partial cache built differently "
                    f"({'; '.join(fingerprint_diff(old, fingerprint))})"
                )
        fsutil.check_output_folder(partial, "cache")
        discard_partial(partial)
        widths = [dim, logits_dim or 0, *(layer_dims or {}).values()]
        fsutil.require_space(partial, _file_bytes(ids, widths, np.dtype(store_dtype)))  # cuts: less
        try:
            # HDF5's own lock would be inherited by forked DataLoader workers and outlive a kill -9
            # of
            # this process; writers are kept apart by ``PATH.lock`` instead, which workers never
            # hold.
            f = h5py.File(partial, "w", locking=False)
        except OSError as exc:
            raise fsutil.explain(exc, partial) from None
        try:
            _create(
                f,
                fingerprint,
                ids,
                labels,
                split,
                classes,
                dim,
                store_dtype,
                logits_dim,
                attrs or {},
                identity,
            )
            for name, width in (layer_dims or {}).items():
                _row_dataset(f, f"{LAYERS}/{name}", len(ids), width, layer_dtype(name, store_dtype))
            # Every block the rows will use is claimed now: a disk that fills up later cannot reach
            # them.
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

    def write(
        self,
        start: int,
        features: np.ndarray,
        ok: np.ndarray | None = None,
        logits: np.ndarray | None = None,
        layers: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Rows ``start .. start+len(features)`` of the features (and logits and layers); rows with
        ``ok`` False hold NaN."""
        assert start == self.rows_done, (
            f"rows must arrive in order: expected {self.rows_done}, got {start}"
        )
        stop = start + len(features)
        dtype = self.f["features"].dtype
        layers = dict(layers or {})
        half = [b for name, b in layers.items() if layer_dtype(name, dtype) == np.float16]
        if dtype == np.float16:
            half.append(features)
        peak = max((float(np.nanmax(np.abs(b), initial=0.0)) for b in half if len(b)), default=0)
        if peak > FLOAT16_MAX:
            raise CacheError(
                f"feature values reach {peak:.3g}, beyond float16's {FLOAT16_MAX:.0f}; "
                "rerun with --store-dtype float32 (a --cut is always float16: cut elsewhere)"
            )
        features = np.asarray(features, dtype=dtype)
        logits = None if logits is None else np.asarray(logits, dtype=dtype)
        layers = {
            name: np.asarray(block, dtype=layer_dtype(name, dtype))
            for name, block in layers.items()
        }
        if set(layers) != set(self.f.get(LAYERS, {})):
            raise CacheError(
                f"rows for layers {sorted(layers)}, but the cache stores "
                f"{sorted(self.f.get(LAYERS, {}))}"
            )
        try:
            self.f["features"][start:stop] = features
            if logits is not None:
                self.f["logits"][start:stop] = logits
            for name, block in layers.items():
                self.f[LAYERS][name][start:stop] = block
            if ok is not None and not ok.all():
                self.f["ok"][start:stop] = ok
            self.f["row_crc"][start:stop] = row_crc(features, logits, layers)
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
        the final name (then fsync the folder). Nothing is marked complete that was not read back.
        """
        assert self.rows_done == self.n_rows, "finish() before every row was written"
        partial = self.partial
        try:
            self.f.attrs.update(attrs or {})
            self.f.attrs["meta_crc"] = meta_crc(
                self.f
            )  # labels, splits, ids, classes: checked where read
            self.f.close()
            fsutil.fsync_path(partial)
            verify(partial)
            with h5py.File(partial, "r+", locking=False) as f:
                f.attrs["complete"] = True
            retired = owned_parts(
                self.path
            )  # a virtual cache replaced by this one: its own parts go with it
            fsutil.replace(partial, self.path)
            for part in retired:
                part.unlink(missing_ok=True)
        except PipelineError:
            raise
        except (OSError, RuntimeError) as exc:
            raise fsutil.explain(exc, partial) from None
        return self.path

    def close(self) -> None:
        _close_quietly(self.f)


def _chunk_rows(n: int, width: int, dtype: np.dtype) -> int:
    return max(1, min(n, CHUNK_BYTES // (width * dtype.itemsize)))


def _file_bytes(ids: list[str], widths: list[int], dtype: np.dtype) -> int:
    """What a new cache file will take: row blocks (features, logits, layers: `widths`, 0 for none)
    rounded up to whole chunks, the per-row datasets, and 64 KiB of HDF5 metadata."""
    n, total = len(ids), 64 << 10
    for width in widths:
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


def verify(path: Path) -> None:
    """Re-read every row and compare it with the CRC stored when it was written. On a mismatch the
    file's `rows_done` goes back to the first bad row, so the rerun rewrites from there."""
    with open_existing(path) as f:
        first = first_bad_row(f)
    if first is None:
        return
    with contextlib.suppress(OSError, RuntimeError), h5py.File(path, "r+", locking=False) as f:
        f.attrs["rows_done"] = first
    raise CacheError(
        f"cache {path} failed verification: row {first} reads back different from what was written "
        "(a full or failing disk?); check the disk and rerun the same command to rewrite from that "
        "row"
    )


def _row_dataset(f: h5py.File, name: str, n: int, width: int, dtype: np.dtype) -> None:
    """An (n, width) dataset in chunks of whole rows, allocated early so row writes never change
    metadata."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    chunks = (_chunk_rows(n, width, dtype), width)
    f.create_dataset(
        name, shape=(n, width), dtype=dtype, chunks=chunks, dcpl=dcpl, fill_time="never"
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
    _row_dataset(f, "features", n, dim, dtype)
    if logits_dim:
        _row_dataset(f, "logits", n, logits_dim, dtype)
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
            "meta_crc": 0,
        }
    )
    for key, value in attrs.items():
        f.attrs[key] = (
            value
            if isinstance(value, str | int | float | bool)
            else json.dumps(value, sort_keys=True)
        )
    f.flush()
