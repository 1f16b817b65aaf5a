"""Every backbone with random weights (timm style: offline, seconds), weights specs and checkpoints."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision

from pipeline import backbone
from pipeline.errors import ConfigError, MissingError, WeightsError


def _seeded_torchvision(name: str, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None).eval()


@pytest.mark.parametrize("name", backbone.BACKBONES)
def test_features_are_the_pooled_input_of_fc(name):
    model = backbone.build(backbone.describe(name, "none", seed=3, image_size=32))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    reference = _seeded_torchvision(name, seed=3)
    captured = {}
    reference.fc.register_forward_hook(lambda module, inputs, output: captured.setdefault("x", inputs[0]))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        features = model(x)
        reference(x)
    assert features.shape == (2, 512 if name in ("resnet18", "resnet34") else 2048) == (2, model.dim)
    torch.testing.assert_close(features, captured["x"], rtol=0, atol=1e-6)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = backbone.build(backbone.describe("resnet18", "none", seed=0))
    assert torch.rand(1) == before
    b = backbone.build(backbone.describe("resnet18", "none", seed=0))
    c = backbone.build(backbone.describe("resnet18", "none", seed=1))
    assert torch.equal(a.body.conv1.weight, b.body.conv1.weight)
    assert not torch.equal(a.body.conv1.weight, c.body.conv1.weight)


def test_preprocessing_comes_from_the_weights():
    v2 = backbone.describe("resnet50", "DEFAULT")
    assert v2.enum is torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert v2.transform.crop_size == [224] and v2.transform.resize_size == [232]
    assert "resnet50-11ad3fa6.pth" in v2.weights_id
    none = backbone.describe("resnet50", "none")  # the standard ImageNet eval preprocessing
    assert none.transform.crop_size == [224] and none.transform.resize_size == [256]
    small = backbone.describe("resnet50", "none", image_size=64)
    assert small.transform.crop_size == [64] and small.transform.resize_size == [73]
    assert "crop_size=[64]" in small.preprocessing and small.preprocessing != none.preprocessing


def test_named_weights_load_from_the_torch_hub_cache(offline_hub):
    state = _seeded_torchvision("resnet18", seed=5).state_dict()
    offline_hub.mkdir(parents=True)
    torch.save(state, offline_hub / "resnet18-f37072fd.pth")
    model = backbone.build(backbone.describe("resnet18", "IMAGENET1K_V1"), progress=False)
    torch.testing.assert_close(model.body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.classifier.weight, state["fc.weight"])


def test_failed_download_names_both_fixes(offline_hub):
    spec = backbone.describe("resnet18", "IMAGENET1K_V1")
    with pytest.raises(
        WeightsError,
        match=r"cannot download ResNet18_Weights\.IMAGENET1K_V1 from https://download\.pytorch\.org/models/"
        r"resnet18-f37072fd\.pth \(.*name resolution\); either put that file at .*torch-home/hub/checkpoints/"
        r"resnet18-f37072fd\.pth or pass --weights /path/to/checkpoint\.pth",
    ):
        backbone.build(spec, progress=False)


def test_checkpoint_state_dict_is_loaded_and_hashed(tmp_path):
    state = _seeded_torchvision("resnet18", seed=9).state_dict()
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # a wrapped DDP checkpoint
    spec = backbone.describe("resnet18", str(path), image_size=48)
    assert spec.weights_id == f"checkpoint sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert spec.transform.crop_size == [48]
    model = backbone.build(spec)
    torch.testing.assert_close(model.body.conv1.weight, state["conv1.weight"])


def test_checkpoint_with_another_head_or_none(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "ten.pt")
    assert backbone.build(backbone.describe("resnet18", str(tmp_path / "ten.pt"))).classifier.out_features == 10
    headless = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pt")
    assert backbone.build(backbone.describe("resnet18", str(tmp_path / "headless.pt"))).classifier is None


def test_bad_checkpoints(tmp_path):
    whole = tmp_path / "whole-model.pt"
    torch.save(torchvision.models.resnet18(weights=None), whole)  # a pickled module, not a state dict
    with pytest.raises(WeightsError, match=r"cannot load checkpoint .*whole-model\.pt \(.*\); expected a state dict"):
        backbone.build(backbone.describe("resnet18", str(whole)))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot load checkpoint .*notes\.pth"):
        backbone.build(backbone.describe("resnet18", str(text)))
    other = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), other)
    with pytest.raises(WeightsError, match=r"checkpoint .*r34\.pth has unexpected keys .* for resnet18; pass the "):
        backbone.build(backbone.describe("resnet18", str(other)))
    wide = tmp_path / "wide.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wide)
    with pytest.raises(WeightsError, match=r"checkpoint .*wide\.pth does not fit wide_resnet50_2 \(size mismatch"):
        backbone.build(backbone.describe("wide_resnet50_2", str(wide)))
    with pytest.raises(MissingError, match=r"checkpoint .*gone\.pth does not exist; pass --weights with a state-dict"):
        backbone.describe("resnet18", str(tmp_path / "gone.pth"))


def test_unknown_names():
    with pytest.raises(ConfigError, match=r"unknown backbone 'vit_b_16'; choose one of: resnet18, resnet34"):
        backbone.describe("vit_b_16", "none")
    with pytest.raises(
        ConfigError,
        match=r"unknown weights 'IMAGENET1K_V9' for resnet50; choose one of: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, "
        r"none, or a path to a checkpoint",
    ):
        backbone.describe("resnet50", "IMAGENET1K_V9")
