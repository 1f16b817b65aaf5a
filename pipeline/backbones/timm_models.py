"""timm backbones: `--backbone timm:NAME`, with the optional extra (`pip install 'pipeline[timm]'`).

The feature is timm's own pre-logits vector, `forward_head(forward_features(x), pre_logits=True)`:
the input of the model's classifier. Weights: DEFAULT (the model's pretrained tag, from the
Hugging Face hub or its cache), `none` (seeded random init) or a local state-dict checkpoint,
matched key by key like a torchvision one. Preprocessing is timm's evaluation recipe
(`resolve_model_data_config`: resize the short side to crop / crop_pct, centre crop, normalise),
expressed as the same torchvision `ImageClassification` transform the torchvision backbones use,
so decoding, `predict` and `export` treat both alike.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import math
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from pipeline.backbones import architectures, checkpoints
from pipeline.backbones.spec import BackboneSpec, FeatureExtractor, describe_transform
from pipeline.errors import ConfigError, WeightsError
from pipeline.registry import TIMM_PREFIX

TIMM_LAYER = "timm forward_head(forward_features(x), pre_logits=True)"


def timm() -> Any:
    """The timm module, or a ConfigError that says how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "--backbone timm:NAME needs the timm package; install it with pip install "
            "'pipeline[timm]' "
            "(or pip install timm), or pick a torchvision backbone"
        ) from None
    return timm


def installed_version() -> str | None:
    """The installed timm's version, read without importing it; None without the extra."""
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        return None


def pretrained_names() -> list[str]:
    """Every timm model name that has pretrained weights."""
    return list(timm().list_models(pretrained=True))


def short_name(name: str) -> str:
    """'timm:resnet18' -> 'resnet18', refusing names timm does not know."""
    short = name.removeprefix(TIMM_PREFIX)
    if not timm().is_model(short):
        close = difflib.get_close_matches(short, timm().list_models(), n=3)
        hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}? " if close else ""
        raise ConfigError(f"unknown timm model {short!r}; {hint}timm.list_models() lists them")
    return short


@functools.cache
def meta_model(name: str) -> nn.Module:
    """timm model `name` with its parameters on the meta device: structure and pretrained_cfg, no
    memory."""
    with architectures.on_meta():
        return timm().create_model(short_name(name), pretrained=False).eval()


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@functools.cache
def anatomy(name: str) -> architectures.Anatomy:
    """The structure of timm model `name`, from a build on the meta device."""
    model = meta_model(name)
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    size = timm().data.resolve_model_data_config(model)["input_size"][-1]
    with torch.no_grad():
        dim = pre_logits(model, torch.empty(1, 3, size, size, device="meta")).shape[-1]
    body = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not any(k.startswith(h + ".") for h in heads)
    }
    kind = type(model.get_classifier()).__name__
    return architectures.Anatomy(type(model).__name__, heads, kind, int(dim), body, TIMM_LAYER)


class PreLogits(nn.Module):
    """A timm model's pre-logits vector: the input of its classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pre_logits(self.model, x)


def _create(name: str, **kwargs: Any) -> nn.Module:
    return timm().create_model(short_name(name), **kwargs)


def _data_config(name: str) -> dict[str, Any]:
    return timm().data.resolve_model_data_config(meta_model(name))


def _transform(name: str, image_size: int | None) -> ImageClassification:
    """timm's eval recipe: resize the short side to floor(crop / crop_pct), centre-crop `crop` (the
    model's, or `image_size`), normalise."""
    data = _data_config(name)
    if data.get("crop_mode", "center") != "center":
        raise ConfigError(
            f"timm model {name} crops by {data['crop_mode']!r}; only centre cropping is supported"
        )
    crop = int(image_size or data["input_size"][-1])
    return ImageClassification(
        crop_size=crop,
        resize_size=math.floor(crop / data["crop_pct"]),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=InterpolationMode(data["interpolation"]),
    )


def describe(name: str, weights: str, seed: int, image_size: int | None) -> BackboneSpec:
    model = meta_model(name)
    checkpoint, prefix = None, ""
    if weights.lower() == "none":
        weights_id = f"none (random init, seed {seed})"
    elif weights == "DEFAULT":
        cfg = model.pretrained_cfg
        where = cfg.get("hf_hub_id") or cfg.get("url")
        weights_id = f"timm {cfg.get('architecture')}.{cfg.get('tag')} ({where})"
    elif checkpoints.looks_like_path(weights):
        checkpoint, prefix, weights_id = checkpoints.identify(name, weights, anatomy)
    else:
        raise ConfigError(
            f"unknown weights {weights!r} for {name}; choose DEFAULT, none, or a path to a "
            "checkpoint"
        )
    transform = _transform(name, image_size)
    architectures.try_input_size(lambda: meta_model(name), name, int(transform.crop_size[0]))
    return BackboneSpec(
        name,
        weights,
        weights_id,
        transform,
        describe_transform(transform),
        checkpoint=checkpoint,
        seed=seed,
        prefix=prefix,
        layer=TIMM_LAYER,
    )


def _pretrained(name: str) -> nn.Module:
    from huggingface_hub import constants

    cfg = meta_model(name).pretrained_cfg
    where = cfg.get("hf_hub_id") or cfg.get("url")
    try:
        return _create(name, pretrained=True)
    except (
        OSError,
        RuntimeError,
        ValueError,
    ) as exc:  # no network, no cached file, a refused download
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(
            f"cannot download the weights of {name} from {where} ({reason}); either download them "
            "into the "
            f"Hugging Face cache {constants.HF_HUB_CACHE} where there is internet, or pass "
            "--weights "
            "/path/to/checkpoint.pth"
        ) from None


def build(spec: BackboneSpec) -> FeatureExtractor:
    """The frozen timm model as a FeatureExtractor whose body returns the pre-logits vector (timm's
    hub download shows its own progress)."""
    parts = anatomy(spec.name)
    state: dict[str, torch.Tensor] = {}
    if spec.weights == "DEFAULT":
        model = _pretrained(spec.name)
    elif spec.checkpoint is not None:
        state = checkpoints.load(spec.checkpoint)
        prefix = checkpoints.prefix(spec.name, state, spec.checkpoint, anatomy)
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        key = f"{parts.head}.weight"
        classes = state[key].shape[0] if key in state else 0  # 0: timm builds no classifier
        model = _create(spec.name, pretrained=False, num_classes=classes)
        model.load_state_dict(
            state, strict=False
        )  # keys and shapes checked; only the classifier may be absent
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = _create(spec.name, pretrained=False)
    classifier = model.get_classifier()
    linear = classifier if isinstance(classifier, nn.Linear) else None
    return (
        FeatureExtractor(PreLogits(model), parts.dim, linear, root=model)
        .eval()
        .requires_grad_(False)
    )
