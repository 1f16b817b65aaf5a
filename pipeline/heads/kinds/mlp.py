"""`--head mlp`: one hidden layer (Linear, ReLU, Dropout, Linear) on the cached features, the next
step up from a linear probe, still trained in seconds because the backbone never runs.

Its candidates are the product of `--hidden` widths, `--dropout` rates and AdamW `--weight-decay`
values, ordered strongest regularisation first (narrow, high dropout, high decay), and numbered
1, 2, ...: the validation curve's `candidate` column. Each candidate trains with AdamW and a cosine
schedule over `--epochs` (batches of --batch-size rows, smaller where an epoch would take fewer
than `MIN_STEPS` steps); after every epoch its validation log-loss is measured and the best epoch
is kept (early stopping, patience `PATIENCE` epochs). The protocol then chooses a candidate on val
by `--select` like any setting, refits it on train+val with the same schedule stopped at the chosen
epoch, and scores test once. Only val is ever read before the choice.

Saved without pickle: `w1` (D, H), `b1` (H,), `w2` (H, O), `b2` (O,) in head.npz, with the post-hoc
adjustment (logit offsets, temperature) folded into the output layer as the linear heads do.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.heads.estimators import Preprocessor, log_proba_from_decision
from pipeline.heads.kinds.registry import HeadKind, register
from pipeline.heads.posthoc import Adjustment

if TYPE_CHECKING:
    from pipeline.config import HeadConfig
    from pipeline.heads.trained import TrainedHead

DEFAULT_HIDDEN = (256.0, 1024.0)
DEFAULT_DROPOUT = (0.0, 0.5)
DEFAULT_WEIGHT_DECAY = (1e-4, 0.05)
DEFAULT_LR = 1e-3
PATIENCE = 5  # epochs without a lower validation log-loss before a candidate stops
MIN_STEPS = 10  # steps per epoch at least: small sets train in batches below --batch-size


@dataclass(frozen=True)
class Candidate:
    """One point of the mlp grid."""

    number: int  # 1-based, strongest regularisation first
    hidden: int
    dropout: float
    weight_decay: float

    def columns(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "dropout": self.dropout, "weight_decay": self.weight_decay}


def candidates(cfg: HeadConfig) -> list[Candidate]:
    """The product of --hidden, --dropout and --weight-decay, strongest regularisation first."""
    points = itertools.product(
        sorted({int(h) for h in cfg.hidden or DEFAULT_HIDDEN}),
        sorted(set(cfg.dropout or DEFAULT_DROPOUT), reverse=True),
        sorted(set(cfg.weight_decay or DEFAULT_WEIGHT_DECAY), reverse=True),
    )
    return [Candidate(n, h, d, w) for n, (h, d, w) in enumerate(points, start=1)]


def check_weight_decays(cfg: HeadConfig) -> None:
    """--weight-decay values AdamW can take (the mlp and tail heads' check)."""
    for w in cfg.weight_decay or ():
        if not 0.0 <= w <= 10.0:
            raise ConfigError(f"--weight-decay {w:g} is not allowed; pass AdamW decays in [0, 10]")


@dataclass
class MLPFit:
    """One trained candidate: its float32 arrays, and the epoch its weights come from."""

    value: int  # the candidate's number
    candidate: Candidate
    arrays: dict[str, np.ndarray]  # w1 (D, H), b1 (H,), w2 (H, O), b2 (O,)
    n_iter: int  # epochs trained: the best epoch on val (sweep), or the chosen count (refit)
    epochs_run: int = 0  # epochs the sweep ran before it stopped (0: a refit)
    val_log_loss: list[float] = field(default_factory=list)
    param = "candidate"
    converged = True

    @property
    def status(self) -> str:
        finite = all(np.isfinite(a).all() for a in self.arrays.values())
        return "converged" if finite else "diverged"

    @property
    def columns(self) -> dict[str, Any]:
        """What the validation curve shows beside the candidate's number."""
        return self.candidate.columns() | {"epochs": self.n_iter}

    def log_proba(self, X: np.ndarray) -> np.ndarray:
        return log_proba_from_decision(logits(self.arrays, X))


def logits(arrays: dict[str, np.ndarray], Z: np.ndarray) -> np.ndarray:
    """relu(Z w1 + b1) w2 + b2 in float32 blocks, returned in float64 (the log-softmax's input)."""
    w1, b1 = np.asarray(arrays["w1"], np.float32), np.asarray(arrays["b1"], np.float32)
    w2, b2 = np.asarray(arrays["w2"], np.float32), np.asarray(arrays["b2"], np.float32)
    out = np.empty((len(Z), w2.shape[1]))
    step = max(1, 4_000_000 // max(w1.shape[1], 1))
    for a in range(0, len(Z), step):
        hidden = np.maximum(np.asarray(Z[a : a + step], np.float32) @ w1 + b1, 0.0)
        out[a : a + step] = hidden @ w2 + b2
    return out


def train(
    cfg: HeadConfig,
    candidate: Candidate,
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    sample_weight: np.ndarray | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    stop_at: int | None = None,
) -> MLPFit:
    """AdamW with a cosine schedule over --epochs; with `val`, the epoch of lowest validation
    log-loss is kept (stopping after PATIENCE epochs without one); without, the weights after
    `stop_at` epochs of the same schedule (the refit)."""
    import torch
    from torch import nn

    from pipeline.devices import choose_device

    device = choose_device(cfg.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + candidate.number)
        model = nn.Sequential(
            nn.Linear(X.shape[1], candidate.hidden),
            nn.ReLU(),
            nn.Dropout(candidate.dropout),
            nn.Linear(candidate.hidden, n_classes),
        ).to(device)
        Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32)).to(device)
        yt = torch.from_numpy(np.asarray(y, np.int64)).to(device)
        wt = torch.from_numpy(
            np.ones(len(y), np.float32)
            if sample_weight is None
            else np.asarray(sample_weight, np.float32)
        ).to(device)
        batch = max(1, min(cfg.batch_size, math.ceil(len(y) / MIN_STEPS)))
        steps = math.ceil(len(y) / batch)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr or DEFAULT_LR, weight_decay=candidate.weight_decay
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps)
        order = torch.Generator().manual_seed(cfg.seed + candidate.number)
        losses: list[float] = []
        best, best_state, epochs = 0, None, stop_at if stop_at is not None else cfg.epochs
        for epoch in range(1, epochs + 1):
            model.train()
            for rows in torch.randperm(len(y), generator=order).to(device).split(batch):
                loss = nn.functional.cross_entropy(
                    model(Xt[rows]), yt[rows], reduction="none", label_smoothing=cfg.label_smoothing
                )
                loss = (loss * wt[rows]).sum() / wt[rows].sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            if val is None:
                continue
            losses.append(_val_log_loss(model, val, device))
            if not math.isfinite(losses[-1]):
                break
            if best == 0 or losses[-1] < losses[best - 1]:
                best, best_state = epoch, {k: v.clone() for k, v in model.state_dict().items()}
            elif epoch - best >= PATIENCE:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    arrays = {
        "w1": np.ascontiguousarray(state["0.weight"].T),
        "b1": state["0.bias"],
        "w2": np.ascontiguousarray(state["3.weight"].T),
        "b2": state["3.bias"],
    }
    if val is None:
        return MLPFit(candidate.number, candidate, arrays, epochs)
    return MLPFit(candidate.number, candidate, arrays, best or len(losses), len(losses), losses)


