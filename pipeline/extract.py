"""The expensive stage: every image through the frozen backbone once, rows into the cache file.

DataLoader workers decode and preprocess; the main process moves each batch to the device,
runs one forward pass and hands the rows to the writer, so memory stays flat in N. The cache
fingerprint is computed before any model is built: a current cache costs one directory scan.
"""

from __future__ import annotations

import importlib.metadata
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import backbone, fsutil, store
from pipeline.config import FeaturesConfig, to_dict
from pipeline.data import EncodedDataset, ImageDataset, SampleList, describe_changes, load_samples
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
        "identity": "ids, labels, splits, file size and mtime" + (", sha256 of content" if cfg.verify_content else ""),
        "logits": cfg.logits,
        "decode": "torchvision.io on the device" if cfg.decode == "device" else "PIL in DataLoader workers",
    }


def collate(batch: list[tuple[int, Any, str | None]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(rows, stacked images of the readable rows, [(row, error)] of the unreadable ones)."""
    rows, images, errors = collate_encoded(batch)
    return rows, (torch.stack(images) if images else None), errors


def collate_encoded(batch: list[tuple[int, Any, str | None]]) -> tuple[list[int], list[Any], list[tuple[int, str]]]:
    """(rows, the readable rows' payloads as a list, [(row, error)] of the unreadable ones)."""
    rows = [row for row, _, _ in batch]
    payloads = [payload for _, payload, _ in batch if payload is not None]
    errors = [(row, error) for row, _, error in batch if error is not None]
    return rows, payloads, errors


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


def prepare(cfg: FeaturesConfig, report: Report = _quiet) -> tuple[SampleList, backbone.BackboneSpec, dict[str, Any]]:
    """The sample list, the backbone spec and the fingerprint they give: no model is built."""
    samples = load_samples(
        data=cfg.data,
        dataset=cfg.dataset,
        root=cfg.root,
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        split_seed=cfg.split_seed,
        verify_content=cfg.verify_content,
    )
    spec = backbone.describe(cfg.backbone, cfg.weights, cfg.seed, cfg.image_size)
    sizes = ", ".join(f"{k} {v}" for k, v in samples.split_sizes().items())
    report(f"data: {len(samples)} images, {len(samples.classes)} classes ({sizes}) from {samples.source}")
    if spec.enum is None and spec.checkpoint is None:
        report(
            f"note: --weights none: random initialisation (seed {spec.seed}), so these features are not pretrained; "
            "pretrained weights need a download (use --weights DEFAULT where there is internet)"
        )
    return samples, spec, fingerprint(cfg, samples, spec)


def is_current(cfg: FeaturesConfig, wanted: dict[str, Any], samples: SampleList, report: Report = _quiet) -> bool:
    """True when the cache at ``cfg.out_path`` already holds these features (and --force is off);
    otherwise says why it will be (re)built, or refuses under ``--on-mismatch refuse``."""
    out = cfg.out_path
    existing = store.stored_fingerprint(out)
    pending = store.partial_state(out)
    if existing == wanted and not cfg.force:
        if pending is not None and pending[0] == wanted:  # an interrupted --force rebuild of the same features
            report(
                f"cache {out} is complete and matches; an interrupted --force rebuild ({pending[1]} of {pending[2]} "
                f"rows) waits in {store.partial_path(out)}: rerun with --force to finish it, or delete that file"
            )
        else:
            report(f"cache {out} is current ({wanted['rows']} rows); nothing to do (--force rebuilds)")
        return True
    if existing is not None and existing != wanted:
        differences = "; ".join(store.fingerprint_diff(existing, wanted))
        if existing.get("samples") != wanted.get("samples"):
            files = describe_changes(store.stored_rows(out), samples)
            differences += f" ({files})" if files else ""
        if cfg.on_mismatch == "refuse":
            raise CacheError(
                f"cache {out} was built differently ({differences}); pass --on-mismatch rebuild or another --out"
            )
        report(f"cache {out} was built differently, rebuilding: {differences}")
    elif existing is not None:
        report(f"cache {out} is current; rebuilding because of --force")
    return False


def run(cfg: FeaturesConfig, report: Report = _quiet) -> FeaturesResult:
    """Make the cache at ``cfg.out_path`` current: nothing, a resume, or a (re)build.

    Under `torchrun` (WORLD_SIZE > 1) every rank extracts its own shard: see `pipeline.distributed`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline import distributed

        return distributed.run_features(cfg, report)
    t0 = time.perf_counter()
    samples, spec, wanted = prepare(cfg, report)
    if cfg.out_path.is_dir():
        raise CacheError(f"--out {cfg.out_path} is a folder; pass a file path such as {cfg.out_path / 'features.h5'}")
    # A current cache needs no lock (so a read-only copy still says "current"); a build takes it and
    # checks again, since another run may have finished it meanwhile.
    if not cfg.force and store.stored_fingerprint(cfg.out_path) == wanted:
        is_current(cfg, wanted, samples, report)
        return FeaturesResult(str(cfg.out_path), "current", len(samples), 0, time.perf_counter() - t0, [])
    with store.locked(cfg.out_path):
        if is_current(cfg, wanted, samples, report):
            return FeaturesResult(str(cfg.out_path), "current", len(samples), 0, time.perf_counter() - t0, [])
        # --force keeps a partial file of the same features: it is the rebuild an earlier --force started.
        return fill(cfg, samples, spec, wanted, report, t0)


def open_writer(
    out: Path,
    cfg: FeaturesConfig,
    samples: SampleList,
    wanted: dict[str, Any],
    dim: int,
    logits_dim: int | None,
    report: Report = _quiet,
    **attrs: Any,
) -> store.CacheWriter:
    """A writer for ``OUT.partial`` whose attributes describe `samples` and `cfg` (resumes when it can)."""
    return store.CacheWriter.open(
        out,
        fingerprint=wanted,
        ids=samples.ids,
        labels=samples.labels,
        split=samples.split,
        classes=samples.classes,
        dim=dim,
        store_dtype=cfg.store_dtype,
        logits_dim=logits_dim,
        attrs={"config": to_dict(cfg), "versions": versions(), "carved": samples.carved, "source": samples.source}
        | attrs,
        identity=samples.identity,
        report=report,
    )


def fill(
    cfg: FeaturesConfig,
    samples: SampleList,
    spec: backbone.BackboneSpec,
    wanted: dict[str, Any],
    report: Report,
    t0: float,
    out: Path | None = None,
    device: torch.device | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> FeaturesResult:
    """Extract every row not yet in ``OUT.partial`` (default: ``cfg.out_path``), then finish the file."""
    out = cfg.out_path if out is None else out
    device = choose_device(cfg.device) if device is None else device
    model = backbone.build(spec, progress=cfg.progress)
    if cfg.logits and model.classifier is None:
        raise CacheError(f"--logits: checkpoint {spec.checkpoint} has no fc layer; drop --logits")
    logits_dim = model.classifier.out_features if cfg.logits else None
    writer = open_writer(out, cfg, samples, wanted, model.dim, logits_dim, report)
    start = writer.rows_done
    sink = RowSink(writer, model.dim, model.classifier.out_features if cfg.logits else None)
    try:
        bad = _extract_rows(sink, start, samples, model, spec, cfg, device, report, on_batch=on_batch)
        path = writer.finish({"extract_seconds": time.perf_counter() - t0, "extract_rows": len(samples) - start})
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: {writer.rows_done} of {len(samples)} rows are saved in {store.partial_path(out)}; "
            "rerun the same command to resume"
        ) from None
    except BadImageError as exc:
        raise BadImageError(
            f"{exc}; fix or remove them, or rerun with --skip-bad-images to record and skip them "
            f"({writer.rows_done} rows saved, the rerun resumes)"
        ) from None
    except fsutil.WriteError as exc:
        error = fsutil.WriteError(
            f"{exc} ({writer.rows_done} of {len(samples)} rows are saved; the same command resumes once it can write)"
        )
        error.hdf5_broken = getattr(exc, "hdf5_broken", False)
        raise error from None
    finally:
        writer.close()
    skipped = [samples.ids[row] for row in bad]
    seconds = time.perf_counter() - t0
    computed = len(samples) - start
    size = path.stat().st_size / 1e6
    report(
        f"wrote {path} ({len(samples)} x {model.dim} {cfg.store_dtype}, {size:.1f} MB): "
        f"{computed} images in {seconds:.1f} s" + (f", {len(skipped)} unreadable images skipped" if skipped else "")
    )
    return FeaturesResult(str(path), "resumed" if start else "built", len(samples), computed, seconds, skipped)


class RowSink:
    """Writes rows on a background thread, so device-to-host copies and HDF5 writes overlap the next
    forward pass. Rows stay in order (one thread, a bounded queue); an error in the thread is raised
    in the caller at its next `put` or at `close`."""

    def __init__(self, writer: store.CacheWriter, dim: int, logits_dim: int | None, depth: int = 4) -> None:
        self.writer, self.dim, self.logits_dim = writer, dim, logits_dim
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def put(self, start: int, ok: np.ndarray, features: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        """Rows ``start .. start+len(ok)``; `features` holds the rows where `ok` is True, in order."""
        self._raise()
        self.queue.put((start, ok, features, logits))

    def close(self, raise_error: bool = True) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def _rows(self, ok: np.ndarray, values: torch.Tensor | None, width: int) -> np.ndarray:
        rows = np.full((len(ok), width), np.nan, dtype=np.float32)  # (B, D); NaN where unreadable
        if values is not None:
            rows[ok] = values.float().cpu().numpy()
        return rows

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            start, ok, features, logits = item
            try:
                self.writer.write(
                    start,
                    self._rows(ok, features, self.dim),
                    ok,
                    None if logits is None else self._rows(ok, logits, self.logits_dim),  # type: ignore[arg-type]
                )
            except BaseException as exc:  # handed to the producer thread
                self.error = exc


def decode_on_device(
    payloads: list[tuple[str, np.ndarray]], device: torch.device, transform: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """JPEG bytes decoded by torchvision.io on `device` (nvjpeg on CUDA, batched); pixels moved there.
    Returns the preprocessed (3, H, W) image or None per payload, and the decode error or None."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(data: Any) -> Any:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)

        images: list[torch.Tensor | None] = [None] * len(payloads)
        errors: list[str | None] = [None] * len(payloads)
        jpegs = [i for i, (kind, _) in enumerate(payloads) if kind == "jpeg"]
        data = [torch.from_numpy(payloads[i][1]) for i in jpegs]
        try:
            decoded = decode(data) if data else []
        except RuntimeError:  # one bad file fails the batch: decode one by one to find it
            decoded = []
            for i, d in zip(jpegs, data, strict=True):
                try:
                    decoded.append(decode(d))
                except RuntimeError as exc:
                    decoded.append(None)
                    errors[i] = f"cannot decode JPEG ({str(exc).splitlines()[0].split(', ')[-1]})"
    for i, image in zip(jpegs, decoded, strict=True):
        images[i] = image
    for i, (kind, pixels) in enumerate(payloads):
        if kind == "pixels":
            images[i] = torch.from_numpy(pixels).permute(2, 0, 1).to(device, non_blocking=True)  # (3, H, W) uint8
    return [None if image is None else transform(image) for image in images], errors


class MemorySink:
    """Rows into one in-memory (N, D) array (NaN rows for unreadable images): for `embed`."""

    def __init__(self, n: int, dim: int) -> None:
        self.features = np.full((n, dim), np.nan, dtype=np.float32)

    def put(self, start: int, ok: np.ndarray, features: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        if features is not None:
            self.features[start : start + len(ok)][ok] = features.float().cpu().numpy()

    def close(self, raise_error: bool = True) -> None:
        pass


def embed(
    cfg: FeaturesConfig, samples: SampleList, spec: backbone.BackboneSpec, report: Report = _quiet
) -> tuple[np.ndarray, dict[int, str]]:
    """Features of `samples` in memory, no cache file: (N, D) float32 and {row: error} of unreadable ones."""
    device = choose_device(cfg.device)
    model = backbone.build(spec, progress=cfg.progress)
    sink = MemorySink(len(samples), model.dim)
    errors: dict[int, str] = {}
    _extract_rows(sink, 0, samples, model, spec, cfg, device, report, errors)
    return sink.features, errors


def _extract_rows(
    sink: RowSink | MemorySink,
    start_row: int,
    samples: SampleList,
    model: backbone.FeatureExtractor,
    spec: backbone.BackboneSpec,
    cfg: FeaturesConfig,
    device: torch.device,
    report: Report,
    errors_out: dict[int, str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[int]:
    """Forward every row from `start_row` on into `sink`; returns the rows skipped as unreadable."""
    workers = default_workers() if cfg.workers is None else cfg.workers
    report(
        f"backbone: {spec.name} ({model.dim}-d), weights {spec.weights_id}; device {device}, {cfg.precision}, "
        f"batch {cfg.batch_size}, {workers} workers, decode on {cfg.decode}" + (", compiled" if cfg.compile else "")
    )
    model = model.to(device, memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile else model
    on_device = cfg.decode == "device"
    dataset = (EncodedDataset if on_device else ImageDataset)(samples, spec.transform, start=start_row)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate_encoded if on_device else collate,
        pin_memory=device.type == "cuda" and not on_device,
        prefetch_factor=4 if workers else None,
    )
    skipped: list[int] = []
    bar = tqdm(
        total=len(samples),
        initial=start_row,
        unit="img",
        desc="extract",
        disable=not cfg.progress,
        smoothing=0.05,
    )
    try:
        with bar, torch.inference_mode(), autocast(device, cfg.precision):
            for rows, payload, errors in loader:
                start, n = rows[0], len(rows)
                if on_device:
                    tensors, decode_errors = decode_on_device(payload, device, spec.transform)
                    readable = [r for r in rows if r not in dict(errors)]
                    errors = sorted(
                        errors
                        + [(r, f"{samples.items[r]}: {e}") for r, e in zip(readable, decode_errors, strict=True) if e]
                    )
                    tensors = [t for t in tensors if t is not None]
                    x = torch.stack(tensors) if tensors else None
                else:
                    x = None if payload is None else payload.to(device, non_blocking=True)
                ok = np.ones(n, dtype=bool)
                ok[[row - start for row, _ in errors]] = False
                f = logits = None
                if x is not None:
                    f = forward(x.contiguous(memory_format=torch.channels_last))  # (B_ok, 3, H, W) -> (B_ok, D)
                    logits = model.classifier(f) if cfg.logits else None
                if errors and not cfg.skip_bad_images:
                    keep = errors[0][0] - start  # the rows before the first bad image are good: save them
                    sink.put(
                        start, ok[:keep], None if f is None else f[:keep], None if logits is None else logits[:keep]
                    )
                    sink.close()
                    listed = "; ".join(error for _, error in errors[:5])
                    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
                    raise BadImageError(f"cannot read {len(errors)} image(s): {listed}{more}")
                sink.put(start, ok, f, logits)
                skipped += [row for row, _ in errors]
                if errors_out is not None:
                    errors_out.update(errors)
                bar.update(n)
                if on_batch is not None:
                    on_batch(start + n)
    except BaseException:
        sink.close(raise_error=False)  # keep every row already computed
        raise
    sink.close()
    if skipped:
        report(f"skipped {len(skipped)} unreadable images: {[samples.ids[r] for r in skipped[:5]]}")
    return skipped
