"""Reduced-size JPEG decoding against the full decode, on real photo content: 320 JPEGs (2000x1500,
quality 90) cut from scikit-learn's two sample photographs (16 classes: 8 regions of each photo,
random crops and scales, upscaled, flipped, with sensor noise), through `pipeline features` with
`--decode cpu` (reduced, the default) and `--decode exact`, resnet18 at 224 px (random weights:
offline). Prints the cosine between the two features of every image and the logreg head's test top-1
on each cache, and checks the demo's caches (PNG images) are identical under both modes.

python -m benchmarks.decode      # about 3 minutes on a 2-core CPU; writes
benchmarks/out/decode.json
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import read_features
from pipeline.config import FeaturesConfig, HeadConfig
from pipeline.features import stage
from pipeline.heads import protocol

OUT = Path("benchmarks/out")


def write_real_photos(
    root: Path, per_class: int = 20, size: tuple[int, int] = (2000, 1500)
) -> Path:
    from sklearn.datasets import load_sample_images

    done = root / f".complete-{per_class}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for photo_index, photo in enumerate(load_sample_images().images):  # 427 x 640 x 3 each
        h, w, _ = photo.shape
        for region in range(8):  # a 2 x 4 grid of regions, each a class
            top, left = (region // 4) * h // 2, (region % 4) * w // 4
            folder = root / f"photo{photo_index}-region{region}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                ch = int(rng.uniform(0.6, 1.0) * h // 2)
                cw = min(int(ch * 4 / 3), w // 4)
                y0 = top + int(rng.integers(0, h // 2 - ch + 1))
                x0 = left + int(rng.integers(0, w // 4 - cw + 1))
                crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize(
                    size, Image.Resampling.BICUBIC
                )
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                pixels = np.asarray(crop, dtype=np.int16) + rng.integers(
                    -6, 7, (size[1], size[0], 3), dtype=np.int16
                )
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{n:03d}.jpg", quality=90
                )
    done.touch()
    return root


def main() -> None:
    photos = write_real_photos(OUT / "real-photos")
    caches = {}
    for mode in ("cpu", "exact"):
        cfg = FeaturesConfig(
            data=str(photos),
            backbone="resnet18",
            weights="none",
            decode=mode,
            progress=False,
            val_fraction=0.1,
            test_fraction=0.25,
            out=str(OUT / f"real-photos-{mode}.h5"),
        )
        stage.run(cfg)
        caches[mode] = cfg.out
    fs = {mode: read_features(path) for mode, path in caches.items()}
    X = {
        mode: np.vstack([f.splits[s].X for s in sorted(f.splits)]).astype(np.float64)
        for mode, f in fs.items()
    }
    cosine = (
        (X["cpu"] * X["exact"]).sum(1)
        / np.linalg.norm(X["cpu"], axis=1)
        / np.linalg.norm(X["exact"], axis=1)
    )
    top1 = {}
    for mode, path in caches.items():
        cfg = HeadConfig(
            features=path, out=str(OUT / f"real-photos-{mode}-logreg"), progress=False, bootstrap=0
        )
        top1[mode] = protocol.run(cfg)["test"]["top1"]
    demo = {}
    for mode in ("cpu", "exact"):
        out = OUT / f"demo-{mode}.h5"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "features",
                "--config",
                "configs/demo.toml",
                "--decode",
                mode,
                "--out",
                str(out),
                "--no-progress",
            ],
            check=True,
            capture_output=True,
        )
        demo[mode] = read_features(out)
    same = all(np.array_equal(demo["cpu"][s].X, demo["exact"][s].X) for s in demo["cpu"].splits)
    report = {
        "images": len(cosine),
        "cosine": {
            "min": float(cosine.min()),
            "mean": float(cosine.mean()),
            "p01": float(np.percentile(cosine, 1)),
        },
        "test_top1": top1,
        "demo_features_identical": same,
        "decode": {mode: f.fingerprint["decode"] for mode, f in fs.items()},
    }
    (OUT / "decode.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
