"""A frozen torchvision ResNet that maps an image to the pooled vector feeding its `fc` layer.

`describe` resolves a (backbone, weights) request without building anything, which is all the
cache fingerprint needs, so a current cache is recognised in a second or two. `build` then makes
the model. Preprocessing always comes from a torchvision weights object (`weights.transforms()`),
never from copied constants; random or checkpoint weights use the standard ImageNet evaluation
preprocessing of the model's IMAGENET1K_V1 weights at the requested size.
"""

from __future__ import annotations

import functools
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
from pipeline.registry import BACKBONES

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
    prefix: str = ""  # stripped from every key of the checkpoint (e.g. 'backbone.')

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
    prefix = ""
    if weights.lower() == "none":
        weights_id = f"none (random init, seed {seed})"
    elif weights in enum_cls.__members__:  # DEFAULT, IMAGENET1K_V1, ...
        enum = enum_cls[weights]
        weights_id = f"{enum} ({os.path.basename(urlparse(enum.url).path)})"
    elif _looks_like_path(weights):
        checkpoint = Path(weights).expanduser()
        if not checkpoint.is_file():
            raise MissingError(f"checkpoint {checkpoint} does not exist; pass --weights with a state-dict file")
        prefix = _checkpoint_prefix(name, _load_checkpoint(checkpoint, mmap=True), checkpoint)
        weights_id = f"checkpoint sha256:{sha256_file(checkpoint)}"
        if prefix not in ("", "module."):  # DDP's module. was stripped before this was recorded: caches stay current
            weights_id += f" (key prefix {prefix!r} stripped)"
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
    return BackboneSpec(
        name, weights, weights_id, transform, text, enum=enum, checkpoint=checkpoint, seed=seed, prefix=prefix
    )


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


def _load_checkpoint(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file, unwrapped from {"state_dict": ...} or {"model": ...}.

    `mmap` maps the tensors instead of reading them (zip-format files): keys and shapes at the cost
    of the file's index, which is all `describe` needs.
    """
    hint = "expected a state dict saved with torch.save(model.state_dict(), path)"
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format cannot be mapped
    except Exception as exc:  # unpickling errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot load checkpoint {path} ({reason[:200]}); {hint}") from None
    for key in ("state_dict", "model"):  # common wrappers from training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"checkpoint {path} holds {type(state).__name__}, not a state dict; {hint}")
    return state


@functools.cache
def _shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the backbone's state dict, without the classifier (`fc` may have any size or be
    absent). Built on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        model = torchvision.models.get_model_builder(name)(weights=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _body(state: dict[str, torch.Tensor], prefix: str) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape with `prefix` stripped and `fc` left out; None when some key lacks the prefix."""
    if not all(k.startswith(prefix) for k in state):
        return None
    keys = {k[len(prefix) :]: tuple(v.shape) for k, v in state.items()}
    return {k: v for k, v in keys.items() if not k.startswith("fc.")}


def _candidate_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """'' and, when every key starts with the same 'name.', that one prefix (backbone., model., module., ...)."""
    firsts = {k.split(".", 1)[0] + "." for k in state if "." in k}
    return [""] + (list(firsts) if len(firsts) == 1 and all("." in k for k in state) else [])


def _fitting_prefix(name: str, state: dict[str, torch.Tensor]) -> str | None:
    """The prefix (possibly '') whose stripping gives exactly this backbone's keys and shapes, if any."""
    for prefix in _candidate_prefixes(state):
        if _body(state, prefix) == _shapes(name):
            return prefix
    return None


def _checkpoint_prefix(name: str, state: dict[str, torch.Tensor], path: Path) -> str:
    """The common key prefix to strip so `state` fits backbone `name` exactly; otherwise a WeightsError that
    says whether the keys carry an unexpected prefix or the shapes belong to another architecture."""
    prefix = _fitting_prefix(name, state)
    if prefix is not None:
        return prefix
    expected = _shapes(name)
    candidates = _candidate_prefixes(state)
    stray = _stray_prefix(state, expected)
    if stray is not None and stray not in candidates:  # the keys are there, under a prefix one strip cannot remove
        example = next(k for k in state if k.startswith(stray))
        outside = [k for k in state if not k.startswith(stray)]
        also = f"; keys outside it too (e.g. {outside[0]!r}, {len(outside)} in all)" if outside else ""
        raise WeightsError(
            f"checkpoint {path} has keys with an unexpected prefix {stray!r} (e.g. {example!r}) that stripping one "
            f"common prefix does not resolve for {name}{also}; save the backbone's own state dict "
            "(torch.save(backbone.state_dict(), path))"
        )
    bodies = [b for b in (_body(state, p) for p in candidates) if b is not None]
    body = max(bodies, key=lambda b: len(b.keys() & expected.keys()))  # the reading closest to this backbone
    fits = [other for other in BACKBONES if other != name and _fitting_prefix(other, state) is not None]
    advice = f"its shapes fit {', '.join(fits)}; pass --backbone {fits[0]}" if fits else (
        "no backbone here fits it; pass --backbone with the architecture it was trained as"
    )  # fmt: skip
    raise WeightsError(f"checkpoint {path} does not fit {name}: {_first_mismatch(body, expected, name)}; {advice}")


def _stray_prefix(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """A prefix P under which most of the backbone's keys appear (P + key) but that no single strip removes:
    two nested prefixes (module.backbone.), or backbone keys next to other keys (backbone.* + head.*)."""
    anchor = next(iter(expected))  # conv1.weight
    for key in state:
        if key != anchor and key.endswith("." + anchor):
            prefix = key[: -len(anchor)]
            if sum(prefix + k in state for k in expected) >= len(expected) / 2:
                return prefix
    return None


def _first_mismatch(body: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], name: str) -> str:
    """The first key (in the model's order, then the checkpoint's) whose shape differs, with both shapes."""
    fmt = lambda shape: "absent" if shape is None else str(tuple(shape))  # noqa: E731
    for key in [*expected, *body]:
        if body.get(key) != expected.get(key):
            return f"{key!r} is {fmt(body.get(key))} in the checkpoint and {fmt(expected.get(key))} in {name}"
    return "the keys differ"


def build(spec: BackboneSpec, progress: bool = True) -> FeatureExtractor:
    """The frozen model in eval mode: no grads, ready for `inference_mode`."""
    builder = torchvision.models.get_model_builder(spec.name)
    if spec.enum is not None:
        model = builder(weights=None, num_classes=len(spec.enum.meta["categories"]))
        model.load_state_dict(_download(spec.enum, progress))
    elif spec.checkpoint is not None:
        state = _load_checkpoint(spec.checkpoint)
        prefix = _checkpoint_prefix(spec.name, state, spec.checkpoint)  # as in describe, unless the file changed
        state = {k.removeprefix(prefix): v for k, v in state.items()}
        classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
        model = builder(weights=None, num_classes=classes)
        fc_in = state["fc.weight"].shape[1] if "fc.weight" in state else model.fc.in_features
        if fc_in != model.fc.in_features:
            raise WeightsError(
                f"checkpoint {spec.checkpoint} does not fit {spec.name}: 'fc.weight' takes {fc_in} inputs in the "
                f"checkpoint and {model.fc.in_features} in {spec.name}; pass the matching --backbone"
            )
        model.load_state_dict(state, strict=False)  # keys and shapes checked above; only fc may be absent
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(spec.seed)
            model = builder(weights=None)
    extractor = FeatureExtractor(model).eval()
    if spec.checkpoint is not None and "fc.weight" not in state:
        extractor.classifier = None  # a headless checkpoint: features only, no logits
    extractor.requires_grad_(False)
    return extractor
