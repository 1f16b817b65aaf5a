"""Every ResNet and a model of every other torchvision family with random weights (offline,
seconds), timm models, weights specs and checkpoints."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torchvision

from pipeline import registry
from pipeline.backbones import architectures, backbone, timm_models
from pipeline.errors import ConfigError, MissingError, WeightsError


def _seeded_torchvision(name: str, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None).eval()


# Every backbone is checked in `make test`; the fast subset keeps the smallest of each kind.
FAST_BACKBONES = ("resnet18", "resnet34")


@pytest.mark.parametrize(
    "name",
    [
        n if n in FAST_BACKBONES else pytest.param(n, marks=pytest.mark.slow)
        for n in registry.RESNETS
    ],
)
def test_features_are_the_pooled_input_of_fc(name):
    model = backbone.build(backbone.describe(name, "none", seed=3, image_size=32))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    reference = _seeded_torchvision(name, seed=3)
    captured = {}
    reference.fc.register_forward_hook(
        lambda module, inputs, output: captured.setdefault("x", inputs[0])
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        features = model(x)
        reference(x)
    assert (
        features.shape == (2, 512 if name in ("resnet18", "resnet34") else 2048) == (2, model.dim)
    )
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
        match=r"cannot download ResNet18_Weights\.IMAGENET1K_V1 from "
        r"https://download\.pytorch\.org/models/"
        r"resnet18-f37072fd\.pth \(.*name resolution\); either put that file at "
        r".*torch-home/hub/checkpoints/"
        r"resnet18-f37072fd\.pth or pass --weights /path/to/checkpoint\.pth",
    ):
        backbone.build(spec, progress=False)


def test_checkpoint_state_dict_is_loaded_and_hashed(tmp_path):
    state = _seeded_torchvision("resnet18", seed=9).state_dict()
    path = tmp_path / "finetuned.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}}, path
    )  # a wrapped DDP checkpoint
    spec = backbone.describe("resnet18", str(path), image_size=48)
    assert spec.weights_id == f"checkpoint sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert spec.transform.crop_size == [48]
    model = backbone.build(spec)
    torch.testing.assert_close(model.body.conv1.weight, state["conv1.weight"])


def test_checkpoint_with_another_head_or_none(tmp_path):
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save(model.state_dict(), tmp_path / "ten.pt")
    assert (
        backbone.build(
            backbone.describe("resnet18", str(tmp_path / "ten.pt"))
        ).classifier.out_features
        == 10
    )
    headless = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pt")
    assert (
        backbone.build(backbone.describe("resnet18", str(tmp_path / "headless.pt"))).classifier
        is None
    )


def test_bad_checkpoints(tmp_path):
    whole = tmp_path / "whole-model.pt"
    torch.save(
        torchvision.models.resnet18(weights=None), whole
    )  # a pickled module, not a state dict
    with pytest.raises(
        WeightsError,
        match=r"cannot load checkpoint .*whole-model\.pt \(.*\); expected a state dict",
    ):
        backbone.build(backbone.describe("resnet18", str(whole)))
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot load checkpoint .*notes\.pth"):
        backbone.build(backbone.describe("resnet18", str(text)))
    with pytest.raises(
        MissingError,
        match=r"checkpoint .*gone\.pth does not exist; pass --weights with a state-dict",
    ):
        backbone.describe("resnet18", str(tmp_path / "gone.pth"))


@pytest.mark.parametrize(
    "prefix",
    [
        "backbone.",
        *(pytest.param(p, marks=pytest.mark.slow) for p in ("model.", "encoder.", "module.")),
    ],
)
def test_a_prefixed_checkpoint_loads_like_the_unprefixed_one(tmp_path, prefix):
    state = _seeded_torchvision("resnet18", seed=4).state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "prefixed.pth")
    plain = backbone.describe("resnet18", str(tmp_path / "plain.pth"), image_size=32)
    prefixed = backbone.describe("resnet18", str(tmp_path / "prefixed.pth"), image_size=32)
    assert prefixed.prefix == prefix and plain.prefix == ""
    sha = hashlib.sha256((tmp_path / "prefixed.pth").read_bytes()).hexdigest()
    recorded = (
        "" if prefix == "module." else f" (key prefix {prefix!r} stripped)"
    )  # module.: as before, caches stay
    assert prefixed.weights_id == f"checkpoint sha256:{sha}{recorded}"
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        a, b = backbone.build(plain)(x), backbone.build(prefixed)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert backbone.build(prefixed).classifier.out_features == 1000
    legacy = (
        tmp_path / "legacy.pth"
    )  # the pre-zip format cannot be memory-mapped: read in full instead
    torch.save(
        {prefix + k: v for k, v in state.items()}, legacy, _use_new_zipfile_serialization=False
    )
    assert backbone.describe("resnet18", str(legacy)).prefix == prefix


def test_a_checkpoint_of_another_architecture_names_the_shape_mismatch(tmp_path):
    wide = tmp_path / "wide.pth"
    torch.save(
        {
            "backbone." + k: v
            for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
        },
        wide,
    )
    with pytest.raises(
        WeightsError,
        match=r"checkpoint .*wide\.pth does not fit wide_resnet50_2: 'layer1\.0\.conv1\.weight' is "
        r"\(64, 64, 1, 1\) in "
        r"the checkpoint and \(128, 64, 1, 1\) in wide_resnet50_2; its shapes fit resnet50; pass "
        r"--backbone resnet50",
    ):
        backbone.describe("wide_resnet50_2", str(wide))
    deeper = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(
        WeightsError,
        match=r"checkpoint .*r34\.pth does not fit resnet18: 'layer1\.2\.conv1\.weight' is \(64, "
        r"64, 3, 3\) in the "
        r"checkpoint and absent in resnet18; its shapes fit resnet34; pass --backbone resnet34",
    ):
        backbone.describe("resnet18", str(deeper))
    alien = tmp_path / "alien.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, alien)
    with pytest.raises(
        WeightsError,
        match=r"alien\.pth does not fit resnet18: 'conv1\.weight' is \(8, 3, 3, 3\) in "
        r"the checkpoint and \(64, 3, 7, 7\) in resnet18; no backbone here fits it",
    ):
        backbone.describe("resnet18", str(alien))


def test_keys_under_a_prefix_that_one_strip_cannot_remove(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    nested = tmp_path / "nested.pth"
    torch.save({"module.backbone." + k: v for k, v in state.items()}, nested)
    with pytest.raises(
        WeightsError,
        match=r"nested\.pth has keys with an unexpected prefix 'module\.backbone\.' "
        r"\(e\.g\. 'module\.backbone\.conv1\.weight'\) that stripping one common prefix does not "
        r"resolve for resnet18; save the backbone's own state dict",
    ):
        backbone.describe("resnet18", str(nested))
    with_head = tmp_path / "with-head.pth"
    torch.save(
        {**{"backbone." + k: v for k, v in state.items()}, "head.weight": torch.zeros(5, 512)},
        with_head,
    )
    outside = (
        r"; keys outside it too \(e\.g\. 'head\.weight', 1 in all\); "
        r"save the backbone's own state dict"
    )
    with pytest.raises(
        WeightsError,
        match=r"with-head\.pth has keys with an unexpected prefix 'backbone\.' .*" + outside,
    ):
        backbone.describe("resnet18", str(with_head))


def test_a_classifier_that_does_not_fit_the_features(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["fc.weight"] = torch.zeros(10, 100)
    odd = tmp_path / "odd-fc.pth"
    torch.save(state, odd)
    with pytest.raises(
        WeightsError,
        match=r"odd-fc\.pth does not fit resnet18: 'fc\.weight' takes 100 inputs in the "
        r"checkpoint and 512 in resnet18; pass the matching --backbone",
    ):
        backbone.build(backbone.describe("resnet18", str(odd)))


def test_unknown_names():
    with pytest.raises(
        ConfigError,
        match=r"unknown backbone 'resnet19'; did you mean resnet18.*\? `pipeline backbones` lists "
        r"the torchvision "
        r"models \(e\.g\. resnet18, resnet34, convnext_tiny, vit_b_16\), and timm:NAME takes a "
        r"timm model",
    ):
        backbone.describe("resnet19", "none")
    with pytest.raises(
        ConfigError,
        match=r"unknown weights 'IMAGENET1K_V9' for resnet50; choose one of: IMAGENET1K_V1, "
        r"IMAGENET1K_V2, DEFAULT, "
        r"none, or a path to a checkpoint",
    ):
        backbone.describe("resnet50", "IMAGENET1K_V9")


# One model of each torchvision family (the rest share their family's code): the fast tests take the
# small
# ones at 32 px, `make test` the others at the smallest size they accept.
FAMILIES = {
    "squeezenet1_1": 32,
    "mobilenet_v3_small": 32,
    "shufflenet_v2_x0_5": 32,
    "regnet_x_400mf": 32,
    "efficientnet_b0": 32,
    "mnasnet0_5": 32,
    "convnext_tiny": 32,
    "densenet121": 32,
    "swin_t": 32,
    "vit_b_16": 32,
    "googlenet": 32,
    "vgg11": 32,
    "alexnet": 64,
    "efficientnet_v2_s": 32,
    "inception_v3": 75,
    "maxvit_t": 224,
}
FAST_FAMILIES = (
    "squeezenet1_1",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
)


def _final_layer_input(reference: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a plain torchvision model feeds its last Linear (or SqueezeNet's last Conv2d,
    pooled)."""
    linear = [m for m in reference.modules() if isinstance(m, torch.nn.Linear)]
    layer = (
        linear[-1]
        if linear
        else [m for m in reference.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    )
    captured = {}
    layer.register_forward_hook(lambda module, inputs, output: captured.setdefault("x", inputs[0]))
    with torch.inference_mode():
        reference(x)
    return captured["x"] if linear else captured["x"].mean(dim=(2, 3))


@pytest.mark.parametrize(
    "name", [n if n in FAST_FAMILIES else pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES]
)
def test_every_family_gives_the_input_of_its_final_layer(name):
    size = FAMILIES[name]
    spec = backbone.describe(name, "none", seed=2, image_size=size)
    model = backbone.build(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        kwargs = {"image_size": size} if name.startswith("vit") else {}
        reference = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        features = model(x)
    assert features.shape == (2, model.dim)
    torch.testing.assert_close(features, _final_layer_input(reference, x), rtol=0, atol=1e-5)
    assert spec.layer.startswith("input of ") and (model.classifier is None) == (
        name == "squeezenet1_1"
    )


def test_every_torchvision_classification_model_has_a_final_layer_of_its_classes():
    """The one rule holds for every model torchvision lists: its last Linear (or Conv2d) maps to the
    1,000 ImageNet classes, so what feeds it is the penultimate vector."""
    for name in architectures.available():
        parts = architectures.anatomy(name)
        assert parts.kind in ("Linear", "Conv2d") and parts.dim > 0, name
        assert not any(k.startswith(parts.head + ".") for k in parts.shapes), name


def test_a_size_the_model_cannot_take_is_refused_before_anything_runs():
    with pytest.raises(
        ConfigError,
        match=r"backbone maxvit_t cannot take 32-pixel crops \(.*\); pass another "
        r"--image-size \(or leave it out for the weights' own size\)",
    ):
        backbone.describe("maxvit_t", "none", image_size=32)
    with pytest.raises(
        ConfigError, match=r"backbone vit_b_16 cannot take 64-pixel crops \(Wrong image height"
    ):
        backbone.describe("vit_b_16", "DEFAULT", image_size=64)  # its weights are made for 224
    assert (
        backbone.describe("vit_b_16", "none", image_size=64).crop_size == 64
    )  # random weights take any size


def test_a_vit_checkpoint_loads_and_reports_a_shape_mismatch_by_key(tmp_path):
    state = _seeded_torchvision("vit_b_32", seed=1).state_dict()
    torch.save({"model." + k: v for k, v in state.items()}, tmp_path / "vit.pth")
    model = backbone.build(backbone.describe("vit_b_32", str(tmp_path / "vit.pth")))
    torch.testing.assert_close(model.classifier.weight, state["heads.head.weight"])
    with pytest.raises(
        WeightsError,
        match=r"vit\.pth does not fit vit_b_16: 'conv_proj\.weight' is \(768, 3, 32, 32\) "
        r"in the checkpoint and \(768, 3, 16, 16\) in vit_b_16; its shapes fit vit_b_32",
    ):
        backbone.describe("vit_b_16", str(tmp_path / "vit.pth"))


def _timm_or_skip():
    return pytest.importorskip("timm")


def test_timm_features_are_its_pre_logits(tmp_path):
    timm = _timm_or_skip()
    spec = backbone.describe("timm:resnet18", "none", seed=4, image_size=32)
    model = backbone.build(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        reference = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.classifier(model(x)), reference(x), rtol=0, atol=1e-5)
    assert model.dim == 512 and spec.layer.startswith("timm forward_head")
    torch.save(
        {"backbone." + k: v for k, v in reference.state_dict().items()}, tmp_path / "timm.pth"
    )
    loaded = backbone.build(
        backbone.describe("timm:resnet18", str(tmp_path / "timm.pth"), image_size=32)
    )
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-5)


def test_timm_preprocessing_is_timms_eval_transform():
    timm = _timm_or_skip()
    from PIL import Image

    spec = backbone.describe("timm:resnet18", "none")
    config = timm.data.resolve_model_data_config(timm.create_model("resnet18", pretrained=False))
    reference = timm.data.create_transform(**config, is_training=False)
    image = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy())
    torch.testing.assert_close(spec.transform(image), reference(image), rtol=0, atol=1e-5)


def test_timm_errors_name_the_fix(monkeypatch):
    _timm_or_skip()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        WeightsError,
        match=r"cannot download the weights of timm:resnet18 from timm/resnet18\.a1_in1k "
        r"\(.*\); either download them into the Hugging Face cache .* or pass --weights",
    ):
        backbone.build(backbone.describe("timm:resnet18", "DEFAULT"))
    with pytest.raises(
        ConfigError, match=r"unknown timm model 'resnt18'; did you mean timm:resnet18"
    ):
        backbone.describe("timm:resnt18", "none")
    with pytest.raises(
        ConfigError,
        match=r"unknown weights 'in1k' for timm:resnet18; choose DEFAULT, none, or a path",
    ):
        backbone.describe("timm:resnet18", "in1k")


def test_without_timm_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    timm_models.meta_model.cache_clear()
    timm_models.anatomy.cache_clear()
    with pytest.raises(
        ConfigError,
        match=r"--backbone timm:NAME needs the timm package; install it with pip install ",
    ):
        backbone.describe("timm:resnet34", "none")
