"""Loading what others send: a tampered export runs no code, and the package's safe loaders
exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.faults import head_folder


@pytest.fixture(scope="module")
def cache(faults_cache: Path) -> Path:
    """A small cache of three classes, shared by this module's tests (see conftest)."""
    return faults_cache


# ------------------------------------------------------------------- 5. loading what others send


def test_a_tampered_export_is_refused_and_runs_no_code(tmp_path):
    import io
    import json
    import pickle
    import zipfile

    import torch

    from pipeline import load_export

    module = torch.nn.Linear(3, 2)
    program = torch.export.export(module, (torch.zeros(2, 3),))
    good = tmp_path / "good.pt2"
    torch.export.save(program, str(good), extra_files={"meta.json": "{}"})
    x = torch.ones(2, 3)
    torch.testing.assert_close(load_export(good).module()(x), module(x))

    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    def tamper(name_filter, replace):
        bad = tmp_path / "bad.pt2"
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                dst.writestr(
                    item, replace(item.filename, data) if name_filter(item.filename) else data
                )
        return bad

    def pickled_weights(name, data):
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        buffer = io.BytesIO()
        torch.save(Payload(), buffer)
        return buffer.getvalue()

    bad = tamper(lambda n: "data/weights/" in n, pickled_weights)
    with pytest.raises(
        Exception, match=r"refusing to load .*bad\.pt2: .*declares pickled payloads"
    ):
        load_export(bad)
    bad = tamper(lambda n: "sample_inputs" in n, lambda n, d: pickle.dumps(Payload()))
    with pytest.raises(
        Exception, match=r"refusing to load .*bad\.pt2: .*model\.pt is not plain tensors"
    ):
        load_export(bad)
    assert not marker.exists(), "no code ran"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "extra.pt2", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("good/data/constants/custom_obj_0", pickle.dumps(Payload()))
    with pytest.raises(Exception, match=r"unexpected entry 'good/data/constants/custom_obj_0'"):
        load_export(tmp_path / "extra.pt2")


def test_an_export_whose_entries_disagree_runs_no_code(tmp_path):
    """Twin entries (zipfile reads the last, torch the first), two top folders, a zip bomb: refused
    before torch opens anything, and torch only ever reads the entries that were checked."""
    import io
    import json
    import warnings
    import zipfile

    import torch

    from pipeline import load_export
    from pipeline.errors import WeightsError

    good = tmp_path / "good.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.zeros(2, 3),)), str(good))
    marker = tmp_path / "owned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pickled = io.BytesIO()
    torch.save(Payload(), pickled)
    with zipfile.ZipFile(good) as src:
        items = [(item.filename, src.read(item.filename)) for item in src.infolist()]

    def write(name: str, entries) -> Path:
        path = tmp_path / name
        with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as dst:
            warnings.simplefilter(
                "ignore"
            )  # zipfile warns of the duplicate name it is asked to write
            for entry, data in entries:
                dst.writestr(entry, data)
        return path

    twin = []
    for name, data in items:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            evil = {"config": {k: {**v, "use_pickle": True} for k, v in config["config"].items()}}
            twin.append(
                (name, json.dumps(evil).encode())
            )  # which copy a reader takes is its own choice
        elif "/data/weights/weight_" in name:
            data = pickled.getvalue()
        twin.append((name, data))
    twice = (
        r"refusing to load .*twin\.pt2: entry '.*model_weights_config\.json' appears more than once"
    )
    with pytest.raises(WeightsError, match=twice):
        load_export(write("twin.pt2", twin))
    two_tops = [*items, ("other/extra/meta.json", b"{}")]
    with pytest.raises(WeightsError, match=r"two\.pt2: its entries sit under 2 top folders"):
        load_export(write("two.pt2", two_tops))
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for name, data in items:
            dst.writestr(name, data)
        dst.writestr(items[0][0].split("/")[0] + "/extra/pad", b"\0" * (64 << 20))
    with pytest.raises(WeightsError, match=r"bomb\.pt2: its entries unpack to 0\.1 GB from"):
        load_export(bomb)
    with pytest.raises(WeightsError, match=r"half\.pt2: it is not a torch.export archive"):
        (tmp_path / "half.pt2").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        load_export(tmp_path / "half.pt2")
    assert not marker.exists(), "no code ran"


def test_the_readme_loaders_exist_on_the_package(cache, tmp_path):
    import pipeline

    folder = head_folder(cache, tmp_path)
    head = pipeline.load_head(folder)
    X = pipeline.read_features(cache)["test"].X
    assert head.predict_proba(X).shape == (len(X), 3)
    assert callable(pipeline.load_export)
