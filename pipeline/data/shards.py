"""WebDataset tar shards as a source: ``--data 'shards/train-{000000..000099}.tar'`` (brace
notation, local paths or any URL fsspec opens), with ``--data-val`` / ``--data-test`` patterns for
the other splits or val/test carved from train as for folders.

A sample is the members of a shard that share a key (webdataset's rule: the name up to the first dot
of its last path part): one image (``.jpg``, ``.jpeg``, ``.png`` or ``.webp``) and its label, in
``KEY.cls`` (an integer) or in ``KEY.json`` under ``--label-key``. Each shard is indexed once by
reading its tar headers and the small label members only; an image is then read by seeking to its
bytes, so rows can be read in any order, resumed at any row and split among ranks by whole shards.
Ids are ``<shard file name>/<key>``; a member's size and modification time (and sha256 with
--verify-content) identify it as a file's do. A corrupt image member follows the bad-image rules.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image

from pipeline.data.images import load_image
from pipeline.data.samples import SampleList, finalize
from pipeline.errors import BadImageError, ConfigError, DataError, MissingError

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
MAX_SHARDS = 100_000  # a brace range naming more is a typo, not a data set
MAX_MTIME = (
    2**33
)  # seconds (the year 2242): a member's time beyond it is stored as 0, not overflowed
_BLOCK = tarfile.BLOCKSIZE


def is_shards(data: str) -> bool:
    """Whether --data names tar shards (a .tar path or pattern) rather than a folder or CSV."""
    return (
        data.rstrip("}").lower().endswith(".tar")
        or ".tar}" in data.lower()
        or "}.tar" in data.lower()
    )


def is_compressed(data: str) -> bool:
    return data.rstrip("}").lower().endswith((".tar.gz", ".tgz")) or ".tar.gz}" in data.lower()


def expand(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern, through webdataset (the optional extra)."""
    named = _count_names(pattern)
    if named > MAX_SHARDS:
        raise DataError(
            f"--data {pattern!r} names {named:,} shards, more than {MAX_SHARDS:,}; check the "
            "numbers in its braces"
        )
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise ConfigError(
            f"--data {pattern!r} names tar shards, which need the webdataset package; install it "
            "with "
            "pip install 'pipeline[webdataset]' (or pip install webdataset)"
        ) from None
    try:
        urls = expand_urls(pattern)
    except (
        AssertionError,
        ValueError,
        KeyError,
        TypeError,
    ) as exc:  # e.g. ${VAR} webdataset cannot expand
        reason = str(exc) or type(exc).__name__
        raise DataError(
            f"--data {pattern!r} cannot be expanded ({reason[:120]}); write the shard names out"
        ) from None
    if not urls:
        raise DataError(f"--data {pattern!r} expands to no shard")
    return list(urls)


def _count_names(pattern: str) -> int:
    """How many names a brace pattern expands to, counted without expanding it: ranges ({a..b},
    {a..b..step}, {x..z} of letters) and {x,y} lists multiply; a range of another form counts as
    more than allowed."""
    count = 1
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        if ".." not in body:
            count *= body.count(",") + 1
            continue
        numbers = re.fullmatch(r"\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*(?:\.\.\s*(-?\d+)\s*)?", body)
        letters = re.fullmatch(r"\s*([A-Za-z])\s*\.\.\s*([A-Za-z])\s*", body)
        if numbers:
            step = abs(int(numbers[3] or 1)) or 1
            count *= abs(int(numbers[2]) - int(numbers[1])) // step + 1
        elif letters:
            count *= abs(ord(letters[2]) - ord(letters[1])) + 1
        else:
            count *= MAX_SHARDS + 1
    return count


@contextmanager
def opened(url: str) -> Iterator[IO[bytes]]:
    """A seekable binary file: a local path directly, anything else through fsspec."""
    if "://" not in url or url.startswith("file://"):
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            raise MissingError(
                f"shard {url} does not exist or is not a file; check the --data pattern"
            )
        with open(path, "rb") as fh:
            yield fh
        return
    import fsspec

    try:
        with fsspec.open(url, "rb") as fh:
            yield fh
    except (OSError, ValueError, ImportError) as exc:
        raise MissingError(
            f"shard {url}: {str(exc).splitlines()[0]}; check the URL and its access"
        ) from None


def _key(name: str) -> tuple[str, str]:
    """webdataset's split of a member name into (key, extension)."""
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    return str(path.parent / stem) if str(path.parent) != "." else stem, ext.lower()


