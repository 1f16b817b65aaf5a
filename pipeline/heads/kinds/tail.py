"""`--head tail`: fine-tune the rest of the backbone after a cut, plus a linear head, on the cut's
activations cached by `features --cut MODULE`: the trunk before the cut never runs again.

The tail is the backbone's own graph from the cut to its penultimate output (`pipeline.backbones.
split`), initialised from the same weights the cache was made with, so before any step its output
equals the cached features' source to rounding. Candidates are `--lr-grid` learning rates x
`--weight-decay` values (AdamW), numbered strongest regularisation first (the smallest step, the
largest decay); each trains with a cosine schedule over `--epochs`, early stopped on the validation
log-loss (patience `PATIENCE`), with batch norm statistics frozen (the pretrained ones) and bf16
autocast on CUDA devices that compute it (see `_precision` for the CPU). The chosen candidate is
refitted on train+val for its epoch count; test is read once, last. Rows stream from the file in
blocks of at most `BLOCK_BYTES`, shuffled block by block, so memory does not grow with the cache.

Saved without pickle: the tuned tail's state (`tail.<name>` arrays) and the linear head
(`head.weight`, `head.bias`, the post-hoc adjustment folded in) in head.npz; the cut and the
backbone come from head.json, and the tail's graph is traced anew from the backbone's own code,
never read from the file. `predict` and `export` run the frozen trunk, the tuned tail and the head.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import CacheError, ConfigError, DataError
from pipeline.heads import choice
from pipeline.heads.estimators import Preprocessor, log_proba_from_decision
from pipeline.heads.kinds.mlp import DEFAULT_WEIGHT_DECAY, PATIENCE, check_weight_decays
from pipeline.heads.kinds.registry import HeadKind, register
from pipeline.heads.posthoc import Adjustment
from pipeline.heads.runs import ChoiceRows, Predictions
from pipeline.registry import CUT_PREFIX

if TYPE_CHECKING:
    import torch

    from pipeline.cache.reader import CacheInfo
    from pipeline.config import HeadConfig
    from pipeline.heads.trained import TrainedHead

DEFAULT_LRS = (1e-4, 1e-3)
MAX_BATCH = 64  # rows per step at most: a tail's activations are large
BLOCK_BYTES = 64 * 2**20  # float32 activations read from the file at once


@dataclass(frozen=True)
class Candidate:
    number: int  # 1-based, strongest regularisation first
    lr: float
    weight_decay: float

    def columns(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay}


def candidates(cfg: HeadConfig) -> list[Candidate]:
    """--lr-grid x --weight-decay, the smallest step and the largest decay first."""
    points = itertools.product(
        sorted(set(cfg.lr_grid or DEFAULT_LRS)),
        sorted(set(cfg.weight_decay or DEFAULT_WEIGHT_DECAY), reverse=True),
    )
    return [Candidate(n, lr, wd) for n, (lr, wd) in enumerate(points, start=1)]


# ---------------------------------------------------------------------------------- the model


def cut_of(meta_or_layer: str | None, path: Path | str) -> str:
    """The module a cut layer name (`cut:MODULE`) names; a one-line error for anything else."""
    if not meta_or_layer or not meta_or_layer.startswith(CUT_PREFIX):
        raise ConfigError(
            f"--head tail trains on a cut stored by `pipeline features --cut MODULE`; cache {path} "
            f"has none (its layer {meta_or_layer!r}); rebuild it with --cut (`pipeline backbones "
            "NAME --cuts` lists where)"
        )
    return meta_or_layer.removeprefix(CUT_PREFIX)


def traced_tail(backbone_name: str, cut: str, size: int | None) -> Any:
    """The tail of `backbone_name` cut at `cut`, traced from the backbone's own code on the meta
    device (no weights): its graph, its state's names and shapes. `size`: the crop size the cache
    was made at (a ViT is built for it)."""
    from pipeline.backbones import layers

    arguments = layers._sized(backbone_name, size) if size else {}
    return layers.split_probe(backbone_name, cut, **arguments).tail


def pretrained_tail(fingerprint: dict[str, Any], config: dict[str, Any], cut: str) -> Any:
    """The tail with the very weights the cache was made with (checked against its fingerprint)."""
    from pipeline.backbones import backbone, split

    spec = backbone.rebuilt(fingerprint, config, None, "the cache")
    model = backbone.build(spec, progress=False)
    return split.of_extractor(model.body, model.root, cut, spec.name).tail


def _net(tail: Any, dim: int, n_classes: int) -> Any:
    """tail (cut -> features) then nn.Linear(dim, n_classes), in channels-last memory layout."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tail = tail
            self.head = nn.Linear(dim, n_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.tail(x))

    net = Net()
    return net.to(memory_format=torch.channels_last)  # oneDNN's layout: 5-20% faster steps here


