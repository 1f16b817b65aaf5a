"""What a new user meets first: the README's two commands on a fresh clone, an install that happens
once, the CPU-only torch option, a README of one screen and a CLI reference that is never stale."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _clone(tmp_path: Path) -> Path:
    """The files a fresh clone has that these commands read: the Makefile, the package, its
    configs."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("Makefile", "pyproject.toml", "configs", "pipeline"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, clone / name)
    for name in ("cache", "results"):
        (clone / name).mkdir()
    return clone


def _fake_python(tmp_path: Path) -> Path:
    """A `python3` whose `-m venv DIR` makes DIR/bin/python: this interpreter with the package on
    its path, whose `-m pip` only logs (the real install runs in CI). Every call is logged."""
    log = tmp_path / "installs.log"
    real = sys.executable
    inner = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "pip $*" >> {log}; exit 0; fi
PYTHONPATH="{REPO}" exec {real} "$@"
"""
    outer = f"""#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  echo "venv $3" >> {log}; mkdir -p "$3/bin"
  cat > "$3/bin/python" <<'INNER'
{inner}INNER
  chmod +x "$3/bin/python"; exit 0
fi
exec {real} "$@"
"""
    path = tmp_path / "python3"
    path.write_text(outer)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _make(clone: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "VIRTUAL_ENV")}
    return subprocess.run(
        ["make", "-s", *args], cwd=clone, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_readme_opens_with_the_two_commands_and_fits_one_screen():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    assert (
        ".venv/bin/pipeline" in text and "source .venv/bin/activate" in text and "TORCH=cpu" in text
    )


def test_every_target_that_runs_the_package_installs_first_and_only_once(tmp_path):
    clone = _clone(tmp_path)
    for target in ("demo", "test", "features", "head", "lint", "docs"):
        plan = _make(clone, "-n", target, f"PYTHON={sys.executable}").stdout
        assert "-m venv .venv" in plan and "pip install -e '.[dev]'" in plan, target
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / ".installed").touch()  # installed, and newer than pyproject.toml
    plan = _make(clone, "-n", "test").stdout
    assert "-m venv" not in plan and "pytest" in plan
    other = _make(clone, "-n", "features", "PY=/usr/bin/python3", "VENV=elsewhere").stdout
    assert "-m venv" not in other, "with PY pointing at another interpreter nothing is installed"


def test_the_cpu_only_torch_build_is_one_flag_away(tmp_path):
    clone = _clone(tmp_path)
    plan = _make(clone, "-n", "install", "TORCH=cpu", f"PYTHON={sys.executable}").stdout
    cpu = plan.index(
        "--index-url https://download.pytorch.org/whl/cpu 'torch>=2.1' 'torchvision>=0.16'"
    )
    assert cpu < plan.index("pip install -e '.[dev]'"), (
        "the CPU wheels first, so the package's pins find them"
    )
    assert (
        "download.pytorch.org"
        not in _make(clone, "-n", "install", f"PYTHON={sys.executable}").stdout
    )


def test_the_cli_reference_is_generated_and_current():
    sys.path.insert(0, str(REPO / "tools"))
    import cli_reference

    committed = (REPO / "docs" / "reference" / "cli.md").read_text()
    assert committed == cli_reference.render(), (
        "stale: run `make docs` (or python tools/cli_reference.py)"
    )
    assert "## pipeline head" in committed and "**long tail and calibration**" in committed


@pytest.mark.slow
def test_make_demo_on_a_fresh_clone_installs_once_and_runs_the_demo(tmp_path):
    """`make demo` twice on a clone without .venv: the (stubbed) install runs once, the demo
    twice."""
    clone = _clone(tmp_path)
    python = _fake_python(tmp_path)
    first = _make(clone, "demo", f"PYTHON={python}")
    assert first.returncode == 0, first.stderr
    assert (
        "wrote cache/digits-resnet18.h5" in first.stderr
        and "results in results/digits-logreg/" in first.stderr
    )
    assert "pipeline is .venv/bin/pipeline" in first.stdout
    for name in ("result.json", "validation_curve.png", "confusion_matrix.png", "reliability.png"):
        assert (clone / "results" / "digits-logreg" / name).exists(), name
    second = _make(clone, "demo", f"PYTHON={python}")
    assert second.returncode == 0 and "is current (1797 rows); nothing to do" in second.stderr
    log = (tmp_path / "installs.log").read_text().splitlines()
    assert sum(line.startswith("venv ") for line in log) == 1, log


def test_a_mistyped_command_or_flag_names_the_closest_one_and_the_commands_own_help(tmp_path):
    from helpers.faults import assert_one_line_error, main_here

    cache = str(tmp_path / "c.h5")
    for argv, pattern in (
        (
            ["head", cache, "--hed", "knn"],
            r"pipeline head: unrecognized arguments: --hed knn \(did you mean --head\?\); see "
            r"`pipeline head --help`",
        ),
        (
            ["features", "--weigths", "none"],
            r"pipeline features: unrecognized arguments: --weigths none \(did you mean "
            r"--weights\?\)",
        ),
        (  # no abbreviations: a later flag could change what an old script does
            ["features", "--dataset", "digits", "--weight", "none"],
            r"unrecognized arguments: --weight none \(did you mean --weights\?\)",
        ),
        (["feature"], r"pipeline: no command 'feature' \(did you mean 'features'\?\)"),
        (
            ["backbones", "resnet150"],
            r"no backbone matches 'resnet150'; did you mean resnet50, resnet152",
        ),
        (
            ["study", str(tmp_path / "none.toml")],
            r"config file .*none\.toml does not exist; pass a TOML file such as "
            r"configs/demo-study\.toml",
        ),
        (
            ["head", "--config", "nowhere/demo.toml"],
            r"config file nowhere/demo\.toml does not exist \(paths are relative to .*\); pass",
        ),
    ):
        code, err = main_here(argv)
        assert code == 2, (argv, err)
        assert_one_line_error(err, pattern)


def test_a_cache_given_as_a_head_says_which_folder_to_pass(tmp_path):
    from helpers import write_cache
    from helpers.faults import assert_one_line_error, main_here

    cache = write_cache(
        tmp_path / "c.h5", np.ones((4, 3), np.float32), np.array([0, 1, 0, 1]), np.zeros(4)
    )
    code, err = main_here(["predict", "--head", str(cache), "--data", str(tmp_path)])
    assert code == 2
    assert_one_line_error(
        err, r"c\.h5 is a feature cache, not a head; pass the results folder that `pipeline head "
    )


def test_more_shots_than_a_class_has_says_so_in_the_summary_and_result(faults_cache, tmp_path):
    import json

    from helpers.faults import main_here

    out = tmp_path / "h"
    code, err = main_here(
        ["head", str(faults_cache), "--shots", "1000", "--out", str(out), "--no-progress"]
    )
    assert code == 0, err
    assert re.search(r"note: --shots 1000: 3 of 3 classes have fewer train images \(\d+", err), err
    trained_on = json.loads((out / "result.json").read_text())["protocol"]["trained_on"]
    assert "3 of 3 classes have fewer train images" in trained_on and "all of theirs" in trained_on
