"""A frozen classification model that maps an image to the vector feeding its final classification
layer.

Any torchvision classification model (`torchvision.models.list_models`) and, with the timm extra,
any `timm:NAME` (`pipeline.backbones.timm_models`). One rule for every family: the feature is the
input of the model's last `nn.Linear` (`fc` of a ResNet, `heads.head` of a ViT, `classifier.2` of a
ConvNeXt), or of its last 1x1 `nn.Conv2d` where it has no Linear (SqueezeNet), found on a model
built on the meta device (`anatomy`: no memory, no initialisation) and replaced by an identity.

`describe` resolves a (backbone, weights) request without building anything, which is all the cache
fingerprint needs, so a current cache is recognised in a second or two. `build` then makes the
model. Preprocessing always comes from a torchvision weights object (`weights.transforms()`), never
from copied constants; random or checkpoint weights use the standard ImageNet evaluation
preprocessing of the model's IMAGENET1K_V1 weights (DEFAULT where it has none) at the requested
size.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from pipeline.backbones import architectures, checkpoints
from pipeline.backbones.layers import check as layer_check
from pipeline.backbones.spec import (
    BackboneSpec,
    FeatureExtractor,
    describe_transform,
    sized_transform,
)
from pipeline.errors import ConfigError, WeightsError
from pipeline.registry import TIMM_PREFIX

__all__ = ["BackboneSpec", "FeatureExtractor", "build", "describe", "rebuilt"]


def describe(
    name: str,
    weights: str = "DEFAULT",
    seed: int = 0,
    image_size: int | None = None,
    layers: tuple[str, ...] = (),
) -> BackboneSpec:
    """Validate the names and work out identity and preprocessing, without building the model;
    `layers` names modules whose pooled outputs are kept too (their widths from a meta-device
    forward)."""
    if name.startswith(TIMM_PREFIX):
        from pipeline.backbones import timm_models

        spec = timm_models.describe(name, weights, seed, image_size)
    else:
        spec = _describe(name, weights, seed, image_size)
    if not layers:
        return spec
    sizes = (
        {}
        if name.startswith(TIMM_PREFIX)
        else _size_arguments(name, spec.transform, spec.enum, spec.checkpoint)
    )
    found = layer_check(name, tuple(layers), spec.crop_size, **sizes)
    return dataclasses.replace(
        spec,
        layer_dims=tuple((layer, width) for layer, (width, _) in found.items()),
        layer_axes=tuple((layer, axis) for layer, (_, axis) in found.items()),
    )


def _describe(name: str, weights: str, seed: int, image_size: int | None) -> BackboneSpec:
    enum_cls = architectures.weights_enum(name)
    enum = checkpoint = None
    prefix = ""
    if weights.lower() == "none":
        weights_id = f"none (random init, seed {seed})"
    elif weights in enum_cls.__members__:  # DEFAULT, IMAGENET1K_V1, ...
        enum = enum_cls[weights]
        weights_id = f"{enum} ({os.path.basename(urlparse(enum.url).path)})"
    elif checkpoints.looks_like_path(weights):
        checkpoint, prefix, weights_id = checkpoints.identify(name, weights)
    else:
        names = ", ".join(enum_cls.__members__)
        raise ConfigError(
            f"unknown weights {weights!r} for {name}; choose one of: {names}, none, or a path to a "
            "checkpoint"
        )
    # random/checkpoint: the standard ImageNet eval preprocessing
    preset = enum or enum_cls.__members__.get("IMAGENET1K_V1", enum_cls.DEFAULT)
    transform = sized_transform(preset.transforms, image_size)
    architectures.check_input_size(
        name, transform.crop_size[0], **_size_arguments(name, transform, enum, checkpoint)
    )
    return BackboneSpec(
        name,
        weights,
        weights_id,
        transform,
        describe_transform(transform),
        enum=enum,
        checkpoint=checkpoint,
        seed=seed,
        prefix=prefix,
        layer=architectures.anatomy(name).layer,
    )


def _size_arguments(
    name: str, transform: Any, enum: Any, checkpoint: Path | None
) -> dict[str, int]:
    """How the model is built for its input size: named weights say theirs, random weights take the
    crop, and a checkpoint is built as the architecture's default (what its keys and shapes were
    checked against)."""
    if checkpoint is not None:
        return {}
    return architectures.size_arguments(name, int(transform.crop_size[0]), enum)


def _download(enum: Any, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()``, which downloads `enum`'s file into the torch hub cache unless it is there; a
    download that fails names the file's place and the checkpoint alternative."""
    filename = os.path.basename(urlparse(enum.url).path)
    local = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return make()
    except (OSError, RuntimeError) as exc:  # URLError, timeouts and SSL errors are OSErrors
        reason = str(getattr(exc, "reason", exc)).splitlines()[0]
        raise WeightsError(
            f"cannot download {enum} from {enum.url} ({reason}); either put that file at {local} "
            "or pass --weights /path/to/checkpoint.pth"
        ) from None


