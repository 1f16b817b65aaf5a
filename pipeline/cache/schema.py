"""The cache file: one self-describing HDF5 file per (image set, backbone, weights, preprocessing,
precision). No torch here, so the head stage can read caches without importing it.

Datasets
    features (N, D) float32|float16, chunked by rows, allocated up front (writes touch no metadata)
    labels (N,) int64 · ids (N,) str · split (N,) int8 (attr ``names``) · classes (C,) str
    ok (N,) bool (False for images skipped as unreadable) · logits (N, K) when asked for
    layers/<name> (N, D_name): with --layers, the global-average-pooled output of each named module
    row_crc (N,) uint32: CRC-32 of each stored row (features, logits, then layers by name),
    re-read and checked before `complete` is set
    file_size, file_mtime_ns (N,) int64 and file_sha256 (N,) with --verify-content: what each image
    file was when it was read, so a rebuild can name the files that changed
Attributes
    schema_version · fingerprint (JSON; equal fingerprints mean equal features) · config (JSON)
    versions (JSON) · created · complete · rows_done · carved (JSON) · source

This module owns the layout: its constants, `validate` (the whole schema, checked once where a file
is opened) and the low-level dataset reads every other module uses.

A run writes ``NAME.partial`` and renames it to ``NAME`` only once every row has been read back
against its CRC and the file fsynced; an interrupted run resumes at ``rows_done``. ``NAME.lock``
keeps two runs from writing the same cache. `validate` checks the whole schema once, on open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import CacheError, PipelineError
from pipeline.registry import CUT_PREFIX
from pipeline.splits import SPLITS

SCHEMA_VERSION = 1
FEATURES = "features"  # the dataset of the penultimate vector
PENULTIMATE = (
    "penultimate"  # how `head --layer` names it (a backbone may have a module called `features`)
)
LAYERS = "layers"  # group of the other stored layers, one (N, D) dataset each


CHUNK_BYTES = (
    4 << 20
)  # rows per chunk: ~4 MiB; read speed is flat from 1 to 64 MiB, writes a bit faster


FLOAT16_MAX = float(np.finfo(np.float16).max)


def layer_dtype(name: str, store_dtype: str | np.dtype) -> np.dtype:
    """How stored layer `name` is kept: a cut (`cut:MODULE`) in float16, others as the features."""
    return np.dtype(np.float16) if name.startswith(CUT_PREFIX) else np.dtype(store_dtype)


def partial_path(path: str | Path) -> Path:
    return Path(f"{path}.partial")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: Path) -> bool:
    """A regular file (not a link) that starts with HDF5's signature."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with path.open("rb") as fh:
            return fh.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def discard_partial(partial: Path) -> None:
    """Remove a partial cache this program left (an HDF5 file, not a link); whatever else sits at
    that name is someone's, and is refused in one line, never deleted."""
    if not partial.exists() and not partial.is_symlink():
        return
    if not is_hdf5(partial):
        raise CacheError(
            f"{partial} exists and is not a partial cache of this program; move it away (or pass "
            "another --out)"
        )
    partial.unlink()


