"""Reading complete caches: `open_cache`, the arrays per split (`read_features`), what the head
stage needs before reading any features (`cache_info`, a `CacheInfo`), and what `pipeline info`
shows (`summary`). Every open goes through `schema.open_existing`, so what a file claims is checked
once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cache.schema import (
    LAYERS,
    columns,
    first_bad_row,
    json_attr,
    meta_crc,
    open_existing,
    partial_path,
    read_columns,
    read_ids,
    reading,
    row_ranges,
)
from pipeline.errors import CacheError, MissingError
from pipeline.registry import CUT_PREFIX
from pipeline.splits import SPLITS


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
    return MissingError(
        f"no cache at {path}; build it with `pipeline features --data YOUR_IMAGES --out {path}` "
        "(`make features` builds the offline demo's)"
    )


def open_cache(path: str | Path) -> h5py.File:
    """Open a complete cache for reading, or say precisely why it cannot be read."""
    path = Path(path)
    if not path.exists():
        partial = partial_path(path)
        if partial.exists():
            with open_existing(partial) as f:
                done, n = int(f.attrs.get("rows_done", 0)), f["features"].shape[0]
            raise CacheError(
                f"cache {path} is incomplete ({done} of {n} rows in {partial}); "
                "rerun the same `pipeline features` command to resume it"
            )
        raise _no_cache(path)
    f = open_existing(path)
    if not bool(f.attrs.get("complete")):
        done, n = int(f.attrs.get("rows_done", 0)), f["features"].shape[0]
        f.close()
        raise CacheError(
            f"cache {path} is incomplete ({done} of {n} rows); rerun `pipeline features` to resume "
            "it"
        )
    return f


def check_rows(path: str | Path) -> None:
    """Every stored row still reads back as written (its CRC): a row edited or damaged after the
    cache was finished is refused where it would be read, never trained on or copied with a fresh
    CRC."""
    with open_cache(path) as f, reading(Path(path)):
        if "meta_crc" in f.attrs and int(np.asarray(f.attrs["meta_crc"]).item()) != meta_crc(f):
            raise CacheError(
                f"cache {path}: its labels, splits, ids or class names no longer read back as they "
                "were written "
                "(their checksum differs: the file was edited or the disk is failing); rebuild it "
                "with "
                "`pipeline features --force`"
            )
        bad = first_bad_row(f)
        if bad is None:
            return
        sample = read_ids(f["ids"], bad, bad + 1)[0]
    raise CacheError(
        f"cache {path}: row {bad} ({sample}) no longer reads back as it was written (its CRC "
        "differs: the file "
        "was edited or the disk is failing); rebuild it with `pipeline features --force`"
    )


def stored_fingerprint(path: str | Path) -> dict[str, Any] | None:
    """The fingerprint of a complete cache at `path`, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    with open_existing(path) as f:
        return json_attr(f, "fingerprint") if bool(f.attrs.get("complete")) else None


def partial_state(path: str | Path) -> tuple[dict[str, Any], int, int] | None:
    """(fingerprint, rows done, rows) of ``PATH.partial``, or None when there is none or it is
    unreadable."""
    partial = partial_path(path)
    if not partial.exists():
        return None
    try:
        with open_existing(partial) as f:
            return (
                json_attr(f, "fingerprint"),
                int(f.attrs.get("rows_done", 0)),
                int(f["features"].shape[0]),
            )
    except CacheError:
        return None


def stored_rows(path: str | Path) -> dict[str, np.ndarray]:
    """Each row's identity as the cache recorded it: ids, labels, split, whether it was read (ok),
    and file size, mtime, sha256 where recorded. Lets a rebuild say which files changed, and an
    update reuse rows."""
    with open_existing(Path(path)) as f:
        rows = {
            "ids": read_ids(f["ids"]),
            "labels": f["labels"][...],
            "split": f["split"][...],
            "ok": f["ok"][...],
        }
        for key in ("file_size", "file_mtime_ns", "file_sha256"):
            if key in f:
                rows[key] = f[key][...]
        return rows


