"""Feature extraction across processes and machines with `torchrun` (torch.distributed).

Each rank takes one contiguous shard of the canonical sample list (whole tar shards, when the source
is shards) and writes its own part file, ``OUT.part-TAG-RRR-of-WWW`` (TAG: the first 8 hex digits of
the fingerprint's hash; ``.partial`` while in progress), with the same schema, fingerprint (plus the
shard), resume and bad-image rules as a single process. When every part is complete, rank 0 makes
``OUT``: by default a virtual cache over the parts (`pipeline.cache.virtual`: metadata only, time
proportional to the number of parts; the parts stay beside it), or with ``--assemble copy`` an
ordinary file with every row copied in (the parts then removed). Either reads as a single-process
run's cache. A rank that dies leaves its finished rows in its part; rerunning the same command
resumes every shard. Rank 0 alone reports, with one progress bar fed by per-rank progress files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import fsutil
from pipeline.backbones import forward
from pipeline.cache import reader, schema, virtual
from pipeline.config import FeaturesConfig
from pipeline.devices import choose_device
from pipeline.errors import CacheError, ConfigError
from pipeline.features import extract
from pipeline.settings import to_dict

BLOCK_ROWS = 8192  # rows per copy when parts are assembled


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        size = int(env.get("WORLD_SIZE", "1"))
        return cls(
            int(env.get("RANK", "0")),
            size,
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", size)),
        )

    def shard(self, n: int, starts: np.ndarray | None = None) -> tuple[int, int]:
        """This rank's contiguous rows: the first ``n % size`` ranks take one more. With `starts`
        (the rows where each tar shard's rows begin), each cut moves to the nearest shard start, so
        whole shards go to ranks, balanced by their sample counts."""
        cuts = [r * (n // self.size) + min(r, n % self.size) for r in range(self.size + 1)]
        if starts is not None and len(starts) > 1:
            edges = np.r_[starts, n]
            cuts = [0, *(int(edges[np.argmin(np.abs(edges - c))]) for c in cuts[1:-1]), n]
            cuts = list(np.maximum.accumulate(cuts))
        return cuts[self.rank], cuts[self.rank + 1]


def part_path(out: Path, rank: int, size: int, wanted: dict[str, Any]) -> Path:
    """Rank `rank`'s part of the cache `wanted` describes: a new build never writes over the parts
    that the current (virtual) cache reads."""
    return schema.part_name(out, wanted, rank, size)


def _progress_path(out: Path, rank: int) -> Path:
    return Path(f"{out}.progress-{rank:03d}")


def _write_progress(out: Path, rank: int, rows: int) -> None:
    path = _progress_path(out, rank)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(rows))
    os.replace(tmp, path)


def _read_progress(out: Path, size: int) -> int:
    total = 0
    for rank in range(size):
        with contextlib.suppress(FileNotFoundError, ValueError):  # not written yet, or mid-replace
            total += int(_progress_path(out, rank).read_text() or 0)
    return total


def run(cfg: FeaturesConfig, report: Any) -> Any:
    """One rank's share of a `torchrun` extraction; rank 0 assembles the final cache."""
    if cfg.views:
        raise ConfigError(
            "--views runs in one process, after the cache: extract the views without torchrun"
        )
    world = World.from_env()
    t0 = time.perf_counter()
    say = report if world.rank == 0 else (lambda message: None)
    device = _device(cfg.device, world)
    if device.type == "cpu":  # ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    if cfg.workers is None:
        cfg = dataclasses.replace(
            cfg, workers=max(0, forward.default_workers() // world.local_size - 1)
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=dt.timedelta(hours=24))  # waits span whole shards
    try:
        # auto decides by the device alone here: every rank computes its part alike
        samples, spec, wanted, choice = extract.prepare(cfg, say, check=False)
        cfg = extract.resolved(cfg, choice)
        out, n = cfg.out_path, len(samples)
        if extract.is_current(
            cfg, wanted, samples, say
        ):  # every rank reads the same file: the same answer
            return extract.FeaturesResult(str(out), "current", n, 0, time.perf_counter() - t0, [])
        say(
            f"distributed: {world.size} ranks ({backend}), {n} rows in contiguous shards, device "
            f"{device} on rank 0"
        )
        start, stop = world.shard(n, samples.group_starts())
        part = part_path(out, world.rank, world.size, wanted)
        shard_fp = {
            **wanted,
            "shard": f"rows {start}:{stop} of {n}, rank {world.rank} of {world.size}",
        }
        quiet = dataclasses.replace(cfg, progress=False)
        with fsutil.locked(part):
            # Parts exist only until assembly, so any part here belongs to this (possibly --force)
            # run: keep it.
            done = reader.stored_fingerprint(part) == shard_fp
            _write_progress(out, world.rank, (stop - start) if done else 0)
            bar = tqdm(
                total=n,
                unit="img",
                desc=f"extract ({world.size} ranks)",
                disable=not (cfg.progress and world.rank == 0),
            )
            with bar:

                def on_batch(rows: int) -> None:
                    _write_progress(out, world.rank, rows)
                    bar.n = _read_progress(out, world.size)
                    bar.refresh()

                if not done:
                    shard = samples.subset(start, stop)
                    extract.fill(
                        quiet,
                        shard,
                        spec,
                        shard_fp,
                        say,
                        t0,
                        out=part,
                        device=device,
                        on_batch=on_batch,
                    )
                if (
                    world.rank == 0
                ):  # one bar for the job: follow the other ranks until all parts exist
                    while not all(
                        part_path(out, r, world.size, wanted).exists() for r in range(world.size)
                    ):
                        on_batch(stop - start)
                        time.sleep(0.5)
                    on_batch(stop - start)
        dist.barrier()
        if world.rank == 0:
            with fsutil.locked(out):
                path = assemble(out, world.size, samples, wanted, cfg, time.perf_counter() - t0)
            for rank in range(world.size):
                _progress_path(out, rank).unlink(missing_ok=True)
            say(
                f"wrote {path} ({n} rows) from {world.size} parts in "
                f"{time.perf_counter() - t0:.1f} s"
            )
        dist.barrier()
        skipped = [] if world.rank else reader.summary(out)["skipped"]
        return extract.FeaturesResult(
            str(out), "built", n, stop - start, time.perf_counter() - t0, skipped
        )
    finally:
        dist.destroy_process_group()


def _device(request: str, world: World) -> torch.device:
    device = choose_device(request)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", world.local_rank)  # one GPU per local rank
    return device


def assemble(
    out: Path, size: int, samples: Any, wanted: dict[str, Any], cfg: FeaturesConfig, seconds: float
) -> Path:
    """The complete parts, in rank order (= canonical row order), as one cache: virtual over the
    parts, or (--assemble copy) copied into one file, the parts then removed."""
    parts = [part_path(out, r, size, wanted) for r in range(size)]
    missing = [str(p) for p in parts if not p.exists()]
    if missing:
        raise CacheError(
            f"cannot assemble {out}: parts {missing} are missing; rerun the same torchrun command"
        )
    if cfg.assemble == "virtual":
        attrs = {
            "config": to_dict(cfg),
            "versions": extract.versions(),
            "carved": samples.carved,
            "source": samples.source,
            "distributed": {"parts": size, "assembly": "virtual"},
            "extract_seconds": seconds,
            "extract_rows": len(samples),
        }
        return virtual.assemble(out, parts, wanted, attrs)
    with reader.open_cache(parts[0]) as f:
        dim = f["features"].shape[1]
        logits_dim = f["logits"].shape[1] if "logits" in f else None
        layer_dims = {name: d.shape[1] for name, d in f.get(schema.LAYERS, {}).items()}
    schema.discard_partial(schema.partial_path(out))
    assembly = {"parts": size, "assembly": "copy"}
    writer = extract.open_writer(
        out, cfg, samples, wanted, dim, logits_dim, layer_dims=layer_dims, distributed=assembly
    )
    try:
        with contextlib.ExitStack() as stack:
            virtual.copy_rows(
                [stack.enter_context(reader.open_cache(part)) for part in parts], writer
            )
        path = writer.finish({"extract_seconds": seconds, "extract_rows": len(samples)})
    finally:
        writer.close()
    for part in parts:
        part.unlink()
    return path
