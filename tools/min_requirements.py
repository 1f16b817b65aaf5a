"""Print the declared lower bound of each checked dependency as an exact pin, one `name==version` a
line.

pyproject.toml is the one source of the bounds: `make test-min` installs this output into a separate
environment and runs the fast tests there, so a `>=` that is not true fails CI. torch and
torchvision are pinned by the Makefile instead (TORCH_PINS): only those releases can be installed
here.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

CHECKED = ("numpy", "h5py", "scikit-learn", "scipy", "joblib", "pillow", "tqdm", "matplotlib")
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*(?:;.*)?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bounds(pyproject: Path) -> dict[str, str]:
    """{name: version} for each CHECKED dependency; an error if one is missing or not a plain
    `>=X`."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found: dict[str, str] = {}
    for dep in deps:
        m = REQUIREMENT.match(dep)
        if m is None or canonical(m[1]) not in CHECKED:
            continue
        specs = [s.strip() for s in m[2].split(",") if s.strip()]
        lows = [s[2:].strip() for s in specs if s.startswith(">=")]
        if len(lows) != 1:
            raise SystemExit(
                f"{pyproject}: {dep!r} needs exactly one '>=' lower bound to be checked"
            )
        found[canonical(m[1])] = lows[0]
    missing = [n for n in CHECKED if n not in found]
    if missing:
        raise SystemExit(f"{pyproject}: no lower bound declared for {', '.join(missing)}")
    return found


def main() -> None:
    path = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parents[1] / "pyproject.toml"
    )
    for name, version in lower_bounds(path).items():
        print(f"{name}=={version}")


if __name__ == "__main__":
    main()
