"""Caches made of parts: a virtual cache over complete part files, and `pack` back into one file.

`assemble` makes ``OUT`` an HDF5 virtual dataset file (``h5py.VirtualLayout``): every per-row
dataset maps, part by part, onto the parts' own datasets by their names relative to ``OUT``'s
folder, so the cache and its parts move together. It writes only metadata, in time proportional
to the number of parts, not rows. Every reader sees an ordinary cache; `schema.open_existing`
refuses one whose part is missing (HDF5 would read fill values in silence). `pack` copies any cache,
virtual or not, into one self-contained file through the ordinary writer (CRC per row, verified,
renamed into place).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import fsutil
from pipeline.cache import reader
from pipeline.cache.schema import (
    LAYERS,
    SCHEMA_VERSION,
    block_rows,
    discard_partial,
    json_attr,
    meta_crc,
    open_existing,
    owned_parts,
    part_files,
    partial_path,
    read_ids,
)
from pipeline.cache.writer import CacheWriter
from pipeline.errors import CacheError
from pipeline.splits import SPLITS

ROW_DATASETS = (
    "features",
    "logits",
    "labels",
    "ids",
    "split",
    "ok",
    "row_crc",
    "file_size",
    "file_mtime_ns",
    "file_sha256",
)
BLOCK_ROWS = 8192


def row_datasets(f: h5py.File) -> list[str]:
    return [name for name in ROW_DATASETS if name in f] + [
        f"{LAYERS}/{name}" for name in f.get(LAYERS, {})
    ]


def assemble(
    out: Path, parts: list[Path], fingerprint: Mapping[str, Any], attrs: Mapping[str, Any]
) -> Path:
    """``OUT`` as a virtual cache over the complete caches `parts`, in order; marked complete,
    renamed into place. The parts of a virtual cache that ``OUT`` was before are removed once it is
    replaced (only those it wrote itself: `schema.owned_parts`)."""
    partial = partial_path(out)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(reader.open_cache(p)) for p in parts]
        first, n = files[0], sum(f["features"].shape[0] for f in files)
        discard_partial(partial)
        with h5py.File(partial, "w", locking=False) as f:
            for name in row_datasets(first):
                widest = max((g[name].dtype for g in files), key=lambda d: d.itemsize)
                layout = h5py.VirtualLayout(shape=(n, *first[name].shape[1:]), dtype=widest)
                start = 0
                for part, g in zip(parts, files, strict=True):
                    rows = g[name].shape[0]
                    if rows:
                        relative = os.path.relpath(part, out.parent)
                        layout[start : start + rows] = h5py.VirtualSource(
                            relative, name, shape=g[name].shape
                        )
                    start += rows
                f.create_virtual_dataset(name, layout)
            f["split"].attrs["names"] = list(SPLITS)
            f.create_dataset(
                "classes",
                data=np.array(first["classes"].asstr()[...], dtype=object),
                dtype=h5py.string_dtype(),
            )
            f.attrs.update(
                {
                    "schema_version": SCHEMA_VERSION,
                    "fingerprint": json.dumps(dict(fingerprint), sort_keys=True),
                    "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "complete": False,
                    "rows_done": n,
                }
            )
            for key, value in attrs.items():
                f.attrs[key] = (
                    value
                    if isinstance(value, str | int | float | bool)
                    else json.dumps(value, sort_keys=True)
                )
    return _finish(partial, out)


def _finish(partial: Path, out: Path) -> Path:
    """Check the new file as a reader will, mark it complete, and swap it in; retire the parts of
    the virtual cache it replaces that it does not use itself."""
    fsutil.fsync_path(partial)
    with open_existing(partial) as f:
        using = set(part_files(f, partial))
    with h5py.File(partial, "r+", locking=False) as f:
        f.attrs["meta_crc"] = meta_crc(f)
        f.attrs["complete"] = True
    retired = set(owned_parts(out))
    fsutil.replace(partial, out)
    for part in retired - using:
        part.unlink(missing_ok=True)
    return out


def same_cache(path: Path, out: Path) -> bool:
    """`out` is the cache at `path` itself, or holds the same features (equal fingerprints): `pack`
    may replace it without --force. Any other file at `out` is someone else's."""
    if not out.is_file():
        return False
    if path.exists() and os.path.samefile(path, out):
        return True
    try:
        theirs, ours = reader.stored_fingerprint(out), reader.stored_fingerprint(path)
    except CacheError:
        return False
    return theirs is not None and theirs == ours


def pack(path: Path, out: Path, report: Any = lambda message: None) -> Path:
    """One self-contained cache file with every row and attribute of the cache at `path` (each
    checked against its stored CRC first: a pack never vouches for a changed row with a fresh CRC).
    """
    reader.check_rows(path)
    with fsutil.locked(out):  # one writer at a time, as for a features run
        return _pack(path, out, report)


def _pack(path: Path, out: Path, report: Any) -> Path:
    with reader.open_cache(path) as f:
        identity = {k: f[k][...] for k in ("file_size", "file_mtime_ns", "file_sha256") if k in f}
        attrs = {
            k: json_attr(f, k)
            if k in ("config", "versions", "carved", "distributed")
            else f.attrs[k]
            for k in ("config", "versions", "carved", "source", "distributed")
            if k in f.attrs
        }
        layers = {name: f[LAYERS][name].shape[1] for name in f.get(LAYERS, {})}
        writer = CacheWriter.open(
            out,
            fingerprint=json_attr(f, "fingerprint"),
            ids=list(read_ids(f["ids"])),
            labels=f["labels"][...],
            split=f["split"][...],
            classes=list(f["classes"].asstr()[...]),
            dim=f["features"].shape[1],
            store_dtype=str(f["features"].dtype),
            logits_dim=f["logits"].shape[1] if "logits" in f else None,
            attrs=attrs,
            identity=identity,
            layer_dims=layers,
            report=report,
        )
        timings = {k: f.attrs[k] for k in ("extract_seconds", "extract_rows") if k in f.attrs}
        try:
            copy_rows([f], writer)
        except BaseException:
            writer.close()
            raise
    # the source is closed first: packed in place, its parts are removed once the file replaces it
    try:
        done = writer.finish(timings)
    finally:
        writer.close()
    report(f"packed {path} into {done} ({done.stat().st_size / 1e6:.1f} MB, one file)")
    return done


def copy_rows(files: list[h5py.File], writer: CacheWriter) -> None:
    """Every row of `files`, in order, through `writer` (from the row it has reached: a resumed
    copy)."""
    offset = 0
    for f in files:
        rows = f["features"].shape[0]
        step = block_rows(f, BLOCK_ROWS)
        for a in range(max(0, writer.rows_done - offset), rows, step):
            b = min(a + step, rows)
            logits = f["logits"][a:b] if "logits" in f else None
            layers = {name: f[LAYERS][name][a:b] for name in f.get(LAYERS, {})}
            writer.write(offset + a, f["features"][a:b], f["ok"][a:b], logits, layers)
        offset += rows
