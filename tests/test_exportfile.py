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