# ---------------------------------------------------------------------------------- the rows


@dataclass
class CutRows:
    """Rows of one cut layer of a cache: sorted file rows, their encoded classes and weights."""

    dataset: Any  # h5py dataset (N, prod(shape)) float16
    rows: np.ndarray
    y: np.ndarray
    shape: tuple[int, ...]
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def block_size(self) -> int:
        return max(1, BLOCK_BYTES // (4 * math.prod(self.shape)))

    def starts(self) -> np.ndarray:
        return np.arange(0, len(self.rows), self.block_size())

    def block(self, a: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, Any]:
        """(positions into `rows`, float32 tensor (b, *shape)) of the block starting at `a`, one
        contiguous read of the file; with `rng`, its rows shuffled."""
        import torch

        positions = np.arange(a, min(a + self.block_size(), len(self.rows)))
        rows = self.rows[positions]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        X = np.asarray(self.dataset[lo:hi], dtype=np.float32)[rows - lo]
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            raise DataError(
                f"cache {self.dataset.file.filename} has NaN or infinite values in {bad.sum()} "
                f"rows of its cut (file row {int(rows[bad][0])}); rebuild it with `pipeline "
                "features --force`"
            )
        if rng is not None:
            order = rng.permutation(len(positions))
            positions, X = positions[order], X[order]
        X = torch.from_numpy(X).reshape(len(X), *self.shape)
        if X.ndim == 4:
            X = X.contiguous(memory_format=torch.channels_last)
        return positions, X

    def blocks(self) -> Any:
        """Every block in order: (positions, rows)."""
        for a in self.starts():
            yield self.block(int(a))


# ---------------------------------------------------------------------------------- training


@dataclass
class TailFit:
    value: int
    candidate: Candidate
    state: dict[str, np.ndarray]  # "tail.<name>" and "head.weight" / "head.bias"
    n_iter: int
    epochs_run: int = 0
    val_log_loss: list[float] = field(default_factory=list)
    about: dict[str, Any] = field(default_factory=dict)  # the cut it was trained on (TailSource)
    param = "candidate"
    converged = True

    @property
    def status(self) -> str:
        floats = [a for a in self.state.values() if a.dtype.kind == "f"]
        return "converged" if all(np.isfinite(a).all() for a in floats) else "diverged"

    @property
    def columns(self) -> dict[str, Any]:
        return self.candidate.columns() | {"epochs": self.n_iter}


def _precision(device: Any) -> str:
    """bf16 autocast on a CUDA device that computes it; fp32 elsewhere. On this project's bf16 CPU
    a bf16 training step of a resnet50 layer4 tail took as long as fp32's or longer (2.5-2.7 s vs
    2.1-2.5 s at batch 16; docs/guide/finetuning.md), so the CPU trains in fp32; fp16 would need a
    gradient scaler."""
    from pipeline.devices import auto_precision

    if device.type != "cuda":
        return "fp32"
    precision, _ = auto_precision(device)
    return precision if precision == "bf16" else "fp32"


def log_proba_of(net: Any, rows: CutRows, device: Any) -> np.ndarray:
    """float64 log-probabilities of `rows` through `net` in eval mode."""
    import torch

    from pipeline.devices import autocast

    net.eval()
    out = np.empty((len(rows), net.head.out_features))
    with torch.no_grad(), autocast(device, _precision(device)):
        for positions, X in rows.blocks():
            for a in range(0, len(X), MAX_BATCH * 4):
                logits = net(X[a : a + MAX_BATCH * 4].to(device)).float().cpu().numpy()
                out[positions[a : a + MAX_BATCH * 4]] = logits
    return log_proba_from_decision(out)


def train(
    cfg: HeadConfig,
    base: Any,
    dim: int,
    n_classes: int,
    candidate: Candidate,
    rows: CutRows | list[CutRows],
    val: CutRows | None = None,
    stop_at: int | None = None,
    report_epoch: Any = lambda: None,
) -> TailFit:
    """A copy of the pretrained tail `base` plus a fresh linear head, trained with AdamW and a
    cosine schedule on `rows` (several sources: the images and their --views, each row weighed by
    its source's weights); with `val`, the epoch of lowest validation log-loss is kept. Blocks of
    every source come in one shuffled order each epoch."""
    import torch
    from torch import nn

    from pipeline.backbones.split import freeze_statistics
    from pipeline.devices import autocast, choose_device

    device = choose_device(cfg.device)
    precision = _precision(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + candidate.number)
        net = _net(copy.deepcopy(base), dim, n_classes).to(device)
        net.requires_grad_(True)
        batch = max(1, min(cfg.batch_size, MAX_BATCH))
        sources = rows if isinstance(rows, list) else [rows]
        plan = [(i, int(a)) for i, source in enumerate(sources) for a in source.starts()]
        step_count = sum(
            math.ceil(min(sources[i].block_size(), len(sources[i]) - a) / batch) for i, a in plan
        )
        optimizer = torch.optim.AdamW(
            net.parameters(), lr=candidate.lr, weight_decay=candidate.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, cfg.epochs * step_count)
        )
        rng = np.random.default_rng(cfg.seed + candidate.number)
        ys = [torch.from_numpy(np.asarray(source.y, np.int64)) for source in sources]
        ws = [
            torch.from_numpy(
                np.ones(len(source), np.float32)
                if source.weights is None
                else np.asarray(source.weights, np.float32)
            )
            for source in sources
        ]
        losses: list[float] = []
        best, best_state = 0, None
        for epoch in range(1, (stop_at or cfg.epochs) + 1):
            freeze_statistics(net)
            for k in rng.permutation(len(plan)):
                i, start = plan[k]
                positions, X = sources[i].block(start, rng)
                y, w = ys[i], ws[i]
                for a in range(0, len(X), batch):
                    idx = torch.from_numpy(positions[a : a + batch])
                    with autocast(device, precision):
                        logits = net(X[a : a + batch].to(device))
                    loss = nn.functional.cross_entropy(
                        logits.float(),
                        y[idx].to(device),
                        reduction="none",
                        label_smoothing=cfg.label_smoothing,
                    )
                    wb = w[idx].to(device)
                    loss = (loss * wb).sum() / wb.sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            report_epoch()
            if val is None:
                continue
            log_proba = log_proba_of(net, val, device)
            losses.append(float(-log_proba[np.arange(len(val)), val.y].mean()))
            if not math.isfinite(losses[-1]):
                break
            if best == 0 or losses[-1] < losses[best - 1]:
                best, best_state = epoch, copy.deepcopy(net.state_dict())
            elif epoch - best >= PATIENCE:
                break
        if best_state is not None:
            net.load_state_dict(best_state)
    state = {k: v.detach().cpu().numpy().copy() for k, v in net.state_dict().items()}
    if val is None:
        return TailFit(candidate.number, candidate, state, stop_at or cfg.epochs)
    return TailFit(candidate.number, candidate, state, best or len(losses), len(losses), losses)


