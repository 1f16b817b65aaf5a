"""Using a trained head on new images: `pipeline predict` (CSV of top-k classes) and
`pipeline export` (one torch file with backbone, preprocessing constants and head).

Both rebuild the backbone and preprocessing that made the head's cache, from the settings the
head saved, and refuse when the weights or preprocessing cannot be matched exactly.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import outputs
from pipeline.backbones import backbone
from pipeline.config import FeaturesConfig
from pipeline.errors import BadImageError, CacheError, ConfigError
from pipeline.heads.saved import load_head
from pipeline.heads.trained import TrainedHead


def _settings(head: TrainedHead, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The head's cache fingerprint and the features settings it was made with, both checked: a
    value a head run would not have written is the head folder's fault, never the user's flags."""
    fingerprint, settings = head.meta.get("cache_fingerprint"), head.meta.get("features_config")
    if not fingerprint or not settings:
        raise CacheError(
            f"head {folder} does not record how its features were made (saved by an older "
            "pipeline); retrain it with `pipeline head`"
        )
    fields = {f.name for f in dataclasses.fields(FeaturesConfig)}
    values = {k: v for k, v in settings.items() if k in fields and k not in ("dataset", "out")}
    why = next(
        (
            f"cache_fingerprint lacks {key!r}"
            for key in ("backbone", "weights", "preprocessing")
            if not isinstance(fingerprint.get(key), str)
        ),
        None,
    )
    if why is None and not isinstance(values.get("weights"), str):
        why = "features_config lacks 'weights'"
    computed = values.get("precision", "fp32")  # heads from before the precision was recorded
    if why is None and (
        computed not in ("fp32", "bf16", "fp16")
        or fingerprint.get("precision", computed) != computed
    ):
        why = (
            f"features_config precision {computed!r} is not the one its cache was computed in "
            f"({fingerprint.get('precision')!r})"
        )
    if why is None:
        try:
            FeaturesConfig(**(values | {"data": "."}))
        except (ConfigError, TypeError, ValueError) as exc:
            why = f"features_config holds a setting no run writes ({str(exc).splitlines()[0]})"
    if why:
        raise CacheError(f"head {folder} is malformed: {why}; retrain it with `pipeline head`")
    return fingerprint, values


def rebuild_spec(
    head: TrainedHead, folder: Path, weights: str | None = None
) -> backbone.BackboneSpec:
    """The head's backbone and preprocessing, verified against its cache fingerprint."""
    layer = (head.meta.get("config") or {}).get("layer")
    own = head.kind.input_layer(head)  # the tail head's cut: computed by the trunk
    if layer not in (None, "", "penultimate", own):
        raise ConfigError(
            f"head {folder} was trained on layer {layer!r} of its cache; predict and export "
            "rebuild the penultimate "
            "features only, so use a head trained on them (without --layer)"
        )
    fingerprint, settings = _settings(head, folder)
    return backbone.rebuilt(fingerprint, settings, weights, f"head {folder}", (own,) if own else ())


def predict(
    head_path: str | Path,
    data: str | Path,
    out: str | Path,
    top_k: int = 5,
    strict: bool = False,
    weights: str | None = None,
    overrides: dict[str, Any] | None = None,
    report: Any = lambda message: None,
    force: bool = False,
) -> dict[str, Any]:
    """Classify every image under `data` (a folder, a CSV with a `path` column, or one file)."""
    from pipeline.backbones import forward
    from pipeline.data.sources import list_images

    if top_k < 1:
        raise ConfigError(f"--top-k {top_k} must be at least 1")
    out = Path(out)
    outputs.check_file_output(out, "predictions", force)
    folder = Path(head_path)
    head = load_head(folder)
    spec = rebuild_spec(head, folder, weights)
    _, values = _settings(head, folder)
    samples = list_images(data)
    values.update(data=str(data), weights=weights or values["weights"], skip_bad_images=not strict)
    values.update(overrides or {})
    cfg = FeaturesConfig(**values)
    try:
        features, errors = forward.embed(cfg, samples, spec, report, head.kind.input_layer(head))
    except BadImageError as exc:
        raise BadImageError(
            f"{exc}; fix or remove them, or drop --strict to list them in the CSV and go on"
        ) from None
    ok = np.isfinite(features).all(axis=1)
    proba = np.full((len(samples), len(head.classes_)), np.nan, dtype=np.float32)
    if ok.any():
        with np.errstate(all="ignore"):  # an overflow is reported per image below, not warned about
            proba[ok] = head.predict_proba(features[ok])
    for row in np.flatnonzero(ok & ~np.isfinite(proba).all(axis=1)):
        errors[row] = (
            "the head gave no finite probability for this image (do its weights overflow?)"
        )
    ok &= np.isfinite(proba).all(axis=1)
    k = min(top_k, len(head.classes_))
    header = ["path", "prediction", "probability"]
    header += [f"{name}_{i}" for i in range(2, k + 1) for name in ("class", "probability")] + [
        "error"
    ]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for row, sample_id in enumerate(samples.ids):
                if not ok[row]:
                    writer.writerow([sample_id] + [""] * (2 * k) + [errors.get(row, "unreadable")])
                    continue
                order = np.argsort(-proba[row])[:k]
                cells = [x for c in order for x in (head.classes_[c], f"{proba[row, c]:.6f}")]
                writer.writerow([sample_id, *cells, ""])

    outputs.replace_file(out, write)
    bad = [samples.ids[r] for r in sorted(errors)]
    report(
        f"wrote {out}: {int(ok.sum())} images classified"
        + (f", {len(bad)} unreadable: {bad[:5]}" if bad else "")
    )
    return {
        "out": str(out),
        "classified": int(ok.sum()),
        "unreadable": bad,
        "proba": proba,
        "ids": samples.ids,
        "classes": [str(c) for c in head.classes_],
    }


