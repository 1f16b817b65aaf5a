"""The expensive stage: every image through the frozen backbone once, rows into the cache file.

The forward loop (`pipeline.backbones.forward`) hands its rows to a `RowSink`, which writes them on
a background thread, so memory stays flat in N. This module owns one process's build or resume of a
cache file (`fill`) and its fingerprint. The fingerprint is computed before any model is built: a
current cache costs one directory scan.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from pipeline import fsutil
from pipeline.backbones import backbone
from pipeline.backbones.forward import forward_rows
from pipeline.cache import reader, schema
from pipeline.cache.writer import CacheWriter
from pipeline.config import FeaturesConfig
from pipeline.data.samples import SampleList, describe_changes
from pipeline.data.sources import load_samples
from pipeline.devices import choose_device
from pipeline.errors import BadImageError, CacheError, Interrupted
from pipeline.features import precision
from pipeline.settings import to_dict

Report = Callable[[str], None]


class RowSink:
    """Writes rows on a background thread, so device-to-host copies and HDF5 writes overlap the next
    forward pass. Rows stay in order (one thread, a bounded queue); an error in the thread is raised
    in the caller at its next `put` or at `close`."""

    def __init__(
        self,
        writer: CacheWriter,
        dim: int,
        logits_dim: int | None,
        layer_dims: dict[str, int] | None = None,
        depth: int = 4,
    ) -> None:
        self.writer, self.dim, self.logits_dim, self.layer_dims = (
            writer,
            dim,
            logits_dim,
            layer_dims or {},
        )
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def put(
        self,
        start: int,
        ok: np.ndarray,
        features: torch.Tensor | None,
        logits: torch.Tensor | None,
        layers: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Rows ``start .. start+len(ok)``; `features` (and `logits`, `layers`) hold the rows where
        `ok` is True, in order."""
        self._raise()
        self.queue.put((start, ok, features, logits, layers or {}))

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
            start, ok, features, logits, layers = item
            try:
                self.writer.write(
                    start,
                    self._rows(ok, features, self.dim),
                    ok,
                    None if logits is None else self._rows(ok, logits, self.logits_dim),  # type: ignore[arg-type]
                    {
                        name: self._rows(ok, layers.get(name), width)
                        for name, width in self.layer_dims.items()
                    },
                )
            except BaseException as exc:  # handed to the producer thread
                self.error = exc


def _quiet(message: str) -> None:
    pass


def versions() -> dict[str, str]:
    names = ("pipeline", "torch", "torchvision", "numpy", "h5py", "pillow")
    return {n: importlib.metadata.version(n) for n in names}


# How the pixels were decoded changes them: part of the fingerprint. `exact` keeps the wording of
# caches
# from before reduced decoding, so they stay current under --decode exact.
DECODE_FINGERPRINT = {
    "cpu": "PIL in DataLoader workers; JPEG reduced by DCT scaling to a short side >= twice the "
    "resize",
    "exact": "PIL in DataLoader workers",
    "device": "torchvision.io on the device",
}


def fingerprint(
    cfg: FeaturesConfig, samples: SampleList, spec: backbone.BackboneSpec
) -> dict[str, Any]:
    """Everything that changes the stored numbers, and nothing that does not (paths, devices,
    versions)."""
    return (
        {
            "schema": schema.SCHEMA_VERSION,
            "backbone": spec.name,
            "weights": spec.weights_id,
            "layer": spec.layer,
            "preprocessing": spec.preprocessing,
            "precision": cfg.precision,
            "store_dtype": cfg.store_dtype,
            "samples": f"sha256:{samples.digest()}",
            "rows": len(samples),
            "identity": "ids, labels, splits, file size and mtime"
            + (", sha256 of content" if cfg.verify_content else ""),
            "logits": cfg.logits,
            "decode": DECODE_FINGERPRINT[cfg.decode],
        }
        | (
            {"layers": f"{', '.join(cfg.layer_names)} (outputs averaged over space or tokens)"}
            if cfg.layers
            else {}
        )
        | ({"cut": f"{cfg.cut.strip()} (its whole output, flattened, float16)"} if cfg.cut else {})
    )


@dataclass(frozen=True)
class FeaturesResult:
    path: str
    status: str  # "current", "built", "resumed" or "updated" (pipeline.features.update)
    rows: int
    computed: int
    seconds: float
    skipped: list[str]


class Prepared(NamedTuple):
    samples: SampleList
    spec: backbone.BackboneSpec
    wanted: dict[str, Any]  # the fingerprint, in the chosen precision
    choice: precision.Choice  # the precision computed in, and why (`--precision auto`)


def prepare(cfg: FeaturesConfig, report: Report = _quiet, check: bool = True) -> Prepared:
    """The sample list, the backbone spec, the precision and the fingerprint they give. No model is
    built, but by `--precision auto` before a new cache, to check its choice against fp32 on the
    first images (`check`; see `pipeline.features.precision`). Run the cache's stage with the
    config's precision replaced by ``choice.precision`` (`resolved`)."""
    # A wrong backbone, weights or layer name fails here, before the images are scanned.
    spec = backbone.describe(cfg.backbone, cfg.weights, cfg.seed, cfg.image_size, cfg.stored_layers)
    samples = load_samples(
        data=cfg.data,
        dataset=cfg.dataset,
        root=cfg.root,
        download=cfg.download,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        split_seed=cfg.split_seed,
        verify_content=cfg.verify_content,
        carve=cfg.carve,
        data_val=cfg.data_val,
        data_test=cfg.data_test,
        label_key=cfg.label_key,
    )
    sizes = ", ".join(f"{k} {v}" for k, v in samples.split_sizes().items())
    report(
        f"data: {len(samples)} images, {len(samples.classes)} classes ({sizes}) from "
        f"{samples.source}"
    )
    if spec.enum is None and spec.checkpoint is None:
        report(
            f"note: --weights none: random initialisation (seed {spec.seed}), so these features "
            "are not pretrained; "
            "pretrained weights need a download (use --weights DEFAULT where there is internet)"
        )
    choice = precision.choose(
        cfg,
        samples,
        spec,
        lambda p: fingerprint(dataclasses.replace(cfg, precision=p), samples, spec),
        report,
        check,
    )
    return Prepared(samples, spec, fingerprint(resolved(cfg, choice), samples, spec), choice)


