"""The package's structure, checked from its source: no import cycles (at top level or inside a
function), stages that import only downwards, module docstrings, file sizes, and registries that
every choice list comes from."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline import registry
from pipeline.config import FeaturesConfig, HeadConfig

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """Every pipeline module `name` imports, anywhere in the file (top level, functions,
    TYPE_CHECKING). `from pipeline.x import y` counts as importing `pipeline.x.y` when that is a
    module, else `pipeline.x`."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pipeline")}
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline")
        ):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, from its first module)."""
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    return cycles


def test_no_module_imports_a_module_that_imports_it():
    assert _cycles() == []


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    monkeypatch.setitem(
        GRAPH, "pipeline.cache.schema", GRAPH["pipeline.cache.schema"] | {"pipeline.cache.reader"}
    )
    assert ["pipeline.cache.reader", "pipeline.cache.schema", "pipeline.cache.reader"] in _cycles()


# Which stage may import which: the data flows data + backbones -> features -> cache -> heads ->
# evaluate, and the shared modules (config, registry, errors, fsutil, outputs, devices, splits) sit
# below them all. A backbone runs over samples (`backbones.forward` reads a SampleList); neither
# data
# nor backbones knows the extraction run, the cache or the heads.
ALLOWED = {
    "pipeline.data": set(),
    "pipeline.backbones": {"pipeline.data"},
    "pipeline.cache": set(),
    "pipeline.features": {"pipeline.data", "pipeline.backbones", "pipeline.cache"},
    "pipeline.evaluate": set(),
    # The tail head fine-tunes the backbone after its cut: it alone reaches into backbones (below).
    "pipeline.heads": {"pipeline.cache", "pipeline.evaluate", "pipeline.backbones"},
}


def test_only_the_tail_head_imports_backbones():
    """The heads that train on cached vectors never build a model (the logreg head imports neither
    torch nor torchvision); the tail head, which fine-tunes part of the backbone, is the
    exception."""
    reach = {
        name
        for name in GRAPH
        if name.startswith("pipeline.heads")
        and any(m.startswith("pipeline.backbones") for m in GRAPH[name])
    }
    assert reach == {"pipeline.heads.kinds.tail"}


def test_predict_needs_data_and_backbones_not_the_extraction_run():
    stages = {m.rsplit(".", 1)[0] for m in GRAPH["pipeline.predict"] if m.count(".") >= 2}
    assert "pipeline.features" not in stages and {"pipeline.data", "pipeline.backbones"} <= stages


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stages_import_only_downwards(stage):
    stages = set(ALLOWED)
    for name in (m for m in GRAPH if m.startswith(stage + ".") or m == stage):
        for imported in GRAPH[name]:
            other = next((s for s in stages if imported == s or imported.startswith(s + ".")), None)
            assert other in (None, stage, *ALLOWED[stage]), f"{name} imports {imported}"


SMELL_LINES = 800  # a smell alarm, not a rule: modules are split by concern, never to meet a number


def test_every_module_says_what_it_owns():
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if name != "pipeline.__main__":
            assert ast.get_docstring(tree), f"{path} has no module docstring"
        lines = len(path.read_text().splitlines())
        assert lines <= SMELL_LINES, (
            f"{path} has {lines} lines: does it hold more than one concern?"
        )


def test_choice_lists_come_from_the_registry():
    fields = {
        f.name: f.metadata.get("choices")
        for cls in (FeaturesConfig, HeadConfig)
        for f in cls.__dataclass_fields__.values()
    }
    assert (
        fields["backbone"] is None
    )  # any torchvision or timm model: checked where it is described
    assert (
        fields["head"] is None
    )  # any registered head kind: checked by `pipeline.heads.kinds.validate`
    assert fields["solver"] == registry.HEAD_SOLVERS and set(registry.SOLVERS) < set(
        fields["solver"]
    )
    assert fields["preprocess"] == registry.HEAD_PREPROCESSING and set(
        registry.PREPROCESSING
    ) < set(fields["preprocess"])
    assert fields["joblib_backend"] == registry.JOBLIB_BACKENDS
    assert fields["select"] == tuple(registry.SELECT_RULES)
    assert (
        fields["precision"] == registry.PRECISIONS
        and fields["store_dtype"] == registry.STORE_DTYPES
    )
    assert len(registry.DEFAULT_GRID) == 45 and registry.DEFAULT_GRID[0] == 1e-6
    assert registry.DEFAULT_GRID_TEXT in HeadConfig.__dataclass_fields__["grid"].metadata["help"]


SHARED = ("config", "registry", "errors", "fsutil", "outputs", "devices", "splits")


def test_shared_modules_import_no_stage():
    """The modules every stage uses sit below them all, with no exception: the solver's options are
    declared in the config (`SolverOptions`), and the head stage imports them from there."""
    for short in SHARED:
        name = f"pipeline.{short}"
        stages = {m for m in GRAPH[name] if any(m.startswith(s) for s in ALLOWED)}
        assert not stages, f"{name} imports {stages}"
