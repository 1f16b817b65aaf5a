"""The sample list: the canonical, ordered (id, label, split) rows that become a cache's rows, with
each image file's identity (size, mtime, optional sha256) and the carving of val/test splits.

Rows are ordered by split (train, val, test) and, within a split, by the source's own order, so
each split is one contiguous block of rows in the cache."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.images import IMAGE_EXTENSIONS, load_image
from pipeline.errors import DataError
from pipeline.splits import SPLITS, hashed_holdout, stratified_holdout

SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}


@dataclass(frozen=True)
class SampleList:
    """The canonical, ordered list of images that becomes the rows of a cache file."""

    ids: list[str]  # stable across machines: a path relative to the source, or "split/index"
    labels: np.ndarray  # (N,) int64 class index
    split: np.ndarray  # (N,) int8 index into SPLITS; non-decreasing
    classes: list[str]
    items: Sequence[Any]  # what `reader` takes: an absolute path, or (split, index)
    reader: Callable[[Any], Image.Image] = load_image
    source: str = ""
    carved: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-row facts of image files (file_size, file_mtime_ns[, file_sha256]); None for in-memory
    # arrays.
    identity: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, row: int, min_short_side: int | None = None) -> Image.Image:
        """The image of `row`; files are decoded reduced to `min_short_side` where the format allows
        (see `images.load_image`)."""
        if min_short_side and (self.reader is load_image or getattr(self.reader, "reduces", False)):
            return self.reader(self.items[row], min_short_side)
        return self.reader(self.items[row])

    def subset(self, start: int, stop: int) -> SampleList:
        """Rows ``start:stop`` (a contiguous shard), same classes and reader."""
        return self.take(np.arange(start, stop))

    def take(self, rows: np.ndarray) -> SampleList:
        """Rows `rows` (increasing, so the split order holds), same classes and reader."""
        return SampleList(
            ids=[self.ids[r] for r in rows],
            labels=self.labels[rows],
            split=self.split[rows],
            classes=self.classes,
            items=[self.items[r] for r in rows],
            reader=self.reader,
            source=self.source,
            carved=self.carved,
            identity=None
            if self.identity is None
            else {k: v[rows] for k, v in self.identity.items()},
        )

    def group_starts(self) -> np.ndarray | None:
        """Rows where another container starts (tar shards: items are (shard, ...) tuples), else
        None."""
        if (
            not self.items
            or not isinstance(self.items[0], tuple)
            or not isinstance(self.items[0][0], str)
        ):
            return None
        shard = [item[0] for item in self.items]
        return np.array(
            [0, *(i for i in range(1, len(shard)) if shard[i] != shard[i - 1])], dtype=np.int64
        )

    def split_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.split, minlength=len(SPLITS))
        return {name: int(n) for name, n in zip(SPLITS, counts, strict=True)}

    def digest(self) -> str:
        """sha256 over ids, labels, splits, classes and each file's size and modification time (and
        content hash with --verify-content): the identity of the image set."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.split, dtype="i1").tobytes())
        for sample_id in self.ids:
            h.update(sample_id.encode() + b"\0")
        for key, values in sorted((self.identity or {}).items()):
            h.update(key.encode() + np.ascontiguousarray(values).tobytes())
        return h.hexdigest()


