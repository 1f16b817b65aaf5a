"""Head kinds: one module per kind, each a class registered by name (see `registry`).

The built-in kinds: `torch` and `logreg` (`linear`), `knn` (`knn`), `ncm` (`ncm`), `mlp` (`mlp`),
`tail` (`tail`).
Importing this package registers them; a kind defined anywhere else registers itself the same way,
with `@register`, and is then a `--head` like these.
"""

# isort: off
from pipeline.heads.kinds import (
    linear,
    knn,
    ncm,
    mlp,
    tail,
)  # registered in this order: torch, logreg, knn, ncm, mlp, tail

# isort: on
from pipeline.heads.kinds.registry import (
    KINDS,
    HeadKind,
    check_temperature,
    for_model,
    get,
    names,
    register,
    unregister,
    validate,
)

__all__ = [
    "KINDS",
    "HeadKind",
    "check_temperature",
    "for_model",
    "get",
    "knn",
    "linear",
    "mlp",
    "names",
    "ncm",
    "register",
    "tail",
    "unregister",
    "validate",
]
