"""One entry point for the feature stage: `run` extracts in this process, or, under `torchrun`
(WORLD_SIZE > 1), this rank's shard (see `distributed`)."""

from __future__ import annotations

import os

from pipeline.config import FeaturesConfig
from pipeline.features import distributed, extract
from pipeline.features.extract import FeaturesResult, Report


def run(cfg: FeaturesConfig, report: Report = extract._quiet) -> FeaturesResult:
    """Make the cache at ``cfg.out_path`` current: nothing, a resume, or a (re)build, locally or as one
    rank of a `torchrun` job."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return distributed.run(cfg, report)
    return extract.run_local(cfg, report)
