"""The tests' shared fixtures. Shared helpers live in `tests/helpers` (`from helpers import
...`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers import make_folder, tiny, write_cache


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images", per_class=5)


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub directory, and downloads that fail the way they do without a network."""
    import urllib.error

    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch-home" / "hub" / "checkpoints"


@pytest.fixture
def synthetic_cache(tmp_path: Path) -> Path:
    """600 rows, 20-d, 4 classes: train 360 / val 120 / test 120."""
    from sklearn.datasets import make_classification

    X, y = make_classification(600, 20, n_informative=8, n_classes=4, class_sep=1.0, random_state=0)
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [360, 120, 120])
    return write_cache(tmp_path / "synthetic.h5", X, y, split)


@pytest.fixture
def tmpfs(tmp_path):
    """A 600 KiB tmpfs; skipped where this process may not mount."""
    point = tmp_path / "small"
    point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(point)], capture_output=True
    )
    if done.returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield point
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture(scope="module")
def faults_cache(tmp_path_factory) -> Path:
    from pipeline.features import stage

    tmp = tmp_path_factory.mktemp("faults")
    root = make_folder(tmp / "img", classes=("cat", "dog", "owl"), per_class=8)
    out = tmp / "c.h5"
    stage.run(tiny(data=str(root), out=str(out), test_fraction=0.25))
    return out
