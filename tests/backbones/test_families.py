"""Backbones beyond the ResNets through the whole feature stage: the cached vectors are what a plain
torchvision (or timm) model feeds its final classification layer, and the cache says which layer
that is."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import cli
from pipeline.features import stage

from helpers import make_folder, tiny
from helpers.faults import FAST


def _direct(model: torch.nn.Module, transform, root: Path, ids: list[str]) -> np.ndarray:
    """The input of `model`'s last Linear for each image, by a forward hook on a plain model."""
    layer = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    captured: list[torch.Tensor] = []
    layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.inference_mode():
        for sample_id in ids:
            model(transform(Image.open(root / sample_id).convert("RGB"))[None])
    return torch.cat(captured).numpy()


@pytest.mark.parametrize(
    "name", ["convnext_tiny", pytest.param("vit_b_16", marks=pytest.mark.slow)]
)
def test_cached_features_equal_the_input_of_the_final_linear(tmp_path, name):
    root = make_folder(tmp_path / "img", per_class=3, splits=("train", "test"), size=(60, 45))
    size = 224 if name == "vit_b_16" else 32
    cfg = tiny(data=str(root), backbone=name, image_size=size, seed=5, out=str(tmp_path / "c.h5"))
    stage.run(cfg)
    with h5py.File(cfg.out) as f:
        ids, cached = list(f["ids"].asstr()[...]), f["features"][...]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = torchvision.models.get_model(name, weights=None).eval()
    from pipeline.backbones import backbone

    transform = backbone.describe(name, "none", image_size=size).transform
    assert cached.shape == (12, {"convnext_tiny": 768, "vit_b_16": 768}[name])
    np.testing.assert_allclose(cached, _direct(model, transform, root, ids), rtol=0, atol=1e-5)


def test_a_timm_backbone_through_the_command_line(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    root = make_folder(tmp_path / "img", per_class=3, splits=("train", "test"), size=(60, 45))
    out = tmp_path / "timm.h5"
    code = cli.main(
        ["features", "--data", str(root), *FAST, "--backbone", "timm:resnet18", "--out", str(out)]
    )
    assert code == 0
    with h5py.File(out) as f:
        ids, cached = list(f["ids"].asstr()[...]), f["features"][...]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("resnet18", pretrained=False).eval()
    config = timm.data.resolve_model_data_config(model)
    config["input_size"] = (
        3,
        32,
        32,
    )  # what --image-size 32 asks for: timm's own crop_pct at that crop
    np.testing.assert_allclose(
        cached, _direct(model, timm.data.create_transform(**config), root, ids), atol=1e-5
    )
    assert cli.main(["info", str(out)]) == 0
    assert "timm forward_head(forward_features(x), pre_logits=True)" in capsys.readouterr().out


def test_the_backbone_list_and_a_wrong_name(capsys):
    assert cli.main(["backbones", "convnext"]) == 0
    table = capsys.readouterr().out
    row = (
        r"convnext_tiny +ConvNeXt +768 +input of classifier\.2 +IMAGENET1K_V1 "
        r"+crop 224, resize 236, bilinear"
    )
    assert re.search(row, table)
    assert "vit_b_16" not in table
    assert (
        cli.main(
            ["features", "--dataset", "digits", "--backbone", "convnxt_tiny", "--weights", "none"]
        )
        == 2
    )
    assert "unknown backbone 'convnxt_tiny'; did you mean convnext_tiny" in capsys.readouterr().err


def test_the_shipped_backbone_table_is_current_and_listing_builds_no_model(
    capsys, tmp_path, monkeypatch
):
    import importlib.metadata
    import json

    from pipeline.backbones import architectures, catalog

    shipped = json.loads(catalog.SHIPPED.read_text())
    if shipped["version"] != importlib.metadata.version("torchvision"):
        pytest.skip(
            "the shipped table is for another torchvision; it is computed and cached instead"
        )
    assert shipped["rows"] == catalog.all_torchvision_rows(), (
        "refresh it: python -m pipeline.backbones.catalog"
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        architectures, "anatomy", lambda name: pytest.fail(f"built {name} to list it")
    )
    assert cli.main(["backbones", "resnet"]) == 0
    assert "resnet50" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(
        catalog, "SHIPPED", tmp_path / "missing.json"
    )  # another torchvision: computed, cached
    assert catalog.torchvision_rows("vit_b_16")[0]["dim"] == 768
    version = importlib.metadata.version("torchvision")
    assert (tmp_path / "pipeline" / f"torchvision-{version}.json").exists()


def test_non_resnet_caches_record_their_layer_and_resnet_fingerprints_are_unchanged(
    tmp_path, folder
):
    resnet = stage.run(tiny(data=str(folder), out=str(tmp_path / "r.h5")))
    squeeze = stage.run(
        tiny(data=str(folder), backbone="squeezenet1_1", out=str(tmp_path / "s.h5"))
    )
    with h5py.File(resnet.path) as r, h5py.File(squeeze.path) as s:
        assert '"layer": "avgpool (flattened input of fc)"' in r.attrs["fingerprint"]
        assert (
            '"layer": "input of classifier.1 (the final Conv2d, pooled)"' in s.attrs["fingerprint"]
        )
        assert s["features"].shape == (10, 512)


def test_logits_need_a_linear_classifier(tmp_path):
    from pipeline.errors import CacheError

    root = make_folder(tmp_path / "img", per_class=2, size=(40, 30))
    with pytest.raises(
        CacheError, match=r"--logits: squeezenet1_1's classification layer is not a Linear"
    ):
        stage.run(
            tiny(data=str(root), backbone="squeezenet1_1", logits=True, out=str(tmp_path / "s.h5"))
        )
