"""The expensive stage: every image through the frozen backbone once, rows into the cache file.

DataLoader workers decode and preprocess; the main process moves each batch to the device,
runs one forward pass and hands the rows to the writer, so memory stays flat in N. The cache
fingerprint is computed before any model is built: a current cache costs one directory scan.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import backbone, store
from pipeline.config import FeaturesConfig, to_dict
from pipeline.data import ImageDataset, SampleList, load_samples
from pipeline.devices import autocast, choose_device
from pipeline.errors import BadImageError, CacheError, Interrupted

Report = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


def versions() -> dict[str, str]:
    names = ("pipeline", "torch", "torchvision", "numpy", "h5py", "pillow")
    return {n: importlib.metadata.version(n) for n in names}


def fingerprint(cfg: FeaturesConfig, samples: SampleList, spec: backbone.BackboneSpec) -> dict[str, Any]:
    """Everything that changes the stored numbers, and nothing that does not (paths, devices, versions)."""
    return {
        "schema": store.SCHEMA_VERSION,
        "backbone": spec.name,
        "weights": spec.weights_id,
        "layer": backbone.LAYER,
        "preprocessing": spec.preprocessing,
        "precision": cfg.precision,
        "store_dtype": cfg.store_dtype,
        "samples": f"sha256:{samples.digest()}",
        "rows": len(samples),
        "logits": cfg.logits,
    }


def collate(batch: list[tuple[int, Any, str | None]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(rows, stacked images of the readable rows, [(row, error)] of the unreadable ones)."""
    rows = [row for row, _, _ in batch]
    images = [image for _, image, _ in batch if image is not None]
    errors = [(row, error) for row, _, error in batch if error is not None]
    return rows, (torch.stack(images) if images else None), errors


@dataclass(frozen=True)
class FeaturesResult:
    path: str
    status: str  # "current", "built" or "resumed"
    rows: int
    computed: int
    seconds: float
    skipped: list[str]


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def run(cfg: FeaturesConfig, report: Report = _quiet) -> FeaturesResult:
    """Make the cache at ``cfg.out_path`` current: nothing, a resume, or a (re)build."""
    t0 = time.perf_counter()
    out = cfg.out_path
    samples = load_samples(
        data=cfg.data,
        dataset=cfg.dataset,
        root=cfg.root,
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        split_seed=cfg.split_seed,
    )
    spec = backbone.describe(cfg.backbone, cfg.weights, cfg.seed, cfg.image_size)
    wanted = fingerprint(cfg, samples, spec)
    sizes = ", ".join(f"{k} {v}" for k, v in samples.split_sizes().items())
    report(f"data: {len(samples)} images, {len(samples.classes)} classes ({sizes}) from {samples.source}")
    if spec.enum is None and spec.checkpoint is None:
        report(
            f"note: --weights none: random initialisation (seed {spec.seed}), so these features are not pretrained; "
            "pretrained weights need a download (use --weights DEFAULT where there is internet)"
        )

    with store.locked(out):
        existing = store.stored_fingerprint(out)
        if existing == wanted and not cfg.force:
            report(f"cache {out} is current ({len(samples)} rows); nothing to do (--force rebuilds)")
            return FeaturesResult(str(out), "current", len(samples), 0, time.perf_counter() - t0, [])
        if existing is not None and existing != wanted:
            differences = "; ".join(store.fingerprint_diff(existing, wanted))
            if cfg.on_mismatch == "refuse":
                raise CacheError(
                    f"cache {out} was built differently ({differences}); pass --on-mismatch rebuild or another --out"
                )
            report(f"cache {out} was built differently, rebuilding: {differences}")
        elif existing is not None:
            report(f"cache {out} is current; rebuilding because of --force")
        if cfg.force:
            store.partial_path(out).unlink(missing_ok=True)
        return _fill(cfg, samples, spec, wanted, report, t0)


