"""`--precision auto` (the default): the precision an extraction computes in, chosen once per cache,
printed, and recorded in the cache (its fingerprint holds the precision; the `precision_choice`
attribute says why, and how closely it agreed with fp32).

auto picks bf16 where the device computes it natively (`pipeline.devices.auto_precision`), fp16 on
CUDA GPUs without bf16, fp32 otherwise. A reduced precision is not assumed to be close enough: the
first images are computed in fp32 too, and when any row's cosine to its fp32 row falls below
`AGREEMENT` the cache is computed in fp32 instead, and the run says so. A cache (or an interrupted
build) already at --out whose model and precision are one of auto's two candidates keeps its
precision: auto never rebuilds an fp32 cache to make it faster. Under torchrun each rank decides by
the device alone (no check), so that every part is computed alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from pipeline import devices
from pipeline.backbones import backbone, forward
from pipeline.cache import reader, schema
from pipeline.config import FeaturesConfig
from pipeline.data.samples import SampleList

REDUCED = ("bf16", "fp16")
AGREEMENT = 0.999  # the least cosine to fp32 that a reduced-precision cache may have on the check
CHECK_IMAGES = 8  # the first images, compared where readable


class Choice(NamedTuple):
    precision: str  # fp32, bf16 or fp16: what the cache is computed in
    record: dict[str, Any]  # the cache's `precision_choice` attribute ({} when not auto)


def choose(
    cfg: FeaturesConfig,
    samples: SampleList,
    spec: backbone.BackboneSpec,
    fingerprint_of: Callable[[str], dict[str, Any]],
    report: Callable[[str], None],
    check: bool = True,
) -> Choice:
    """The precision of the cache at ``cfg.out_path``: the one asked for, or auto's choice."""
    if cfg.precision != "auto":
        return Choice(cfg.precision, {})
    chosen, why = devices.auto_precision(devices.choose_device(cfg.device))
    kept = _held(cfg, {p: fingerprint_of(p) for p in dict.fromkeys(("fp32", chosen, *REDUCED))})
    if kept is not None:
        return kept
    record = {"requested": "auto", "chosen": chosen, "why": why}
    if chosen == "fp32" or not check:
        report(f"precision: {chosen} (auto: {why})")
        return Choice(chosen, record)
    cosine, images = agreement(cfg, samples, spec, chosen)
    if images == 0:
        report(f"precision: fp32 (auto: none of the first images could be read to check {chosen})")
        return Choice("fp32", record | {"chosen": "fp32", "fallback_from": chosen})
    record |= {"min_cosine_to_fp32": cosine, "images_checked": images}
    if cosine < AGREEMENT:
        report(
            f"precision: fp32 (auto: {chosen} agreed with fp32 to a cosine of only {cosine:.6f} on "
            f"the first {images} images, below {AGREEMENT}; --precision {chosen} forces it)"
        )
        return Choice("fp32", record | {"chosen": "fp32", "fallback_from": chosen})
    report(
        f"precision: {chosen} (auto: {why}; cosine to fp32 at least {cosine:.6f} on the first "
        f"{images} images; --precision fp32 for full precision)"
    )
    return Choice(chosen, record)


def _held(cfg: FeaturesConfig, variants: dict[str, dict[str, Any]]) -> Choice | None:
    """The precision of the cache at --out when this model made it in any precision (a complete
    cache first, then an interrupted build): it is kept, updated or resumed as it is, never
    rebuilt or discarded for another precision. Its own record of the choice goes on."""
    if cfg.force:
        return None
    existing = reader.stored_fingerprint(cfg.out_path)
    pending = reader.partial_state(cfg.out_path)
    for found, complete in ((existing, True), (pending[0] if pending else None, False)):
        for precision, wanted in variants.items():
            same = found is not None and (
                schema.model_part(found) == schema.model_part(wanted)
                if complete
                else found == wanted
            )
            if same:
                record = (_record_of(cfg.out_path) if complete else {}) or {
                    "requested": "auto",
                    "chosen": precision,
                    "why": f"kept, as {cfg.out_path} holds {precision} features",
                }
                return Choice(precision, record)
    return None


def _record_of(path: Path) -> dict[str, Any]:
    """The `precision_choice` a complete cache recorded, when it is a readable record of auto's."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            record = json.loads(f.attrs.get("precision_choice", "{}"))
    except (OSError, ValueError, TypeError):
        return {}
    return record if isinstance(record, dict) and record.get("requested") == "auto" else {}


def agreement(
    cfg: FeaturesConfig, samples: SampleList, spec: backbone.BackboneSpec, precision: str
) -> tuple[float, int]:
    """(least cosine, images): the readable ones of the first `CHECK_IMAGES` images through the
    backbone in fp32 and in `precision`, row against row."""
    rows = samples.subset(0, min(len(samples), CHECK_IMAGES))
    quiet = dataclasses.replace(
        cfg, precision="fp32", workers=0, progress=False, skip_bad_images=True, compile=False
    )
    reference, errors = forward.embed(quiet, rows, spec)
    reduced, _ = forward.embed(dataclasses.replace(quiet, precision=precision), rows, spec)
    good = [row for row in range(len(rows)) if row not in errors]
    if not good:
        return 1.0, 0
    a, b = reference[good].astype(np.float64), reduced[good].astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return float(cosine.min()), len(good)
