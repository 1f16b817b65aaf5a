"""A backbone request once resolved (`BackboneSpec`: identity, preprocessing, the layer the features
are) and the frozen model built from it (`FeatureExtractor`: images in, features out), whatever
library the model comes from; `pipeline.backbones.backbone` makes both.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.backbones.architectures import RESNET_LAYER
from pipeline.registry import CUT_PREFIX


def pool(output: Any, axis: int) -> torch.Tensor:
    """(B, ...) -> (B, C): the mean over every axis but the batch and channel `axis` (a tuple's
    first element)."""
    if isinstance(output, tuple | list):
        output = output[0]
    if output.ndim <= 2:
        return output.flatten(1)
    return output.mean(dim=tuple(d for d in range(1, output.ndim) if d != axis))


def flat(output: Any) -> torch.Tensor:
    """(B, ...) -> (B, prod(...)) in the output's logical order (a tuple's first element)."""
    if isinstance(output, tuple | list):
        output = output[0]
    return output.flatten(1)


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved (backbone, weights, preprocessing) request; cheap to make, nothing built yet."""

    name: str
    weights: str  # as asked for
    weights_id: str  # what the fingerprint records: enum + file, checkpoint sha256, or seed
    transform: Callable[[Any], torch.Tensor]  # PIL image or uint8 tensor -> (3, H, W) float
    preprocessing: str
    enum: Any = None  # torchvision WeightsEnum member, for named weights
    checkpoint: Path | None = None
    seed: int = 0
    prefix: str = ""  # stripped from every key of the checkpoint (e.g. 'backbone.')
    layer: str = RESNET_LAYER  # which activation the features are, as the fingerprint records it
    layer_dims: tuple[
        tuple[str, int], ...
    ] = ()  # --layers: (module path, pooled width), stored beside it
    layer_axes: tuple[
        tuple[str, int | None], ...
    ] = ()  # --layers: (module path, the axis of its output's channels); a --cut: (cut:PATH, None)

    @property
    def pretrained(self) -> bool:
        return self.enum is not None or self.checkpoint is not None

    @property
    def crop_size(self) -> int:
        return int(self.transform.crop_size[0])


class FeatureExtractor(nn.Module):
    """A body that maps images to features, and the classification layer kept aside for optional
    logits (only a Linear: SqueezeNet's convolution is followed by a ReLU and a pooling)."""

    def __init__(
        self, body: nn.Module, dim: int, classifier: nn.Linear | None, root: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.body, self.dim, self.classifier = body, dim, classifier
        self.root = body if root is None else root  # the model whose module paths --layers names
        self.captured: dict[str, torch.Tensor] = {}

    def watch(self, axes: dict[str, int | None]) -> None:
        """Keep the output of each named module, averaged over all but its channel axis, at every
        forward (`captured`, in that order); a cut (`cut:MODULE`, axis None) whole, flattened."""
        for layer, axis in axes.items():
            path = layer.removeprefix(CUT_PREFIX)
            self.root.get_submodule(path).register_forward_hook(
                lambda module, inputs, output, layer=layer, axis=axis: self.captured.__setitem__(
                    layer, pool(output, axis) if axis is not None else flat(output)
                )
            )

    @classmethod
    def before(cls, model: nn.Module, head: str, dim: int) -> FeatureExtractor:
        """`model` with its layer at module path `head` replaced by an identity."""
        parent, _, leaf = head.rpartition(".")
        owner = model.get_submodule(parent)
        layer = getattr(owner, leaf)
        setattr(owner, leaf, nn.Identity())
        return cls(model, dim, layer if isinstance(layer, nn.Linear) else None)

    def forward(
        self, x: torch.Tensor
    ) -> torch.Tensor:  # (B, 3, H, W) -> (B, D); watched layers -> captured
        self.captured = {}
        return self.body(x)


def sized_transform(make: Callable[..., Any], image_size: int | None) -> Any:
    """``make()``, or at crop `image_size` keeping the weights' resize/crop ratio (256/224 or
    232/224)."""
    transform = make()
    if image_size is None:
        return transform
    resize = round(image_size * transform.resize_size[0] / transform.crop_size[0])
    return make(crop_size=image_size, resize_size=resize)


def describe_transform(transform: Any) -> str:
    """The transform's repr on one line: what the fingerprint records as the preprocessing."""
    return re.sub(r"\(\s+|\s+\)", lambda m: m.group().strip(), " ".join(repr(transform).split()))
