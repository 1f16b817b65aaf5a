"""`make bench-gpu`: the GPU numbers, in one command that finishes in under 5 minutes on a CUDA
machine.

1. forward-only images/s of resnet50 and resnet18 at 224 px: fp32, bf16 and fp16 (autocast),
   channels-last, with and without `torch.compile`;
2. `pipeline features` images/s on 2,000 photo-like 500x375 JPEGs, decoded by PIL in DataLoader
   workers (`--decode cpu`) and on the GPU (`--decode device`, nvjpeg), with the GPU's utilisation
   sampled every 0.2 s during each run;
3. the torch head's 45-value sweep (select, refit, test) on the 50,000 x 2,048 x 100-class cache.

Writes benchmarks/out/gpu.json. Without CUDA it refuses in one line (exit status 2). Every function
takes the device, so the logic runs on the CPU in the tests (tests/test_benchmarks.py).

python -m benchmarks.gpu            # or: make bench-gpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.measure import extraction_rate, forward_rate

OUT = Path("benchmarks/out")


def read_utilisation() -> float | None:
    """The GPU's utilisation in %, from nvidia-smi (None when it cannot be read)."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=5,
    )
    try:
        return float(done.stdout.split()[0])
    except (IndexError, ValueError):
        return None


@contextmanager
def sampled(read: Callable[[], float | None], every: float = 0.2) -> Iterator[list[float]]:
    """Samples of `read()` taken every `every` seconds on a thread while the block runs."""
    samples: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            value = read()
            if value is not None:
                samples.append(value)
            stop.wait(every)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def summary(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0, "mean": None, "p10": None, "p90": None}
    ordered = sorted(samples)
    return {
        "samples": len(samples),
        "mean": sum(samples) / len(samples),
        "p10": ordered[len(ordered) // 10],
        "p90": ordered[(len(ordered) * 9) // 10],
    }


def features_rate(
    photos: Path,
    count: int,
    decode: str,
    device: str,
    read: Callable[[], float | None],
    batch: int = 128,
) -> dict[str, Any]:
    """`pipeline features` images/s of resnet50 (start-up excluded, see `measure.extraction_rate`)
    and the utilisation sampled during the run."""
    out = OUT / f"gpu-{photos.name}-{decode}.h5"
    with sampled(read) as samples:
        rate = extraction_rate(photos, count, "resnet50", batch, decode, out, device=device)
    return {"images_per_s": rate, "utilisation": summary(samples)}


def sweep_seconds(cache: Path, device: str) -> dict[str, Any]:
    from pipeline.config import HeadConfig
    from pipeline.heads import protocol

    cfg = HeadConfig(
        features=str(cache),
        head="torch",
        device=device,
        progress=False,
        bootstrap=0,
        out=str(OUT / f"gpu-sweep-{device.replace(':', '')}"),
    )
    start = time.perf_counter()
    result = protocol.run(cfg)
    return {
        "seconds": time.perf_counter() - start,
        "test_top1": result["test"]["top1"],
        "timings": result["timings"],
    }


def run(
    device: str, images: int, names: tuple[str, ...], photos_dir: Path, cache: Path
) -> dict[str, Any]:
    """Every measurement on `device`; what gpu.json holds."""
    from pipeline.synthetic import write_photo_folder, write_synthetic_cache

    report: dict[str, Any] = {"device": device, "forward": [], "features": {}, "sweep": None}
    for name in names:
        for precision in ("fp32", "bf16", "fp16"):
            for compiled in (False, True):
                rate = forward_rate(name, precision, compiled, device)
                report["forward"].append(
                    {
                        "backbone": name,
                        "precision": precision,
                        "compile": compiled,
                        "channels_last": True,
                        "images_per_s": rate,
                    }
                )
                print(
                    f"  forward {name} {precision} compile={compiled}: {rate:.0f} img/s", flush=True
                )
    photos = write_photo_folder(photos_dir, images)
    for decode in ("cpu", "device"):
        report["features"][decode] = features_rate(photos, images, decode, device, read_utilisation)
        print(f"  features --decode {decode}: {report['features'][decode]}", flush=True)
    if not cache.exists():
        write_synthetic_cache(cache)
    report["sweep"] = sweep_seconds(cache, device)
    print(f"  torch head sweep: {report['sweep']['seconds']:.1f} s", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "error: make bench-gpu measures a CUDA GPU, and torch.cuda.is_available() is False "
            "here "
            f"(torch {torch.__version__}); run it on a machine with an NVIDIA GPU and a CUDA build "
            "of torch",
            file=sys.stderr,
        )
        return 2
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = run(
        "cuda",
        args.images,
        ("resnet50", "resnet18"),
        OUT / f"photos-{args.images}",
        OUT / "cifar100-like.h5",
    )
    report |= {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - started,
    }
    (OUT / "gpu.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {OUT / 'gpu.json'} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
