"""A trained head's pickle-free files: ``head.json`` (what it is, where it came from) and
``head.npz`` (the arrays, loaded with ``allow_pickle=False``), tied by one run id.

`load_head` checks everything they claim (JSON, keys, array shapes and sizes, the kind's own rules,
one run), so a head folder from anyone is safe to load. The kind named in head.json (`model`, and
`head`) is found in the registry of head kinds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.schema import is_hdf5
from pipeline.errors import CacheError, MissingError
from pipeline.heads.estimators import Preprocessor
from pipeline.heads.kinds import for_model
from pipeline.heads.trained import TrainedHead, is_number, preprocessor_arrays
from pipeline.npz import BadArchive, read_arrays
from pipeline.registry import PREPROCESSING

HEAD_SCHEMA = 1


def save_head(head: TrainedHead, folder: str | Path, meta: dict[str, Any]) -> Path:
    """``head.npz`` and ``head.json`` in `folder`, both carrying ``meta["run_id"]``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"run_id": np.array(str(meta.get("run_id", "")))} | preprocessor_arrays(
        head.preprocessor
    )
    np.savez(folder / "head.npz", **arrays, **head.arrays)
    document = {
        "schema": HEAD_SCHEMA,
        "model": head.kind.model,
        **head.settings,
        "classes": [str(c) for c in head.classes_],
        "preprocessing": head.preprocessor.kind,
        "n_features": head.n_features_in_,
        **meta,
    }
    (folder / "head.json").write_text(json.dumps(document, indent=2))
    return folder


def _bad_head(folder: Path, what: str) -> CacheError:
    return CacheError(f"head {folder} is malformed: {what}; retrain it with `pipeline head`")


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _bad_head(folder, f"{path.name} is not JSON (or nests too deep)") from None
    if not isinstance(document, dict):
        raise _bad_head(
            folder, f"{path.name} holds a {type(document).__name__}, expected an object"
        )
    return document


def _load_arrays(
    arrays_path: Path,
    folder: Path,
    shapes: dict[str, tuple[int | None, ...]],
    optional: dict[str, tuple[int | None, ...]],
) -> dict[str, np.ndarray]:
    """The arrays of head.npz, each checked for presence (`optional` ones when there), numeric
    dtype, finiteness and shape."""
    try:
        found = read_arrays(arrays_path, {*shapes, *optional, "run_id"})
    except BadArchive as why:
        raise _bad_head(folder, f"head.npz: {why}") from None
    for name, shape in (shapes | {k: v for k, v in optional.items() if k in found}).items():
        if name not in found:
            raise _bad_head(folder, f"head.npz has no array {name!r}")
        array = found[name]
        fits = array.ndim == len(shape) and all(
            want in (None, got) for want, got in zip(shape, array.shape, strict=True)
        )
        if array.dtype.kind not in "fiu" or not fits:
            raise _bad_head(
                folder, f"{name} is {array.shape} {array.dtype}, expected {shape} numbers"
            )
        if not np.isfinite(array).all():
            raise _bad_head(folder, f"{name} holds NaN or infinite values")
    return found


def load_head(path: str | Path) -> TrainedHead:
    """A saved head (its folder, or its head.json / head.npz) as a working `TrainedHead`. Everything
    the files claim is checked: JSON, keys, array shapes, the kind's own rules, and that head.json,
    head.npz and result.json come from one run. Nothing is unpickled."""
    path = Path(path)
    folder = path.parent if path.name in ("head.json", "head.npz") else path
    meta_path, arrays_path = folder / "head.json", folder / "head.npz"
    if is_hdf5(path):
        raise MissingError(
            f"{path} is a feature cache, not a head; pass the results folder that "
            f"`pipeline head {path}` wrote (results/NAME)"
        )
    if not meta_path.is_file() or not arrays_path.is_file():
        raise MissingError(
            f"no saved head in {folder} (expected head.json and head.npz); run `pipeline head` "
            "first"
        )
    meta = _read_json(meta_path, folder)
    if meta.get("schema") != HEAD_SCHEMA or isinstance(meta.get("schema"), bool):
        raise CacheError(
            f"head {folder} has schema {meta.get('schema')!r}, this pipeline reads {HEAD_SCHEMA}; "
            "retrain it with "
            "`pipeline head`"
        )
    missing = [k for k in ("classes", "preprocessing", "n_features") if k not in meta]
    if missing:
        raise _bad_head(folder, f"head.json lacks {', '.join(missing)}")
    classes = meta["classes"]
    if (
        not isinstance(classes, list)
        or len(classes) < 2
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise _bad_head(
            folder, "classes in head.json must be a list of at least two distinct names"
        )
    if meta["preprocessing"] not in PREPROCESSING or not is_number(
        meta["n_features"], integer=True
    ):
        raise _bad_head(folder, "preprocessing or n_features in head.json has an unexpected value")
    if meta["n_features"] < 1:
        raise _bad_head(folder, "preprocessing or n_features in head.json has an unexpected value")
    for key in ("cache_fingerprint", "features_config", "config", "posthoc"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise _bad_head(
                folder, f"{key} in head.json is a {type(meta[key]).__name__}, expected an object"
            )
    for key in ("model", "head", "run_id"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise _bad_head(
                folder, f"{key} in head.json is a {type(meta[key]).__name__}, expected a string"
            )
    meta.setdefault("model", "linear")
    kind = for_model(meta["model"], meta.get("head"))
    if kind is None:
        raise _bad_head(
            folder, f"model {meta['model']!r} in head.json is no head kind this pipeline knows"
        )
    if meta["preprocessing"] not in kind.preprocessings:
        raise _bad_head(
            folder, f"a {kind.model} head does not take preprocessing {meta['preprocessing']!r}"
        )
    preprocessor = Preprocessor(meta["preprocessing"])
    shapes = kind.array_shapes(meta) | {
        name: (meta["n_features"],) for name in preprocessor_arrays(preprocessor)
    }
    arrays = _load_arrays(arrays_path, folder, shapes, kind.optional_shapes(meta))
    wrong = kind.check_saved(meta, arrays)
    if "scale" in arrays and not (arrays["scale"] > 0).all():
        wrong = "scale in head.npz holds a value that is not positive"
    if wrong:
        raise _bad_head(folder, wrong)
    run_ids = {
        "head.json": meta.get("run_id") or None,
        "head.npz": str(arrays.get("run_id", "")) or None,
    }
    if (folder / "result.json").is_file():
        run_id = _read_json(folder / "result.json", folder).get("run_id") or None
        if run_id is not None and not isinstance(run_id, str):
            raise _bad_head(folder, f"run_id in result.json is a {type(run_id).__name__}")
        run_ids["result.json"] = run_id
    if len(set(run_ids.values())) > 1:
        raise _bad_head(folder, f"its files come from different runs ({run_ids})")
    preprocessor.mean_, preprocessor.scale_ = arrays.get("mean"), arrays.get("scale")
    own = {name: array for name, array in arrays.items() if name not in ("run_id", "mean", "scale")}
    settings = {key: meta[key] for key in kind.setting_keys if key in meta}
    head = TrainedHead(
        kind, preprocessor, np.array(classes), own, settings, n_features=meta["n_features"]
    )
    head.meta.update(meta)
    return head
