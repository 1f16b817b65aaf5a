"""Reading one image: decoding to 8-bit RGB with the file named in every error, images held in
memory by torchvision datasets, and the map-style datasets the DataLoader workers run."""

from __future__ import annotations

import os
from typing import IO

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import BadImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


_SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images as 8-bit RGB."""
    if image.mode in _SIXTEEN_BIT:
        # convert("RGB") would clip 16-bit values at 255; scale the full range down instead.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" else 257.0
        image = Image.fromarray(np.clip(pixels / scale, 0, 255).round().astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def draft_scale(size: tuple[int, int], min_short_side: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) that leaves the short side at least
    `min_short_side`."""
    short = min(size)
    return max((s for s in (1, 2, 4, 8) if -(-short // s) >= min_short_side), default=1)


def load_image(
    path: str | os.PathLike[str] | IO[bytes],
    min_short_side: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode an image file (or file object, called `name` in errors) as RGB, raising BadImageError
    (with the path or name) when it cannot.

    With `min_short_side`, a JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8, libjpeg's
    scaled IDCT through PIL's `draft`) whose short side is still at least that many pixels; the
    resize that follows then starts from fewer pixels. Other formats decode in full."""
    try:
        with Image.open(path) as image:
            if min_short_side and image.format == "JPEG":
                scale = draft_scale(image.size, min_short_side)
                if scale > 1:
                    w, h = image.size
                    image.draft(image.mode, (-(-w // scale), -(-h // scale)))
            image.load()  # decode now, so truncated files fail here and not in a transform
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise BadImageError(f"{name or path}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).split(" '")[0] or type(exc).__name__  # drop PIL's repeated file name
        if "truncated" in reason.lower():
            reason = "file is truncated"
        raise BadImageError(f"{name or path}: {reason}") from None


class ArrayReader:
    """Images held in memory by a torchvision dataset (CIFAR, STL10), addressed by (split,
    index)."""

    def __init__(self, arrays: dict[str, np.ndarray], channels_first: bool) -> None:
        self.arrays = arrays
        self.channels_first = channels_first

    def __call__(self, item: tuple[str, int]) -> Image.Image:
        pixels = self.arrays[item[0]][item[1]]
        if self.channels_first:
            pixels = np.transpose(pixels, (1, 2, 0))
        return to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))
