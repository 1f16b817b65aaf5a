"""`--layers`: the modules a backbone's features pass through, and how each one's output becomes one
vector per image.

The modules on offer are those of the model as the extractor runs it: a torchvision model with its
final classification layer replaced by an identity (so `fc` is not one: its input is the features),
a timm model along its pre-logits path. Each output is averaged over every axis but its channels.
Which axis holds the channels is found, not assumed: a meta-device forward at the crop size and at
twice it, where spatial and token axes grow and the channel axis does not (NCHW convolutions,
NHWC Swin and ConvNeXt blocks, MaxViT's window partitions, ViT tokens alike). Where the second size
cannot run (a ViT made for one size), the convention is used: channels second in 4-D, last in 3-D.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipeline.backbones import architectures, timm_models
from pipeline.errors import ConfigError
from pipeline.registry import CUT_PREFIX, TIMM_PREFIX


def probe_model(name: str, **arguments: int) -> tuple[nn.Module, Callable[[torch.Tensor], Any]]:
    """The meta-device model as the extractor runs it, and how to run it."""
    if name.startswith(TIMM_PREFIX):
        model = timm_models.meta_model(name)
        return model, lambda x: timm_models.pre_logits(model, x)
    model = architectures.meta_model(name, **arguments)
    parent, _, leaf = architectures.anatomy(name).head.rpartition(".")
    setattr(model.get_submodule(parent), leaf, nn.Identity())
    return model, model


def module_paths(name: str) -> list[str]:
    """The module paths --layers accepts: every module the extractor's model holds."""
    return [path for path, _ in probe_model(name)[0].named_modules() if path]


