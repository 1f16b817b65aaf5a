"""Reading `.npz` files that someone else may have made (head.npz, predictions.npz): nothing
pickled, no entry the caller does not expect, no compressed entry that unpacks to far more than the
file holds, no array header that claims more bytes than its entry holds (which would be allocated
before anything else could be checked). Numpy only; callers turn `BadArchive` into their own error.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Collection
from pathlib import Path

import numpy as np

# This project writes .npz files stored, not compressed: entries that unpack to far more are a bomb
MAX_EXPANSION = 16


class BadArchive(ValueError):
    """Why an .npz file cannot be read, in a few words."""


def read_arrays(path: Path, names: Collection[str]) -> dict[str, np.ndarray]:
    """The arrays of the .npz at `path` (only `names` may be there), or BadArchive saying what is
    wrong with it. Everything is checked before any array is read."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            declared = sum(info.file_size for info in infos)
            if declared > MAX_EXPANSION * size + (1 << 20):
                raise BadArchive(f"its entries unpack to {declared / 1e9:.1f} GB from {size} bytes")
            for info in infos:
                name = info.filename.removesuffix(".npy")
                if name not in names:
                    raise BadArchive(
                        f"it holds an array {name[:40]!r}; expected only {', '.join(sorted(names))}"
                    )
                with archive.open(info) as fh:
                    fmt = np.lib.format
                    version = fmt.read_magic(fh)
                    read = (
                        fmt.read_array_header_1_0
                        if version == (1, 0)
                        else fmt.read_array_header_2_0
                    )
                    shape, _, dtype = read(fh)
                if math.prod(shape) * dtype.itemsize > info.file_size:
                    raise BadArchive(
                        f"its {info.filename} declares a {shape} {dtype} array, more than its "
                        f"{info.file_size} bytes"
                    )
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        if isinstance(exc, BadArchive):
            raise
        # np.load below names what is wrong with the archive
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError:
        raise BadArchive(
            "it holds pickled data (or is no .npz archive); nothing pickled is loaded"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError):
        raise BadArchive("it is not a readable .npz archive") from None
