"""Reading `.npz` files that someone else may have made (head.npz, predictions.npz): nothing
pickled, no array header that claims more bytes than its entry holds (which would be allocated
before anything else could be checked). Numpy only; callers turn `BadArchive` into their own error.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np


class BadArchive(ValueError):
    """Why an .npz file cannot be read, in a few words."""


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at `path`, or BadArchive saying what is wrong with it."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
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
