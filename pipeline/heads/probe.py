"""A fitted head as plain arrays (`LinearProbe`: preprocessing, weights, classes, numpy only; or a
`CosineKNN` with its bank of rows) and its pickle-free files: ``head.json`` (what it is, where it
came from) and ``head.npz`` (the arrays), tied by one run id and checked in full by `load_head`."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.errors import CacheError, MissingError
from pipeline.heads.estimators import Described, LinearDecision, Preprocessor
from pipeline.heads.neighbours import CosineKNN, KNNFit
from pipeline.heads.posthoc import Adjustment
from pipeline.heads.runs import Fit
from pipeline.registry import COSINE_PREPROCESSING, PREPROCESSING

HEAD_SCHEMA = 1


class LinearProbe(Described, LinearDecision, ClassifierMixin, BaseEstimator):
    """A fitted head as arrays: preprocessing, then ``X @ coef_.T + intercept_``. Numpy only.

    It is built fitted (there is nothing to learn), and keeps the estimator contract: its parameters
    are stored as given, so `get_params`, `repr` and `clone` work; `coef_`, `intercept_`, `classes_`
    and `n_features_in_` are read from them as float32 arrays."""

    def __init__(self, preprocessor: Preprocessor, coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray):
        self.preprocessor = preprocessor
        self.coef = coef
        self.intercept = intercept
        self.classes = classes

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def fit(self, X: Any = None, y: Any = None) -> LinearProbe:
        """Nothing to fit: a probe is made from trained weights (`pipeline head`, `load_head`)."""
        return self

    @property
    def coef_(self) -> np.ndarray:
        return np.asarray(self.coef, dtype=np.float32)

    @property
    def intercept_(self) -> np.ndarray:
        return np.asarray(self.intercept, dtype=np.float32)

    @property
    def classes_(self) -> np.ndarray:
        return np.asarray(self.classes)

    @property
    def n_features_in_(self) -> int:
        return int(self.coef_.shape[1])

    @classmethod
    def from_estimator(cls, preprocessor: Preprocessor, estimator: Any) -> LinearProbe:
        return cls(preprocessor, estimator.coef_, estimator.intercept_, estimator.classes_)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        X = self.preprocessor.transform(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[-1]} features, but this head expects {self.n_features_in_}")
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores


Head = LinearProbe | CosineKNN


def from_fit(fit: Fit | KNNFit, preprocessor: Preprocessor, classes: np.ndarray, adjustment: Adjustment) -> Head:
    """A protocol's final fit as a working estimator, its post-hoc adjustment inside: a `LinearProbe`
    (offsets and temperature in its weights and intercept), or a `CosineKNN` on its bank."""
    if isinstance(fit, KNNFit):
        head = CosineKNN.from_bank(preprocessor, fit.bank, fit.labels, classes, fit.value, fit.temperature)
        return head.set_params(calibration=adjustment.temperature, offsets=adjustment.offsets)
    coef, intercept = adjustment.linear(fit.coef, fit.intercept)
    return LinearProbe(preprocessor, coef.T, intercept, classes)


def _preprocessor_arrays(prep: Preprocessor) -> dict[str, np.ndarray]:
    return {"standardize": {"mean": prep.mean_, "scale": prep.scale_}, "center-l2": {"mean": prep.mean_}}.get(
        prep.kind, {}
    )


def save_head(probe: Head, folder: str | Path, meta: dict[str, Any]) -> Path:
    """``head.npz`` (arrays, no pickle) and ``head.json`` (classes, preprocessing, cache fingerprint);
    both carry ``meta["run_id"]`` so a folder mixing two runs is refused on load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prep = probe.preprocessor if isinstance(probe, LinearProbe) else probe.preprocessor_
    arrays = {"run_id": np.array(str(meta.get("run_id", "")))} | _preprocessor_arrays(prep)
    if isinstance(probe, CosineKNN):
        arrays.update(bank=probe.bank_, bank_labels=probe.bank_labels_)
        if probe.offsets is not None:
            arrays.update(offsets=np.asarray(probe.offsets, dtype=np.float64))
        model = {"model": "knn", "k": int(probe.n_neighbors), "temperature": float(probe.temperature)}
        model["calibration_temperature"] = float(probe.calibration)
    else:
        arrays.update(coef=probe.coef_, intercept=probe.intercept_)
        model = {"model": "linear"}
    np.savez(folder / "head.npz", **arrays)
    document = {
        "schema": HEAD_SCHEMA,
        **model,
        "classes": [str(c) for c in probe.classes_],
        "preprocessing": prep.kind,
        "n_features": probe.n_features_in_,
        **meta,
    }
    (folder / "head.json").write_text(json.dumps(document, indent=2))
    return folder