def resolved(cfg: FeaturesConfig, choice: precision.Choice) -> FeaturesConfig:
    """`cfg` computing in the chosen precision (never `auto`)."""
    return dataclasses.replace(cfg, precision=choice.precision)


def is_current(
    cfg: FeaturesConfig, wanted: dict[str, Any], samples: SampleList, report: Report = _quiet
) -> bool:
    """True when the cache at ``cfg.out_path`` already holds these features (and --force is off);
    otherwise says why it will be (re)built, or refuses under ``--on-mismatch refuse``."""
    out = cfg.out_path
    existing = reader.stored_fingerprint(out)
    pending = reader.partial_state(out)
    if existing == wanted and not cfg.force:
        if (
            pending is not None and pending[0] == wanted
        ):  # an interrupted --force rebuild of the same features
            report(
                f"cache {out} is complete and matches; an interrupted --force rebuild "
                f"({pending[1]} of {pending[2]} "
                f"rows) waits in {schema.partial_path(out)}: rerun with --force to finish it, or "
                "delete that file"
            )
        else:
            report(
                f"cache {out} is current ({wanted['rows']} rows); nothing to do (--force rebuilds)"
            )
        return True
    if existing is not None and existing != wanted:
        differences = "; ".join(schema.fingerprint_diff(existing, wanted))
        if existing.get("samples") != wanted.get("samples"):
            files = describe_changes(reader.stored_rows(out), samples)
            differences += f" ({files})" if files else ""
        if cfg.on_mismatch == "refuse":
            raise CacheError(
                f"cache {out} was built differently ({differences}); pass --on-mismatch rebuild or "
                "another --out"
            )
        if schema.model_part(existing) == schema.model_part(wanted) and not cfg.force:
            report(
                f"cache {out} holds another image set ({differences}); updating it, reusing "
                "unchanged rows"
            )
        else:
            report(f"cache {out} was built differently, rebuilding: {differences}")
    elif existing is not None:
        report(f"cache {out} is current; rebuilding because of --force")
    return False


def open_writer(
    out: Path,
    cfg: FeaturesConfig,
    samples: SampleList,
    wanted: dict[str, Any],
    dim: int,
    logits_dim: int | None,
    report: Report = _quiet,
    layer_dims: dict[str, int] | None = None,
    **attrs: Any,
) -> CacheWriter:
    """A writer for ``OUT.partial`` whose attributes describe `samples` and `cfg` (resumes when it
    can)."""
    return CacheWriter.open(
        out,
        fingerprint=wanted,
        ids=samples.ids,
        labels=samples.labels,
        split=samples.split,
        classes=samples.classes,
        dim=dim,
        store_dtype=cfg.store_dtype,
        logits_dim=logits_dim,
        attrs={
            "config": to_dict(cfg),
            "versions": versions(),
            "carved": samples.carved,
            "source": samples.source,
        }
        | attrs,
        identity=samples.identity,
        report=report,
        layer_dims=layer_dims,
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
    attrs: dict[str, Any] | None = None,
) -> FeaturesResult:
    """Extract every row not yet in ``OUT.partial`` (default: ``cfg.out_path``), then finish the
    file; `attrs` are recorded in it too."""
    out = cfg.out_path if out is None else out
    device = choose_device(cfg.device) if device is None else device
    model = backbone.build(spec, progress=cfg.progress)
    if cfg.logits and model.classifier is None:
        why = (
            f"checkpoint {spec.checkpoint} has no classification layer"
            if spec.checkpoint is not None
            else f"{spec.name}'s classification layer is not a Linear on the features "
            "(SqueezeNet's is a convolution "
            "followed by a pooling)"
        )
        raise CacheError(f"--logits: {why}; drop --logits")
    logits_dim = model.classifier.out_features if cfg.logits else None
    writer = open_writer(
        out,
        cfg,
        samples,
        wanted,
        model.dim,
        logits_dim,
        report,
        dict(spec.layer_dims),
        **(attrs or {}),
    )
    start = writer.rows_done
    sink = RowSink(writer, model.dim, logits_dim, dict(spec.layer_dims))
    try:
        bad = forward_rows(
            sink, start, samples, model, spec, cfg, device, report, on_batch=on_batch
        )
        path = writer.finish(
            {"extract_seconds": time.perf_counter() - t0, "extract_rows": len(samples) - start}
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted: {writer.rows_done} of {len(samples)} rows are saved in "
            f"{schema.partial_path(out)}; "
            "rerun the same command to resume"
        ) from None
    except BadImageError as exc:
        raise BadImageError(
            f"{exc}; fix or remove them, or rerun with --skip-bad-images to record and skip them "
            f"({writer.rows_done} rows saved, the rerun resumes)"
        ) from None
    except fsutil.WriteError as exc:
        error = fsutil.WriteError(
            f"{exc} ({writer.rows_done} of {len(samples)} rows are saved; the same command resumes "
            "once it can write)"
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
        f"{computed} images in {seconds:.1f} s"
        + (f", {len(skipped)} unreadable images skipped" if skipped else "")
    )
    return FeaturesResult(
        str(path), "resumed" if start else "built", len(samples), computed, seconds, skipped
    )
