"""The head kinds: what a kind declares (`HeadKind`), and the registry that names them.

A kind is one class in one module, registered by a decorator as timm's `@register_model` does:

    @register
    class NearestClassMean(LinearStorage, HeadKind):
        name = "ncm"
        ...

The protocol, saving, loading, `predict` and `export` ask the kind of a run for everything that
differs between heads, so a new head is one file. `get` finds a kind by its `--head` name;
`for_model` finds the kind that reads a saved head by the `model` its head.json names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipeline.errors import ConfigError
from pipeline.registry import PREPROCESSING

if TYPE_CHECKING:
    from pipeline.config import HeadConfig
    from pipeline.heads.estimators import Preprocessor
    from pipeline.heads.posthoc import Adjustment
    from pipeline.heads.trained import TrainedHead

KINDS: dict[str, HeadKind] = {}
MIN_TEMPERATURE = 1e-4  # cosine / T stays finite in float32 for T in [1e-4, 1e4]


class HeadKind:
    """What a head kind declares and does. The defaults suit a linear head trained on standardised
    rows.

    Declared:
    - `name`: its `--head` value.
    - `setting`: what its sweep chooses, the validation curve's first column (C, k or temperature).
    - `model`: how `head.npz` stores it; the kind registered first for a model loads it.
    - `preprocessings`: the `--preprocess` values it accepts; `default_preprocessing`: what `auto`
      means.
    - `takes_c`: `--C`, `--class-weight` and a study's `[head]` C grid apply to it.
    - `may_stream`: it can train on rows streamed from the file (`--max-memory` below the rows).
    - `packages`: libraries whose versions its `result.json` records beside numpy and scikit-learn.
    - `early_stops`: its fits watch the validation rows while they train (`fit_grid` gets
      `val=(Z_val, y_val)` in the sweep; never in the refit).
    - `own_options`: HeadConfig options only some kinds use (mlp's --hidden, the tail's --lr-grid);
      a kind that does not declare one refuses it when it is given.
    - `setting_keys`: the settings a trained head keeps in head.json (k, temperatures), beside its
      arrays.
    """

    name: ClassVar[str] = ""
    setting: ClassVar[str] = "C"
    model: ClassVar[str] = "linear"
    preprocessings: ClassVar[tuple[str, ...]] = PREPROCESSING
    default_preprocessing: ClassVar[str] = "standardize"
    takes_c: ClassVar[bool] = False
    may_stream: ClassVar[bool] = False
    packages: ClassVar[tuple[str, ...]] = ()
    setting_keys: ClassVar[tuple[str, ...]] = ()
    early_stops: ClassVar[bool] = False
    own_options: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ the settings and the sweep

    def check(self, cfg: HeadConfig) -> None:
        """Refuse what this kind cannot do with `cfg`, in one line. The base refuses a preprocessing
        it does not accept, and --C and --class-weight for a kind without C."""
        if cfg.preprocess != "auto" and cfg.preprocess not in self.preprocessings:
            raise ConfigError(
                f"--preprocess {cfg.preprocess} does not suit the {self.name} head; choose one of: "
                f"{', '.join(self.preprocessings)}"
            )
        for option in sorted({o for kind in KINDS.values() for o in kind.own_options}):
            if getattr(cfg, option, None) is not None and option not in self.own_options:
                users = [kind.name for kind in KINDS.values() if option in kind.own_options]
                raise ConfigError(
                    f"--{option.replace('_', '-')} is a setting of the {' and '.join(users)} "
                    f"head{'s' if len(users) > 1 else ''}; the {self.name} head does not use it "
                    "(drop it)"
                )
        if not self.takes_c and cfg.C is not None:
            raise ConfigError(
                f"--C is a setting of the linear heads; the {self.name} head has no C (drop --C)"
            )
        if not self.takes_c and cfg.class_weight != "none":
            raise ConfigError(
                f"--class-weight {cfg.class_weight} applies to the linear heads; the {self.name} "
                "head is not "
                "trained with a loss to weigh (drop --class-weight)"
            )

    def preprocessing(self, cfg: HeadConfig) -> str:
        """--preprocess with `auto` resolved for this kind."""
        return self.default_preprocessing if cfg.preprocess == "auto" else cfg.preprocess

    def grid(self, cfg: HeadConfig) -> list[float]:
        """The settings the sweep tries, strongest regularisation first."""
        raise NotImplementedError

    def prepare_grid(
        self, grid: list[float], train_rows: int, report: Callable[[str], None]
    ) -> list[float]:
        """The grid made into what it can mean on `train_rows` training rows (knn caps k); before
        scoring."""
        return grid

    def solver(self, cfg: HeadConfig, streaming: bool) -> str:
        """How this kind's fits are computed, as result.json's `final_fit.solver` says it."""
        raise NotImplementedError

    def fit_grid(
        self,
        cfg: HeadConfig,
        X: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        grid: list[float],
        tick: Callable[[int], None] = lambda n: None,
        init: Any = None,
        sample_weight: np.ndarray | None = None,
    ) -> list[Any]:
        """One fit per setting of `grid` on the same (preprocessed) rows; `sample_weight`: --views'
        weights. A fit has `value`, `param`, `status`, `n_iter`, `converged` and `log_proba(X)`."""
        raise NotImplementedError

    def open_source(self, cfg: HeadConfig, info: Any, grid: list[float]) -> Any:
        """The protocol's `Source` of rows when this kind reads the cache its own way (the tail
        head: a cut's activations); None: the rows in memory or streamed, as for every kind."""
        return None

    def input_layer(self, head: TrainedHead) -> str | None:
        """The stored layer a trained head of this kind takes as input where it is not the layer
        its config names (the tail head: its cut), so predict and export compute that one."""
        return None

    def log_proba_all(self, fits: list[Any], X: np.ndarray) -> list[np.ndarray]:
        """Each fit's float64 log-probabilities on (preprocessed) rows X."""
        return [fit.log_proba(X) for fit in fits]

    # ------------------------------------------------------------------ the trained head

    def trained(
        self, fit: Any, prep: Preprocessor, classes: np.ndarray, adjustment: Adjustment
    ) -> TrainedHead:
        """The protocol's final fit as the one trained-head type, its post-hoc adjustment inside."""
        raise NotImplementedError

    def array_shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
        """The arrays `head.npz` must hold for `meta` (head.json), with their shapes (None: any
        length)."""
        raise NotImplementedError

    def optional_shapes(self, meta: dict[str, Any]) -> dict[str, tuple[int | None, ...]]:
        """Arrays `head.npz` may hold for `meta`, checked like `array_shapes` when they are
        there."""
        return {}

    def n_features(self, arrays: dict[str, np.ndarray]) -> int:
        """The width of the features a trained head of this kind takes, from its arrays."""
        raise NotImplementedError

    def check_saved(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
        """What is wrong with a saved head beyond its array shapes (None: nothing): said in one
        line."""
        return None

    def log_proba(self, head: TrainedHead, Z: np.ndarray) -> np.ndarray:
        """float64 log-probabilities (n, classes) of preprocessed rows Z."""
        raise NotImplementedError

    def module(self, head: TrainedHead) -> Any:
        """A `torch.nn.Module`: preprocessed features (B, D) -> class probabilities (B, classes)."""
        raise NotImplementedError


def check_temperature(cfg: HeadConfig) -> None:
    """--temperature within [1e-4, 1e4], where cosine / T stays finite (the cosine heads' check)."""
    if not MIN_TEMPERATURE <= cfg.temperature <= 1 / MIN_TEMPERATURE:
        raise ConfigError(
            f"--temperature {cfg.temperature} is out of range; pass a number in "
            f"[{MIN_TEMPERATURE:g}, "
            f"{1 / MIN_TEMPERATURE:g}] (0.07 is DINO's)"
        )


def register(cls: type[HeadKind]) -> type[HeadKind]:
    """Class decorator: make `cls` the kind named `cls.name` (a second kind of one name is
    refused)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in KINDS and type(KINDS[cls.name]) is not cls:
        raise ValueError(
            f"a head kind named {cls.name!r} is registered already "
            f"({type(KINDS[cls.name]).__name__})"
        )
    KINDS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Forget the kind `name` (for kinds registered by tests)."""
    KINDS.pop(name, None)


def names() -> list[str]:
    return list(KINDS)


def get(name: str) -> HeadKind:
    """The kind registered as `name`, or a one-line error listing the kinds there are."""
    if name not in KINDS:
        raise ConfigError(f"--head {name!r} is not allowed; choose one of: {', '.join(KINDS)}")
    return KINDS[name]


def for_model(model: str, name: str | None = None) -> HeadKind | None:
    """The kind that reads a saved head whose head.json says `model`: the kind `name` (its `head`)
    when it stores that model, else the first registered for it."""
    if name in KINDS and KINDS[name].model == model:
        return KINDS[name]
    return next((kind for kind in KINDS.values() if kind.model == model), None)


def validate(cfg: HeadConfig) -> HeadKind:
    """`cfg`'s kind, after it has checked `cfg` (every kind-specific rule, each one line)."""
    kind = get(cfg.head)
    kind.check(cfg)
    return kind
