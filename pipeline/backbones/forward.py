"""Running a backbone over a sample list: DataLoader workers decode and preprocess, the main process
runs one forward pass per batch and hands the rows to a sink (`Sink`: memory for `embed` and
`predict`, or the extraction run's cache writer). Unreadable images stop the run with their paths,
or are recorded and skipped."""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from tqdm import tqdm

from pipeline.backbones import backbone
from pipeline.config import FeaturesConfig
from pipeline.data.samples import SampleList
from pipeline.devices import autocast, choose_device
from pipeline.errors import BadImageError, WorkerError

Report = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


class ImageDataset:
    """Map-style dataset over rows ``start..N-1``: (row, tensor or None, error or None).

    A bad image does not raise inside a worker (where the traceback would be mangled); it comes back
    as an error string so the extraction loop decides: stop with the path, or record and skip it.
    """

    def __init__(
        self,
        samples: SampleList,
        transform: Callable[[Image.Image], Any],
        start: int = 0,
        min_short_side: int = 0,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.start = start
        self.min_short_side = (
            min_short_side  # JPEGs decoded reduced, short side >= this (0: in full)
        )

    def __len__(self) -> int:
        return len(self.samples) - self.start

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        row = self.start + i
        try:
            image = self.samples.read(row, self.min_short_side)
        except BadImageError as exc:
            return row, None, str(exc)
        return row, self.transform(image), None


class EncodedDataset(ImageDataset):
    """For decoding on the device: JPEG files come back as their bytes, anything else (PNG, 16-bit,
    in-memory arrays) as RGB pixels decoded here. Payloads are ("jpeg", uint8 bytes) or
    ("pixels", (H, W, 3) uint8)."""

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        row = self.start + i
        item = self.samples.items[row]
        if isinstance(item, str):
            try:
                with open(item, "rb") as fh:
                    head = fh.read(3)
                    if head == b"\xff\xd8\xff":
                        return (
                            row,
                            ("jpeg", np.frombuffer(bytearray(head + fh.read()), dtype=np.uint8)),
                            None,
                        )
            except OSError as exc:
                return row, None, f"{item}: {exc.strerror or exc}"
        try:
            image = self.samples.read(row)
        except BadImageError as exc:
            return row, None, str(exc)
        return row, ("pixels", np.asarray(image)), None


def collate(
    batch: list[tuple[int, Any, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(rows, stacked images of the readable rows, [(row, error)] of the unreadable ones).

    In a worker the batch goes into shared memory here, as torch's own collate does. A batch that
    cannot be shared (``ulimit -f``, a full /dev/shm) then fails where the loader reports it. Left
    to the queue's feeder thread, that failure would drop the batch and leave the run waiting
    forever.
    """
    rows, images, errors = collate_encoded(batch)
    if not images:
        return rows, None, errors
    stacked = torch.stack(images)
    return rows, (stacked.share_memory_() if get_worker_info() is not None else stacked), errors


def collate_encoded(
    batch: list[tuple[int, Any, str | None]],
) -> tuple[list[int], list[Any], list[tuple[int, str]]]:
    """(rows, the readable rows' payloads as a list, [(row, error)] of the unreadable ones)."""
    rows = [row for row, _, _ in batch]
    payloads = [payload for _, payload, _ in batch if payload is not None]
    errors = [(row, error) for row, _, error in batch if error is not None]
    return rows, payloads, errors


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def decode_on_device(
    payloads: list[tuple[str, np.ndarray]],
    device: torch.device,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """JPEG bytes decoded by torchvision.io on `device` (nvjpeg on CUDA, batched); pixels moved
    there. Returns the preprocessed (3, H, W) image or None per payload, and the decode error or
    None."""
    with (
        warnings.catch_warnings()
    ):  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(data: Any) -> Any:
            return decode_jpeg(
                data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True
            )

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
            images[i] = (
                torch.from_numpy(pixels).permute(2, 0, 1).to(device, non_blocking=True)
            )  # (3, H, W) uint8
    return [None if image is None else transform(image) for image in images], errors


class Sink(Protocol):
    """Where `forward_rows` puts the rows it computes, in order."""

    def put(
        self,
        start: int,
        ok: np.ndarray,
        features: torch.Tensor | None,
        logits: torch.Tensor | None,
        layers: dict[str, torch.Tensor] | None = None,
    ) -> None: ...

    def close(self, raise_error: bool = True) -> None: ...


class MemorySink:
    """Rows into one in-memory (N, D) array (NaN rows for unreadable images): for `embed`."""

    def __init__(self, n: int, dim: int, layer: str | None = None) -> None:
        self.features = np.full((n, dim), np.nan, dtype=np.float32)
        self.layer = layer

    def put(
        self,
        start: int,
        ok: np.ndarray,
        features: torch.Tensor | None,
        logits: torch.Tensor | None,
        layers: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if self.layer is not None and layers:
            features = layers[self.layer]
        if features is not None:
            self.features[start : start + len(ok)][ok] = features.float().cpu().numpy()

    def close(self, raise_error: bool = True) -> None:
        pass


def embed(
    cfg: FeaturesConfig,
    samples: SampleList,
    spec: backbone.BackboneSpec,
    report: Report = _quiet,
    layer: str | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Features of `samples` in memory, no cache file: (N, D) float32 and {row: error} of unreadable
    ones; with `layer`, that stored layer of the spec's (a cut) instead of the features."""
    device = choose_device(cfg.device)
    model = backbone.build(spec, progress=cfg.progress)
    sink = MemorySink(len(samples), dict(spec.layer_dims).get(layer, model.dim), layer)
    errors: dict[int, str] = {}
    forward_rows(sink, 0, samples, model, spec, cfg, device, report, errors)
    return sink.features, errors


def reduced_decode_side(cfg: FeaturesConfig, spec: backbone.BackboneSpec) -> int:
    """`--decode cpu`: JPEGs decoded reduced to twice the resize target on the short side (0: in
    full)."""
    return 2 * spec.transform.resize_size[0] if cfg.decode == "cpu" else 0


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _quiet_worker(worker_id: int) -> None:
    """SIGTERM to the whole process group ends a worker as Ctrl-C does: its loop returns quietly and
    the main process says "interrupted" once, instead of reporting a worker killed by a signal.
    Once the worker is exiting, the signal is ignored: raised inside multiprocessing's exit
    finalizers (a busy machine makes that window wide), it would print a traceback."""
    from multiprocessing import util

    signal.signal(signal.SIGTERM, _stop)
    # Finalizers run by priority, highest first: this one before the queues' (priority -5).
    util.Finalize(None, signal.signal, args=(signal.SIGTERM, signal.SIG_IGN), exitpriority=100)


def _batches(loader: DataLoader, cfg: FeaturesConfig) -> Any:
    """The loader's batches; a worker that dies or cannot hand over a batch ends the run in one
    line."""
    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as exc:
            raise _worker_error(exc, cfg) from None
        yield batch


def _worker_error(exc: RuntimeError, cfg: FeaturesConfig) -> BaseException:
    text = str(exc)
    if "DataLoader worker" not in text:
        return exc
    last = text.strip().splitlines()[-1]
    if any(
        reason in text for reason in ("File too large", "No space left", "Cannot allocate memory")
    ):
        return WorkerError(
            "DataLoader workers cannot hand a batch to the main process through shared memory "
            f"({last}); "
            "the file size limit (ulimit -f) or the free space in /dev/shm is too small for a "
            "batch of "
            f"{cfg.batch_size} images: raise it, lower --batch-size, or pass --workers 0 (finished "
            "rows are kept)"
        )
    return WorkerError(
        f"a DataLoader worker died ({text.splitlines()[0]}); out of memory, or killed? lower "
        "--workers or "
        "--batch-size and rerun the same command (finished rows are kept)"
    )


def forward_rows(
    sink: Sink,
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
        f"backbone: {spec.name} ({model.dim}-d), weights {spec.weights_id}; device {device}, "
        f"{cfg.precision}, "
        f"batch {cfg.batch_size}, {workers} workers, decode on {cfg.decode}"
        + (", compiled" if cfg.compile else "")
    )
    model = model.to(device, memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.compile else model
    on_device = cfg.decode == "device"
    dataset = (EncodedDataset if on_device else ImageDataset)(
        samples, spec.transform, start=start_row, min_short_side=reduced_decode_side(cfg, spec)
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=workers,
        collate_fn=collate_encoded if on_device else collate,
        pin_memory=device.type == "cuda" and not on_device,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_quiet_worker,
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
            for rows, payload, errors in _batches(loader, cfg):
                start, n = rows[0], len(rows)
                if on_device:
                    tensors, decode_errors = decode_on_device(payload, device, spec.transform)
                    readable = [r for r in rows if r not in dict(errors)]
                    errors = sorted(
                        errors
                        + [
                            (r, f"{samples.items[r]}: {e}")
                            for r, e in zip(readable, decode_errors, strict=True)
                            if e
                        ]
                    )
                    tensors = [t for t in tensors if t is not None]
                    x = torch.stack(tensors) if tensors else None
                else:
                    x = None if payload is None else payload.to(device, non_blocking=True)
                ok = np.ones(n, dtype=bool)
                ok[[row - start for row, _ in errors]] = False
                f = logits = None
                layers: dict[str, torch.Tensor] = {}
                if x is not None:
                    f = forward(
                        x.contiguous(memory_format=torch.channels_last)
                    )  # (B_ok, 3, H, W) -> (B_ok, D)
                    logits = model.classifier(f) if cfg.logits else None
                    layers = dict(model.captured)  # the --layers outputs of this same forward pass
                if errors and not cfg.skip_bad_images:
                    keep = (
                        errors[0][0] - start
                    )  # the rows before the first bad image are good: save them
                    sink.put(
                        start,
                        ok[:keep],
                        None if f is None else f[:keep],
                        None if logits is None else logits[:keep],
                        {name: v[:keep] for name, v in layers.items()},
                    )
                    sink.close()
                    listed = "; ".join(error for _, error in errors[:5])
                    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
                    raise BadImageError(f"cannot read {len(errors)} image(s): {listed}{more}")
                sink.put(start, ok, f, logits, layers)
                skipped += [row for row, _ in errors]
                if errors_out is not None:
                    errors_out.update(errors)
                bar.update(n)
                if on_batch is not None:
                    on_batch(start + n)
    except RuntimeError as exc:
        sink.close(raise_error=False)  # keep every row already computed
        # torch reports a dead worker from its SIGCHLD handler, in whatever the main thread runs
        # then (a forward pass, a write), not only where a batch is fetched.
        error = _worker_error(exc, cfg)
        if error is exc:
            raise
        raise error from None
    except BaseException:
        sink.close(raise_error=False)  # keep every row already computed
        raise
    sink.close()
    if skipped:
        report(f"skipped {len(skipped)} unreadable images: {[samples.ids[r] for r in skipped[:5]]}")
    return skipped
