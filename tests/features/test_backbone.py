"""Every backbone with random weights (timm style: offline, seconds), weights specs and checkpoints."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision

from pipeline import registry
from pipeline.errors import ConfigError, MissingError, WeightsError
from pipeline.features import backbone


def _seeded_torchvision(name: str, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None).eval()


# Every backbone is checked in `make test`; the fast subset keeps the smallest of each kind.
FAST_BACKBONES = ("resnet18", "resnet34")


@pytest.mark.parametrize(
    "name", [n if n in FAST_BACKBONES else pytest.param(n, marks=pytest.mark.slow) for n in registry.BACKBONES]
)
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
    with pytest.raises(MissingError, match=r"checkpoint .*gone\.pth does not exist; pass --weights with a state-dict"):
        backbone.describe("resnet18", str(tmp_path / "gone.pth"))


@pytest.mark.parametrize(
    "prefix", ["backbone.", *(pytest.param(p, marks=pytest.mark.slow) for p in ("model.", "encoder.", "module."))]
)
def test_a_prefixed_checkpoint_loads_like_the_unprefixed_one(tmp_path, prefix):
    state = _seeded_torchvision("resnet18", seed=4).state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "prefixed.pth")
    plain = backbone.describe("resnet18", str(tmp_path / "plain.pth"), image_size=32)
    prefixed = backbone.describe("resnet18", str(tmp_path / "prefixed.pth"), image_size=32)
    assert prefixed.prefix == prefix and plain.prefix == ""
    sha = hashlib.sha256((tmp_path / "prefixed.pth").read_bytes()).hexdigest()
    recorded = "" if prefix == "module." else f" (key prefix {prefix!r} stripped)"  # module.: as before, caches stay
    assert prefixed.weights_id == f"checkpoint sha256:{sha}{recorded}"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        a, b = backbone.build(plain)(x), backbone.build(prefixed)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert backbone.build(prefixed).classifier.out_features == 1000
    legacy = tmp_path / "legacy.pth"  # the pre-zip format cannot be memory-mapped: read in full instead
    torch.save({prefix + k: v for k, v in state.items()}, legacy, _use_new_zipfile_serialization=False)
    assert backbone.describe("resnet18", str(legacy)).prefix == prefix


def test_a_checkpoint_of_another_architecture_names_the_shape_mismatch(tmp_path):
    wide = tmp_path / "wide.pth"
    torch.save({"backbone." + k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}, wide)
    with pytest.raises(
        WeightsError,
        match=r"checkpoint .*wide\.pth does not fit wide_resnet50_2: 'layer1\.0\.conv1\.weight' is \(64, 64, 1, 1\) in "
        r"the checkpoint and \(128, 64, 1, 1\) in wide_resnet50_2; its shapes fit resnet50; pass --backbone resnet50",
    ):
        backbone.describe("wide_resnet50_2", str(wide))
    deeper = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(
        WeightsError,
        match=r"checkpoint .*r34\.pth does not fit resnet18: 'layer1\.2\.conv1\.weight' is \(64, 64, 3, 3\) in the "
        r"checkpoint and absent in resnet18; its shapes fit resnet34; pass --backbone resnet34",
    ):
        backbone.describe("resnet18", str(deeper))
    alien = tmp_path / "alien.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, alien)
    with pytest.raises(WeightsError, match=r"alien\.pth does not fit resnet18: 'conv1\.weight' is \(8, 3, 3, 3\) in "
                       r"the checkpoint and \(64, 3, 7, 7\) in resnet18; no backbone here fits it"):  # fmt: skip
        backbone.describe("resnet18", str(alien))


def test_keys_under_a_prefix_that_one_strip_cannot_remove(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    nested = tmp_path / "nested.pth"
    torch.save({"module.backbone." + k: v for k, v in state.items()}, nested)
    with pytest.raises(WeightsError, match=r"nested\.pth has keys with an unexpected prefix 'module\.backbone\.' "
                       r"\(e\.g\. 'module\.backbone\.conv1\.weight'\) that stripping one common prefix does not "
                       r"resolve for resnet18; save the backbone's own state dict"):  # fmt: skip
        backbone.describe("resnet18", str(nested))
    with_head = tmp_path / "with-head.pth"
    torch.save({**{"backbone." + k: v for k, v in state.items()}, "head.weight": torch.zeros(5, 512)}, with_head)
    outside = r"; keys outside it too \(e\.g\. 'head\.weight', 1 in all\); save the backbone's own state dict"
    with pytest.raises(
        WeightsError, match=r"with-head\.pth has keys with an unexpected prefix 'backbone\.' .*" + outside
    ):
        backbone.describe("resnet18", str(with_head))


def test_a_classifier_that_does_not_fit_the_features(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["fc.weight"] = torch.zeros(10, 100)
    odd = tmp_path / "odd-fc.pth"
    torch.save(state, odd)
    with pytest.raises(WeightsError, match=r"odd-fc\.pth does not fit resnet18: 'fc\.weight' takes 100 inputs in the "
                       r"checkpoint and 512 in resnet18; pass the matching --backbone"):  # fmt: skip
        backbone.build(backbone.describe("resnet18", str(odd)))


def test_unknown_names():
    with pytest.raises(ConfigError, match=r"unknown backbone 'vit_b_16'; choose one of: resnet18, resnet34"):
        backbone.describe("vit_b_16", "none")
    with pytest.raises(
        ConfigError,
        match=r"unknown weights 'IMAGENET1K_V9' for resnet50; choose one of: IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT, "
        r"none, or a path to a checkpoint",
    ):
        backbone.describe("resnet50", "IMAGENET1K_V9")
