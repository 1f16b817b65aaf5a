"""A measured plan for a large extraction: `python -m benchmarks.plan --images 1e9 --gpus 64`.

What is measured here, in this run, on this machine (one core each, start-up excluded):
  - decoding + preprocessing one photo-like JPEG for the backbone (500x375 web photo; 12-MP phone
    photo reduced by DCT scaling, the default, and in full), through the pipeline's own code;
  - reading an image file's bytes (all the CPU does per image when the GPU decodes: --decode
    device);
  - the bytes per cache row, from a cache written by the pipeline's own writer;
  - one pass of the streamed torch head over a block of rows (forward and gradient of the linear
    layer for K classes), per row.
What is assumed, and cited:
  - the GPU's forward throughput: ResNet-50 inference with mixed precision at batch 256 on one V100,
    3,382 images/s (NVIDIA DeepLearningExamples,
    PyTorch/Classification/ConvNets/resnet50v1.5/README.md,
    "Inference performance: NVIDIA DGX-1 (1x V100 16GB)", pytorch-21.03 container). Newer GPUs are
    faster: pass --gpu-rate with your own `make bench-gpu` number. Other backbones scale it by their
    forward cost relative to ResNet-50 measured here on the CPU;
  - that GPUs scale linearly across ranks (each rank writes its own part; no shared bottleneck but
    the file system, which --disk-gbps stands for), and that decoding parallelises across cores;
  - for --decode device, that the GPU's JPEG decoder keeps up (nvjpeg); the CPU then only reads
    bytes.
Prints a table and writes benchmarks/out/plan.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path("benchmarks/out")
V100_AMP_RESNET50 = 3382.0  # images/s, cited above


def per_image(fn, items: list, repeats: int = 1) -> float:
    """Seconds per item of fn on one core (the best of `repeats` passes)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return best


def measure(backbone: str, dim_dtype: str) -> dict:
    import torch

    from pipeline.backbones import backbone as bb
    from pipeline.data.images import load_image
    from pipeline.synthetic import photo_like

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    folder = OUT / "plan-images"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for label, size, count in (("500x375", (500, 375), 20), ("4000x3000", (4000, 3000), 4)):
        files[label] = []
        for i in range(count):
            path = folder / f"{label}-{i}.jpg"
            if not path.exists():
                photo_like(rng, *size).save(path, quality=90)
            files[label].append(path)
    transform = bb.describe("resnet50", "none").transform
    side = 2 * transform.resize_size[0]
    m = {
        "decode_500x375_s": per_image(
            lambda p: transform(load_image(p, side)), files["500x375"], 2
        ),
        "decode_12mp_reduced_s": per_image(
            lambda p: transform(load_image(p, side)), files["4000x3000"]
        ),
        "decode_12mp_full_s": per_image(lambda p: transform(load_image(p)), files["4000x3000"]),
        "read_bytes_s": per_image(lambda p: p.read_bytes(), files["500x375"] * 5, 3),
    }
    torch.set_num_threads(os.cpu_count() or 1)  # the forward rates only enter as a ratio
    rates = {}
    for name in dict.fromkeys(["resnet50", backbone]):
        model = bb.build(bb.describe(name, "none")).to(memory_format=torch.channels_last)
        x = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            model(x)
            start = time.perf_counter()
            model(x)
            rates[name] = 16 / (time.perf_counter() - start)
        m["dim"] = model.dim
    m["relative_cost"] = rates["resnet50"] / rates[backbone]
    m["row_bytes"] = row_bytes(m["dim"], dim_dtype)
    m["head_pass_per_row_s"] = head_pass(m["dim"], 1000)
    return m


def row_bytes(dim: int, dtype: str, rows: int = 20_000) -> float:
    """File bytes per row of a cache written by the pipeline's writer (features plus per-row
    records)."""
    from pipeline.cache.writer import CacheWriter

    path = OUT / "plan-rows.h5"
    ids = [f"train-{i // 10000:06d}.tar/{i:012d}" for i in range(rows)]
    facts = {"file_size": np.zeros(rows, np.int64), "file_mtime_ns": np.zeros(rows, np.int64)}
    writer = CacheWriter.open(
        path,
        fingerprint={"plan": rows},
        ids=ids,
        labels=np.zeros(rows, np.int64),
        split=np.zeros(rows, np.int8),
        classes=["a", "b"],
        dim=dim,
        store_dtype=dtype,
        identity=facts,
    )
    for a in range(0, rows, 4096):
        writer.write(a, np.zeros((min(4096, rows - a), dim), np.float32))
    done = writer.finish()
    writer.close()
    size = done.stat().st_size
    done.unlink()
    return size / rows


