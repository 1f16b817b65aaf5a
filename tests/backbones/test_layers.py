"""--layers: intermediate layers pooled in the same forward pass, stored beside the features,
checked by their CRCs, and read by `head --layer` (one layer, or several concatenated)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from pipeline import cli, read_features
from pipeline.backbones import backbone, layers
from pipeline.cache import writer as cache_writer
from pipeline.config import FeaturesConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.features import stage

from helpers import make_folder, tiny


def _pooled_outputs(
    model: torch.nn.Module, layers: list[str], x: torch.Tensor
) -> dict[str, np.ndarray]:
    captured = {}
    for name in layers:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, out, name=name: captured.__setitem__(name, out.mean(dim=(2, 3)).numpy())
        )
    with torch.inference_mode():
        model(x)
    return captured


def test_layers_are_the_pooled_module_outputs_of_the_same_forward_pass(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "img", per_class=3, splits=("train", "test"), size=(60, 45))
    plain = stage.run(tiny(data=str(root), out=str(tmp_path / "plain.h5")))
    calls = []
    forward = backbone.FeatureExtractor.forward
    monkeypatch.setattr(
        backbone.FeatureExtractor,
        "forward",
        lambda self, x: calls.append(len(x)) or forward(self, x),
    )
    cfg = tiny(data=str(root), layers="layer2,layer3", out=str(tmp_path / "layers.h5"))
    stage.run(cfg)
    assert calls == [4, 4, 4]  # one forward pass per batch of 4, whatever the number of layers
    with h5py.File(cfg.out) as f, h5py.File(plain.path) as g:
        np.testing.assert_array_equal(
            f["features"][...], g["features"][...]
        )  # the features do not change
        ids, stored = list(f["ids"].asstr()[...]), {k: f["layers"][k][...] for k in f["layers"]}
        assert (
            json.loads(f.attrs["fingerprint"])["layers"]
            == "layer2, layer3 (outputs averaged over space or tokens)"
        )
    assert {k: v.shape for k, v in stored.items()} == {"layer2": (12, 128), "layer3": (12, 256)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval()
    transform = backbone.describe("resnet18", "none", image_size=32).transform
    x = torch.stack([transform(Image.open(root / i).convert("RGB")) for i in ids])
    for name, expected in _pooled_outputs(model, ["layer2", "layer3"], x).items():
        np.testing.assert_allclose(stored[name], expected, rtol=0, atol=1e-5)


def _channels_last_output_is_pooled_over_its_grid(name: str, layer: str, width: int) -> None:
    """The stored layer equals the module's (B, H, W, C) output averaged over H and W, by a forward
    hook."""
    spec = backbone.describe(name, "none", image_size=32, layers=(layer,))
    model = backbone.build(spec)
    grid = {}
    model.root.get_submodule(layer).register_forward_hook(
        lambda m, i, out: grid.setdefault("x", out)
    )
    with torch.inference_mode():
        model(torch.randn(2, 3, 32, 32))
    assert grid["x"].shape[-1] == width and dict(spec.layer_dims) == {layer: width}
    torch.testing.assert_close(model.captured[layer], grid["x"].mean(dim=(1, 2)))


def test_a_swin_stage_is_pooled_over_its_channels_last_grid():
    _channels_last_output_is_pooled_over_its_grid("swin_t", "features.3", 192)


def test_heads_read_one_layer_or_several_concatenated(tmp_path, capsys):
    root = make_folder(tmp_path / "img", per_class=6, size=(40, 30))
    cache = tmp_path / "c.h5"
    stage.run(tiny(data=str(root), layers="layer3,layer4", out=str(cache)))
    both = read_features(cache, layer="layer3,layer4")
    np.testing.assert_array_equal(
        both["train"].X[:, :256], read_features(cache, layer="layer3")["train"].X
    )
    assert both.dim == 256 + 512 and read_features(cache, layer="penultimate").dim == 512
    for layer, dim in (("layer3", 256), ("layer3,layer4", 768)):
        out = tmp_path / f"r-{layer}"
        assert (
            cli.main(
                [
                    "head",
                    "--features",
                    str(cache),
                    "--layer",
                    layer,
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        result = json.loads((out / "result.json").read_text())
        assert result["cache"]["layer"] == layer and result["cache"]["dim"] == dim
    capsys.readouterr()
    assert (
        cli.main(
            ["head", "--features", str(cache), "--layer", "layer1", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert (
        "has no layer 'layer1'; its layers: layer3, layer4, and 'penultimate'"
        in capsys.readouterr().err
    )
    assert cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "report.md")]) == 0
    assert "resnet18 none @ layer3" in (tmp_path / "report.md").read_text()
    assert cli.main(["predict", "--head", str(tmp_path / "r-layer3"), "--data", str(root)]) == 2
    assert (
        "was trained on layer 'layer3' of its cache; predict and export rebuild"
        in capsys.readouterr().err
    )


def test_wrong_layer_names_fail_before_any_image_is_read(tmp_path):
    with pytest.raises(
        ConfigError, match=r"--layers: resnet18 has no module 'layer5'; did you mean layer4"
    ):
        backbone.describe("resnet18", "none", layers=("layer5",))
    with pytest.raises(ConfigError, match=r"--layers 'layer3,layer3' names a module twice"):
        FeaturesConfig(dataset="digits", layers="layer3,layer3")
    with pytest.raises(
        ConfigError, match=r"googlenet does not run aux1 on the way to its features"
    ):
        backbone.describe("googlenet", "none", layers=("aux1",))  # only in training mode
    with pytest.raises(
        CacheError, match=r"no layer 'layer2'; its layers: none \(it was built without --layers\)"
    ):
        read_features(
            stage.run(tiny(dataset="digits", out=str(tmp_path / "d.h5"))).path, layer="layer2"
        )


def test_a_layer_row_that_reads_back_wrong_fails_verification(tmp_path):
    path = tmp_path / "c.h5"
    writer = cache_writer.CacheWriter.open(
        path,
        fingerprint={"t": 1},
        ids=["a", "b"],
        labels=np.array([0, 1]),
        split=np.array([0, 2], np.int8),
        classes=["x", "y"],
        dim=3,
        store_dtype="float32",
        layer_dims={"layer3": 2},
    )
    writer.write(0, np.ones((2, 3)), layers={"layer3": np.ones((2, 2))})
    writer.f["layers"]["layer3"][1] = [5.0, 5.0]  # a layer value that differs from what was written
    with pytest.raises(CacheError, match=r"failed verification: row 1 reads back different"):
        writer.finish()
    writer.close()


def test_a_malformed_layers_group_is_named_on_open(tmp_path):
    cache = stage.run(tiny(dataset="digits", layers="layer4", out=str(tmp_path / "d.h5"))).path
    with h5py.File(cache, "r+") as f:
        del f["layers"]["layer4"]
        f["layers"]["layer4"] = np.zeros((3, 2), np.float32)
    with pytest.raises(
        CacheError, match=r"layers/layer4 is \(3, 2\) float32, expected \(\d+, dim\) floats"
    ):
        read_features(cache)


def test_the_module_list_names_what_layers_accepts(capsys):
    assert cli.main(["backbones", "resnet18", "--layers"]) == 0
    listing = capsys.readouterr().out
    assert "layer3                 Sequential           256" in listing and "avgpool" in listing
    assert layers.layout("resnet18", ("layer4",), 32) == {"layer4": (512, 1)}


def test_the_channel_axis_is_found_where_it_lies():
    """NCHW convolutions, NHWC blocks of ConvNeXt and Swin, ViT tokens: each pooled over all but its
    channels."""
    swin = layers.check("swin_t", ("features.0.0", "features.0.1", "permute", "avgpool"), 64)
    assert swin == {
        "features.0.0": (96, 1),
        "features.0.1": (96, 3),
        "permute": (768, 1),
        "avgpool": (768, 1),
    }
    assert layers.check("convnext_tiny", ("features.1.0.block.2",), 64) == {
        "features.1.0.block.2": (96, 3)
    }
    assert layers.check("vit_b_16", ("encoder.layers.encoder_layer_0",), 224) == {
        "encoder.layers.encoder_layer_0": (768, 2)
    }
    assert layers.check("vgg11", ("avgpool",), 64) == {
        "avgpool": (512, 1)
    }  # (512, 7, 7) at every size
    _channels_last_output_is_pooled_over_its_grid("convnext_tiny", "features.1.0.block.2", 96)


def test_the_classification_layer_and_modules_off_the_feature_path_are_refused():
    with pytest.raises(
        ConfigError, match=r"'fc' is resnet18's classification layer, which the features replace"
    ):
        backbone.describe("resnet18", "none", layers=("fc",))
    with pytest.raises(
        ConfigError, match=r"timm:resnet18 does not run fc on the way to its features"
    ):
        pytest.importorskip("timm")
        backbone.describe("timm:resnet18", "none", layers=("fc",))


def test_a_module_called_features_is_a_layer_like_any_other(tmp_path):
    from pipeline.heads.protocol import HeadConfig

    root = make_folder(tmp_path / "img", per_class=4, size=(40, 30))
    cache = stage.run(
        tiny(data=str(root), backbone="densenet121", layers="features", out=str(tmp_path / "s.h5"))
    )
    stored, penultimate = read_features(cache.path, layer="features"), read_features(cache.path)
    assert stored.dim == 1024 and not np.array_equal(
        stored["train"].X, penultimate["train"].X
    )  # before the last ReLU
    with pytest.raises(
        ConfigError, match=r"--layer 'layer3,layer3' names a layer twice or an empty one"
    ):
        HeadConfig(features="c.h5", layer="layer3,layer3")
    with pytest.raises(ConfigError, match=r"--layer 'layer3,' names a layer twice or an empty one"):
        HeadConfig(features="c.h5", layer="layer3,")