def _val_log_loss(model: Any, val: tuple[np.ndarray, np.ndarray], device: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        X = torch.from_numpy(np.ascontiguousarray(val[0], np.float32)).to(device)
        y = torch.from_numpy(np.asarray(val[1], np.int64)).to(device)
        return float(torch.nn.functional.cross_entropy(model(X).double(), y))


@register
class MLPHead(HeadKind):
    """The mlp kind: one hidden layer, width, dropout and weight decay chosen on val, early stopped
    on val, refitted on train+val for the chosen number of epochs."""

    name = "mlp"
    setting = "candidate"
    model = "mlp"
    packages = ("torch",)
    early_stops = True
    own_options = ("hidden", "dropout", "weight_decay")
    setting_keys = ("hidden", "dropout", "weight_decay", "epochs")

    def check(self, cfg: HeadConfig) -> None:
        super().check(cfg)
        if cfg.grid:
            raise ConfigError(
                "--grid is not used by the mlp head; its candidates are --hidden, --dropout and "
                "--weight-decay (drop --grid)"
            )
        if cfg.solver not in ("auto", "adam"):
            raise ConfigError(
                f"--solver {cfg.solver} does not apply to the mlp head, which trains with AdamW "
                "(drop --solver)"
            )
        for h in cfg.hidden or ():
            if not (1 <= h <= 65536 and float(h).is_integer()):
                raise ConfigError(
                    f"--hidden {h:g} is not allowed; pass whole numbers of units in 1..65536"
                )
        for d in cfg.dropout or ():
            if not 0.0 <= d < 1.0:
                raise ConfigError(f"--dropout {d:g} is not allowed; pass rates in [0, 1)")
        check_weight_decays(cfg)

    def grid(self, cfg: HeadConfig) -> list[float]:
        return [c.number for c in candidates(cfg)]

    def solver(self, cfg: HeadConfig, streaming: bool) -> str:
        return (
            f"AdamW, cosine schedule over {cfg.epochs} epochs, lr {cfg.lr or DEFAULT_LR:g}, early "
            f"stopping on validation log-loss (patience {PATIENCE})"
        )

    def fit_grid(
        self,
        cfg,
        X,
        y,
        n_classes,
        grid,
        tick=lambda n: None,
        init=None,
        sample_weight=None,
        val=None,
    ) -> list[MLPFit]:
        """Each candidate of `grid`, early stopped on `val` (the sweep); with `init` (the chosen
        sweep fit), trained for its epoch count without val (the refit)."""
        by_number = {c.number: c for c in candidates(cfg)}
        fits = []
        for number in grid:
            stop_at = None if init is None else max(int(init.n_iter), 1)
            fits.append(
                train(
                    cfg,
                    by_number[int(number)],
                    X,
                    y,
                    n_classes,
                    sample_weight,
                    val=None if init is not None else val,
                    stop_at=stop_at,
                )
            )
            tick(1)
        return fits

    # ------------------------------------------------------------------ the trained head

    def trained(
        self, fit: MLPFit, prep: Preprocessor, classes: np.ndarray, adjustment: Adjustment
    ) -> TrainedHead:
        from pipeline.heads.trained import TrainedHead

        w2, b2 = adjustment.linear(fit.arrays["w2"], fit.arrays["b2"])
        arrays = {
            "w1": np.asarray(fit.arrays["w1"], np.float32),
            "b1": np.asarray(fit.arrays["b1"], np.float32),
            "w2": np.asarray(w2, np.float32),
            "b2": np.asarray(b2, np.float32),
        }
        settings = fit.candidate.columns() | {"epochs": int(fit.n_iter)}
        return TrainedHead(self, prep, classes, arrays, settings)

    def array_shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
        hidden, n_classes = meta.get("hidden"), len(meta["classes"])
        width = hidden if isinstance(hidden, int) and not isinstance(hidden, bool) else None
        return {
            "w1": (meta["n_features"], width),
            "b1": (width,),
            "w2": (width, n_classes),
            "b2": (n_classes,),
        }

    def n_features(self, arrays: dict[str, np.ndarray]) -> int:
        return int(arrays["w1"].shape[0])

    def check_saved(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
        from pipeline.heads.trained import is_number

        if not (
            is_number(meta.get("hidden"), integer=True)
            and meta["hidden"] == arrays["w1"].shape[1] >= 1
            and is_number(meta.get("epochs"), integer=True)
        ):
            return (
                "an mlp head needs hidden (a whole number >= 1, the width of w1) and epochs in "
                "head.json"
            )
        return None

    def log_proba(self, head: TrainedHead, Z: np.ndarray) -> np.ndarray:
        return log_proba_from_decision(logits(head.arrays, Z))

    def module(self, head: TrainedHead) -> Any:
        import torch
        from torch import nn

        w1, b1, w2, b2 = (
            np.ascontiguousarray(head.arrays[k], np.float32) for k in ("w1", "b1", "w2", "b2")
        )
        first, second = nn.Linear(*w1.shape), nn.Linear(*w2.shape)
        with torch.no_grad():
            first.weight.copy_(torch.from_numpy(w1.T.copy()))
            first.bias.copy_(torch.from_numpy(b1))
            second.weight.copy_(torch.from_numpy(w2.T.copy()))
            second.bias.copy_(torch.from_numpy(b2))
        module = nn.Sequential(first, nn.ReLU(), second, nn.Softmax(dim=1)).eval()
        return module.requires_grad_(False)  # an exported program carries no gradient
