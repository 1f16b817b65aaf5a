"""A frozen torchvision ResNet that maps an image to the pooled vector feeding its `fc` layer.

`describe` resolves a (backbone, weights) request without building anything, which is all the
cache fingerprint needs, so a current cache is recognised in a second or two. `build` then makes
the model. Preprocessing always comes from a torchvision weights object (`weights.transforms()`),
never from copied constants; random or checkpoint weights use the standard ImageNet evaluation
preprocessing of the model's IMAGENET1K_V1 weights at the requested size.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from pipeline.errors import ConfigError, MissingError, WeightsError

BACKBONES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
LAYER = "avgpool (flattened input of fc)"


@dataclass(frozen=True)
class BackboneSpec:
    """A resolved (backbone, weights, preprocessing) request; cheap to make, nothing built yet."""

    name: str
    weights: str  # as asked for
    weights_id: str  # what the fingerprint records: enum + file, checkpoint sha256, or seed
    transform: Callable[[Any], torch.Tensor]  # PIL image or uint8 tensor -> (3, H, W) float
    preprocessing: str
    enum: Any = None  # torchvision WeightsEnum member, for named weights
    checkpoint: Path | None = None
    seed: int = 0

    @property
    def pretrained(self) -> bool:
        return self.enum is not None or self.checkpoint is not None

    @property
    def crop_size(self) -> int:
        return int(self.transform.crop_size[0])


def _weights_enum(name: str) -> Any:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return torchvision.models.get_model_weights(name)


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.lower().endswith(CHECKPOINT_SUFFIXES) or Path(weights).is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe(name: str, weights: str = "DEFAULT", seed: int = 0, image_size: int | None = None) -> BackboneSpec:
    """Validate the names and work out identity and preprocessing, without building the model."""
    enum_cls = _weights_enum(name)
    enum = checkpoint = None
    if weights.lower() == "none":
        weights_id = f"none (random init, seed {seed})"
    elif weights in enum_cls.__members__:  # DEFAULT, IMAGENET1K_V1, ...
        enum = enum_cls[weights]
        weights_id = f"{enum} ({os.path.basename(urlparse(enum.url).path)})"
    elif _looks_like_path(weights):
        checkpoint = Path(weights).expanduser()
        if not checkpoint.is_file():
            raise MissingError(f"checkpoint {checkpoint} does not exist; pass --weights with a state-dict file")
        weights_id = f"checkpoint sha256:{sha256_file(checkpoint)}"
    else:
        names = ", ".join(enum_cls.__members__)
        raise ConfigError(
            f"unknown weights {weights!r} for {name}; choose one of: {names}, none, or a path to a checkpoint"
        )
    preset = enum or enum_cls.IMAGENET1K_V1  # random/checkpoint: the standard ImageNet eval preprocessing
    transform = preset.transforms()
    if image_size is not None:  # keep the weights' resize/crop ratio (256/224 or 232/224)
        resize = round(image_size * transform.resize_size[0] / transform.crop_size[0])
        transform = preset.transforms(crop_size=image_size, resize_size=resize)
    text = re.sub(r"\(\s+|\s+\)", lambda m: m.group().strip(), " ".join(repr(transform).split()))
    return BackboneSpec(name, weights, weights_id, transform, text, enum=enum, checkpoint=checkpoint, seed=seed)


class FeatureExtractor(nn.Module):
    """ResNet up to global average pooling; the original `fc` kept aside for optional logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.dim = model.fc.in_features
        self.classifier = model.fc
        model.fc = nn.Identity()
        self.body = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        return self.body(x)


def _download(enum: Any, progress: bool) -> dict[str, torch.Tensor]:
    filename = os.path.basename(urlparse(enum.url).path)
    local = Path(torch.hub.get_dir()) / "checkpoints" / filename
    try:
        return torch.hub.load_state_dict_from_url(enum.url, progress=progress, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as exc:  # URLError, timeouts and SSL errors are OSErrors
        reason = str(getattr(exc, "reason", exc)).splitlines()[0]
        raise WeightsError(
            f"cannot download {enum} from {enum.url} ({reason}); either put that file at {local} "
            "or pass --weights /path/to/checkpoint.pth"
        ) from None


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    hint = "expected a state dict saved with torch.save(model.state_dict(), path)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot load checkpoint {path} ({reason[:200]}); {hint}") from None
    for key in ("state_dict", "model"):  # common wrappers from training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} holds {type(state).__name__}, not a state dict; {hint}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def build(spec: BackboneSpec, progress: bool = True) -> FeatureExtractor:
    """The frozen model in eval mode: no grads, ready for `inference_mode`."""
    builder = torchvision.models.get_model_builder(spec.name)
    if spec.enum is not None:
        model = builder(weights=None, num_classes=len(spec.enum.meta["categories"]))
        model.load_state_dict(_download(spec.enum, progress))
    elif spec.checkpoint is not None:
        state = _load_checkpoint(spec.checkpoint)
        classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
        model = builder(weights=None, num_classes=classes)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
            raise WeightsError(
                f"checkpoint {spec.checkpoint} does not fit {spec.name} ({detail}); pass the matching --backbone"
            ) from None
        body_missing = [k for k in missing if not k.startswith("fc.")]
        if body_missing or unexpected:
            keys = (body_missing or unexpected)[:3]
            kind = "lacks" if body_missing else "has unexpected"
            raise WeightsError(
                f"checkpoint {spec.checkpoint} {kind} keys {keys} for {spec.name}; pass the matching --backbone"
            )
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(spec.seed)
            model = builder(weights=None)
    extractor = FeatureExtractor(model).eval()
    if spec.checkpoint is not None and "fc.weight" not in state:
        extractor.classifier = None  # a headless checkpoint: features only, no logits
    extractor.requires_grad_(False)
    return extractor
