"""Augmented views of the training images (`--views K --augment crop-flip`): the accuracy that
caching usually gives up, bought once.

Each train image gets K views: a RandomResizedCrop at the weights' crop size (area scale
(`--view-scale`, 1), aspect ratio (3/4, 4/3), torchvision's rule of 10 tries then a centre crop) and
a horizontal flip with probability 1/2, both drawn from a generator seeded by the image's id and the
view's number, so a view is the same on every machine and every rerun. The crop is resized to the
crop size in one step (PIL, the weights' interpolation, antialiased) and normalised as the weights
say. Val and test keep their one centre-crop view.

The views are rows of a companion cache ``NAME.views.h5`` (ids ``<id>#view<k>``, all train): an
ordinary cache, so it resumes, verifies, updates incrementally and is read like any other; its
fingerprint records the recipe. `head --views` trains on them (see `pipeline.heads.fitting`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from pipeline.cache.schema import views_path
from pipeline.data.samples import SampleList

__all__ = ["AugmentedReader", "recipe", "view_samples", "view_spec", "views_path"]
from pipeline.backbones.spec import BackboneSpec, describe_transform

RESAMPLE = {
    InterpolationMode.BILINEAR: Image.BILINEAR,
    InterpolationMode.BICUBIC: Image.BICUBIC,
    InterpolationMode.NEAREST: Image.NEAREST,
}


def view_seed(sample_id: str, view: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{sample_id}#view{view}".encode(), digest_size=8).digest(), "big"
    )


def random_resized_box(
    width: int, height: int, scale: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering an area fraction in (scale, 1) with an
    aspect ratio in (3/4, 4/3), log-uniform: torchvision's RandomResizedCrop rule (10 tries, then
    the largest centre crop within the ratio range)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = (
        width / height
    )  # torchvision's fallback: the largest centre crop with a ratio within the range
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * 4 / 3), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


@dataclasses.dataclass(frozen=True)
class AugmentedReader:
    """Reads a view: the original image through `reader`, then its seeded crop, resize and flip. A
    plain class, so DataLoader workers can pickle it."""

    reader: Callable[[Any], Image.Image]
    crop: int
    scale: float
    interpolation: InterpolationMode

    def __call__(self, item: tuple[Any, str, int]) -> Image.Image:
        original, sample_id, view = item
        image = self.reader(original)
        rng = np.random.default_rng(view_seed(sample_id, view))
        box = random_resized_box(image.width, image.height, self.scale, rng)
        out = image.resize(
            (self.crop, self.crop), RESAMPLE.get(self.interpolation, Image.BILINEAR), box=box
        )
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def recipe(k: int, crop: int, scale: float) -> str:
    return (
        f"{k} views per train image: RandomResizedCrop({crop}, scale=({scale:g}, 1), ratio=(3/4, "
        "4/3)) and a "
        "horizontal flip with p=0.5, seeded by the image id and view number"
    )


def view_samples(samples: SampleList, k: int, spec: BackboneSpec, scale: float) -> SampleList:
    """The (train image, view) rows, in train order, view 1..k for each image."""
    rows = np.flatnonzero(samples.split == 0)
    facts = samples.identity
    reader = AugmentedReader(samples.reader, spec.crop_size, scale, spec.transform.interpolation)
    return SampleList(
        ids=[f"{samples.ids[r]}#view{v}" for r in rows for v in range(1, k + 1)],
        labels=np.repeat(samples.labels[rows], k),
        split=np.zeros(len(rows) * k, dtype=np.int8),
        classes=samples.classes,
        items=[(samples.items[r], samples.ids[r], v) for r in rows for v in range(1, k + 1)],
        reader=reader,
        source=samples.source,
        identity=None
        if facts is None
        else {key: np.repeat(values[rows], k) for key, values in facts.items()},
    )


def view_spec(spec: BackboneSpec, k: int, scale: float) -> BackboneSpec:
    """`spec` for views: they arrive at the crop size, so only the weights' normalisation is left to
    do."""
    t = spec.transform
    transform = ImageClassification(
        crop_size=spec.crop_size,
        resize_size=spec.crop_size,
        mean=t.mean,
        std=t.std,
        interpolation=t.interpolation,
    )
    text = f"{recipe(k, spec.crop_size, scale)}; then {describe_transform(transform)}"
    return dataclasses.replace(spec, transform=transform, preprocessing=text)