def head_pass(dim: int, classes: int, block: int = 4096) -> float:
    """Seconds per row of one streamed-head pass: logits, softmax cross-entropy and its gradient."""
    import torch

    X = torch.randn(block, dim)
    y = torch.randint(0, classes, (block,))
    W = torch.zeros(dim, classes, requires_grad=True)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(X @ W, y).backward()
        best = min(best, time.perf_counter() - start)
    return best / block


def plan(images: float, gpus: int, gpu_rate: float, m: dict, disk_gbps: float) -> dict:
    rate = gpu_rate / m["relative_cost"]  # images/s per GPU for this backbone
    cache_bytes = images * m["row_bytes"]
    return {
        "images": images,
        "extraction_hours": images / (rate * gpus) / 3600,
        "cores_per_gpu_500x375": rate * m["decode_500x375_s"],
        "cores_per_gpu_12mp": rate * m["decode_12mp_reduced_s"],
        "cores_per_gpu_12mp_full": rate * m["decode_12mp_full_s"],
        "cores_per_gpu_device_decode": rate * m["read_bytes_s"],
        "cache_tb": cache_bytes / 1e12,
        "head_epoch_disk_hours": cache_bytes / (disk_gbps * 1e9) / 3600,  # reading every row once
        "head_epoch_cpu_hours": images
        * m["head_pass_per_row_s"]
        / 3600,  # this machine's compute, one pass
    }


COLUMNS = {  # column: (header, format)
    "images": ("images", "{:>8.0e}"),
    "extraction_hours": ("extract h", "{:>9.3g}"),
    "cores_per_gpu_500x375": ("cores/GPU 500x375", "{:>17.1f}"),
    "cores_per_gpu_12mp": ("12-MP", "{:>6.1f}"),
    "cores_per_gpu_12mp_full": ("12-MP full", "{:>10.1f}"),
    "cores_per_gpu_device_decode": ("device decode", "{:>13.2f}"),
    "cache_tb": ("cache TB", "{:>8.3g}"),
    "head_epoch_disk_hours": ("head epoch: disk h", "{:>18.3g}"),
    "head_epoch_cpu_hours": ("CPU h", "{:>6.3g}"),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=float, nargs="+", default=[1e6, 1e8, 1e9])
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument(
        "--gpu-rate", type=float, default=V100_AMP_RESNET50, help="ResNet-50 images/s on one GPU"
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--store-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument(
        "--disk-gbps", type=float, default=2.0, help="read bandwidth for the streamed head, GB/s"
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    m = measure(args.backbone, args.store_dtype)
    rows = [plan(n, args.gpus, args.gpu_rate, m, args.disk_gbps) for n in args.images]
    print(
        f"measured here (one core): decode+preprocess 500x375 {m['decode_500x375_s'] * 1e3:.1f} "
        "ms, 12-MP reduced "
        f"{m['decode_12mp_reduced_s'] * 1e3:.1f} ms, 12-MP full "
        f"{m['decode_12mp_full_s'] * 1e3:.1f} ms, read bytes "
        f"{m['read_bytes_s'] * 1e3:.2f} ms; {m['row_bytes']:.0f} bytes per {m['dim']}-d "
        f"{args.store_dtype} row; "
        f"head pass {m['head_pass_per_row_s'] * 1e6:.2f} us per row (1,000 classes); "
        f"{args.backbone} costs "
        f"{m['relative_cost']:.2f}x ResNet-50"
    )
    print(
        f"assumed: {args.gpu_rate:.0f} ResNet-50 images/s per GPU, {args.gpus} GPUs scaling "
        "linearly, "
        f"{args.disk_gbps:g} GB/s disk for the head\n"
    )
    print("  ".join(f"{header:>{len(fmt.format(0.0))}}" for header, fmt in COLUMNS.values()))
    for r in rows:
        print("  ".join(fmt.format(r[key]) for key, (_, fmt) in COLUMNS.items()))
    (OUT / "plan.json").write_text(
        json.dumps({"measured": m, "assumed": vars(args), "plan": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
