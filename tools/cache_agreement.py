"""How closely two caches of the same images agree: the least and mean cosine between their rows.

    python tools/cache_agreement.py cache/precision/digits-resnet50-fp32.h5 \
        cache/precision/digits-resnet50-auto.h5

Rows are matched by id (every id of the first must be in the second); `--layer` compares a stored
layer instead of the features. Used for the per-family bf16 table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from pipeline import read_features


def cosines(a: str, b: str, layer: str | None = None) -> np.ndarray:
    """Each row's cosine between cache `a` and cache `b` (matched by id), in float64."""
    rows = {}
    for path in (a, b):
        fs = read_features(path, dtype=np.float32, layer=layer)
        ids = np.concatenate([s.ids for s in fs.splits.values()])
        X = np.concatenate([s.X for s in fs.splits.values()]).astype(np.float64)
        rows[path] = dict(zip(ids.tolist(), X, strict=True))
    first, second = rows[a], rows[b]
    missing = sorted(set(first) - set(second))
    if missing:
        raise SystemExit(f"{b} lacks {len(missing)} ids of {a} (e.g. {missing[0]!r})")
    A = np.stack([first[i] for i in first])
    B = np.stack([second[i] for i in first])
    norms = np.linalg.norm(A, axis=1) * np.linalg.norm(B, axis=1)
    return (A * B).sum(axis=1) / np.where(norms > 0, norms, 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--layer", default=None)
    args = parser.parse_args()
    c = cosines(args.a, args.b, args.layer)
    print(f"{len(c)} rows: least cosine {c.min():.6f}, mean {c.mean():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
