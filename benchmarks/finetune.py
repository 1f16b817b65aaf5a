"""`make bench` part `finetune`: what fine-tuning the last stage of a backbone costs from a cached
cut (`features --cut`, `head --head tail`) against the plain torch loop that runs the whole
backbone, frozen trunk included, on every epoch.

Both train the same tail (resnet50 after layer3 by default) and linear head, from the same weights,
with the same optimiser, batch size, precision (fp32) and frozen batch-norm statistics, one epoch
over the same images; the plain
loop decodes and preprocesses every image (torchvision ImageFolder, resize 256 / crop 224, a
DataLoader with the pipeline's default workers) and runs the trunk under no_grad, as one would
without a cache. Rounds alternate between the two and the median of each is kept.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _plain_epoch(photos: Path, trunk: Any, tail: Any, dim: int, classes: int, batch: int) -> float:
    """Seconds of one epoch of the loop written without the cache."""
    import torch

    from benchmarks.measure import plain_loader
    from pipeline.backbones.split import freeze_statistics
    from pipeline.heads.kinds.tail import _net

    loader = plain_loader(photos, batch, shuffle=True)
    torch.manual_seed(0)
    net = _net(copy.deepcopy(tail), dim, classes)
    net.requires_grad_(True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for x, y in loader:
        with torch.no_grad():
            cut = trunk(x.contiguous(memory_format=torch.channels_last))
        loss = torch.nn.functional.cross_entropy(freeze_statistics(net)(cut), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def _cached_epoch(cache: Path, layer: str, shape: tuple, tail: Any, dim: int, batch: int) -> float:
    """Seconds of one epoch of `head --head tail`'s training loop on the cached cut (every row)."""
    import h5py

    from pipeline.config import HeadConfig
    from pipeline.heads.kinds import tail as kind

    with h5py.File(cache, "r") as f:
        labels = f["labels"][...]
        rows = kind.CutRows(f["layers"][layer], np.arange(len(labels)), labels, shape)
        cfg = HeadConfig(features=str(cache), head="tail", batch_size=batch, epochs=1)
        candidate = kind.Candidate(1, 1e-3, 1e-4)
        start = time.perf_counter()
        kind.train(cfg, tail, dim, int(labels.max()) + 1, candidate, rows, stop_at=1)
        return time.perf_counter() - start


def _flops(parts: Any) -> dict[str, float]:
    """GFLOP per image of the trunk's forward and the tail's training step (forward and backward,
    no gradient into the cut), and the ratio they bound the per-epoch speed-up by."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    tail = copy.deepcopy(parts.tail).requires_grad_(True)
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        cut = parts.trunk(torch.zeros(1, 3, 224, 224))
    trunk = counted.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as counted:
        tail(cut).sum().backward()
    step = counted.get_total_flops() / 1e9
    return {"trunk": trunk, "tail_step": step, "bound": (trunk + step) / step}


def bench_finetune(
    row: Any, out: Path, n: int, name: str = "resnet50", cut: str = "layer3", batch: int = 16
) -> None:
    from pipeline.backbones import backbone, catalog, split
    from pipeline.config import FeaturesConfig
    from pipeline.features import stage
    from pipeline.synthetic import write_photo_folder

    print(f"finetune: {name} cut at {cut}, {n} photo-like 500x375 JPEGs, batch {batch}, fp32")
    for point in catalog.cuts(name):
        row(
            f"{name} cut at {point['module']}: bytes per image (float16)",
            point["bytes"] / 1024,
            "KiB",
            tail_parameters=point["tail_parameters"],
        )
    photos = write_photo_folder(out / f"photos-{n}", n)
    cache = out / f"finetune-{name}-{cut}-{n}.h5"
    started = time.perf_counter()
    stage.run(
        FeaturesConfig(
            data=str(photos),
            backbone=name,
            weights="none",
            cut=cut,
            out=str(cache),
            progress=False,
            force=True,  # the extraction is timed: never a reuse
        )
    )
    extract = time.perf_counter() - started
    row(f"{name} --cut {cut}: cache size per image", cache.stat().st_size / n / 1024, "KiB")
    spec = backbone.describe(name, "none")
    model = backbone.build(spec, progress=False)
    parts = split.of_extractor(model.body, model.root, cut, name)
    shape = tuple(int(d) for d in parts.trunk(__import__("torch").zeros(1, 3, 224, 224)).shape[1:])
    assert math.prod(shape) > 0
    layer = f"cut:{cut}"
    cached, plain = [], []
    for _ in range(2):  # alternate, so a busy machine slows both alike
        cached.append(_cached_epoch(cache, layer, shape, parts.tail, model.dim, batch))
        plain.append(_plain_epoch(photos, parts.trunk, parts.tail, model.dim, 10, batch))
    tail_s, plain_s = statistics.median(cached), statistics.median(plain)
    row(f"{name} tail after {cut}: seconds per epoch from the cache", tail_s, "s", images=n)
    row(f"{name} tail after {cut}: seconds per epoch, plain loop (trunk runs)", plain_s, "s")
    ratio = plain_s / tail_s
    targeted = (name, cut) == ("resnet50", "layer3")  # the target is set for this cut
    row(
        f"{name} tail after {cut}: plain loop / cached, per epoch",
        ratio,
        "ratio",
        ">= 3" if targeted else "",
        (ratio >= 3) if targeted else None,
        flops=_flops(parts),
    )
    row(
        f"{name} --cut {cut}: extraction (once) in cached epochs' savings",
        extract / max(plain_s - tail_s, 1e-9),
        "epochs",
        extract_seconds=extract,
    )
