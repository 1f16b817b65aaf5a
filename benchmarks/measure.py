"""The two speed measurements `make bench` and `make bench-gpu` share: a backbone's forward pass on
ready tensors, and `pipeline features` with its start-up excluded."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any


def forward_rate(
    name: str,
    precision: str,
    compiled: bool,
    device: str,
    batch: int = 128,
    size: int = 224,
    batches: int = 10,
    channels_last: bool = True,
) -> float:
    """images/s of the frozen backbone on ready tensors on `device`, channels-last (as the pipeline
    runs it) unless `channels_last` is off."""
    import torch

    from pipeline.backbones import backbone
    from pipeline.devices import autocast

    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = backbone.build(backbone.describe(name, "none")).to(device, memory_format=layout)
    forward = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
    with torch.inference_mode(), autocast(torch.device(device), precision):
        for _ in range(3 if compiled else 1):  # warm-up (compilation happens here)
            forward(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(batches):
            forward(x)
        _sync(device)
    return batch * batches / (time.perf_counter() - start)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def extraction_rate(
    photos: Path,
    count: int,
    name: str,
    batch: int,
    decode: str,
    out: Path,
    device: str = "auto",
    layers: str | None = None,
    precision: str = "fp32",
) -> float:
    """`pipeline features` images/s with its start-up excluded: a full run's time minus a rerun's on
    the now-current cache (listing the files, the fingerprint, opening the cache)."""
    from pipeline.config import FeaturesConfig
    from pipeline.features import stage

    cfg = FeaturesConfig(
        data=str(photos),
        backbone=name,
        weights="none",
        out=str(out),
        device=device,
        batch_size=batch,
        progress=False,
        val_fraction=0.0,
        test_fraction=0.0,
        decode=decode,
        layers=layers,
        precision=precision,
    )
    start = time.perf_counter()
    stage.run(dataclasses.replace(cfg, force=True))
    full = time.perf_counter() - start
    start = time.perf_counter()
    assert stage.run(cfg).status == "current"
    return count / (full - (time.perf_counter() - start))


def plain_loader(photos: Path, batch: int, shuffle: bool = False) -> Any:
    """The loader one writes without this project: torchvision's `ImageFolder` with the usual
    resize-256 / crop-224 transform, a `DataLoader` with the pipeline's default workers."""
    import torch
    import torchvision
    from torchvision import transforms

    from pipeline.backbones.forward import default_workers

    transform = transforms.Compose(
        [
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    return torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(str(photos), transform),
        batch_size=batch,
        shuffle=shuffle,
        num_workers=default_workers(),
    )


def plain_loop_rate(photos: Path, count: int, name: str, batch: int) -> float:
    """images/s of the loop one writes without this project: torchvision's `ImageFolder` with the
    usual resize-256 / crop-224 transform, a `DataLoader` with as many workers as the pipeline's
    default, the model's forward in fp32 with its classifier made an identity, rows to numpy.
    Timed from the model's construction to the last row."""
    import torch
    import torchvision
    from torch import nn

    start = time.perf_counter()
    model = torchvision.models.get_model(name, weights=None).eval()
    if hasattr(model, "fc"):
        model.fc = nn.Identity()
    elif hasattr(model, "heads"):
        model.heads = nn.Identity()
    else:
        model.classifier[-1] = nn.Identity()
    loader = plain_loader(photos, batch)
    rows = 0
    with torch.inference_mode():
        for x, _ in loader:
            rows += len(model(x).numpy())
    assert rows == count, (rows, count)
    return count / (time.perf_counter() - start)
