"""Loading what others send: a tampered export runs no code, and the package's safe loaders exist."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faultkit import head_folder


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
                dst.writestr(item, replace(item.filename, data) if name_filter(item.filename) else data)
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
    with pytest.raises(Exception, match=r"refusing to load .*bad\.pt2: .*declares pickled payloads"):
        load_export(bad)
    bad = tamper(lambda n: "sample_inputs" in n, lambda n, d: pickle.dumps(Payload()))
    with pytest.raises(Exception, match=r"refusing to load .*bad\.pt2: .*model\.pt is not plain tensors"):
        load_export(bad)
    assert not marker.exists(), "no code ran"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(tmp_path / "extra.pt2", "w") as dst:
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename))
        dst.writestr("good/data/constants/custom_obj_0", pickle.dumps(Payload()))
    with pytest.raises(Exception, match=r"unexpected entry 'good/data/constants/custom_obj_0'"):
        load_export(tmp_path / "extra.pt2")


def test_the_readme_loaders_exist_on_the_package(cache, tmp_path):
    import pipeline

    folder = head_folder(cache, tmp_path)
    head = pipeline.load_head(folder)
    X = pipeline.read_features(cache)["test"].X
    assert head.predict_proba(X).shape == (len(X), 3)
    assert callable(pipeline.load_export)