def read_features(
    path: str | Path,
    splits: tuple[str, ...] = SPLITS,
    dtype: Any = None,
    include_logits: bool = False,
    layer: str | None = None,
    verify: bool = True,
) -> FeatureSet:
    """Load a complete cache: arrays per split (skipped images left out) plus its metadata.

    ``verify`` (default) first checks every stored row's CRC and the checksum of the labels, ids,
    splits and class names, as the head stage does: an edited or damaged file is a CacheError.

    ``dtype`` converts features while reading (e.g. ``np.float32`` from float16 storage); ``layer``
    reads a layer stored with ``--layers`` (or several, comma-separated and concatenated) instead of
    the penultimate features.
    """
    if verify:
        check_rows(path)
    with open_cache(path) as f, reading(Path(path)):
        datasets = [f["logits"]] if include_logits else columns(f, layer)
        split_codes = f["split"][...]
        ok = f["ok"][...]
        out: dict[str, Split] = {}
        for name, (a, b) in row_ranges(split_codes).items():
            if name not in splits or a == b:
                continue
            X = read_columns(datasets, a, b, dtype)
            y, ids = f["labels"][a:b], read_ids(f["ids"], a, b)
            keep = ok[a:b]
            if not keep.all():
                X, y, ids = X[keep], y[keep], ids[keep]
            out[name] = Split(X=X, y=y, ids=ids)
        return FeatureSet(
            path=Path(path),
            classes=list(f["classes"].asstr()[...]),
            splits=out,
            fingerprint=json_attr(f, "fingerprint"),
            config=json_attr(f, "config"),
            skipped=[] if ok.all() else list(read_ids(f["ids"])[~ok]),
            attrs={k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
        )


@dataclass(frozen=True)
class CacheInfo:
    """What the head stage knows about a cache before reading any features: its identity, shape and
    row ranges, and the labels per split (readable rows only) with the class names."""

    path: str
    classes: list[str]
    labels: dict[str, np.ndarray]  # per split, readable rows only
    fingerprint: dict[str, Any]
    config: dict[str, Any]
    extract_seconds: float | None
    dim: int
    ranges: dict[str, tuple[int, int]]  # file rows of each split (readable or not)
    rows: dict[str, int]  # readable rows per split


def cache_info(path: str | Path, layer: str | None = None) -> CacheInfo:
    """The `CacheInfo` of a complete cache (reads labels and attributes, no features); `dim` is that
    of `layer` (see `read_features`)."""
    with open_cache(path) as f, reading(Path(path)):
        split_codes, ok, labels = f["split"][...], f["ok"][...], f["labels"][...]
        return CacheInfo(
            path=str(path),
            classes=list(f["classes"].asstr()[...]),
            labels={name: labels[(split_codes == code) & ok] for code, name in enumerate(SPLITS)},
            fingerprint=json_attr(f, "fingerprint"),
            config=json_attr(f, "config"),
            extract_seconds=float(f.attrs["extract_seconds"])
            if "extract_seconds" in f.attrs
            else None,
            dim=sum(int(d.shape[1]) for d in columns(f, layer)),
            ranges=row_ranges(split_codes),
            rows={
                name: int((ok & (split_codes == code)).sum()) for code, name in enumerate(SPLITS)
            },
        )


def _display_record(f: h5py.File, key: str) -> dict[str, Any]:
    """An attribute only shown, never relied on: a JSON object, or {} when it is anything else."""
    try:
        value = json_attr(f, key)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def summary(path: str | Path) -> dict[str, Any]:
    """What `pipeline info` shows; for a cache still being written, the partial file's state."""
    path = Path(path)
    if not path.exists() and partial_path(path).exists():
        path = partial_path(path)
    if not path.exists():
        raise _no_cache(path)
    with open_existing(path) as f, reading(path):
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
            "layers": {name: tuple(d.shape) for name, d in f.get(LAYERS, {}).items()},
            "cuts": [name for name in f.get(LAYERS, {}) if name.startswith(CUT_PREFIX)],
            "classes": list(f["classes"].asstr()[...]),
            "splits": {name: int(n) for name, n in zip(SPLITS, counts, strict=True)},
            "skipped": list(read_ids(f["ids"])[~ok]),
            "fingerprint": json_attr(f, "fingerprint"),
            "carved": json_attr(f, "carved"),
            "precision_choice": _display_record(f, "precision_choice"),
            "versions": json_attr(f, "versions"),
            "created": str(f.attrs.get("created", "")),
            "source": str(f.attrs.get("source", "")),
        }
