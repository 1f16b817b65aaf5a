"""The helpers in tools/: lower bounds read from pyproject.toml, the torch stack linked, not copied,
and the agreement of two caches of the same images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import cache_agreement
import link_torch
import min_requirements


def fake_distribution(site: Path, name: str, files: dict[str, str]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    rows = [f"{path},sha256=x,1" for path in files] + [
        "../../../bin/script,sha256=x,1",
        f"{info.name}/RECORD,,",
    ]
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    for path, text in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_text(text)


def test_the_torch_stack_is_hard_linked_and_nothing_else(tmp_path):
    source, target = (tmp_path / v / "lib/python3.11/site-packages" for v in ("a", "b"))
    target.mkdir(parents=True)
    fake_distribution(source, "torch", {"torch/__init__.py": "x", "torch/lib/big.so": "y"})
    fake_distribution(source, "nvidia_cublas", {"nvidia/cublas/lib.so": "z"})
    fake_distribution(source, "numpy", {"numpy/__init__.py": "n"})
    assert link_torch.link(source, target) == 5  # three files and two RECORDs
    assert (target / "torch/lib/big.so").stat().st_ino == (
        source / "torch/lib/big.so"
    ).stat().st_ino
    assert (target / "torch-1.0.dist-info/RECORD").is_file()
    assert not (target / "numpy").exists() and not (tmp_path / "b/bin/script").exists()
    assert link_torch.link(source, target) == 0  # idempotent


def test_a_venv_without_site_packages_is_named(tmp_path):
    with pytest.raises(SystemExit, match=r"expected one lib/python3\*/site-packages"):
        link_torch.site_packages(tmp_path)


def test_lower_bounds_need_exactly_one_bound_each(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    deps = [f'"{name}>=1.0"' for name in min_requirements.CHECKED]
    pyproject.write_text(f"[project]\ndependencies = [{', '.join(deps)}]\n")
    assert set(min_requirements.lower_bounds(pyproject).values()) == {"1.0"}
    pyproject.write_text(f"[project]\ndependencies = [{', '.join(deps[1:])}, 'numpy<3']\n")
    with pytest.raises(SystemExit, match="'numpy<3' needs exactly one '>=' lower bound"):
        min_requirements.lower_bounds(pyproject)


def test_cache_agreement_matches_rows_by_id_and_gives_their_cosines(tmp_path, capsys):
    import numpy as np

    from helpers import write_cache

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 6)), np.arange(30) % 3
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), 10)
    a = write_cache(tmp_path / "a.h5", X, y, split)
    noisy = X + 0.01 * rng.normal(size=X.shape)
    b = write_cache(tmp_path / "b.h5", noisy, y, split)
    c = cache_agreement.cosines(str(a), str(b))
    expected = (X * noisy).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(noisy, axis=1)
    np.testing.assert_allclose(np.sort(c), np.sort(expected), rtol=1e-6)
    assert cache_agreement.cosines(str(a), str(a)).min() == pytest.approx(1.0)
    sys.argv = ["cache_agreement", str(a), str(b)]
    assert cache_agreement.main() == 0
    assert capsys.readouterr().out.startswith("30 rows: least cosine 0.99")
