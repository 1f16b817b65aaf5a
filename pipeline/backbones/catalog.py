"""`pipeline backbones [FILTER]`: what can be extracted with, and what each model's feature is.

One row per torchvision classification model whose name contains FILTER: its family, the feature
dimension, the module whose input the feature is, the weights names, and the crop and resize of its
DEFAULT weights. With the timm extra installed, the timm models whose names match follow.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from pipeline.registry import TIMM_PREFIX

TIMM_SHOWN = 30
# The table for the torchvision this package was released with, so listing builds no model (and
# imports no torch); any other torchvision gets its table computed once and kept in the user's
# cache.
SHIPPED = Path(__file__).with_name("backbones.json")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"


def _cached(kind: str, version: str, compute: Any) -> Any:
    """`compute()` for this `kind` at this library `version`: from the shipped table or the user's
    cache when they hold it, else computed and kept in the user's cache (best effort)."""
    for path in (
        SHIPPED if kind == "torchvision" else None,
        _cache_dir() / f"{kind}-{version}.json",
    ):
        try:
            document = json.loads(path.read_text()) if path else None
        except (OSError, ValueError):
            document = None
        if isinstance(document, dict) and document.get("version") == version and "rows" in document:
            return document["rows"]
    rows = compute()
    try:
        target = _cache_dir() / f"{kind}-{version}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"version": version, "rows": rows}))
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only home: computed again next time
    return rows


def all_torchvision_rows() -> list[dict[str, Any]]:
    """Every torchvision classification model's row, computed from meta-device builds (seconds)."""
    from pipeline.backbones import architectures

    rows = []
    for name in architectures.available():
        parts = architectures.anatomy(name)
        enum = architectures.weights_enum(name)
        preset = enum.DEFAULT.transforms()
        rows.append(
            {
                "name": name,
                "family": parts.family,
                "dim": parts.dim,
                "feature": f"input of {parts.head}"
                + (" (pooled)" if parts.kind == "Conv2d" else ""),
                "weights": ", ".join(m for m in enum.__members__ if m != "DEFAULT"),
                "preprocessing": f"crop {preset.crop_size[0]}, resize {preset.resize_size[0]}, "
                f"{preset.interpolation.value}",
            }
        )
    return rows


def torchvision_rows(text: str = "") -> list[dict[str, Any]]:
    """The rows of the models whose names contain `text` (no model is built when the table is
    known)."""
    rows = _cached("torchvision", importlib.metadata.version("torchvision"), all_torchvision_rows)
    return [row for row in rows if text.lower() in row["name"].lower()]


def timm_names(text: str = "") -> list[str] | None:
    """timm models with pretrained weights whose names contain `text`; None without timm."""
    from pipeline.backbones import timm_models

    version = timm_models.installed_version()
    if version is None:
        return None
    names = _cached("timm", version, timm_models.pretrained_names)
    return [TIMM_PREFIX + n for n in names if text.lower() in n.lower()]


def write_shipped_table() -> Path:
    """Write backbones.json for the installed torchvision (run when the pinned torchvision
    changes)."""
    version = importlib.metadata.version("torchvision")
    SHIPPED.write_text(
        json.dumps({"version": version, "rows": all_torchvision_rows()}, indent=1) + "\n"
    )
    return SHIPPED


def format_layers(name: str) -> str:
    """Every module of backbone `name` that --layers accepts, in the order the forward pass finishes
    them, with the width of its pooled output at the default crop size."""
    from pipeline.backbones import backbone, layers

    spec = backbone.describe(name, "none")
    found = layers.layout(name, None, spec.crop_size)
    widths = {path: width for path, (width, _) in found.items()}
    kinds = dict(layers.probe_model(name)[0].named_modules())
    width = max(len(path) for path in widths)
    lines = [
        f"{name}: modules for --layers at {spec.crop_size} px (path, type, pooled width); the "
        "features are "
        f"{spec.layer}"
    ]
    lines += [
        f"  {path.ljust(width)}  {type(kinds[path]).__name__:<20} {dim}"
        for path, dim in widths.items()
    ]
    return "\n".join(lines)