def views_path(path: str | Path) -> Path:
    """cache/x.h5 -> cache/x.views.h5: the companion cache of the augmented train views of cache
    `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.views{path.suffix or '.h5'}")


def json_attr(f: h5py.File, key: str) -> Any:
    return json.loads(f.attrs[key]) if key in f.attrs else {}


def fingerprint_tag(fingerprint: Mapping[str, Any], length: int = 16) -> str:
    """A short hash of a whole fingerprint: names the state of a cache (its views, its torchrun
    parts)."""
    return hashlib.sha256(json.dumps(dict(fingerprint), sort_keys=True).encode()).hexdigest()[
        :length
    ]


ROW_KEYS = (
    "samples",
    "rows",
    "views_of",
)  # the fingerprint's row part; every other key describes the model


def model_part(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A fingerprint without its row part: equal model parts mean the same features for the same
    image."""
    return {k: v for k, v in fingerprint.items() if k not in ROW_KEYS}


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Every key whose value differs, as ``key: old -> new``."""
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
        for k in keys
        if old.get(k) != new.get(k)
    ]


def part_files(f: h5py.File, path: Path) -> list[Path]:
    """The files a virtual cache reads its rows from (as stored: relative to the cache's folder); []
    for an ordinary cache."""
    found: dict[str, None] = {}  # in order, once each

    def visit(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset) and item.is_virtual:
            found.update(dict.fromkeys(source.file_name for source in item.virtual_sources()))

    f.visititems(visit)
    return [Path(path).parent / name for name in found if name != "."]


def parts_of(path: Path) -> list[Path]:
    """The part files the virtual cache at `path` reads ([] when it is absent, unreadable or
    ordinary)."""
    if not Path(path).is_file():
        return []
    try:
        with _peek(path) as f:
            return part_files(f, path)
    except OSError:
        return []


def _peek(path: Path) -> h5py.File:
    """`path` opened read-only, whether this process holds it open already (as `open_existing` opens
    it: HDF5 refuses a second open with other locking flags) or not (another process may be
    writing)."""
    try:
        return h5py.File(path, "r")
    except OSError:
        return h5py.File(path, "r", locking=False)


def part_name(out: Path, fingerprint: Mapping[str, Any], rank: int, size: int) -> Path:
    """Where rank `rank` of `size` writes its part of the cache `out` with `fingerprint`
    (torchrun)."""
    return Path(f"{out}.part-{fingerprint_tag(fingerprint, 8)}-{rank:03d}-of-{size:03d}")


def whole_fingerprint(part_fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """A part's fingerprint without its ``shard`` key: the fingerprint of the cache it is a part
    of."""
    return {k: v for k, v in part_fingerprint.items() if k != "shard"}


def _fingerprint_of(path: Path) -> dict[str, Any] | None:
    try:
        with _peek(path) as f:
            value = json.loads(f.attrs["fingerprint"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def owned_parts(path: Path) -> list[Path]:
    """The parts of the virtual cache at `path` that replacing it may delete.

    Those are files this project wrote for it: beside it, named after it and its fingerprint tag,
    holding that fingerprint, and read by no other cache in the folder. Whatever else a crafted
    cache names as a part is left alone.
    """
    path = Path(path)
    parts = parts_of(path)
    fingerprint = _fingerprint_of(path) if parts else None
    if not fingerprint:
        return []
    named = re.compile(
        re.escape(f"{path.name}.part-{fingerprint_tag(fingerprint, 8)}-") + r"\d{3}-of-\d{3}"
    )
    folder = path.parent.resolve()
    mine = [
        part
        for part in parts
        if named.fullmatch(part.name)
        and not part.is_symlink()
        and part.is_file()
        and part.parent.resolve() == folder
        and whole_fingerprint(_fingerprint_of(part) or {"shard": None}) == fingerprint
    ]
    if not mine:
        return []
    others: set[Path] = set()
    for entry in folder.iterdir():
        if (
            entry.name == path.name
            or ".part-" in entry.name
            or entry.suffix in (".partial", ".lock")
        ):
            continue
        others.update(p.resolve() for p in parts_of(entry))
    return [part for part in mine if part.resolve() not in others]


def _check_parts(f: h5py.File, path: Path) -> None:
    """Each part of a virtual cache is there (HDF5 would read fill values in silence for a missing
    one) and holds rows of this very cache (its fingerprint, less its shard, is the cache's)."""
    parts = part_files(f, path)
    if not parts:
        return
    fingerprint = json_attr(f, "fingerprint")
    shards: dict[str, Path] = {}
    for part in parts:
        if not part.is_file():
            raise CacheError(
                f"cache {path} reads its rows from {part}, which is missing or was moved; put the "
                "part files back "
                "beside the cache (keep them together when moving it), or rebuild it"
            )
        stored = _fingerprint_of(part)
        if stored is None or whole_fingerprint(stored) != fingerprint:
            differs = fingerprint_diff(fingerprint, whole_fingerprint(stored or {}))
            raise CacheError(
                f"cache {path} reads its rows from {part}, which holds rows of another cache "
                f"({'; '.join(differs[:3]) or 'no fingerprint'}); put back the parts written with "
                "it, or rebuild it"
            )
        shard = str(stored.get("shard"))
        if shard in shards:  # one part copied over another: the same rows twice, another's missing
            raise CacheError(
                f"cache {path} reads the same shard ({shard}) from {shards[shard]} and {part}; put "
                "back the parts "
                "written with it, or rebuild it"
            )
        shards[shard] = part


def open_existing(path: Path, mode: str = "r") -> h5py.File:
    """Open a cache file and check everything it claims (see `validate`), or say why it cannot be
    read."""
    if path.is_dir():
        raise CacheError(
            f"{path} is a folder, not a cache file; pass the .h5 file inside it or another path"
        )
    if path.exists() and not path.is_file():  # a FIFO or a device would block the read forever
        raise CacheError(
            f"{path} is not a regular file (a pipe or a device?); pass a cache file written by "
            "`pipeline features`"
        )
    try:
        # No chunk cache when reading: whole-chunk reads then go straight into the caller's array.
        f = h5py.File(path, mode, rdcc_nbytes=0 if mode == "r" else 1 << 20)
    except BlockingIOError:
        raise CacheError(
            f"cache {path} is open for writing by another process; wait for it to finish"
        ) from None
    except OSError as exc:
        reason = str(exc).split("(")[-1].rstrip(")") if "(" in str(exc) else str(exc)
        raise CacheError(
            f"{path} is not a feature cache: not a readable HDF5 file ({reason}); check the path "
            "(a cache is the "
            "file `pipeline features` writes), or rebuild it there with `pipeline features --force`"
        ) from None
    try:
        with reading(path):
            validate(f, path)
            _check_parts(f, path)
    except BaseException:
        f.close()
        raise
    return f


# What h5py (and decoding what it returns) raises on a file whose structure is damaged
DAMAGED = (KeyError, RuntimeError, OSError, UnicodeDecodeError, ValueError, TypeError, IndexError)


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Reading a cache someone may have damaged: an HDF5 structure that does not read back is one
    CacheError naming the file, never h5py's traceback."""
    try:
        yield
    except PipelineError:  # already one line, said by the code reading the cache
        raise
    except DAMAGED as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the file system's own refusal (permissions, a full disk): said as such
        reason = (str(exc).strip().splitlines() or [""])[0][:120]
        raise malformed(path, f"its HDF5 structure does not read back ({reason})") from None


def malformed(path: Path, what: str) -> CacheError:
    return CacheError(
        f"cache {path} is malformed: {what}; rebuild it with `pipeline features --force`"
    )


def validate(f: h5py.File, path: Path) -> None:
    """Check the whole schema once, where a cache is opened: every dataset with its shape, dtype and
    value range, and every JSON attribute. Readers after this can trust what the file says."""
    version = f.attrs.get("schema_version")
    if version is None or "features" not in f:
        raise CacheError(
            f"{path} is an HDF5 file but not a feature cache; point at a file written by `pipeline "
            "features`"
        )
    try:
        version = int(np.asarray(version).item())
    except (TypeError, ValueError):
        raise malformed(path, f"schema_version {version!r} is not an integer") from None
    if version != SCHEMA_VERSION:
        raise CacheError(
            f"cache {path} has schema version {version}, this pipeline reads version "
            f"{SCHEMA_VERSION}; "
            "rebuild it with `pipeline features --force`"
        )
    missing = [
        k
        for k in ("features", "labels", "ids", "split", "classes", "ok")
        if not isinstance(f.get(k), h5py.Dataset)
    ]
    if missing:
        raise malformed(path, f"dataset(s) {', '.join(missing)} missing")
    features = f["features"]
    if features.ndim != 2 or features.dtype.kind != "f" or features.shape[1] == 0:
        raise malformed(
            path, f"features are {features.shape} {features.dtype}, expected (rows, dim) floats"
        )
    n = features.shape[0]
    kinds = {"labels": "iu", "split": "iu", "ok": "b", "ids": "SOU"}
    optional = {"file_size": "iu", "file_mtime_ns": "iu", "file_sha256": "SO", "row_crc": "u"}
    for key, kind in [*kinds.items(), *((k, v) for k, v in optional.items() if k in f)]:
        d = f[key]
        if (
            not isinstance(d, h5py.Dataset)
            or d.ndim != 1
            or d.shape[0] != n
            or d.dtype.kind not in kind
        ):
            shape = getattr(d, "shape", "a group")
            raise malformed(
                path,
                f"{key} is {shape} {getattr(d, 'dtype', '')}, expected {n} rows to match features",
            )
    classes = f["classes"]
    if classes.ndim != 1 or h5py.check_string_dtype(classes.dtype) is None:
        raise malformed(
            path, f"classes is {classes.shape} {classes.dtype}, expected a list of names"
        )
    if "logits" in f and (
        not isinstance(f["logits"], h5py.Dataset)
        or f["logits"].ndim != 2
        or f["logits"].shape[0] != n
    ):
        raise malformed(
            path, f"logits are {getattr(f['logits'], 'shape', 'a group')}, expected {n} rows"
        )
    try:
        claims = json.loads(f.attrs.get("fingerprint", "{}"))
    except (TypeError, ValueError):
        claims = {}
    if isinstance(claims, dict) and claims.get("logits") is True and "logits" not in f:
        raise malformed(path, "its fingerprint says it holds logits, and it has no logits dataset")
    layers = f.get(LAYERS, {})
    if not isinstance(layers, h5py.Group | dict):
        raise malformed(path, f"{LAYERS} is not a group of datasets")
    for name, d in layers.items():
        if (
            not isinstance(d, h5py.Dataset)
            or d.ndim != 2
            or d.shape[0] != n
            or d.dtype.kind != "f"
            or not d.shape[1]
            or (name.startswith(CUT_PREFIX) and d.dtype != np.float16)
        ):
            shape = getattr(d, "shape", "a group")
            raise malformed(
                path,
                f"{LAYERS}/{name} is {shape} {getattr(d, 'dtype', '')}, expected ({n}, dim) floats",
            )
    labels, split = f["labels"][...], f["split"][...]
    if n and (labels.min() < 0 or labels.max() >= len(classes)):
        bad = int(np.flatnonzero((labels < 0) | (labels >= len(classes)))[0])
        raise malformed(
            path, f"label {labels[bad]} at row {bad} is outside the {len(classes)} class names"
        )
    if n and (split.min() < 0 or split.max() >= len(SPLITS)):
        bad = int(np.flatnonzero((split < 0) | (split >= len(SPLITS)))[0])
        raise malformed(
            path,
            f"split code {split[bad]} at row {bad} is not one of 0, 1, 2 ({', '.join(SPLITS)})",
        )
    for key in ("fingerprint", "config", "carved", "versions"):
        if key in f.attrs:
            try:
                value = json.loads(f.attrs[key])
            except (TypeError, ValueError):
                raise malformed(path, f"attribute {key} is not JSON") from None
            if not isinstance(value, dict):
                raise malformed(
                    path, f"attribute {key} is {type(value).__name__}, expected a JSON object"
                )
    try:
        done = int(np.asarray(f.attrs.get("rows_done", 0)).item())
    except (TypeError, ValueError):
        raise malformed(path, "rows_done is not an integer") from None
    if not 0 <= done <= n:
        raise malformed(path, f"rows_done {done} is outside 0..{n}")


def columns(f: h5py.File, layer: str | None = None) -> list[h5py.Dataset]:
    """The datasets a head reads as its features: the penultimate vector (the default, named
    `penultimate`), a stored layer, or several names joined by commas (their columns concatenated in
    that order)."""
    stored = list(f[LAYERS]) if LAYERS in f else []
    found = []
    for name in (layer or PENULTIMATE).split(","):
        name = name.strip()
        if name == PENULTIMATE:
            found.append(f[FEATURES])
        elif name in stored:
            found.append(f[LAYERS][name])
        else:
            have = ", ".join(stored) if stored else "none (it was built without --layers)"
            rebuild = (
                f"--cut {name.removeprefix(CUT_PREFIX)}"
                if name.startswith(CUT_PREFIX)
                else f"--layers {name}"
            )
            raise CacheError(
                f"cache {f.filename} has no layer {name!r}; its layers: {have}, and "
                f"{PENULTIMATE!r} (the features); "
                f"pass one of those to --layer, or rebuild it with `pipeline features {rebuild}`"
            )
    return found


def read_columns(
    datasets: list[h5py.Dataset], start: int, stop: int, dtype: Any = None
) -> np.ndarray:
    """Rows ``start:stop`` of each dataset, side by side (one dataset: one read straight into the
    result)."""
    if len(datasets) == 1:
        return read_block(datasets[0], start, stop, dtype)
    return np.hstack([read_block(d, start, stop, dtype) for d in datasets])


def row_ranges(split: np.ndarray) -> dict[str, tuple[int, int]]:
    """Rows are sorted by split, so each split is one contiguous range."""
    if np.any(np.diff(split) < 0):
        raise CacheError(
            "cache rows are not ordered by split; rebuild it with `pipeline features --force`"
        )
    return {
        name: (
            int(np.searchsorted(split, code, "left")),
            int(np.searchsorted(split, code, "right")),
        )
        for code, name in enumerate(SPLITS)
    }


def read_ids(dataset: h5py.Dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Sample ids ``start:stop`` as a str array, from fixed-length (fast path) or variable-length
    storage."""
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


def row_crc(
    features: np.ndarray,
    logits: np.ndarray | None = None,
    layers: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """(B,) CRC-32 of each row's stored bytes (features, then logits, then each layer by name): what
    verification re-reads."""
    blocks = [
        features,
        *([] if logits is None else [logits]),
        *(layers[k] for k in sorted(layers or {})),
    ]
    out = np.empty(len(features), dtype=np.uint32)
    for i in range(len(features)):
        crc = 0
        for block in blocks:
            crc = zlib.crc32(np.ascontiguousarray(block[i]).tobytes(), crc)
        out[i] = crc
    return out


def meta_crc(f: h5py.File) -> int:
    """CRC-32 of what each row is besides its vectors: labels, split, ok, ids, and the class names.
    Stored as the `meta_crc` attribute when a cache is finished; `reader.check_rows` compares it."""
    crc = zlib.crc32(np.ascontiguousarray(f["labels"][...], dtype="<i8").tobytes())
    crc = zlib.crc32(np.ascontiguousarray(f["split"][...], dtype="i1").tobytes(), crc)
    crc = zlib.crc32(np.ascontiguousarray(f["ok"][...], dtype=bool).tobytes(), crc)
    for name in ("ids", "classes"):
        for value in read_ids(f[name]):
            crc = zlib.crc32(str(value).encode() + b"\0", crc)
    return crc


BLOCK_BYTES = 64 * 2**20  # what one block of whole rows holds at most when rows are copied or read


def block_rows(f: h5py.File, most: int = 8192) -> int:
    """Rows per block such that a block of every row dataset (features, logits, layers, cuts) stays
    within BLOCK_BYTES: a cut's rows are wide."""
    datasets = [f[FEATURES], *([f["logits"]] if "logits" in f else []), *f.get(LAYERS, {}).values()]
    row = sum(int(np.prod(d.shape[1:])) * d.dtype.itemsize for d in datasets)
    return int(max(1, min(most, BLOCK_BYTES // max(row, 1))))


def first_bad_row(f: h5py.File, block_rows_: int | None = None) -> int | None:
    """The first row whose stored bytes no longer match the CRC written with them, or None (also for
    a cache without CRCs). One pass over every stored row block."""
    if "row_crc" not in f:
        return None
    block_rows_ = block_rows_ or block_rows(f)
    n, stored = f[FEATURES].shape[0], f["row_crc"][...]
    for a in range(0, n, block_rows_):
        b = min(n, a + block_rows_)
        logits = read_block(f["logits"], a, b) if "logits" in f else None
        layers = {name: read_block(d, a, b) for name, d in f.get(LAYERS, {}).items()}
        bad = np.flatnonzero(row_crc(read_block(f[FEATURES], a, b), logits, layers) != stored[a:b])
        if bad.size:
            return a + int(bad[0])
    return None
