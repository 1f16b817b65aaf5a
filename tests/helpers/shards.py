"""WebDataset-style tar shards written by tests: `write_shard`, and `make_shards` (shards whose
images also sit in a folder, so the two sources compare)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from helpers import PALETTE, write_image


def write_shard(path: Path, samples: list[tuple[str, bytes, dict[str, bytes]]]) -> Path:
    """A tar shard: KEY.png plus its label members, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, extra in samples:
            for name, data in [
                (f"{key}.png", image),
                *((f"{key}.{ext}", d) for ext, d in extra.items()),
            ]:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(tmp_path: Path, shards: int = 3, per_shard: int = 4) -> tuple[Path, Path]:
    """Shards of images that also sit in a folder (ROOT/<class>/<key>.png), so the two sources
    compare."""
    folder = tmp_path / "folder"
    for s in range(shards):
        members = []
        for i in range(per_shard):
            label = (s + i) % 2
            image = write_image(
                folder / f"c{label}" / f"s{s}-{i:02d}.png", PALETTE[label], (40, 30)
            )
            members.append((f"s{s}-{i:02d}", image.read_bytes(), {"cls": str(label).encode()}))
        write_shard(tmp_path / "shards" / f"train-{s:03d}.tar", members)
    return tmp_path / "shards", folder