# Modules that end a stage or block of the common families: ResNet and RegNet stages, the
# `features` blocks of ConvNeXt, EfficientNet, MobileNet, DenseNet and Swin, a ViT's encoder layers,
# GoogLeNet's and Inception's blocks, ShuffleNet's stages, timm's blocks and stages.
STAGE = re.compile(
    r"^(layer\d+|features\.\d+|features\.(denseblock|transition)\d+|"
    r"encoder\.layers\.encoder_layer_\d+|trunk_output\.block\d+|blocks\.\d+|stages\.\d+|"
    r"layers\.\d+|inception\d[a-z]|Mixed_\d[a-z]|stage\d)$"
)
SHOWN_CUTS = 4  # the last stages: the tails worth fine-tuning on a cache
MIN_TAIL = 100_000  # parameters a tail needs to be listed (not just pooling and a norm)


def cuts(name: str) -> list[dict[str, Any]]:
    """The sensible cut points of backbone `name` at its default crop size, last stages first: the
    module, its output shape, float16 bytes per image, the tail's parameters, and whether it splits
    cleanly (torch.fx) or why not."""
    from pipeline.backbones import backbone, layers, split
    from pipeline.errors import ConfigError

    spec = backbone.describe(name, "none")
    candidates = [path for path in layers.module_paths(name) if STAGE.match(path)]
    shapes = layers.layout(name, tuple(candidates), spec.crop_size)  # the ones the forward runs
    rows = []
    for path in [p for p in candidates if p in shapes][::-1]:
        shape = layers.cut_shape(name, path, spec.crop_size)
        row = {"module": path, "shape": shape, "bytes": 2 * math.prod(shape)}
        try:
            parts = layers.split_probe(name, path)
            row |= {"tail_parameters": split.tail_parameters(parts.tail), "splits": "yes"}
        except ConfigError as why:
            row |= {"tail_parameters": None, "splits": f"no: {str(why).split(': ', 1)[1]}"}
        if row["tail_parameters"] is not None and row["tail_parameters"] < MIN_TAIL:
            continue  # only pooling and a norm after it: nothing to fine-tune
        rows.append(row)
        if len(rows) == SHOWN_CUTS:
            break
    return rows


def format_cuts(name: str) -> str:
    """`pipeline backbones NAME --cuts`: where `features --cut` may cut NAME for `--head tail`."""
    from pipeline.backbones import backbone

    spec = backbone.describe(name, "none")
    rows = cuts(name)
    if not rows:
        return f"{name}: no stage modules found to cut at; `pipeline backbones {name} --layers`"
    width = max(len(r["module"]) for r in rows)
    lines = [
        f"{name}: cut points for `features --cut MODULE` and `head --head tail` at "
        f"{spec.crop_size} px (the tail after the cut is fine-tuned; each image's cut is stored "
        "in float16)"
    ]
    for r in rows:
        params = "-" if r["tail_parameters"] is None else f"{r['tail_parameters'] / 1e6:.1f}M"
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"  {r['module'].ljust(width)}  {shape:<14} {r['bytes'] / 1024:>8.0f} KiB/image  "
            f"tail {params:>6} parameters  splits: {r['splits']}"
        )
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
        lines.append(
            "timm models: install the extra (pip install 'pipeline[timm]') to use --backbone "
            "timm:NAME"
        )
    else:
        shown = ", ".join(names[:TIMM_SHOWN]) + (
            f", ... ({len(names) - TIMM_SHOWN} more)" if len(names) > TIMM_SHOWN else ""
        )
        lines.append(
            f"timm models with pretrained weights matching {text!r}: {len(names)}"
            + (f": {shown}" if names else "")
        )
    return "\n".join(line.rstrip() for line in lines)


if __name__ == "__main__":  # python -m pipeline.backbones.catalog: refresh the shipped table
    print(f"wrote {write_shipped_table()}")
