"""Where the images come from: a deterministic sample list (id, label, split) and a way to read each.

Sources: an image folder, a CSV manifest, a torchvision dataset by name, or the offline digits demo.
Rows are ordered by split (train, val, test) and, within a split, by the source's own order, so
each split is one contiguous block of rows in the cache. No torch model is touched here.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import BadImageError, ConfigError, DataError, MissingError
from pipeline.splits import SPLITS, stratified_holdout

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


# --------------------------------------------------------------------------------------- images


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images as 8-bit RGB."""
    if image.mode in _SIXTEEN_BIT:
        # convert("RGB") would clip 16-bit values at 255; scale the full range down instead.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 1.0 if image.mode == "F" else 257.0
        image = Image.fromarray(np.clip(pixels / scale, 0, 255).round().astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode a whole image file as RGB, raising BadImageError (with the path) when it cannot."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here and not in a transform
            return to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = str(exc).split(" '")[0] or type(exc).__name__  # drop PIL's repeated file name
        if "truncated" in reason.lower():
            reason = "file is truncated"
        raise BadImageError(f"{path}: {reason}") from None


class ArrayReader:
    """Images held in memory by a torchvision dataset (CIFAR, STL10), addressed by (split, index)."""

    def __init__(self, arrays: dict[str, np.ndarray], channels_first: bool) -> None:
        self.arrays = arrays
        self.channels_first = channels_first

    def __call__(self, item: tuple[str, int]) -> Image.Image:
        pixels = self.arrays[item[0]][item[1]]
        if self.channels_first:
            pixels = np.transpose(pixels, (1, 2, 0))
        return to_rgb(Image.fromarray(np.ascontiguousarray(pixels)))


# ----------------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class SampleList:
    """The canonical, ordered list of images that becomes the rows of a cache file."""

    ids: list[str]  # stable across machines: a path relative to the source, or "split/index"
    labels: np.ndarray  # (N,) int64 class index
    split: np.ndarray  # (N,) int8 index into SPLITS; non-decreasing
    classes: list[str]
    items: Sequence[Any]  # what `reader` takes: an absolute path, or (split, index)
    reader: Callable[[Any], Image.Image] = load_image
    source: str = ""
    carved: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-row facts of image files (file_size, file_mtime_ns[, file_sha256]); None for in-memory arrays.
    identity: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, row: int) -> Image.Image:
        return self.reader(self.items[row])

    def subset(self, start: int, stop: int) -> SampleList:
        """Rows ``start:stop`` (a contiguous shard), same classes and reader."""
        return SampleList(
            ids=self.ids[start:stop],
            labels=self.labels[start:stop],
            split=self.split[start:stop],
            classes=self.classes,
            items=self.items[start:stop],
            reader=self.reader,
            source=self.source,
            carved=self.carved,
            identity=None if self.identity is None else {k: v[start:stop] for k, v in self.identity.items()},
        )

    def split_sizes(self) -> dict[str, int]:
        counts = np.bincount(self.split, minlength=len(SPLITS))
        return {name: int(n) for name, n in zip(SPLITS, counts, strict=True)}

    def digest(self) -> str:
        """sha256 over ids, labels, splits, classes and each file's size and modification time (and
        content hash with --verify-content): the identity of the image set."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        h.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.split, dtype="i1").tobytes())
        for sample_id in self.ids:
            h.update(sample_id.encode() + b"\0")
        for key, values in sorted((self.identity or {}).items()):
            h.update(key.encode() + np.ascontiguousarray(values).tobytes())
        return h.hexdigest()


def _finalize(
    ids: list[str],
    items: Sequence[Any],
    labels: Sequence[int],
    splits: Sequence[str],
    classes: list[str],
    source: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    reader: Callable[[Any], Image.Image] = load_image,
    verify_content: bool = False,
) -> SampleList:
    """Carve missing val/test splits out of train, then order rows by split."""
    if not ids:
        raise DataError(f"{source} holds no images; add images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    present = sorted(set(labels))
    if len(present) < 2:
        only = ", ".join(classes[c] for c in present)
        raise DataError(f"{source} has {len(present)} class ({only}); a classifier needs at least two classes")
    labels_arr = np.asarray(labels, dtype=np.int64)
    split = np.array([SPLITS.index(s) for s in splits], dtype=np.int8)
    carved: dict[str, dict[str, Any]] = {}
    for name, fraction, salt in (("test", test_fraction, 2), ("val", val_fraction, 1)):
        code = SPLITS.index(name)
        if (split == code).any() or fraction == 0:
            continue
        train_rows = np.flatnonzero(split == 0)
        held = stratified_holdout(labels_arr[train_rows], fraction, seed, salt)
        if held.any():
            split[train_rows[held]] = code
            carved[name] = {"from": "train", "fraction": fraction, "seed": seed, "stratified": True}
    order = np.argsort(split, kind="stable")
    items = [items[i] for i in order]
    files = all(isinstance(item, str) for item in items)
    return SampleList(
        ids=[ids[i] for i in order],
        labels=labels_arr[order],
        split=split[order],
        classes=classes,
        items=items,
        reader=reader,
        source=source,
        carved=carved,
        identity=file_identity(items, verify_content) if files else None,
    )


def file_identity(paths: Sequence[str], content: bool = False) -> dict[str, np.ndarray]:
    """Each file's size and modification time (and sha256 of its bytes when `content`). Refuses,
    naming the file, anything that is not a readable regular file (a FIFO would hang the reader)."""
    sizes = np.empty(len(paths), dtype=np.int64)
    mtimes = np.empty(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc.strerror}; fix or remove it") from None
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"image {path} is not a regular file (a FIFO, socket or device?); remove it from the data")
        if not os.access(path, os.R_OK):
            raise DataError(f"image {path} is not readable (permission denied); fix its permissions or remove it")
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    identity = {"file_size": sizes, "file_mtime_ns": mtimes}
    if content:
        identity["file_sha256"] = np.array([_sha256(p).encode() for p in paths], dtype="S64")
    return identity


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def describe_changes(old: dict[str, np.ndarray], new: SampleList, most: int = 5) -> str:
    """Which files were added, removed or changed (label, split, size, time, content) between the
    rows a cache recorded (`store.stored_rows`) and a new sample list; "" when the rows are equal."""
    before = {str(i): row for row, i in enumerate(old["ids"])}
    after = {i: row for row, i in enumerate(new.ids)}
    added = [i for i in new.ids if i not in before]
    removed = [i for i in before if i not in after]
    changed = []
    for sample_id, row in after.items():
        if sample_id not in before:
            continue
        o = before[sample_id]
        what = [
            name
            for name, a, b in (("label", old["labels"][o], new.labels[row]), ("split", old["split"][o], new.split[row]))
            if a != b
        ]
        for key in ("file_size", "file_mtime_ns", "file_sha256"):
            if key in old and new.identity and key in new.identity and old[key][o] != new.identity[key][row]:
                what.append({"file_size": "size", "file_mtime_ns": "modified", "file_sha256": "content"}[key])
        if what:
            changed.append(f"{sample_id} ({', '.join(what)})")
    parts = [
        f"{label} {len(found)}: {', '.join(found[:most])}{', ...' if len(found) > most else ''}"
        for label, found in (("changed", changed), ("added", added), ("removed", removed))
        if found
    ]
    return "; ".join(parts)


# ------------------------------------------------------------------------------------ folders


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_name(folder: Path | str, name: str) -> str:
    """File names become cache ids (UTF-8 text): refuse the ones that are not valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"file name {os.fsencode(name)!r} in {folder} is not valid UTF-8; rename it (e.g. with `convmv`)"
        ) from None
    return name


