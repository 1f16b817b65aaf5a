"""What a torchvision classification model is made of, without building it for real.

`anatomy` finds where any model's features are (the input of its final classification layer) and the
shapes of its state dict, on a model whose parameters live on the meta device; `check_input_size`
runs a meta forward to refuse crop sizes a model cannot take. Both cost no memory and no compute.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from pipeline.errors import ConfigError
from pipeline.registry import RESNETS, TIMM_PREFIX

RESNET_LAYER = (
    "avgpool (flattened input of fc)"  # the ResNets' wording, kept so their caches stay current
)


@functools.cache
def available() -> tuple[str, ...]:
    """Every torchvision classification model name."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def weights_enum(name: str) -> Any:
    if name not in available():
        close = difflib.get_close_matches(name, available(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(
            f"unknown backbone {name!r}; {hint}`pipeline backbones` lists the torchvision models "
            f"(e.g. {', '.join(RESNETS[:2])}, convnext_tiny, vit_b_16), and {TIMM_PREFIX}NAME "
            "takes a timm model"
        )
    return torchvision.models.get_model_weights(name)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Every parameter and buffer created inside goes to the meta device: a model's structure and
    shapes without its memory or initialisation. (`torch.device("meta")` alone breaks builders that
    compute their widths with tensors, such as RegNet's.)"""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        meta = (
            None
            if param is None
            else nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        )
        register_parameter(module, name, meta)

    def buffer(
        module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = (
            register_parameter,
            register_buffer,
        )


def construct(name: str, **kwargs: Any) -> nn.Module:
    with (
        warnings.catch_warnings()
    ):  # GoogLeNet and Inception warn about their default initialisation
        warnings.simplefilter("ignore", FutureWarning)
        return torchvision.models.get_model(name, **kwargs)


@dataclass(frozen=True)
class Anatomy:
    """Where a model's features are: its final classification layer, and the state-dict shapes
    before it."""

    family: str  # the model's class, e.g. ResNet, VisionTransformer
    heads: tuple[
        str, ...
    ]  # module path(s) of the classification layer(s): fc, heads.head, classifier.6
    kind: str  # Linear, or Conv2d (SqueezeNet's 1x1 convolution)
    dim: int  # the feature dimension
    shapes: dict[str, tuple[int, ...]]  # state-dict key -> shape, the heads' keys left out
    layer: str  # which activation the features are, as the fingerprint records it

    @property
    def head(self) -> str:
        return self.heads[0]

    def body_keys(self, keys: dict[str, Any]) -> dict[str, Any]:
        """`keys` without those of the classification layer(s)."""
        return {k: v for k, v in keys.items() if not any(k.startswith(h + ".") for h in self.heads)}


def final_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(module path, module) of the model's last nn.Linear, or its last nn.Conv2d when it has no
    Linear."""
    modules = list(model.named_modules())
    linear = [(k, m) for k, m in modules if isinstance(m, nn.Linear)]
    found = linear or [(k, m) for k, m in modules if isinstance(m, nn.Conv2d)]
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no Linear or Conv2d layer to take features before"
        )
    return found[-1]


@functools.cache
def anatomy(name: str) -> Anatomy:
    """The structure of torchvision model `name`, from a build on the meta device (a timm model's:
    `pipeline.backbones.timm_models.anatomy`)."""
    weights_enum(name)
    with on_meta():
        model = construct(name, weights=None)
    path, head = final_layer(model)
    dim = head.in_features if isinstance(head, nn.Linear) else head.in_channels
    kind = type(head).__name__
    shapes = {
        k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(path + ".")
    }
    family = type(model).__name__
    pooled = ", pooled" if kind == "Conv2d" else ""
    layer = RESNET_LAYER if family == "ResNet" else f"input of {path} (the final {kind}{pooled})"
    return Anatomy(family, (path,), kind, dim, shapes, layer)


def size_arguments(name: str, crop: int, weights: Any = None) -> dict[str, int]:
    """Builder arguments that fix the input size. Only a ViT has one: its position embeddings are
    made for one size, its weights' own (`min_size`) or, without weights, the crop, so a random ViT
    takes any crop."""
    if anatomy(name).family != "VisionTransformer":
        return {}
    return {"image_size": int(weights.meta["min_size"][0]) if weights is not None else crop}


@functools.cache
def check_input_size(name: str, size: int, **arguments: int) -> None:
    """A ConfigError when torchvision model `name`, built with `arguments`, cannot take `size`-pixel
    crops (MaxViT's windows, a ViT made for another size or patches that do not divide it)."""
    try_input_size(lambda: meta_model(name, **arguments), name, size)


def try_input_size(build: Callable[[], nn.Module], name: str, size: int) -> None:
    """Run the meta-device model `build()` gives on one `size`-pixel crop; a one-line ConfigError
    when it cannot take it."""
    try:
        model = build()
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"))
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"backbone {name} cannot take {size}-pixel crops ({reason}); pass another --image-size "
            "(or leave it out for the weights' own size)"
        ) from None


def meta_model(name: str, **arguments: int) -> nn.Module:
    """Torchvision model `name` in eval mode with its parameters on the meta device."""
    with on_meta():
        return construct(name, weights=None, **arguments).eval()
