"""`pipeline backbones [FILTER]`: what can be extracted with, and what each model's feature is.

One row per torchvision classification model whose name contains FILTER: its family, the feature
dimension, the module whose input the feature is, the weights names, and the crop and resize of its
DEFAULT weights. With the timm extra installed, the timm models whose names match follow.
"""

from __future__ import annotations

from typing import Any

from pipeline.features import architectures, layers
from pipeline.registry import TIMM_PREFIX

TIMM_SHOWN = 30


def torchvision_rows(text: str = "") -> list[dict[str, Any]]:
    rows = []
    for name in architectures.available():
        if text.lower() not in name.lower():
            continue
        parts = architectures.anatomy(name)
        enum = architectures.weights_enum(name)
        preset = enum.DEFAULT.transforms()
        rows.append(
            {
                "name": name,
                "family": parts.family,
                "dim": parts.dim,
                "feature": f"input of {parts.head}" + (" (pooled)" if parts.kind == "Conv2d" else ""),
                "weights": ", ".join(m for m in enum.__members__ if m != "DEFAULT"),
                "preprocessing": f"crop {preset.crop_size[0]}, resize {preset.resize_size[0]}, "
                f"{preset.interpolation.value}",
            }
        )
    return rows


def timm_names(text: str = "") -> list[str] | None:
    """timm models with pretrained weights whose names contain `text`; None without timm."""
    try:
        import timm
    except ImportError:
        return None
    return [TIMM_PREFIX + n for n in timm.list_models(f"*{text}*", pretrained=True)]


def format_layers(name: str) -> str:
    """Every module of backbone `name` that --layers accepts, in the order the forward pass finishes them, with
    the width of its pooled output at the default crop size."""
    from pipeline.features import backbone

    spec = backbone.describe(name, "none")
    found = layers.layout(name, None, spec.crop_size)
    widths = {path: width for path, (width, _) in found.items()}
    kinds = dict(layers.probe_model(name)[0].named_modules())
    width = max(len(path) for path in widths)
    lines = [f"{name}: modules for --layers at {spec.crop_size} px (path, type, pooled width); the features are "
             f"{spec.layer}"]  # fmt: skip
    lines += [f"  {path.ljust(width)}  {type(kinds[path]).__name__:<20} {dim}" for path, dim in widths.items()]
    return "\n".join(lines)


def format_table(text: str = "") -> str:
    rows = torchvision_rows(text)
    columns = ("name", "family", "dim", "feature", "weights", "preprocessing")
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    if not rows:
        lines = [f"no torchvision classification model matches {text!r}"]
    names = timm_names(text.removeprefix(TIMM_PREFIX))
    if names is None:
        lines.append("timm models: install the extra (pip install 'pipeline[timm]') to use --backbone timm:NAME")
    else:
        shown = ", ".join(names[:TIMM_SHOWN]) + (
            f", ... ({len(names) - TIMM_SHOWN} more)" if len(names) > TIMM_SHOWN else ""
        )
        lines.append(
            f"timm models with pretrained weights matching {text!r}: {len(names)}" + (f": {shown}" if names else "")
        )
    return "\n".join(line.rstrip() for line in lines)
