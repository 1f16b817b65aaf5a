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
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from pipeline import devices
from pipeline.backbones import backbone, forward
from pipeline.cache import reader, schema
from pipeline.config import FeaturesConfig
from pipeline.data.samples import SampleList

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
    for candidate in dict.fromkeys((chosen, "fp32")):
        if _held(cfg, fingerprint_of(candidate)):
            return Choice(
                candidate,
                {
                    "requested": "auto",
                    "chosen": candidate,
                    "why": f"kept, as {cfg.out_path} holds it",
                },
            )
    record = {"requested": "auto", "chosen": chosen, "why": why}
    if chosen == "fp32" or not check:
        report(f"precision: {chosen} (auto: {why})")
        return Choice(chosen, record)
    cosine, images = agreement(cfg, samples, spec, chosen)
    record |= {"min_cosine_to_fp32": cosine, "images_checked": images}
    if images == 0:
        report(f"precision: fp32 (auto: none of the first images could be read to check {chosen})")
        return Choice("fp32", record | {"chosen": "fp32", "fallback_from": chosen})
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


def _held(cfg: FeaturesConfig, wanted: dict[str, Any]) -> bool:
    """Whether the cache at --out (complete, or an interrupted build) was made by this model in this
    precision: then it is kept, updated or resumed, never rebuilt for another precision."""
    if cfg.force:
        return False
    existing = reader.stored_fingerprint(cfg.out_path)
    if existing is not None and schema.model_part(existing) == schema.model_part(wanted):
        return True
    pending = reader.partial_state(cfg.out_path)
    return pending is not None and pending[0] == wanted


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