def index_shard(url: str, label_key: str) -> list[tuple[str, tuple[int, int, int, str], Any]]:
    """[(key, (data offset, size, mtime, member name) of its image, its label)] in the shard's
    order. A shard must end as a tar file ends (every member whole, then the end-of-archive block):
    Python's tarfile takes a header cut short for the end, so a truncated shard would read as fewer
    samples."""
    samples: dict[str, dict[str, Any]] = {}
    with opened(url) as fh:
        try:
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    _check_name(member.name, url)
                    key, ext = _key(member.name)
                    entry = samples.setdefault(key, {})
                    if ext in IMAGE_SUFFIXES:
                        if "image" in entry:
                            raise DataError(
                                f"sample {key!r} in shard {url} has two images "
                                f"({entry['image'][3]}, {member.name}); "
                                "keep one image per key"
                            )
                        mtime = int(member.mtime) if 0 <= member.mtime < MAX_MTIME else 0
                        entry["image"] = (member.offset_data, member.size, mtime, member.name)
                    elif ext in ("cls", "json"):
                        entry[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                end = tar.offset  # where the next header would start: the end-of-archive block
        except tarfile.TarError as exc:
            reason = f"shard {url} is not a readable tar file ({exc})"
            raise DataError(f"{reason}; expected uncompressed .tar shards") from None
        fh.seek(end)
        if fh.read(_BLOCK) != bytes(_BLOCK):
            raise DataError(
                f"shard {url} ends early: its bytes stop at offset {end}, inside a member or where "
                "the end-of-archive "
                "block should be (a cut-short copy?); copy it again whole"
            )
        while tail := fh.read(
            1 << 20
        ):  # after the end of the archive: only the zero padding of the record
            if tail.count(0) != len(tail):
                raise DataError(
                    f"shard {url} holds data after its end-of-archive block (tar files joined with "
                    "cat?); tar "
                    "reads only the first archive of such a file: rebuild it as one archive (tar "
                    "-A joins them)"
                )
    out = []
    for key, entry in samples.items():
        where = f"sample {key!r} in shard {url}"
        if "image" not in entry:
            raise DataError(
                f"{where} has no image member (.{', .'.join(IMAGE_SUFFIXES)}); fix the shard"
            )
        out.append((key, entry["image"], _label(entry, label_key, where)))
    return out


def _check_name(name: str, url: str) -> None:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        raise DataError(
            f"shard {url} has a member whose name is not UTF-8 ({raw!r}); rename it in the shard"
        ) from None


def _label(entry: dict[str, Any], label_key: str, where: str) -> Any:
    try:
        if "cls" in entry:
            return int(entry["cls"].decode().strip())
        if "json" in entry:
            value = json.loads(entry["json"])[label_key]
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError(type(value).__name__)
            return value
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise DataError(
            f"{where}: cannot read its label ({type(exc).__name__}: {exc}); expected an integer "
            ".cls "
            f"or a .json with a {label_key!r} field (--label-key)"
        ) from None
    raise DataError(
        f"{where} has no label: add KEY.cls, or KEY.json with a {label_key!r} field (--label-key)"
    )


class ShardReader:
    """Reads one image member by seeking to its bytes in the shard; decoded like a file (reduced
    JPEG decoding included). A plain class, so DataLoader workers can pickle it."""

    reduces = True  # takes `min_short_side` like `load_image`

    def __call__(
        self, item: tuple[str, int, int, str], min_short_side: int | None = None
    ) -> Image.Image:
        url, offset, size, name = item
        label = f"{os.path.basename(url)}/{name}"
        with opened(url) as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise BadImageError(f"{label}: member is truncated ({len(data)} of {size} bytes)")
        return load_image(io.BytesIO(data), min_short_side, name=label)


def load_shards(
    patterns: dict[str, str],
    label_key: str,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    verify_content: bool = False,
    rule: str = "hash",
) -> SampleList:
    """The sample list of shard patterns per split ({"train": ..., "val": ..., "test": ...})."""
    ids, items, raw, splits, sizes, mtimes, urls = [], [], [], [], [], [], []
    for split, pattern in patterns.items():
        for url in expand(pattern):
            urls.append(url)
            shard = os.path.basename(url.rstrip("/"))
            for key, (offset, size, mtime, name), label in index_shard(url, label_key):
                ids.append(f"{shard}/{key}")
                items.append((url, offset, size, name))
                raw.append(label)
                splits.append(split)
                sizes.append(size)
                mtimes.append(mtime * 1_000_000_000)
    if len(set(ids)) != len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"sample {twice!r} appears twice; shard file names and keys must be unique")
    numeric = all(isinstance(v, int) for v in raw)
    if not numeric and any(isinstance(v, int) for v in raw):
        number = next(ids[i] for i, v in enumerate(raw) if isinstance(v, int))
        name = next(ids[i] for i, v in enumerate(raw) if not isinstance(v, int))
        raise DataError(
            f"labels mix class numbers ({number}) and class names ({name}); label every sample one "
            "way "
            "(all .cls numbers, or all names under --label-key)"
        )
    classes = sorted(set(raw), key=lambda v: (not isinstance(v, int), v))
    index = {c: i for i, c in enumerate(classes)}
    identity = {"file_size": np.array(sizes, np.int64), "file_mtime_ns": np.array(mtimes, np.int64)}
    if verify_content:
        digests = []
        for url, offset, size, _ in items:
            with opened(url) as fh:
                fh.seek(offset)
                digests.append(hashlib.sha256(fh.read(size)).hexdigest().encode())
        identity["file_sha256"] = np.array(digests, dtype="S64")
    # The shards' folder: a grown pattern (more shards) is the same source, so an update reuses its
    # rows.
    source = "tar shards in " + ", ".join(sorted({os.path.dirname(url) or "." for url in urls}))
    return finalize(
        ids,
        items,
        [index[v] for v in raw],
        splits,
        [str(c) for c in classes] if numeric else classes,
        source,
        val_fraction,
        test_fraction,
        seed,
        reader=ShardReader(),
        rule=rule,
        identity=identity,
    )
