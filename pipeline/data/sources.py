"""Where the images come from: an image folder, a CSV manifest, or a dataset by name (see
`datasets`), each turned into a `SampleList`; and the unlabelled images `predict` reads. The folder
scan is symlink-safe (each real folder entered once) and refuses what would hang or repeat a row."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from pipeline.data import shards
from pipeline.data.datasets import load_torchvision, materialize_digits
from pipeline.data.images import IMAGE_EXTENSIONS, is_image
from pipeline.data.samples import SPLIT_ALIASES, SampleList, finalize
from pipeline.errors import ConfigError, DataError, MissingError
from pipeline.registry import canonical_dataset_name


def _check_name(folder: Path | str, name: str) -> str:
    """File names become cache ids (UTF-8 text): refuse the ones that are not valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"file name {os.fsencode(name)!r} in {folder} is not valid UTF-8; rename it (e.g. with "
            "`convmv`)"
        ) from None
    return name


def _scandir(folder: Path | str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise DataError(
            f"cannot read folder {folder}: {exc.strerror}; fix its permissions or remove it"
        ) from None


def _subdirs(folder: Path) -> list[str]:
    return sorted(
        _check_name(folder, e.name)
        for e in _scandir(folder)
        if e.is_dir() and not e.name.startswith(".")
    )


class _Seen:
    """Real folders and files met so far: a symlink loop is entered once, and no file is listed
    twice."""

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
                f"{path} and {self.files[key]} are the same file (a link); an image may appear "
                "once, "
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
            elif is_image(entry.name):
                seen.file(entry.path)
                found.append(os.path.normpath(os.path.join(rel, _check_name(dirpath, entry.name))))
    return sorted(found)


def scan_folder(
    root: str | Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    verify_content: bool = False,
    rule: str = "stratified",
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
                    f"folder {folder / c} is a link to a folder already read; an image may appear "
                    "once, or it "
                    "can leak between classes and splits: remove the link"
                )
    per_split = {
        name: {c: _walk(folder / c, seen) for c in classes_of[name]}
        for name, folder in parts.items()
    }
    if not any(per_split.values()):
        loose = [e.name for e in _scandir(root) if is_image(e.name)]
        extra = (
            f" (found {len(loose)} images directly in it; move them into class folders)"
            if loose
            else ""
        )
        raise DataError(f"data folder {root} contains no class folders{extra}; {hint}")
    classes = sorted({c for found in per_split.values() for c in found})
    index = {c: i for i, c in enumerate(classes)}
    ids, items, labels, splits = [], [], [], []
    for name, found in per_split.items():
        prefix = parts[name].relative_to(root)
        for c, files in found.items():
            if not files:
                raise DataError(
                    f"class folder {parts[name] / c} contains no images; add images or remove the "
                    "folder "
                    f"(extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            for f in files:
                rel = os.path.normpath(os.path.join(prefix, c, f))
                ids.append(rel)
                items.append(str(root / rel))
                labels.append(index[c])
                splits.append(name)
    return finalize(
        ids,
        items,
        labels,
        splits,
        classes,
        str(root),
        val_fraction,
        test_fraction,
        seed,
        verify_content=verify_content,
        rule=rule,
    )


def _sorted_labels(names: set[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), anything else alphabetically."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def read_csv(
    path: Path, required: tuple[str, ...], expected: str
) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a UTF-8 CSV with a header naming at least `required`; encoding and
    format slips (Latin-1 bytes, a NUL byte, an oversized field) are one-line errors naming the
    line."""
    if path.is_dir():
        raise DataError(f"manifest {path} is a folder; pass a CSV file with columns {expected}")
    if not path.is_file():
        raise MissingError(f"manifest {path} does not exist; pass a CSV with columns {expected}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in reader.fieldnames or []]
            if not set(required) <= set(columns):
                raise DataError(
                    f"manifest {path} has columns {columns}; expected a header row {expected}"
                )
            reader.fieldnames = columns
            rows = []
            for row in reader:
                if any("\0" in (value or "") for value in row.values() if isinstance(value, str)):
                    raise DataError(
                        f"manifest {path} line {reader.line_num}: contains a NUL byte; fix that row"
                    )
                rows.append((reader.line_num, row))
            return rows
    except UnicodeDecodeError as exc:
        raise DataError(
            f"manifest {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
            f"{exc.start}); "
            "save it as UTF-8"
        ) from None
    except csv.Error as exc:
        raise DataError(f"manifest {path} line {reader.line_num}: {exc}; fix that row") from None
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc.strerror}") from None


def read_manifest(
    path: str | Path,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    verify_content: bool = False,
    rule: str = "stratified",
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
            raise DataError(
                f"manifest {path} line {line}: empty path or label; every row needs both"
            )
        split = (row.get("split") or "train").strip().lower()
        if split not in SPLIT_ALIASES:
            raise DataError(
                f"manifest {path} line {line}: split {split!r} is not one of train, val, test"
            )
        full = base / rel
        real = os.path.realpath(full)
        if real in first_line:
            raise DataError(
                f"manifest {path} lines {first_line[real]} and {line} name the same file {rel!r}; "
                "list each image "
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
    return finalize(
        ids,
        items,
        labels,
        splits,
        classes,
        str(path),
        val_fraction,
        test_fraction,
        seed,
        verify_content=verify_content,
        rule=rule,
    )


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
    carve: str = "auto",
    data_val: str | None = None,
    data_test: str | None = None,
    label_key: str = "label",
) -> SampleList:
    """The sample list of whichever source is named (exactly one of `data` or `dataset`). `carve`
    auto: by hash for folders and CSVs (which grow), stratified for named datasets (which do not).
    """
    rule = carve if carve != "auto" else ("stratified" if dataset is not None else "hash")
    carve_args = {
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": split_seed,
        "verify_content": verify_content,
        "rule": rule,
    }
    if dataset is not None:
        name = canonical_dataset_name(dataset)
        if name == "digits":
            return scan_folder(materialize_digits(root), **carve_args)
        return load_torchvision(name, root, download, **carve_args)
    assert data is not None, "FeaturesConfig guarantees one source"
    if shards.is_compressed(data):
        raise ConfigError(
            f"--data {data!r} names compressed shards, which cannot be read by seeking; decompress "
            "them to .tar "
            "(gunzip keeps the tar inside)"
        )
    if shards.is_shards(data):
        patterns = (
            {"train": data}
            | ({"val": data_val} if data_val else {})
            | ({"test": data_test} if data_test else {})
        )
        return shards.load_shards(patterns, label_key, **carve_args)
    if data_val or data_test:
        raise ConfigError(
            "--data-val and --data-test name shard patterns; use them with --data "
            "'...{000..009}.tar'"
        )
    path = Path(data).expanduser()
    if path.suffix.lower() == ".csv":
        return read_manifest(path, **carve_args)
    if path.is_file():
        raise DataError(f"--data {path} is a file; expected an image folder or a .csv manifest")
    return scan_folder(path, **carve_args)


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
        raise MissingError(
            f"{path} does not exist; pass a folder of images, a CSV manifest or an image file"
        )
    for item in (
        items
    ):  # a FIFO or device would hang the reader: refuse it up front (missing files are listed)
        if os.path.exists(item) and not os.path.isfile(item):
            raise DataError(
                f"{item} is not a regular file (a folder, FIFO, socket or device?); remove it from "
                "the list"
            )
    if not ids:
        raise DataError(
            f"{path} holds no images (extensions read: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    n = len(ids)
    return SampleList(
        ids, np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int8), ["?"], items, source=str(path)
    )