def net_of(fit: TailFit, base: Any, dim: int, n_classes: int) -> Any:
    """The trained network of `fit` (its arrays into a copy of the pretrained tail)."""
    import torch

    net = _net(copy.deepcopy(base), dim, n_classes)
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in fit.state.items()})
    return net.eval()


# ---------------------------------------------------------------------------------- the source


class TailSource:
    """The protocol's rows for the tail head: the cut's activations of train, val (or a holdout of
    train) and test, streamed from the file; test only when `test` is called, after every choice."""

    streams = True

    def __init__(self, cfg: HeadConfig, info: CacheInfo) -> None:
        from pipeline.cache import schema
        from pipeline.cache.reader import open_cache, stored_rows
        from pipeline.splits import stratified_holdout

        self.cfg, self.path, self.info = cfg, Path(info.path), info
        with open_cache(self.path) as f:
            stored = [n for n in f.get(schema.LAYERS, {}) if n.startswith(CUT_PREFIX)]
            layer = cfg.layer or (stored[0] if len(stored) == 1 else None)
            if cfg.layer is None and len(stored) > 1:
                raise ConfigError(
                    f"cache {self.path} stores several cuts ({', '.join(stored)}); pick one with "
                    "--layer"
                )
            self.cut = cut_of(layer, self.path)
            self.layer = f"{CUT_PREFIX}{self.cut}"
            if self.layer not in stored:
                cut_of(None, self.path)
            self.width = int(f[schema.LAYERS][self.layer].shape[1])
        rows = stored_rows(self.path)
        code = {name: i for i, name in enumerate(("train", "val", "test"))}
        ok, split, labels = rows["ok"], rows["split"], rows["labels"]
        self.ids = np.asarray(rows["ids"])
        index = {s: np.flatnonzero(ok & (split == c)) for s, c in code.items()}
        train, val = index["train"], index["val"]
        if len(val):
            self.selected_on = ChoiceRows("val")
        else:
            held = stratified_holdout(labels[train], cfg.val_fraction, cfg.seed, salt=3)
            if not held.any():
                raise DataError(
                    f"cache {self.path} has no val split and train is too small to hold out "
                    f"{cfg.val_fraction}"
                )
            train, val = train[~held], train[held]
            self.selected_on = ChoiceRows("holdout", cfg.val_fraction, cfg.seed)
        self.present = np.unique(labels[train])
        self.names = [info.classes[c] for c in self.present]
        self.index = {"train": train, "val": val, "test": index["test"]}
        self.labels = labels
        self.y = {s: np.searchsorted(self.present, labels[r]) for s, r in self.index.items()}
        self.sweep_counts = np.bincount(self.y["train"], minlength=len(self.names))
        self.val_counts = np.bincount(self.y["val"], minlength=len(self.names))
        self.views_per_image = 0
        fingerprint, config = info.fingerprint, info.config
        self.shape = _checked_shape(fingerprint, config, self.cut, self.width, self.path)
        self.base = pretrained_tail(fingerprint, config, self.cut)
        self.dim = int(info.dim)
        self.views: tuple[np.ndarray, np.ndarray] | None = None  # views file rows, their classes
        self.view_weight = 1.0
        if cfg.views:
            self._find_views(labels)
        self.about = {
            "backbone": fingerprint["backbone"],
            "cut": self.cut,
            "shape": list(self.shape),
            "crop_size": int(config.get("image_size") or _crop_size(fingerprint["backbone"])),
            "feature_dim": self.dim,
        }
        self.file: Any = None

    def _find_views(self, labels: np.ndarray) -> None:
        """--views: the rows of NAME.views.h5 that are views of this run's train images, from views
        made for this very state of the cache and holding the same cut."""
        from pipeline.cache import schema
        from pipeline.cache.reader import open_cache, stored_rows
        from pipeline.errors import MissingError

        path = schema.views_path(self.path)
        if not path.exists():
            raise MissingError(
                f"--views: no views cache {path}; run `pipeline features` with --views K and --cut "
                f"{self.cut} for this cache"
            )
        with open_cache(path) as f:
            made_for = schema.json_attr(f, "fingerprint").get("views_of")
            has_cut = self.layer in f.get(schema.LAYERS, {})
            width = f[schema.LAYERS][self.layer].shape[1] if has_cut else None
        if made_for != schema.fingerprint_tag(self.info.fingerprint):
            raise CacheError(
                f"views cache {path} was made for another state of cache {self.path}; rerun "
                "`pipeline features` with --views K on the same settings"
            )
        if width != self.width:
            raise CacheError(
                f"views cache {path} holds no {self.layer} of {self.width} values per view; rerun "
                f"`pipeline features` with --views K --cut {self.cut}"
            )
        vrows = stored_rows(path)
        base = np.array([str(i).rsplit("#view", 1)[0] for i in vrows["ids"]])
        train = {str(self.ids[r]): r for r in self.index["train"]}
        image = np.array([train.get(b, -1) for b in base], dtype=np.int64)
        kept = np.flatnonzero((image >= 0) & vrows["ok"])
        k = int(np.unique(base[kept], return_counts=True)[1].max(initial=0))
        self.views = (kept, np.searchsorted(self.present, labels[image[kept]]))
        self.view_weight, self.views_per_image = 1.0 / (k + 1), k

    def describe(self) -> str:
        views = f" (+{self.views_per_image} views per image)" if self.views is not None else ""
        return (
            f"{len(self.index['train'])} train{views}, {len(self.index['val'])} val rows of cut "
            f"{self.cut} ({'x'.join(map(str, self.shape))}, streamed)"
        )

    def __enter__(self) -> TailSource:
        from pipeline.cache import schema
        from pipeline.cache.reader import open_cache

        self.file = open_cache(self.path)
        self.view_file = (
            open_cache(schema.views_path(self.path)) if self.views is not None else None
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for f in (self.file, getattr(self, "view_file", None)):
            if f is not None:
                f.close()
        self.file = self.view_file = None

    def _training(self, *splits: str) -> list[CutRows]:
        """The training rows of `splits` (train weighed like each of its views), and the views."""
        rows = self._rows(*splits)
        if self.views is None:
            return [rows]
        from pipeline.cache import schema

        train = np.isin(rows.rows, self.index["train"])
        rows.weights = np.where(train, self.view_weight, 1.0)  # val: one view, weight 1
        kept, y = self.views
        dataset = self.view_file[schema.LAYERS][self.layer]
        views = CutRows(dataset, kept, y, self.shape, np.full(len(kept), self.view_weight))
        return [rows, views]

    def _rows(self, *splits: str) -> CutRows:
        from pipeline.cache import schema

        rows = np.concatenate([self.index[s] for s in splits])
        y = np.concatenate([self.y[s] for s in splits])
        order = np.argsort(rows, kind="stable")
        dataset = self.file[schema.LAYERS][self.layer]
        return CutRows(dataset, rows[order], y[order], self.shape)

    def sweep(self, repeat: int, grid: list[float], tick: Any) -> tuple[Preprocessor, list, list]:
        by_number = {c.number: c for c in candidates(self.cfg)}
        rows, val = self._training("train"), self._rows("val")
        fits, curve = [], []
        for number in grid:
            fit = train(
                self.cfg, self.base, self.dim, len(self.names), by_number[int(number)], rows, val
            )
            fit.about = self.about
            curve.append(choice.curve_row(fit, val.y, self._log_proba(fit, val), self.names))
            fits.append(fit)
            tick(1)
        return Preprocessor("none"), fits, curve

    def refit(self, value: float, init: TailFit) -> tuple[Preprocessor, TailFit]:
        cand = {c.number: c for c in candidates(self.cfg)}[int(value)]
        fit = train(
            self.cfg,
            self.base,
            self.dim,
            len(self.names),
            cand,
            self._training("train", "val"),
            stop_at=max(1, int(init.n_iter)),
        )
        fit.about = self.about
        return Preprocessor("none"), fit

    def _log_proba(self, fit: TailFit, rows: CutRows) -> np.ndarray:
        from pipeline.devices import choose_device

        net = net_of(fit, self.base, self.dim, len(self.names))
        device = choose_device(self.cfg.device)
        return log_proba_of(net.to(device), rows, device)

    def validate(self, fit: TailFit, prep: Preprocessor) -> tuple[np.ndarray, np.ndarray]:
        val = self._rows("val")
        return val.y, self._log_proba(fit, val)

    def test(self, final: TailFit, prep: Preprocessor) -> Predictions:
        test = self._rows("test")
        return Predictions(self.ids[test.rows], test.y, self._log_proba(final, test))


def _crop_size(name: str) -> int:
    from pipeline.backbones import backbone

    return backbone.describe(name, "none").crop_size


def _checked_shape(
    fingerprint: dict[str, Any], config: dict[str, Any], cut: str, width: int, path: Path
) -> tuple[int, ...]:
    """The cut's shape per image, from the backbone at the cache's crop size; the stored width must
    be its product (what the file claims is checked where it is read)."""
    from pipeline.backbones import backbone, layers

    name = fingerprint.get("backbone")
    if not isinstance(name, str):
        raise CacheError(f"cache {path} does not record its backbone; rebuild it")
    spec = backbone.describe(name, "none", 0, config.get("image_size"))
    shape = layers.sized_cut_shape(name, cut, spec.crop_size)
    if math.prod(shape) != width:
        raise CacheError(
            f"cache {path} stores {width} values per image for cut {cut}, but {name} gives "
            f"{'x'.join(map(str, shape))} = {math.prod(shape)} at {spec.crop_size} px; rebuild it "
            "with `pipeline features --cut`"
        )
    return shape


# ---------------------------------------------------------------------------------- the kind


@register
class TailHead(HeadKind):
    """The tail kind: the backbone after the cut, fine-tuned with a linear head on cached
    activations."""

    name = "tail"
    setting = "candidate"
    model = "tail"
    preprocessings = ("none",)
    default_preprocessing = "none"
    packages = ("torch", "torchvision")
    own_options = ("weight_decay", "lr_grid")
    setting_keys = (
        "backbone",
        "cut",
        "shape",
        "crop_size",
        "feature_dim",
        "lr",
        "weight_decay",
        "epochs",
    )

    def check(self, cfg: HeadConfig) -> None:
        super().check(cfg)
        refused = {
            "--grid (its candidates are --lr-grid and --weight-decay)": bool(cfg.grid),
            "--lr (its candidates are --lr-grid)": cfg.lr is not None,
            "--max-memory (it streams its cut in blocks of 64 MiB whatever the budget)": (
                cfg.max_memory is not None
            ),
            "--shots": bool(cfg.shots),
            "--imbalance-ratio": cfg.imbalance_ratio is not None,
            "--balanced-sampler": cfg.balanced_sampler,
            f"--solver {cfg.solver} (it trains with AdamW)": cfg.solver not in ("auto", "adam"),
        }
        for flag, given in refused.items():
            if given:
                raise ConfigError(f"{flag} is not supported by the tail head; drop it")
        if cfg.layer is not None and not cfg.layer.startswith(CUT_PREFIX):
            raise ConfigError(
                f"--layer {cfg.layer} is not a cut; the tail head trains on a cut:MODULE layer "
                "(`pipeline features --cut MODULE`)"
            )
        for lr in cfg.lr_grid or ():
            if not 0 < lr <= 1:
                raise ConfigError(f"--lr-grid {lr:g} is not allowed; pass learning rates in (0, 1]")
        check_weight_decays(cfg)

    def grid(self, cfg: HeadConfig) -> list[float]:
        return [c.number for c in candidates(cfg)]

    def solver(self, cfg: HeadConfig, streaming: bool) -> str:
        return (
            f"AdamW over the tail and a linear head, cosine schedule over {cfg.epochs} epochs, "
            f"batch norm statistics frozen, early stopping on validation log-loss (patience "
            f"{PATIENCE}), bf16 autocast on CUDA devices that compute it"
        )

    def open_source(self, cfg: HeadConfig, info: CacheInfo, grid: list[float]) -> TailSource:
        return TailSource(cfg, info)

    # ------------------------------------------------------------------ the trained head

    def trained(
        self, fit: TailFit, prep: Preprocessor, classes: np.ndarray, adjustment: Adjustment
    ) -> TrainedHead:
        from pipeline.heads.trained import TrainedHead

        weight, bias = fit.state["head.weight"], fit.state["head.bias"]
        coef, intercept = adjustment.linear(weight.T, bias)
        arrays = {k: v for k, v in fit.state.items() if k.startswith("tail.")}
        arrays["head.weight"] = np.asarray(coef.T, np.float32)
        arrays["head.bias"] = np.asarray(intercept, np.float32)
        settings = fit.about | fit.candidate.columns() | {"epochs": int(fit.n_iter)}
        width = math.prod(fit.about["shape"])
        return TrainedHead(self, prep, classes, arrays, settings, n_features=width)

    def array_shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
        tail = _meta_tail(meta)
        shapes: dict[str, tuple[int | None, ...]] = {
            f"tail.{k}": tuple(v.shape) for k, v in tail.state_dict().items()
        }
        n_classes, dim = len(meta["classes"]), int(meta["feature_dim"])
        return shapes | {"head.weight": (n_classes, dim), "head.bias": (n_classes,)}

    def n_features(self, arrays: dict[str, np.ndarray]) -> int:
        raise NotImplementedError  # always given: the cut's width

    def check_saved(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
        """What head.json claims against what it describes: the cache's backbone, cut and crop
        size, the cut's shape at that size (traced, not read), and the arrays' dtypes and values
        against the traced tail's state."""
        from pipeline.backbones import layers

        fingerprint = meta.get("cache_fingerprint") or {}
        settings = meta.get("features_config") or {}
        if fingerprint.get("backbone") != meta["backbone"] or settings.get("cut") != meta["cut"]:
            return (
                f"its tail ({meta['backbone']} cut at {meta['cut']!r}) is not the backbone and cut "
                f"of its cache ({fingerprint.get('backbone')!r} cut at {settings.get('cut')!r})"
            )
        crop = settings.get("image_size") or _crop_size(meta["backbone"])
        if meta["crop_size"] != crop:
            return f"crop_size {meta['crop_size']} is not its cache's crop size {crop}"
        name, size = meta["backbone"], int(meta["crop_size"])
        shape = list(layers.sized_cut_shape(name, meta["cut"], size))
        if meta.get("shape") != shape or meta["n_features"] != math.prod(shape):
            return (
                f"shape {meta.get('shape')!r} and n_features {meta['n_features']} are not the "
                f"cut's {shape} ({math.prod(shape)} values) at {size} px"
            )
        for key, kind in _state_kinds(name, meta["cut"], size).items():
            array = arrays[f"tail.{key}"]
            if array.dtype != kind:
                return f"tail.{key} in head.npz is {array.dtype}, the tail holds {kind}"
            if key.endswith("running_var") and (array < 0).any():
                return f"tail.{key} in head.npz holds a negative variance"
            if key.endswith("num_batches_tracked") and (array < 0).any():
                return f"tail.{key} in head.npz is negative"
        for key in ("head.weight", "head.bias"):
            if arrays[key].dtype != np.float32:
                return f"{key} in head.npz is {arrays[key].dtype}, expected float32"
        return None

    def input_layer(self, head: TrainedHead) -> str:
        return f"{CUT_PREFIX}{head.settings['cut']}"

    def _net(self, head: TrainedHead) -> Any:
        import torch

        net = getattr(head, "_net", None)
        if net is None:
            tail = _meta_tail(head.settings)
            net = _net(tail, int(head.settings["feature_dim"]), len(head.classes_))
            state = {k: torch.from_numpy(np.array(v)) for k, v in head.arrays.items()}
            net.load_state_dict(state, assign=True)
            net.eval().requires_grad_(False)  # an exported program carries no gradient
            head._net = net
        return net

    def log_proba(self, head: TrainedHead, Z: np.ndarray) -> np.ndarray:
        import torch

        net, shape = self._net(head), tuple(head.settings["shape"])
        out = np.empty((len(Z), len(head.classes_)))
        with torch.no_grad():
            for a in range(0, len(Z), 256):
                x = torch.from_numpy(np.ascontiguousarray(Z[a : a + 256], np.float32))
                out[a : a + 256] = net(x.reshape(len(x), *shape)).double().numpy()
        return log_proba_from_decision(out)

    def module(self, head: TrainedHead) -> Any:
        from torch import nn

        net, shape = self._net(head), tuple(head.settings["shape"])

        class Tuned(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, z: Any) -> Any:
                return self.net(z.reshape(z.shape[0], *shape)).softmax(dim=1)

        return Tuned().eval()


@functools.lru_cache(maxsize=8)
def _state_kinds(backbone: str, cut: str, size: int) -> dict[str, np.dtype]:
    """The numpy dtype of each entry of the traced tail's state (float32 weights, int64 counts)."""
    tail = traced_tail(backbone, cut, size)
    return {k: np.dtype(str(v.dtype).removeprefix("torch.")) for k, v in tail.state_dict().items()}


def _meta_tail(meta: dict[str, Any]) -> Any:
    """The tail a saved head's head.json names, traced from the backbone's code on the meta device;
    a CacheError in one line when head.json names no backbone, cut or size that traces."""
    from pipeline.errors import PipelineError
    from pipeline.heads.trained import is_number

    backbone, cut, size, dim = (
        meta.get(k) for k in ("backbone", "cut", "crop_size", "feature_dim")
    )
    if not (
        isinstance(backbone, str)
        and isinstance(cut, str)
        and is_number(size, integer=True)
        and is_number(dim, integer=True)
        and 8 <= size <= 4096
        and dim >= 1
    ):
        raise CacheError(
            "a saved tail head needs backbone, cut (strings), crop_size and feature_dim (whole "
            "numbers) in head.json; retrain it with `pipeline head --head tail`"
        )
    try:
        return traced_tail(backbone, cut, int(size))
    except PipelineError as exc:
        raise CacheError(
            f"a saved tail head names backbone {backbone!r} cut at {cut!r}, which does not give a "
            f"tail here ({exc}); retrain it with `pipeline head --head tail`"
        ) from None
