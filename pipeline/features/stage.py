"""One entry point for the feature stage: `run` extracts in this process (`run_local`: nothing, a
resume, an incremental update or a build, then the --views cache alike), or, under `torchrun`
(WORLD_SIZE > 1), this rank's shard (see `distributed`)."""

from __future__ import annotations

import dataclasses
import os
import time

from pipeline import fsutil
from pipeline.backbones.spec import BackboneSpec
from pipeline.cache import reader, schema
from pipeline.config import FeaturesConfig
from pipeline.data.samples import SampleList
from pipeline.errors import CacheError
from pipeline.features import distributed, extract, update, views
from pipeline.features.extract import FeaturesResult, Report


def run(cfg: FeaturesConfig, report: Report = extract._quiet) -> FeaturesResult:
    """Make the cache at ``cfg.out_path`` current: nothing, a resume, or a (re)build, locally or as
    one rank of a `torchrun` job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return distributed.run(cfg, report)
    return run_local(cfg, report)


def run_local(
    cfg: FeaturesConfig,
    report: Report = extract._quiet,
    prepared: extract.Prepared | None = None,
) -> FeaturesResult:
    """Make the cache at ``cfg.out_path`` current in this process: nothing, a resume, an update that
    reuses the rows of unchanged images (same model, changed image set), or a (re)build; then, with
    --views, its companion cache of augmented train views the same way. `prepared` is
    `extract.prepare`'s answer when the caller has it already."""
    t0 = time.perf_counter()
    samples, spec, wanted, choice = prepared or extract.prepare(cfg, report)
    cfg = extract.resolved(cfg, choice)
    attrs = {"precision_choice": choice.record} if choice.record else {}
    result = make_current(cfg, samples, spec, wanted, report, t0, attrs)
    if cfg.views:
        # Views are decoded in full (their crop needs every pixel), so a reduced decode is not
        # claimed.
        decode = "exact" if cfg.decode == "cpu" else cfg.decode
        vcfg = dataclasses.replace(
            cfg, out=str(views.views_path(cfg.out_path)), logits=False, decode=decode
        )
        vsamples = views.view_samples(samples, cfg.views, spec, cfg.view_scale)
        vspec = views.view_spec(spec, cfg.views, cfg.view_scale)
        # The views name the state of the cache they belong to: `head --views` refuses them once it
        # changes.
        vwanted = extract.fingerprint(vcfg, vsamples, vspec) | {
            "views_of": schema.fingerprint_tag(wanted)
        }
        done = make_current(vcfg, vsamples, vspec, vwanted, report, t0, attrs)
        result = dataclasses.replace(
            result, computed=result.computed + done.computed, skipped=result.skipped + done.skipped
        )
    return result


def make_current(
    cfg: FeaturesConfig,
    samples: SampleList,
    spec: BackboneSpec,
    wanted: dict,
    report: Report,
    t0: float,
    attrs: dict | None = None,
) -> FeaturesResult:
    """The cache at ``cfg.out_path`` made to hold exactly `samples` through `spec` (recording
    `attrs` in a file it writes)."""
    if cfg.out_path.is_dir():
        raise CacheError(
            f"--out {cfg.out_path} is a folder; pass a file path such as "
            f"{cfg.out_path / 'features.h5'}"
        )
    # A current cache needs no lock (so a read-only copy still says "current"); a build takes it and
    # checks again, since another run may have finished it meanwhile.
    if not cfg.force and reader.stored_fingerprint(cfg.out_path) == wanted:
        extract.is_current(cfg, wanted, samples, report)
        return FeaturesResult(
            str(cfg.out_path), "current", len(samples), 0, time.perf_counter() - t0, []
        )
    with fsutil.locked(cfg.out_path):
        if extract.is_current(cfg, wanted, samples, report):
            return FeaturesResult(
                str(cfg.out_path), "current", len(samples), 0, time.perf_counter() - t0, []
            )
        if (
            not cfg.force
            and (done := update.update(cfg, samples, spec, wanted, report, t0, attrs)) is not None
        ):
            return done
        # --force keeps a partial file of the same features: it is the rebuild an earlier --force
        # started.
        return extract.fill(cfg, samples, spec, wanted, report, t0, attrs=attrs)
