"""Local checkpoint files for a backbone: loaded without running pickled code, unwrapped, and
matched key by key and shape by shape against the architecture, with a common key prefix (`module.`,
`backbone.`, `model.`, ...) stripped where that makes them fit exactly. A file that does not fit is
refused with the first key that differs and, where one exists, the architecture it does fit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.backbones import architectures
from pipeline.backbones.architectures import Anatomy
from pipeline.errors import MissingError, WeightsError
from pipeline.registry import RESNETS

SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def looks_like_path(weights: str) -> bool:
    return os.sep in weights or weights.lower().endswith(SUFFIXES) or Path(weights).is_file()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
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
            state = torch.load(
                path, map_location="cpu", weights_only=True
            )  # the legacy format cannot be mapped
    except Exception as exc:  # unpickling errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot load checkpoint {path} ({reason[:200]}); {hint}") from None
    for key in ("state_dict", "model"):  # common wrappers from training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(
            f"checkpoint {path} holds {type(state).__name__}, not a state dict; {hint}"
        )
    return state


Anatomies = Callable[[str], Anatomy]  # a backbone's structure by name: torchvision's, or timm's


def identify(
    name: str, weights: str, anatomy: Anatomies = architectures.anatomy
) -> tuple[Path, str, str]:
    """(file, key prefix to strip, what the fingerprint records) of the checkpoint `weights` for
    backbone `name` (whose structure `anatomy` gives), checked key by key and shape by shape without
    reading the tensors."""
    checkpoint = Path(weights).expanduser()
    if not checkpoint.is_file():
        raise MissingError(
            f"checkpoint {checkpoint} does not exist; pass --weights with a state-dict file"
        )
    stripped = prefix(name, load(checkpoint, mmap=True), checkpoint, anatomy)
    weights_id = f"checkpoint sha256:{sha256_file(checkpoint)}"
    if stripped not in (
        "",
        "module.",
    ):  # DDP's module. was stripped before this was recorded: caches stay current
        weights_id += f" (key prefix {stripped!r} stripped)"
    return checkpoint, stripped, weights_id


def _body(
    state: dict[str, torch.Tensor], prefix: str, parts: Anatomy
) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape with `prefix` stripped and the classifier left out; None when some key lacks the
    prefix."""
    if not all(k.startswith(prefix) for k in state):
        return None
    return parts.body_keys({k[len(prefix) :]: tuple(v.shape) for k, v in state.items()})


def _candidate_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """'' and, when every key starts with the same 'name.', that one prefix (backbone., model.,
    module., ...)."""
    firsts = {k.split(".", 1)[0] + "." for k in state if "." in k}
    return [""] + (list(firsts) if len(firsts) == 1 and all("." in k for k in state) else [])


def _fitting_prefix(parts: Anatomy, state: dict[str, torch.Tensor]) -> str | None:
    """The prefix (possibly '') whose stripping gives exactly this backbone's keys and shapes (those
    of its state dict without the classifier, which may have any size or be absent), if any."""
    for prefix in _candidate_prefixes(state):
        if _body(state, prefix, parts) == parts.shapes:
            return prefix
    return None


def prefix(
    name: str,
    state: dict[str, torch.Tensor],
    path: Path,
    anatomy: Anatomies = architectures.anatomy,
) -> str:
    """The common key prefix to strip so `state` fits backbone `name` exactly; otherwise a
    WeightsError that says whether the keys carry an unexpected prefix or the shapes belong to
    another architecture."""
    parts = anatomy(name)
    prefix = _fitting_prefix(parts, state)
    if prefix is not None:
        return prefix
    expected = parts.shapes
    candidates = _candidate_prefixes(state)
    stray = _stray_prefix(state, expected)
    if (
        stray is not None and stray not in candidates
    ):  # the keys are there, under a prefix one strip cannot remove
        example = next(k for k in state if k.startswith(stray))
        outside = [k for k in state if not k.startswith(stray)]
        also = (
            f"; keys outside it too (e.g. {outside[0]!r}, {len(outside)} in all)" if outside else ""
        )
        raise WeightsError(
            f"checkpoint {path} has keys with an unexpected prefix {stray!r} (e.g. {example!r}) "
            "that stripping one "
            f"common prefix does not resolve for {name}{also}; save the backbone's own state dict "
            "(torch.save(backbone.state_dict(), path))"
        )
    bodies = [b for b in (_body(state, p, parts) for p in candidates) if b is not None]
    body = max(
        bodies, key=lambda b: len(b.keys() & expected.keys())
    )  # the reading closest to this backbone
    fits = [
        other for other in _relatives(name) if _fitting_prefix(anatomy(other), state) is not None
    ]
    advice = (
        f"its shapes fit {', '.join(fits)}; pass --backbone {fits[0]}"
        if fits
        else ("no backbone here fits it; pass --backbone with the architecture it was trained as")
    )
    raise WeightsError(
        f"checkpoint {path} does not fit {name}: {_first_mismatch(body, expected, name)}; {advice}"
    )


def _stray_prefix(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> str | None:
    """A prefix P under which most of the backbone's keys appear (P + key) but that no single strip
    removes: two nested prefixes (module.backbone.), or backbone keys next to other keys (backbone.*
    + head.*)."""
    anchor = next(iter(expected))  # conv1.weight
    for key in state:
        if key != anchor and key.endswith("." + anchor):
            prefix = key[: -len(anchor)]
            if sum(prefix + k in state for k in expected) >= len(expected) / 2:
                return prefix
    return None


def _first_mismatch(
    body: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], name: str
) -> str:
    """The first key (in the model's order, then the checkpoint's) whose shape differs, with both
    shapes."""
    fmt = lambda shape: "absent" if shape is None else str(tuple(shape))  # noqa: E731
    for key in [*expected, *body]:
        if body.get(key) != expected.get(key):
            ours, theirs = fmt(body.get(key)), fmt(expected.get(key))
            return f"{key!r} is {ours} in the checkpoint and {theirs} in {name}"
    return "the keys differ"


def _relatives(name: str) -> list[str]:
    """The other models of `name`'s family, by name: the ResNets together, else the same stem
    (vit_*, convnext_*)."""
    if name in RESNETS:
        return [other for other in RESNETS if other != name]
    stem = name.split("_")[0]
    return [
        other
        for other in architectures.available()
        if other != name and other.split("_")[0] == stem
    ]