def format_predictions(done: dict[str, Any], top_k: int = 5, most: int = 10) -> str:
    """What `pipeline predict` prints: one image's top-k classes, or for many how many images each
    class got (the CSV has every image)."""
    proba, ids, classes = done["proba"], done["ids"], done["classes"]
    readable = np.isfinite(proba).all(axis=1)
    if len(ids) == 1:
        if not readable[0]:
            return f"{ids[0]}: unreadable (the error column of {done['out']} says why)"
        order = np.argsort(-proba[0])[: min(top_k, len(classes))]
        return f"{ids[0]}: " + ", ".join(f"{classes[c]} {proba[0, c]:.1%}" for c in order)
    counts = (
        np.bincount(proba[readable].argmax(axis=1), minlength=len(classes))
        if readable.any()
        else []
    )
    ranked = sorted(
        ((int(n), classes[c]) for c, n in enumerate(counts) if n), key=lambda t: (-t[0], t[1])
    )
    lines = [f"{int(readable.sum())} images classified ({done['out']} has each one's top {top_k}):"]
    lines += [f"  {name:<24} {n:>7} images" for n, name in ranked[:most]]
    if len(ranked) > most:
        lines.append(f"  ... {len(ranked) - most} more classes")
    return "\n".join(lines)


def export_module(model: Any, spec: backbone.BackboneSpec, head: TrainedHead) -> Any:
    """The exported module: uint8 crops (B, 3, S, S) -> class probabilities (B, C): the backbone's
    normalisation and body (for a tail head, the frozen trunk up to its cut), then the head's own
    module (its preprocessing inside)."""
    import torch
    from torch import nn

    body = model.body
    own = head.kind.input_layer(head)
    if own is not None:
        from pipeline.backbones import split
        from pipeline.registry import CUT_PREFIX

        body = split.of_extractor(model.body, model.root, own.removeprefix(CUT_PREFIX), spec.name)
        body = body.trunk

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body
            self.head = head.to_module()
            t = spec.transform
            self.register_buffer("mean", torch.tensor(t.mean).reshape(1, 3, 1, 1).clone())
            self.register_buffer("std", torch.tensor(t.std).reshape(1, 3, 1, 1).clone())

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            x = (images.to(torch.float32) / 255.0 - self.mean) / self.std  # (B, 3, S, S)
            return self.head(self.body(x))  # (B, D) -> (B, C)

    return Classifier().eval()


def export(
    head_path: str | Path,
    out: str | Path,
    weights: str | None = None,
    report: Any = lambda m: None,
    force: bool = False,
) -> Path:
    """One file that `torch.export.load` opens without this package: module + preprocessing in
    meta.json."""
    import torch

    out = Path(out)
    outputs.check_file_output(out, "export", force)
    folder = Path(head_path)
    head = load_head(folder)
    spec = rebuild_spec(head, folder, weights)
    model = backbone.build(spec, progress=False)
    module = export_module(model, spec, head)
    size = spec.crop_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(module, (example,), dynamic_shapes={"images": {0: batch}})
    t = spec.transform
    meta = {
        "format": f"pipeline {head.kind.model} classifier ({head.kind.name} head), torch.export "
        "program",
        "input": f"uint8 tensor (B, 3, {size}, {size}): RGB image resized (shorter side "
        f"{t.resize_size[0]}, "
        f"{t.interpolation.value}, antialias) and centre-cropped to {size}",
        "output": "float32 (B, C) class probabilities, columns in the order of `classes`",
        "classes": [str(c) for c in head.classes_],
        "resize_size": t.resize_size[0],
        "crop_size": size,
        "interpolation": t.interpolation.value,
        "mean": list(t.mean),
        "std": list(t.std),
        "backbone": spec.name,
        "weights": spec.weights_id,
        "head": {
            k: head.meta[k]
            for k in ("head", "C", "k", "temperature", "posthoc", "trained_on", "cache")
            if k in head.meta
        },
        "usage": "p = torch.export.load(path).module()(images_uint8)",
    }

    def write(tmp: Path) -> None:  # through a file object: the archive's top folder is "archive",
        with tmp.open("wb") as fh:  # not the temporary file's name
            torch.export.save(program, fh, extra_files={"meta.json": json.dumps(meta, indent=2)})

    outputs.replace_file(out, write)
    report(
        f"wrote {out}: {spec.name} + {head.meta.get('head', 'linear')} head, {len(head.classes_)} "
        "classes; "
        f"input {meta['input']}"
    )
    return out