def _fill(
    cfg: FeaturesConfig,
    samples: SampleList,
    spec: backbone.BackboneSpec,
    wanted: dict[str, Any],
    report: Report,
    t0: float,
) -> FeaturesResult:
    device = choose_device(cfg.device)
    model = backbone.build(spec, progress=cfg.progress)
    if cfg.logits and model.classifier is None:
        raise CacheError(f"--logits: checkpoint {spec.checkpoint} has no fc layer; drop --logits")
    writer = store.CacheWriter.open(
        cfg.out_path,
        fingerprint=wanted,
        ids=samples.ids,
        labels=samples.labels,
        split=samples.split,
        classes=samples.classes,
        dim=model.dim,
        store_dtype=cfg.store_dtype,
        logits_dim=model.classifier.out_features if cfg.logits else None,
        attrs={
            "config": to_dict(cfg),
            "versions": versions(),
            "carved": samples.carved,
            "source": samples.source,
        },
        report=report,
    )
    start = writer.rows_done
    try:
        skipped = _extract_rows(writer, samples, model, spec, cfg, device, report)
        path = writer.finish()
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: {writer.rows_done} of {len(samples)} rows are saved in {store.partial_path(cfg.out_path)}; "
            "rerun the same command to resume"
        ) from None
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    computed = len(samples) - start
    size = path.stat().st_size / 1e6
    report(
        f"wrote {path} ({len(samples)} x {model.dim} {cfg.store_dtype}, {size:.1f} MB): "
        f"{computed} images in {seconds:.1f} s" + (f", {len(skipped)} unreadable images skipped" if skipped else "")
    )
    return FeaturesResult(str(path), "resumed" if start else "built", len(samples), computed, seconds, skipped)


def _extract_rows(
    writer: store.CacheWriter,
    samples: SampleList,
    model: backbone.FeatureExtractor,
    spec: backbone.BackboneSpec,
    cfg: FeaturesConfig,
    device: torch.device,
    report: Report,
) -> list[str]:
    """Forward every row from ``writer.rows_done`` on; returns the ids of skipped unreadable images."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    report(
        f"backbone: {spec.name} ({model.dim}-d), weights {spec.weights_id}; device {device}, {cfg.precision}, "
        f"batch {cfg.batch_size}, {workers} workers"
    )
    model = model.to(device, memory_format=torch.channels_last)
    loader = DataLoader(
        ImageDataset(samples, spec.transform, start=writer.rows_done),
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    skipped: list[str] = []
    bar = tqdm(
        total=len(samples),
        initial=writer.rows_done,
        unit="img",
        desc="extract",
        disable=not cfg.progress,
        smoothing=0.05,
    )
    with bar, torch.inference_mode(), autocast(device, cfg.precision):
        for rows, images, errors in loader:
            start, n = rows[0], len(rows)
            ok = np.ones(n, dtype=bool)
            ok[[row - start for row, _ in errors]] = False
            features = np.full((n, model.dim), np.nan, dtype=np.float32)  # (B, D)
            logits = np.full((n, model.classifier.out_features), np.nan, dtype=np.float32) if cfg.logits else None
            if images is not None:
                x = images.to(device, non_blocking=True, memory_format=torch.channels_last)  # (B_ok, 3, H, W)
                f = model(x)  # (B_ok, D)
                features[ok] = f.float().cpu().numpy()
                if logits is not None:
                    logits[ok] = model.classifier(f).float().cpu().numpy()
            if errors and not cfg.skip_bad_images:
                keep = errors[0][0] - start  # the rows before the first bad image are good: save them
                writer.write(start, features[:keep], None, None if logits is None else logits[:keep])
                listed = "; ".join(error for _, error in errors[:5])
                more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
                raise BadImageError(
                    f"cannot read {len(errors)} image(s): {listed}{more}; fix or remove them, or rerun with "
                    f"--skip-bad-images to record and skip them ({writer.rows_done} rows saved, the rerun resumes)"
                )
            writer.write(start, features, ok, logits)
            skipped += [samples.ids[row] for row, _ in errors]
            bar.update(n)
    if skipped:
        report(f"skipped {len(skipped)} unreadable images (recorded in the cache's `ok` mask): {skipped[:5]}")
    return skipped