def _scandir(folder: Path | str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise DataError(f"cannot read folder {folder}: {exc.strerror}; fix its permissions or remove it") from None


def _subdirs(folder: Path) -> list[str]:
    return sorted(_check_name(folder, e.name) for e in _scandir(folder) if e.is_dir() and not e.name.startswith("."))


class _Seen:
    """Real folders and files met so far: a symlink loop is entered once, and no file is listed twice."""

    def __init__(self) -> None:
        self.folders: set[tuple[int, int]] = set()
        self.files: dict[tuple[int, int], str] = {}

    def new_folder(self, path: str) -> bool:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino)
        if key in self.folders:
            return False
        self.folders.add(key)
        return True

    def file(self, path: str) -> None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc.strerror}; fix or remove it") from None
        key = (st.st_dev, st.st_ino)
        if key in self.files:
            raise DataError(
                f"{path} and {self.files[key]} are the same file (a link); an image may appear once, "
                "or it can leak between splits: remove one of them"
            )
        self.files[key] = path


def _images_under(folder: Path) -> list[str]:
    """Image files below `folder` (recursively, following symlinks but entering each real folder
    once), as sorted paths relative to it."""
    seen = _Seen()
    seen.new_folder(str(folder))
    return _walk(folder, seen)


def _walk(folder: Path, seen: _Seen) -> list[str]:
    """Image files below `folder` (already registered in `seen`); folders met before are skipped."""
    found = []
    stack = [str(folder)]
    while stack:
        dirpath = stack.pop()
        rel = os.path.relpath(dirpath, folder)
        for entry in sorted(_scandir(dirpath), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if seen.new_folder(entry.path):
                    _check_name(dirpath, entry.name)
                    stack.append(entry.path)
            elif _is_image(entry.name):
                seen.file(entry.path)
                found.append(os.path.normpath(os.path.join(rel, _check_name(dirpath, entry.name))))
    return sorted(found)


def scan_folder(
    root: str | Path, val_fraction: float, test_fraction: float, seed: int, verify_content: bool = False
) -> SampleList:
    """``ROOT/<class>/<image>`` or ``ROOT/{train,val,test}/<class>/<image>``."""
    root = Path(root).expanduser()
    hint = "expected ROOT/<class>/<image> or ROOT/{train,val,test}/<class>/<image>"
    if not root.is_dir():
        raise MissingError(f"data folder {root} does not exist; {hint}")
    top = _subdirs(root)
    if "train" in top:
        parts = {SPLIT_ALIASES[d]: root / d for d in top if d in SPLIT_ALIASES}
        if extra := [d for d in top if d not in SPLIT_ALIASES]:
            raise DataError(f"data folder {root} mixes split folders with {extra[0]!r}; {hint}")
    else:
        parts = {"train": root}
    # Register the root, the split folders and every class folder before walking any of them, so
    # a link from inside one class to the root or to another class is never followed.
    seen = _Seen()
    seen.new_folder(str(root))
    classes_of = {name: _subdirs(folder) for name, folder in parts.items()}
    for name, folder in parts.items():
        seen.new_folder(str(folder))
        for c in classes_of[name]:
            if not seen.new_folder(str(folder / c)):
                raise DataError(
                    f"folder {folder / c} is a link to a folder already read; an image may appear once, or it "
                    "can leak between classes and splits: remove the link"
                )
    per_split = {name: {c: _walk(folder / c, seen) for c in classes_of[name]} for name, folder in parts.items()}
    if not any(per_split.values()):
        loose = [e.name for e in _scandir(root) if _is_image(e.name)]
        extra = f" (found {len(loose)} images directly in it; move them into class folders)" if loose else ""
        raise DataError(f"data folder {root} contains no class folders{extra}; {hint}")
    classes = sorted({c for found in per_split.values() for c in found})
    index = {c: i for i, c in enumerate(classes)}
    ids, items, labels, splits = [], [], [], []
    for name, found in per_split.items():
        prefix = parts[name].relative_to(root)
        for c, files in found.items():
            if not files:
                raise DataError(
                    f"class folder {parts[name] / c} contains no images; add images or remove the folder "
                    f"(extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            for f in files:
                rel = os.path.normpath(os.path.join(prefix, c, f))
                ids.append(rel)
                items.append(str(root / rel))
                labels.append(index[c])
                splits.append(name)
    return _finalize(
        ids, items, labels, splits, classes, str(root), val_fraction, test_fraction, seed, verify_content=verify_content
    )


# ------------------------------------------------------------------------------ CSV manifests


def _sorted_labels(names: set[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), anything else alphabetically."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def read_csv(path: Path, required: tuple[str, ...], expected: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a UTF-8 CSV with a header naming at least `required`; encoding and format
    slips (Latin-1 bytes, a NUL byte, an oversized field) are one-line errors naming the line."""
    if path.is_dir():
        raise DataError(f"manifest {path} is a folder; pass a CSV file with columns {expected}")
    if not path.is_file():
        raise MissingError(f"manifest {path} does not exist; pass a CSV with columns {expected}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            if not set(required) <= set(columns):
                raise DataError(f"manifest {path} has columns {columns}; expected a header row {expected}")
            reader.fieldnames = columns
            rows = []
            for row in reader:
                if any("\0" in (value or "") for value in row.values() if isinstance(value, str)):
                    raise DataError(f"manifest {path} line {reader.line_num}: contains a NUL byte; fix that row")
                rows.append((reader.line_num, row))
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(
            f"manifest {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise DataError(f"manifest {path} line {reader.line_num}: {exc}; fix that row") from None
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror}") from None


def read_manifest(
    path: str | Path, val_fraction: float, test_fraction: float, seed: int, verify_content: bool = False
) -> SampleList:
    """A CSV with a header ``path,label[,split]``; relative paths are read from the CSV's folder.
    A path may point anywhere the user can read (``../`` included); each file may be listed once."""
    path = Path(path).expanduser()
    rows = read_csv(path, ("path", "label"), "path,label[,split]")
    base = path.parent
    ids, items, names, splits, missing = [], [], [], [], []
    first_line: dict[str, int] = {}
    for line, row in rows:
        rel, label = (row["path"] or "").strip(), (row["label"] or "").strip()
        if not rel or not label:
            raise DataError(f"manifest {path} line {line}: empty path or label; every row needs both")
        split = (row.get("split") or "train").strip().lower()
        if split not in SPLIT_ALIASES:
            raise DataError(f"manifest {path} line {line}: split {split!r} is not one of train, val, test")
        full = base / rel
        real = os.path.realpath(full)
        if real in first_line:
            raise DataError(
                f"manifest {path} lines {first_line[real]} and {line} name the same file {rel!r}; list each image "
                "once (with one label), or it leaks between splits"
            )
        first_line[real] = line
        if not full.exists():
            missing.append((line, full))
        ids.append(rel)
        items.append(str(full))
        names.append(label)
        splits.append(SPLIT_ALIASES[split])
    if missing:
        line, full = missing[0]
        more = f" (and {len(missing) - 1} more rows)" if len(missing) > 1 else ""
        raise MissingError(
            f"manifest {path} line {line}: image {full} does not exist{more}; "
            "fix the path (relative paths are read from the CSV's folder)"
        )
    classes = _sorted_labels(set(names))
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[n] for n in names]
    return _finalize(
        ids, items, labels, splits, classes, str(path), val_fraction, test_fraction, seed, verify_content=verify_content
    )


# ------------------------------------------------------------------------ torchvision datasets

# Our split name -> constructor arguments of the official split. Sources without a val (or test)
# split get one carved from train; ImageNet's official "val" is the conventional test set.
TORCHVISION_SPLITS: dict[str, dict[str, dict[str, Any]]] = {
    "CIFAR10": {"train": {"train": True}, "test": {"train": False}},
    "CIFAR100": {"train": {"train": True}, "test": {"train": False}},
    "STL10": {"train": {"split": "train"}, "test": {"split": "test"}},
    "Flowers102": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "OxfordIIITPet": {"train": {"split": "trainval"}, "test": {"split": "test"}},
    "DTD": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "Food101": {"train": {"split": "train"}, "test": {"split": "test"}},
    "FGVCAircraft": {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    "Caltech101": {"train": {}},
    "SUN397": {"train": {}},
    "ImageNet": {"train": {"split": "train"}, "test": {"split": "val"}},
}
DATASET_NAMES = ("digits", *TORCHVISION_SPLITS)


def _dataset_items(ds: Any, split_key: str, root: Path) -> tuple[list[str], list[Any], list[int], bool]:
    """(ids, items, labels, in_memory) of one constructed torchvision dataset."""
    if isinstance(getattr(ds, "data", None), np.ndarray):  # CIFAR (N, H, W, C), STL10 (N, C, H, W)
        labels = getattr(ds, "targets", None)
        labels = ds.labels if labels is None else labels
        n = len(ds.data)
        return [f"{split_key}/{i}" for i in range(n)], [(split_key, i) for i in range(n)], list(map(int, labels)), True
    if hasattr(ds, "samples"):  # ImageFolder-based: ImageNet
        paths, labels = zip(*ds.samples, strict=True) if ds.samples else ((), ())
    elif hasattr(ds, "_image_files"):  # Flowers102, DTD, Food101, FGVCAircraft, SUN397
        paths, labels = ds._image_files, ds._labels
    elif hasattr(ds, "_images"):  # OxfordIIITPet
        paths, labels = ds._images, ds._labels
    elif hasattr(ds, "categories") and hasattr(ds, "y"):  # Caltech101
        folder = Path(ds.root) / "101_ObjectCategories"
        paths = [folder / ds.categories[y] / f"image_{i:04d}.jpg" for y, i in zip(ds.y, ds.index, strict=True)]
        labels = ds.y
    else:
        raise DataError(f"torchvision dataset {type(ds).__name__} exposes no image list this version can read")
    paths = [str(p) for p in paths]
    return [os.path.relpath(p, root) for p in paths], paths, list(map(int, labels)), False


def _dataset_classes(ds: Any, n_labels: int) -> list[str]:
    if hasattr(ds, "wnids"):  # ImageNet: several wnids share a first name; keep them apart
        return [f"{names[0]} ({wnid})" for wnid, names in zip(ds.wnids, ds.classes, strict=True)]
    names = getattr(ds, "classes", None) or getattr(ds, "categories", None)
    return [str(c) for c in names] if names else [f"class_{i:03d}" for i in range(n_labels)]


def load_torchvision(
    name: str,
    root: str | Path,
    download: bool,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    verify_content: bool = False,
) -> SampleList:
    """A torchvision dataset with its official splits (labels read without decoding any image)."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, name)
    root = Path(root).expanduser()
    accepts_download = "download" in inspect.signature(cls).parameters
    if download and not accepts_download:
        raise ConfigError(
            f"torchvision cannot download {name}; get it from its official site and pass --root to the local copy"
        )
    ids, items, labels, splits, arrays = [], [], [], [], {}
    classes: list[str] = []
    for split, kwargs in TORCHVISION_SPLITS[name].items():
        extra = {"download": download} if accepts_download else {}
        try:
            ds = cls(str(root), **kwargs, **extra)
        except (RuntimeError, FileNotFoundError, OSError) as exc:
            fix = "pass --download to fetch it" if accepts_download else "place the official files there"
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MissingError(f"{name} not found under {root} ({reason}); {fix}, or point --root at a copy") from None
        s_ids, s_items, s_labels, in_memory = _dataset_items(ds, split, root)
        if in_memory:
            arrays[split] = ds.data
        ids += s_ids
        items += s_items
        labels += s_labels
        splits += [split] * len(s_ids)
        classes = classes or _dataset_classes(ds, max(s_labels, default=-1) + 1)
    reader = ArrayReader(arrays, channels_first=name == "STL10") if arrays else load_image
    source = f"{name} in {root}"
    return _finalize(
        ids, items, labels, splits, classes, source, val_fraction, test_fraction, seed, reader, verify_content
    )


# --------------------------------------------------------------------------- the offline demo


def materialize_digits(root: str | Path) -> Path:
    """scikit-learn's bundled 8x8 digits as ``ROOT/digits/{train,test}/<digit>/<n>.png`` (written once)."""
    target = Path(root).expanduser() / "digits"
    if (target / "train").is_dir():
        return target
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    test = stratified_holdout(digits.target, 0.25, seed=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    for n, (image, label, is_test) in enumerate(zip(pixels, digits.target, test, strict=True)):
        folder = staging / ("test" if is_test else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{n:04d}.png")
    try:
        staging.rename(target)  # appears whole, or not at all
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------- one entry point


def canonical_dataset_name(name: str) -> str:
    by_lower = {n.lower(): n for n in DATASET_NAMES}
    if name.lower() not in by_lower:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return by_lower[name.lower()]


def load_samples(
    *,
    data: str | None = None,
    dataset: str | None = None,
    root: str = "cache/datasets",
    download: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    verify_content: bool = False,
) -> SampleList:
    """The sample list of whichever source is named (exactly one of `data` or `dataset`)."""
    carve = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": split_seed,
        "verify_content": verify_content,
    }
    if dataset is not None:
        name = canonical_dataset_name(dataset)
        if name == "digits":
            return scan_folder(materialize_digits(root), **carve)
        return load_torchvision(name, root, download, **carve)
    assert data is not None, "FeaturesConfig guarantees one source"
    path = Path(data).expanduser()
    if path.suffix.lower() == ".csv":
        return read_manifest(path, **carve)
    if path.is_file():
        raise DataError(f"--data {path} is a file; expected an image folder or a .csv manifest")
    return scan_folder(path, **carve)


class ImageDataset:
    """Map-style dataset over rows ``start..N-1``: (row, tensor or None, error or None).

    A bad image does not raise inside a worker (where the traceback would be mangled); it comes back
    as an error string so the extraction loop decides: stop with the path, or record and skip it.
    """

    def __init__(self, samples: SampleList, transform: Callable[[Image.Image], Any], start: int = 0) -> None:
        self.samples = samples
        self.transform = transform
        self.start = start

    def __len__(self) -> int:
        return len(self.samples) - self.start

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        row = self.start + i
        try:
            image = self.samples.read(row)
        except BadImageError as exc:
            return row, None, str(exc)
        return row, self.transform(image), None


class EncodedDataset(ImageDataset):
    """For decoding on the device: JPEG files come back as their bytes, anything else (PNG, 16-bit,
    in-memory arrays) as RGB pixels decoded here. Payloads are ("jpeg", uint8 bytes) or
    ("pixels", (H, W, 3) uint8)."""

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        row = self.start + i
        item = self.samples.items[row]
        if isinstance(item, str):
            try:
                with open(item, "rb") as fh:
                    head = fh.read(3)
                    if head == b"\xff\xd8\xff":
                        return row, ("jpeg", np.frombuffer(bytearray(head + fh.read()), dtype=np.uint8)), None
            except OSError as exc:
                return row, None, f"{item}: {exc.strerror or exc}"
        try:
            image = self.samples.read(row)
        except BadImageError as exc:
            return row, None, str(exc)
        return row, ("pixels", np.asarray(image)), None


def list_images(path: str | Path) -> SampleList:
    """Unlabelled images for prediction: a folder (searched recursively), a CSV with a `path`
    column (relative to the CSV's folder), or a single image file. Ids are the paths as given."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".csv":
        rows = read_csv(path, ("path",), "path[,...]")
        ids = [row["path"].strip() for _, row in rows if (row.get("path") or "").strip()]
        items = [str(path.parent / i) for i in ids]
    elif path.is_file():
        ids, items = [path.name], [str(path)]
    elif path.is_dir():
        ids = _images_under(path)
        items = [str(path / i) for i in ids]
    else:
        raise MissingError(f"{path} does not exist; pass a folder of images, a CSV manifest or an image file")
    for item in items:  # a FIFO or device would hang the reader: refuse it up front (missing files are listed)
        if os.path.exists(item) and not os.path.isfile(item):
            raise DataError(
                f"{item} is not a regular file (a folder, FIFO, socket or device?); remove it from the list"
            )
    if not ids:
        raise DataError(f"{path} holds no images (extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    n = len(ids)
    return SampleList(ids, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int8), ["?"], items, source=str(path))
