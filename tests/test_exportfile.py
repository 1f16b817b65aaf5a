"""An export from someone else (`pipeline.exportfile.load_export`): a program crafted to become code
through its JSON, with no pickle anywhere, is refused before torch reads it, and torch's own
refusals are one line."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline import load_export
from pipeline.errors import WeightsError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "good.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.zeros(2, 3),)), str(path))
    return path


def _rewrite(good: Path, out: Path, change) -> Path:
    """`good` with its program JSON changed by `change(program)`."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("models/model.json"):
                program = json.loads(data)
                change(program)
                data = json.dumps(program).encode()
            dst.writestr(item.filename, data)
    return out


def _nodes(program: dict) -> list[dict]:
    return program["graph_module"]["graph"]["nodes"]


def test_a_program_that_would_become_code_is_refused_and_runs_nothing(good, tmp_path):
    marker = tmp_path / "owned"
    payload = f"a=1) if 0 else None\rimport os; os.system('touch {marker}')\rdef h(*a, **k): #"

    def hop(program):  # a higher-order op whose keyword name FX would paste into generated source
        _nodes(program).insert(
            0,
            {
                "target": "torch.ops.higher_order.wrap",
                "name": "evil",
                "metadata": {},
                "inputs": [{"name": payload, "arg": {"as_string": "v"}, "kind": 2}],
                "outputs": [{"as_none": True}],
                "is_hop_single_tensor_return": True,
            },
        )

    def keyword(program):  # the same keyword name on an ordinary ATen node
        _nodes(program)[0]["inputs"][0]["name"] = payload

    def name(program):
        _nodes(program)[0]["name"] = "x; import os"

    def guards(program):
        program["guards_code"] = ["__import__('os').system('true')"]

    def pytree(program):
        call_graph = program["graph_module"]["module_call_graph"][0]["signature"]
        call_graph["in_spec"] = json.dumps(
            [1, {"type": "os.system", "context": "null", "children_spec": []}]
        )

    cases = {
        hop: r"its program calls 'torch\.ops\.higher_order\.wrap', not an ATen operator",
        keyword: r"its program has a string of unexpected characters at "
        r"graph_module/graph/nodes/inputs/name",
        name: r"its program has a name 'x; import os' that is not an identifier",
        guards: r"its program carries guard code",
        pytree: r"its program's inputs or outputs are of type 'os\.system'",
    }
    for change, pattern in cases.items():
        crafted = _rewrite(good, tmp_path / f"{change.__name__}.pt2", change)
        with pytest.raises(
            WeightsError, match=rf"refusing to load .*{change.__name__}\.pt2: {pattern}"
        ):
            load_export(crafted)
    assert not marker.exists(), "no code ran"


def test_debug_metadata_is_dropped_and_torchs_own_refusals_are_one_line(good, tmp_path):
    marker = tmp_path / "owned"

    def trace(program):  # a stack trace is printed into generated comments: dropped, never read
        _nodes(program)[0]["metadata"] = {
            "stack_trace": f"File x\r__import__('os').system('touch {marker}')"
        }

    program = load_export(_rewrite(good, tmp_path / "trace.pt2", trace))
    x = torch.ones(2, 3)
    assert program.module()(x).shape == (2, 2) and not marker.exists()

    def empty(program):
        program["graph_module"]["graph"]["nodes"] = []

    with pytest.raises(
        WeightsError, match=r"refusing to load .*empty\.pt2: torch cannot read it \("
    ):
        load_export(_rewrite(good, tmp_path / "empty.pt2", empty))
    with pytest.raises(WeightsError, match=r"refusing to load .*: it is a folder"):
        load_export(tmp_path)
    os.mkfifo(tmp_path / "pipe.pt2")
    with pytest.raises(
        WeightsError, match=r"refusing to load .*pipe\.pt2: it is not a regular file"
    ):
        load_export(tmp_path / "pipe.pt2")


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory) -> Path:
    """An export whose batch size is symbolic, as `pipeline export` writes it."""
    path = tmp_path_factory.mktemp("export") / "dynamic.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        torch.nn.Linear(3, 2), (torch.zeros(2, 3),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    return path


def _expressions(program: dict) -> list[dict]:
    """Every {"expr_str": ...} in the program."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            if "expr_str" in value:
                found.append(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(program)
    return found


def test_a_shape_expression_that_sympy_would_evaluate_as_code_is_refused(dynamic, tmp_path):
    """torch hands each `expr_str` to sympy.sympify (an eval): only integer shape expressions
    pass."""
    marker = tmp_path / "owned"
    program = load_export(dynamic)  # the symbolic batch size of a real export passes
    assert program.module()(torch.ones(5, 3)).shape == (5, 2)
    crafted = {
        "code": (f"__import__('os').system('touch {marker}') + s0", r"naming '__import__'"),
        "attribute": ("Symbol('s0').func", r"that is not one"),
        "power": ("Pow(Integer(10), Integer(10000000000))", r"naming 'Pow'"),
        "infix power": ("Integer(10)**Integer(99999999)", r"that is not one"),
        "long number": ("Integer(" + "9" * 40 + ")", r"that is not one"),
        "huge": ("Add(" + "Integer(1), " * 2000 + "Integer(1))", r"of \d+ characters"),
    }
    for case, (text, pattern) in crafted.items():

        def swap(program, text=text):
            for expression in _expressions(program):
                expression["expr_str"] = text

        path = _rewrite(dynamic, tmp_path / f"{case.replace(' ', '_')}.pt2", swap)
        with pytest.raises(WeightsError, match=rf"a shape expression (.* )?{pattern}"):
            load_export(path)
    assert not marker.exists(), "no code ran"


def test_a_payload_torch_would_unpickle_whatever_the_list_says_is_refused(good, tmp_path):
    out = tmp_path / "custom.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                for entry in config["config"].values():
                    entry["path_name"] = "custom_obj_0"
                data = json.dumps(config).encode()
            dst.writestr(item.filename, data)
    with pytest.raises(WeightsError, match=r"names a payload 'custom_obj_0'"):
        load_export(out)
