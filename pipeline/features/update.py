"""Incremental rebuilds: the same model, a changed image set.

A cache's fingerprint has a model part (backbone, weights, layers, preprocessing, precision, dtype,
decoding, logits, identity rule) and a row part (the sample digest and row count). When only the
row part differs and the source (folder, CSV) is the same, each new row whose image is the very same
file as an old row (same id, size and modification time, and sha256 with --verify-content; read
without error before) is copied from the old cache; only new or changed images go through the
backbone, into ``OUT.new-rows.h5`` (an ordinary cache, so a killed run resumes it). Then every row
is written in the new order into ``OUT.partial``, verified and renamed over the old cache, as any
build is: a changed image is never served from its old row, and the old cache stays whole until the
new one replaces it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backbones import backbone
from pipeline.cache import reader, schema
from pipeline.config import FeaturesConfig
from pipeline.data.samples import SampleList
from pipeline.features import extract

BLOCK_ROWS = 4096


def delta_path(out: Path) -> Path:
    return Path(f"{out}.new-rows.h5")


def matching_rows(old: dict[str, np.ndarray], samples: SampleList) -> np.ndarray:
    """For each row of `samples`, the row of the old cache that holds the same image file, or -1:
    the same id and every identity fact the new list records (size, mtime[, sha256]), and read fine
    then. Images without file facts (in-memory datasets) are never matched."""
    found = np.full(len(samples), -1, dtype=np.int64)
    facts = samples.identity or {}
    if not facts or any(key not in old for key in facts):
        return found
    where = {str(sample_id): row for row, sample_id in enumerate(old["ids"])}
    for row, sample_id in enumerate(samples.ids):
        o = where.get(sample_id)
        if o is not None and old["ok"][o] and all(old[key][o] == facts[key][row] for key in facts):
            found[row] = o
    return found


def update(
    cfg: FeaturesConfig,
    samples: SampleList,
    spec: backbone.BackboneSpec,
    wanted: dict[str, Any],
    report: extract.Report,
    t0: float,
    attrs: dict[str, Any] | None = None,
) -> extract.FeaturesResult | None:
    """Bring the complete cache at ``cfg.out_path`` to `samples` by reusing its rows; None (build
    from scratch) when it was made by another model or shares no image with `samples`. `attrs`
    are recorded in the new file where the old one does not have them."""
    out = cfg.out_path
    old_fingerprint = reader.stored_fingerprint(out)
    if old_fingerprint is None or schema.model_part(old_fingerprint) != schema.model_part(wanted):
        return None
    with reader.open_cache(out) as f:
        if (
            str(f.attrs.get("source", "")) != samples.source
        ):  # another folder's files are not these files
            return None
    old = reader.stored_rows(out)
    source = matching_rows(old, samples)
    bad = damaged_rows(out, np.unique(source[source >= 0]))
    if len(
        bad
    ):  # never re-certify a row that no longer reads back as written: extract its image again
        report(
            f"{len(bad)} rows of {out} fail their checksum (e.g. row {bad[0]}); extracting those "
            "images again"
        )
        source[np.isin(source, bad)] = -1
    fresh = np.flatnonzero(source < 0)
    if len(fresh) == len(samples):
        return None
    delta, skipped = delta_path(out), []
    if len(fresh):
        part = samples.take(fresh)
        part_wanted = extract.fingerprint(cfg, part, spec)
        if reader.stored_fingerprint(delta) != part_wanted:

            def quiet(message: str) -> None:  # the delta file is a step, not a result to name
                if not message.startswith(f"wrote {delta} "):
                    report(message)

            skipped = extract.fill(cfg, part, spec, part_wanted, quiet, t0, out=delta).skipped
    known = set(map(str, old["ids"]))
    dropped = len(known - set(samples.ids))
    changed = sum(1 for i in fresh if samples.ids[i] in known)
    path = merge(cfg, samples, wanted, source, delta, time.perf_counter() - t0, attrs)
    delta.unlink(missing_ok=True)
    reused = len(samples) - len(fresh)
    report(
        f"updated {path}: reused {reused} rows, extracted {len(fresh)} ({len(fresh) - changed} "
        f"new, {changed} "
        f"changed), dropped {dropped} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return extract.FeaturesResult(
        str(path), "updated", len(samples), len(fresh), time.perf_counter() - t0, skipped
    )


def merge(
    cfg: FeaturesConfig,
    samples: SampleList,
    wanted: dict[str, Any],
    source: np.ndarray,
    delta: Path,
    seconds: float,
    attrs: dict[str, Any] | None = None,
) -> Path:
    """Write every row of `samples` in order into the new cache: row i from the old cache's row
    source[i], or, where source[i] is -1, the next row of the delta cache."""
    out = cfg.out_path
    from_delta = np.cumsum(source < 0) - 1  # the delta row of each fresh row
    with reader.open_cache(out) as old, _maybe_open(delta, (source < 0).any()) as new:
        names = ["features", *(["logits"] if "logits" in old else [])]
        layers = list(old.get(schema.LAYERS, {}))
        widths = {name: old[schema.LAYERS][name].shape[1] for name in layers}
        kept = {key: schema.json_attr(old, key) for key in (attrs or {}) if key in old.attrs}
        writer = extract.open_writer(
            out,
            cfg,
            samples,
            wanted,
            old["features"].shape[1],
            old["logits"].shape[1] if "logits" in old else None,
            layer_dims=widths,
            incremental={"reused": int((source >= 0).sum()), "extracted": int((source < 0).sum())},
            **((attrs or {}) | kept),
        )
        try:
            step = schema.block_rows(old, BLOCK_ROWS)
            for a in range(writer.rows_done, len(samples), step):
                b = min(a + step, len(samples))
                rows = {
                    name: _gather(old, new, name, source[a:b], from_delta[a:b]) for name in names
                }
                blocks = {
                    name: _gather(old, new, f"{schema.LAYERS}/{name}", source[a:b], from_delta[a:b])
                    for name in layers
                }
                ok = np.ones(b - a, dtype=bool)
                if new is not None and (source[a:b] < 0).any():
                    ok[source[a:b] < 0] = new["ok"][from_delta[a:b][source[a:b] < 0]]
                writer.write(a, rows["features"], ok, rows.get("logits"), blocks)
            return writer.finish(
                {"extract_seconds": seconds, "extract_rows": int((source < 0).sum())}
            )
        finally:
            writer.close()


def damaged_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """The rows among `rows` (sorted) of the cache at `path` whose stored bytes (features, logits,
    layers) no longer match the CRC written with them."""
    bad = []
    with reader.open_cache(path) as f:
        if "row_crc" not in f:
            return np.zeros(0, dtype=np.int64)
        names = ["features", *(["logits"] if "logits" in f else [])]
        layers, stored = sorted(f.get(schema.LAYERS, {})), f["row_crc"][...]
        step = schema.block_rows(f, BLOCK_ROWS)
        for a in range(0, len(rows), step):
            chunk = rows[a : a + step]
            blocks = {name: _take(f[name], chunk) for name in names}
            stacked = {name: _take(f[schema.LAYERS][name], chunk) for name in layers}
            crc = schema.row_crc(blocks["features"], blocks.get("logits"), stacked)
            bad.extend(chunk[crc != stored[chunk]].tolist())
    return np.array(bad, dtype=np.int64)


def _gather(
    old: Any, new: Any, name: str, source: np.ndarray, from_delta: np.ndarray
) -> np.ndarray:
    """Rows of dataset `name`: from `old` where source >= 0, else from `new` (the delta) at
    from_delta."""
    width = old[name].shape[1]
    block = np.empty((len(source), width), dtype=np.float32)
    reused = source >= 0
    if reused.any():
        block[reused] = _take(old[name], source[reused])
    if (~reused).any():
        block[~reused] = _take(new[name], from_delta[~reused])
    return block


def _take(dataset: Any, rows: np.ndarray) -> np.ndarray:
    """dataset[rows], in the stored dtype, for any order of rows (h5py needs increasing indices):
    read sorted, then put back."""
    order = np.argsort(rows, kind="stable")
    unique, inverse = np.unique(rows[order], return_inverse=True)
    values = _span(dataset, unique)
    out = np.empty((len(rows), dataset.shape[1]), dtype=dataset.dtype)
    out[order] = values[inverse]
    return out


def _span(dataset: Any, unique: np.ndarray) -> np.ndarray:
    """Many sorted rows: contiguous reads of spans of at most BLOCK_ROWS rows (far faster than point
    selection, and bounded in memory however far apart the rows lie), then pick."""
    parts, i = [], 0
    while i < len(unique):
        a = int(unique[i])
        j = int(np.searchsorted(unique, a + BLOCK_ROWS, "left"))
        parts.append(schema.read_block(dataset, a, int(unique[j - 1]) + 1)[unique[i:j] - a])
        i = j
    return np.concatenate(parts)


class _maybe_open:
    """The delta cache opened for reading when `needed`, else None (nothing was extracted)."""

    def __init__(self, path: Path, needed: bool) -> None:
        self.path, self.needed, self.f = path, bool(needed), None

    def __enter__(self) -> Any:
        if self.needed:
            self.f = reader.open_cache(self.path)
        return self.f

    def __exit__(self, *exc: object) -> None:
        if self.f is not None:
            self.f.close()