def build(spec: BackboneSpec, progress: bool = True) -> FeatureExtractor:
    """The frozen model in eval mode: no grads, ready for `inference_mode`; it keeps the pooled
    outputs of the spec's layers at each forward."""
    if spec.name.startswith(TIMM_PREFIX):
        from pipeline.backbones import timm_models

        extractor = timm_models.build(spec)
    else:
        extractor = _build(spec, progress)
    extractor.watch(dict(spec.layer_axes))
    return extractor


def _build(spec: BackboneSpec, progress: bool) -> FeatureExtractor:
    parts = architectures.anatomy(spec.name)
    sizes = _size_arguments(spec.name, spec.transform, spec.enum, spec.checkpoint)
    state: dict[str, torch.Tensor] = {}
    if (
        spec.enum is not None
    ):  # the builder applies what the weights imply (GoogLeNet's transform_input, ...)
        model = _download(
            spec.enum,
            lambda: architectures.construct(spec.name, weights=spec.enum, progress=progress),
        )
    elif spec.checkpoint is not None:
        state = checkpoints.load(spec.checkpoint)
        prefix = checkpoints.prefix(
            spec.name, state, spec.checkpoint
        )  # as in describe, unless the file changed
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        key = f"{parts.head}.weight"
        classes = state[key].shape[0] if key in state else 1000
        model = architectures.construct(spec.name, weights=None, num_classes=classes, **sizes)
        fc_in = state[key].shape[1] if key in state else parts.dim
        if fc_in != parts.dim:
            raise WeightsError(
                f"checkpoint {spec.checkpoint} does not fit {spec.name}: {key!r} takes {fc_in} "
                "inputs in the "
                f"checkpoint and {parts.dim} in {spec.name}; pass the matching --backbone"
            )
        model.load_state_dict(
            state, strict=False
        )  # keys and shapes checked above; only the head may be absent
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(spec.seed)
            model = architectures.construct(spec.name, weights=None, **sizes)
    extractor = FeatureExtractor.before(model, parts.head, parts.dim).eval()
    if spec.checkpoint is not None and f"{parts.head}.weight" not in state:
        extractor.classifier = None  # a headless checkpoint: features only, no logits
    extractor.requires_grad_(False)
    return extractor


def rebuilt(
    fingerprint: dict[str, Any],
    settings: dict[str, Any],
    weights: str | None,
    what: str,
    layers: tuple[str, ...] = (),
) -> BackboneSpec:
    """The backbone and preprocessing that made a cache (of `what`: a head, the cache itself), from
    its features settings, refused unless its weights and preprocessing match the fingerprint."""
    spec = describe(
        fingerprint["backbone"],
        weights or settings["weights"],
        settings.get("seed", 0),
        settings.get("image_size"),
        layers,
    )
    if spec.weights_id != fingerprint["weights"]:
        raise WeightsError(
            f"cannot rebuild the backbone of {what}: its features came from weights "
            f"{fingerprint['weights']!r}, "
            f"these are {spec.weights_id!r}; pass --weights with the very same weights (a "
            "checkpoint is matched by "
            "its sha256)"
        )
    if spec.preprocessing != fingerprint["preprocessing"]:
        raise WeightsError(
            f"cannot rebuild the preprocessing of {what}: it was "
            f"{fingerprint['preprocessing']!r}, this "
            f"torchvision gives {spec.preprocessing!r}; use the torchvision version recorded in "
            "the head's cache"
        )
    return spec