def finalize(
    ids: list[str],
    items: Sequence[Any],
    labels: Sequence[int],
    splits: Sequence[str],
    classes: list[str],
    source: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    reader: Callable[[Any], Image.Image] = load_image,
    verify_content: bool = False,
    rule: str = "stratified",
    identity: dict[str, np.ndarray] | None = None,
) -> SampleList:
    """Carve missing val/test splits out of train (`rule`: stratified or hash, see
    `pipeline.splits`), then order rows by split. `identity`: per-row facts of sources that are not
    files (tar members)."""
    if not ids:
        raise DataError(
            f"{source} holds no images; add images (extensions: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    present = sorted(set(labels))
    if len(present) < 2:
        only = ", ".join(classes[c] for c in present)
        raise DataError(
            f"{source} has {len(present)} class ({only}); a classifier needs at least two classes"
        )
    labels_arr = np.asarray(labels, dtype=np.int64)
    split = np.array([SPLITS.index(s) for s in splits], dtype=np.int8)
    carved: dict[str, dict[str, Any]] = {}
    for name, fraction, salt in (("test", test_fraction, 2), ("val", val_fraction, 1)):
        code = SPLITS.index(name)
        if (split == code).any() or fraction == 0:
            continue
        train_rows = np.flatnonzero(split == 0)
        if rule == "hash":
            held = hashed_holdout(
                [ids[i] for i in train_rows], labels_arr[train_rows], fraction, seed, salt
            )
        else:
            held = stratified_holdout(labels_arr[train_rows], fraction, seed, salt)
        if held.any():
            split[train_rows[held]] = code
            carved[name] = {"from": "train", "fraction": fraction, "seed": seed, "stratified": True}
            if rule == "hash":  # (stratified caches keep their old record, so they stay current)
                carved[name]["rule"] = "hash of each id (stable as images are added)"
    order = np.argsort(split, kind="stable")
    items = [items[i] for i in order]
    files = all(isinstance(item, str) for item in items)
    return SampleList(
        ids=[ids[i] for i in order],
        labels=labels_arr[order],
        split=split[order],
        classes=classes,
        items=items,
        reader=reader,
        source=source,
        carved=carved,
        identity=file_identity(items, verify_content)
        if files
        else (
            None if identity is None else {key: values[order] for key, values in identity.items()}
        ),
    )


def file_identity(paths: Sequence[str], content: bool = False) -> dict[str, np.ndarray]:
    """Each file's size and modification time (and sha256 of its bytes when `content`). Refuses,
    naming the file, anything that is not a readable regular file (a FIFO would hang the reader)."""
    sizes = np.empty(len(paths), dtype=np.int64)
    mtimes = np.empty(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc.strerror}; fix or remove it") from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(
                f"image {path} is not a regular file (a FIFO, socket or device?); remove it from "
                "the data"
            )
        if not os.access(path, os.R_OK):
            raise DataError(
                f"image {path} is not readable (permission denied); fix its permissions or remove "
                "it"
            )
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    identity = {"file_size": sizes, "file_mtime_ns": mtimes}
    if content:
        identity["file_sha256"] = np.array([_sha256(p).encode() for p in paths], dtype="S64")
    return identity


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def describe_changes(old: dict[str, np.ndarray], new: SampleList, most: int = 5) -> str:
    """Which files were added, removed or changed (label, split, size, time, content) between the
    rows a cache recorded (`reader.stored_rows`) and a new sample list; "" when the rows are equal.
    """
    before = {str(i): row for row, i in enumerate(old["ids"])}
    after = {i: row for row, i in enumerate(new.ids)}
    added = [i for i in new.ids if i not in before]
    removed = [i for i in before if i not in after]
    changed = []
    for sample_id, row in after.items():
        if sample_id not in before:
            continue
        o = before[sample_id]
        what = [
            name
            for name, a, b in (
                ("label", old["labels"][o], new.labels[row]),
                ("split", old["split"][o], new.split[row]),
            )
            if a != b
        ]
        for key in ("file_size", "file_mtime_ns", "file_sha256"):
            if (
                key in old
                and new.identity
                and key in new.identity
                and old[key][o] != new.identity[key][row]
            ):
                what.append(
                    {"file_size": "size", "file_mtime_ns": "modified", "file_sha256": "content"}[
                        key
                    ]
                )
        if what:
            changed.append(f"{sample_id} ({', '.join(what)})")
    parts = [
        f"{label} {len(found)}: {', '.join(found[:most])}{', ...' if len(found) > most else ''}"
        for label, found in (("changed", changed), ("added", added), ("removed", removed))
        if found
    ]
    return "; ".join(parts)
