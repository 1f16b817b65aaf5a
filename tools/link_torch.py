"""Hard-link the pinned torch stack of one virtual environment into another: `link_torch.py FROM
TO`.

`make test-min` builds a second environment whose torch and torchvision are the same pinned releases
as the main one (TORCH_PINS); installing them again costs about 6 GB of disk (the CUDA libraries),
which is what filled the CI machine. Linking every file that the installed distributions' RECORDs
name (torch, torchvision, triton, nvidia-*, cuda-*) costs no space, and pip then sees them installed
and only adds what is missing. Files outside site-packages (console scripts, whose first line names
the other interpreter) are skipped; a link across file systems falls back to a copy.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import sys
from pathlib import Path

LINKED = re.compile(r"^(torch|torchvision|triton|nvidia[-_].*|cuda[-_].*)$", re.IGNORECASE)


def site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise SystemExit(
            f"{venv}: expected one lib/python3*/site-packages, found {len(found)}; create the venv "
            "first"
        )
    return found[0]


def distribution_files(site: Path) -> list[Path]:
    """Every file, relative to `site`, that a RECORD of a LINKED distribution names inside
    `site`."""
    files: list[Path] = []
    for info in sorted(site.glob("*.dist-info")):
        name = info.name.split("-", 1)[0]  # NAME-VERSION.dist-info, NAME with underscores
        if not LINKED.match(name) or not (info / "RECORD").is_file():
            continue
        with open(info / "RECORD", newline="") as f:
            for row in csv.reader(f):
                relative = Path(row[0]) if row else None
                if (
                    relative is not None
                    and not relative.is_absolute()
                    and ".." not in relative.parts
                ):
                    files.append(relative)
    return files


def link(source: Path, target: Path) -> int:
    """Link (or copy) the files; the number placed. Files already at the target are left alone."""
    placed = 0
    for relative in distribution_files(source):
        src, dst = source / relative, target / relative
        if not src.is_file() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        placed += 1
    return placed


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: link_torch.py FROM_VENV TO_VENV")
    if not Path(sys.argv[1]).is_dir():
        print(f"{sys.argv[1]}: no environment to link the torch stack from; pip installs it")
        return
    source, target = (site_packages(Path(p)) for p in sys.argv[1:])
    print(f"linked {link(source, target)} files of the torch stack from {source} into {target}")


if __name__ == "__main__":
    main()