def _bad_head(folder: Path, what: str) -> CacheError:
    return CacheError(f"head {folder} is malformed: {what}; retrain it with `pipeline head`")


def _read_json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise _bad_head(folder, f"{path.name} is not JSON") from None
    if not isinstance(document, dict):
        raise _bad_head(folder, f"{path.name} holds a {type(document).__name__}, expected an object")
    return document


def _check_declared_sizes(arrays_path: Path, folder: Path) -> None:
    """Each array's header may not claim more bytes than its entry holds: a crafted header declaring
    petabytes would otherwise be allocated before anything else is checked."""
    try:
        with zipfile.ZipFile(arrays_path) as archive:
            for info in archive.infolist():
                with archive.open(info) as fh:
                    fmt = np.lib.format
                    version = fmt.read_magic(fh)
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(fh)
                declared = math.prod(shape) * dtype.itemsize
                if declared > info.file_size:
                    raise _bad_head(
                        folder,
                        f"head.npz's {info.filename} declares a {shape} {dtype} array, more than its "
                        f"{info.file_size} bytes",
                    )
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return  # np.load below names what is wrong with the archive


def _head_arrays(arrays_path: Path, folder: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of head.npz, each checked for presence, numeric dtype and the shape head.json implies."""
    dim, n_classes = meta["n_features"], len(meta["classes"])
    outputs = 1 if n_classes == 2 else n_classes
    shapes: dict[str, tuple[int | None, ...]] = {"coef": (outputs, dim), "intercept": (outputs,)}
    if meta["model"] == "knn":  # the bank has any number of rows (None), the same in both arrays
        shapes = {"bank": (None, dim), "bank_labels": (None,)}
    shapes |= {name: (dim,) for name in _preprocessor_arrays(Preprocessor(meta["preprocessing"]))}
    _check_declared_sizes(arrays_path, folder)
    try:
        with np.load(arrays_path, allow_pickle=False) as archive:
            found = {name: archive[name] for name in archive.files}
    except ValueError:
        raise _bad_head(
            folder, "head.npz holds pickled data (or is no .npz archive); nothing pickled is loaded"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError):
        raise _bad_head(folder, "head.npz is not a readable .npz archive") from None
    if meta["model"] == "knn" and "offsets" in found:
        shapes["offsets"] = (n_classes,)
    for name, shape in shapes.items():
        if name not in found:
            raise _bad_head(folder, f"head.npz has no array {name!r}")
        array = found[name]
        fits = array.ndim == len(shape) and all(
            want in (None, got) for want, got in zip(shape, array.shape, strict=True)
        )
        if array.dtype.kind not in "fiu" or not fits:
            raise _bad_head(folder, f"{name} is {array.shape} {array.dtype}, expected {shape} numbers")
        if not np.isfinite(array).all():
            raise _bad_head(folder, f"{name} holds NaN or infinite values")
    if meta["model"] == "knn":
        norms = np.linalg.norm(found["bank"].astype(np.float64), axis=1)
        if len(norms) == 0 or not np.all((np.abs(norms - 1) < 1e-3) | (norms == 0)):
            raise _bad_head(folder, "its bank must hold at least one row, each of unit length (L2-normalised)")
        if meta["k"] > len(norms):
            raise _bad_head(folder, f"k = {meta['k']} exceeds its bank of {len(norms)} rows")
    if meta["model"] == "knn":
        labels = found["bank_labels"]
        if (
            len(labels) != len(found["bank"])
            or labels.dtype.kind not in "iu"
            or not np.all((labels >= 0) & (labels < n_classes))
        ):
            raise _bad_head(folder, f"bank_labels must be one class index in 0..{n_classes - 1} per bank row")
    return found


def load_head(path: str | Path) -> Head:
    """A saved head (its folder, or its head.json / head.npz) as a working estimator. Everything the
    files claim is checked: JSON, keys, array shapes, and that head.json, head.npz and result.json
    come from one run. Nothing is unpickled, so a head folder from anyone is safe to load."""
    path = Path(path)
    folder = path.parent if path.name in ("head.json", "head.npz") else path
    meta_path, arrays_path = folder / "head.json", folder / "head.npz"
    if not meta_path.is_file() or not arrays_path.is_file():
        raise MissingError(f"no saved head in {folder} (expected head.json and head.npz); run `pipeline head` first")
    meta = _read_json(meta_path, folder)
    if meta.get("schema") != HEAD_SCHEMA:
        raise CacheError(
            f"head {folder} has schema {meta.get('schema')!r}, this pipeline reads {HEAD_SCHEMA}; retrain it with "
            "`pipeline head`"
        )
    missing = [k for k in ("classes", "preprocessing", "n_features") if k not in meta]
    if missing:
        raise _bad_head(folder, f"head.json lacks {', '.join(missing)}")
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise _bad_head(folder, "classes in head.json must be a list of at least two names")
    if meta["preprocessing"] not in PREPROCESSING or not isinstance(meta["n_features"], int) or meta["n_features"] < 1:
        raise _bad_head(folder, "preprocessing or n_features in head.json has an unexpected value")
    meta.setdefault("model", "linear")
    if meta["model"] not in ("linear", "knn"):
        raise _bad_head(folder, f"model {meta['model']!r} in head.json is neither 'linear' nor 'knn'")
    if meta["model"] == "knn" and meta["preprocessing"] not in COSINE_PREPROCESSING:
        raise _bad_head(folder, f"a knn head compares unit rows, but its preprocessing is {meta['preprocessing']!r}")
    knn_settings = [meta.get("temperature"), meta.get("calibration_temperature", 1.0)]
    if meta["model"] == "knn" and not (
        _number(meta.get("k"), integer=True) and meta["k"] >= 1 and all(_number(t) and t > 0 for t in knn_settings)
    ):
        raise _bad_head(
            folder,
            "a knn head needs k (a whole number >= 1), temperature and calibration_temperature (> 0) in head.json",
        )
    arrays = _head_arrays(arrays_path, folder, meta)
    run_ids = {"head.json": meta.get("run_id") or None, "head.npz": str(arrays.get("run_id", "")) or None}
    if (folder / "result.json").is_file():
        run_ids["result.json"] = _read_json(folder / "result.json", folder).get("run_id") or None
    if len(set(run_ids.values())) > 1:
        raise _bad_head(folder, f"its files come from different runs ({run_ids})")
    preprocessor = Preprocessor(meta["preprocessing"])
    preprocessor.mean_, preprocessor.scale_ = arrays.get("mean"), arrays.get("scale")
    if meta["model"] == "knn":
        bank = np.asarray(arrays["bank"], dtype=np.float32)
        probe: Head = CosineKNN.from_bank(
            preprocessor,
            bank,
            arrays["bank_labels"].astype(np.int64),
            np.array(classes),
            meta["k"],
            meta["temperature"],
        ).set_params(calibration=meta.get("calibration_temperature", 1.0), offsets=arrays.get("offsets"))
    else:
        probe = LinearProbe(preprocessor, arrays["coef"], arrays["intercept"], np.array(classes))
    probe.meta.update(meta)
    return probe


def _number(value: Any, integer: bool = False) -> bool:
    """A JSON number (not a bool), a whole one when `integer`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        return False
    return math.isfinite(number) and (not integer or number.is_integer())
