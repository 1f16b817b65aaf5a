"""Reduced-size JPEG decoding (`--decode cpu`, the default) against the full decode (`--decode
exact`)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline import read_features
from pipeline.data import images
from pipeline.features import extract, stage
from pipeline.synthetic import photo_like

from helpers import tiny


@pytest.mark.parametrize(
    ("size", "side", "scale"),
    [
        ((4000, 3000), 512, 4),
        ((3000, 4000), 512, 4),
        ((500, 375), 512, 1),
        ((1024, 1025), 512, 2),
        ((800, 600), 73, 8),
    ],
)
def test_the_smallest_dct_scale_that_keeps_the_short_side(size, side, scale):
    assert images.draft_scale(size, side) == scale
    assert -(-min(size) // scale) >= side or scale == 1


def test_a_large_jpeg_decodes_reduced_and_other_formats_in_full(tmp_path):
    photo = photo_like(np.random.default_rng(0), 1600, 1200)
    photo.save(tmp_path / "big.jpg", quality=90)
    photo.save(tmp_path / "big.png")
    reduced = images.load_image(tmp_path / "big.jpg", min_short_side=290)
    assert reduced.size == (400, 300) and reduced.mode == "RGB", (
        "1/4 scale: 300 >= 290, 1/8 would give 150"
    )
    assert images.load_image(tmp_path / "big.jpg").size == (1600, 1200)
    assert images.load_image(tmp_path / "big.png", min_short_side=290).size == (1600, 1200)
    # The EXIF orientation is still applied after a reduced decode.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    photo.save(tmp_path / "turned.jpg", quality=90, exif=exif)
    assert images.load_image(tmp_path / "turned.jpg", min_short_side=290).size == (300, 400)


def test_reduced_decoding_changes_the_fingerprint_and_keeps_the_features(tmp_path):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        for n in range(3):
            (tmp_path / "data" / c).mkdir(parents=True, exist_ok=True)
            photo_like(rng, 1280, 960).save(tmp_path / "data" / c / f"{n}.jpg", quality=90)
    runs = {}
    for mode in ("cpu", "exact"):
        cfg = tiny(
            data=str(tmp_path / "data"),
            decode=mode,
            out=str(tmp_path / f"{mode}.h5"),
            image_size=64,
        )
        stage.run(cfg)
        runs[mode] = read_features(cfg.out)
    assert runs["cpu"].fingerprint["decode"] == (
        "PIL in DataLoader workers; JPEG reduced by DCT scaling to a short side >= twice the resize"
    )  # resize 73 at crop 64: 960 px decoded at 1/4 (240 px >= 146; 1/8 would be 120)
    assert (
        runs["exact"].fingerprint["decode"]
        == extract.DECODE_FINGERPRINT["exact"]
        == "PIL in DataLoader workers"
    )
    a, b = runs["cpu"].splits, runs["exact"].splits
    X, Y = np.vstack([a[s].X for s in sorted(a)]), np.vstack([b[s].X for s in sorted(b)])
    cosine = (X * Y).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(Y, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(X, Y)
