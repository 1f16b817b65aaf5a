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

import math
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

from pipeline.errors import ConfigError, WeightsError
from pipeline.features import architectures, checkpoints
from pipeline.features.spec import BackboneSpec, FeatureExtractor, describe_transform


class PreLogits(nn.Module):
    """A timm model's pre-logits vector: the input of its classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return architectures.timm_pre_logits(self.model, x)


def _create(name: str, **kwargs: Any) -> nn.Module:
    return architectures.timm().create_model(architectures.timm_name(name), **kwargs)


def _data_config(name: str) -> dict[str, Any]:
    return architectures.timm().data.resolve_model_data_config(architectures.timm_meta_model(name))


def _transform(name: str, image_size: int | None) -> ImageClassification:
    """timm's eval recipe: resize the short side to floor(crop / crop_pct), centre-crop `crop` (the model's,
    or `image_size`), normalise."""
    data = _data_config(name)
    if data.get("crop_mode", "center") != "center":
        raise ConfigError(f"timm model {name} crops by {data['crop_mode']!r}; only centre cropping is supported")
    crop = int(image_size or data["input_size"][-1])
    return ImageClassification(
        crop_size=crop,
        resize_size=math.floor(crop / data["crop_pct"]),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=InterpolationMode(data["interpolation"]),
    )


def describe(name: str, weights: str, seed: int, image_size: int | None) -> BackboneSpec:
    model = architectures.timm_meta_model(name)
    checkpoint, prefix = None, ""
    if weights.lower() == "none":
        weights_id = f"none (random init, seed {seed})"
    elif weights == "DEFAULT":
        cfg = model.pretrained_cfg
        weights_id = f"timm {cfg.get('architecture')}.{cfg.get('tag')} ({cfg.get('hf_hub_id') or cfg.get('url')})"
    elif checkpoints.looks_like_path(weights):
        checkpoint, prefix, weights_id = checkpoints.identify(name, weights)
    else:
        raise ConfigError(f"unknown weights {weights!r} for {name}; choose DEFAULT, none, or a path to a checkpoint")
    transform = _transform(name, image_size)
    architectures.check_input_size(name, int(transform.crop_size[0]))
    return BackboneSpec(
        name, weights, weights_id, transform, describe_transform(transform), checkpoint=checkpoint,
        seed=seed, prefix=prefix, layer=architectures.TIMM_LAYER,
    )  # fmt: skip


def _pretrained(name: str) -> nn.Module:
    from huggingface_hub import constants

    cfg = architectures.timm_meta_model(name).pretrained_cfg
    where = cfg.get("hf_hub_id") or cfg.get("url")
    try:
        return _create(name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as exc:  # no network, no cached file, a refused download
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(
            f"cannot download the weights of {name} from {where} ({reason}); either download them into the "
            f"Hugging Face cache {constants.HF_HUB_CACHE} where there is internet, or pass --weights "
            "/path/to/checkpoint.pth"
        ) from None


def build(spec: BackboneSpec) -> FeatureExtractor:
    """The frozen timm model as a FeatureExtractor whose body returns the pre-logits vector (timm's hub
    download shows its own progress)."""
    parts = architectures.anatomy(spec.name)
    state: dict[str, torch.Tensor] = {}
    if spec.weights == "DEFAULT":
        model = _pretrained(spec.name)
    elif spec.checkpoint is not None:
        state = checkpoints.load(spec.checkpoint)
        prefix = checkpoints.prefix(spec.name, state, spec.checkpoint)
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        key = f"{parts.head}.weight"
        classes = state[key].shape[0] if key in state else 0  # 0: timm builds no classifier
        model = _create(spec.name, pretrained=False, num_classes=classes)
        model.load_state_dict(state, strict=False)  # keys and shapes checked; only the classifier may be absent
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = _create(spec.name, pretrained=False)
    classifier = model.get_classifier()
    linear = classifier if isinstance(classifier, nn.Linear) else None
    return FeatureExtractor(PreLogits(model), parts.dim, linear, root=model).eval().requires_grad_(False)