def _shapes(
    name: str, paths: tuple[str, ...] | None, size: int, arguments: dict[str, int]
) -> dict[str, tuple]:
    """{path: output shape} of the modules that a meta forward of `size`-pixel crops runs, in
    finishing order."""
    model, run = probe_model(name, **arguments)
    shapes: dict[str, tuple] = {}

    def record(path: str) -> Callable[..., None]:
        def hook(
            module: nn.Module, inputs: Any, output: Any
        ) -> None:  # returns None: the output is unchanged
            out = output[0] if isinstance(output, tuple | list) else output
            if isinstance(out, torch.Tensor):
                shapes.setdefault(path, tuple(out.shape))

        return hook

    chosen = [p for p, _ in model.named_modules() if p] if paths is None else paths
    hooks = [model.get_submodule(path).register_forward_hook(record(path)) for path in chosen]
    try:
        with torch.no_grad():
            run(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _sized(name: str, size: int) -> dict[str, Any]:
    """Builder arguments that make a fixed-size torchvision model take `size`-pixel inputs."""
    if name.startswith(TIMM_PREFIX):
        return {}
    return {"VisionTransformer": {"image_size": size}, "MaxVit": {"input_size": (size, size)}}.get(
        architectures.anatomy(name).family, {}
    )


def channel_axis(shape: tuple, grown: tuple | None) -> int:
    """The axis of `shape` that holds the channels: one that keeps its size (> 1) when the input
    grows (`grown`), the second in 4-D when it does, else the last that does; by convention without
    `grown`."""
    if len(shape) <= 2:
        return 1
    if grown is not None and len(grown) == len(shape):
        kept = [d for d in range(1, len(shape)) if shape[d] == grown[d] and shape[d] > 1]
        if kept:
            return 1 if len(shape) == 4 and 1 in kept else kept[-1]
    return 1 if len(shape) == 4 else len(shape) - 1


@functools.cache
def layout(
    name: str, layers: tuple[str, ...] | None, size: int, **arguments: int
) -> dict[str, tuple[int, int]]:
    """{path: (width of its pooled output, channel axis)} of `layers` (every module the forward runs
    when None), for `size`-pixel crops."""
    first = _shapes(name, layers, size, arguments)
    try:  # models made for one input size (ViT, MaxViT) are built anew for the larger one
        grown = _shapes(name, layers, 2 * size, {**arguments, **_sized(name, 2 * size)})
    except (RuntimeError, AssertionError, ValueError):
        grown = {}
    out = {}
    for path, shape in first.items():
        axis = channel_axis(shape, grown.get(path))
        out[path] = (int(shape[axis]) if len(shape) > 2 else math.prod(shape[1:]), axis)
    return out


def cut_shape(name: str, module: str, size: int, **arguments: int) -> tuple[int, ...]:
    """The shape of one image's whole output of `module` (no batch axis) for `size`-pixel crops."""
    return tuple(int(d) for d in _shapes(name, (module,), size, arguments)[module][1:])


def split_probe(name: str, cut: str, **arguments: int) -> Any:
    """The meta-device model as the extractor runs it (a timm model along its pre-logits path),
    split at module `cut` (`pipeline.backbones.split.Split`): graphs and shapes, no weights."""
    from pipeline.backbones import split

    model, _ = probe_model(name, **arguments)
    body = timm_models.PreLogits(model) if name.startswith(TIMM_PREFIX) else model
    return split.of_extractor(body, model, cut, name)


def sized_cut_shape(name: str, module: str, size: int) -> tuple[int, ...]:
    """`cut_shape` of a model built for `size`-pixel crops (a ViT is made for its crop size)."""
    return cut_shape(name, module, size, **_sized(name, size))


def _splits(name: str, module: str, arguments: dict[str, int]) -> None:
    """A cut is for `--head tail`: refuse, before any image is read, one the backbone cannot be
    split at (`pipeline.backbones.split`), in the same one line the head would give."""
    try:
        split_probe(name, module, **arguments)
    except ConfigError as exc:
        raise ConfigError(f"--cut {module}: {str(exc).removeprefix('--head tail: ')}") from None


def check(
    name: str, layers: tuple[str, ...], size: int, **arguments: int
) -> dict[str, tuple[int, int | None]]:
    """`layout` of `layers`, or a ConfigError naming a module that does not exist or never runs. A
    cut (`cut:MODULE`) is MODULE's whole output: its width the product of its shape, axis None."""
    cuts = {
        layer: layer.removeprefix(CUT_PREFIX) for layer in layers if layer.startswith(CUT_PREFIX)
    }
    pooled = tuple(layer for layer in layers if layer not in cuts)
    found: dict[str, tuple[int, int | None]] = dict(_check(name, pooled, size, **arguments))
    _check(name, tuple(cuts.values()), size, "--cut", **arguments)
    for module in cuts.values():
        _splits(name, module, arguments)
    for layer, module in cuts.items():
        found[layer] = (math.prod(cut_shape(name, module, size, **arguments)), None)
    return {layer: found[layer] for layer in layers}


def _check(
    name: str, layers: tuple[str, ...], size: int, flag: str = "--layers", **arguments: int
) -> dict[str, tuple[int, int]]:
    paths = set(module_paths(name))
    head = None if name.startswith(TIMM_PREFIX) else architectures.anatomy(name).head
    for layer in layers:
        if head is not None and (layer == head or layer.startswith(head + ".")):
            raise ConfigError(
                f"{flag}: {layer!r} is {name}'s classification layer, which the features replace "
                "(they are its input); name a module before it"
            )
        if layer not in paths:
            close = difflib.get_close_matches(layer, sorted(paths), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(
                f"{flag}: {name} has no module {layer!r}; {hint}`pipeline backbones {name} "
                "--layers` lists them"
            )
    found = layout(name, tuple(layers), size, **arguments)
    unused = [layer for layer in layers if layer not in found]
    if unused:
        raise ConfigError(
            f"{flag}: {name} does not run {', '.join(unused)} on the way to its features; pick "
            "another module"
        )
    return {layer: found[layer] for layer in layers}
