"""How C is chosen, on four caches shaped like the issue's (1,440 train / 160 val / 400 test rows):

- `digits`: the offline demo cache (scikit-learn's digits, random resnet18, 64 px);
- `shapes`: ten procedurally drawn shape and texture classes (random colour, size, place, noise);
- `patches`: sixteen classes of 48 px crops from sixteen regions of scikit-learn's two sample
  photos;
- `gaussian`: ten Gaussian classes written straight into a cache, whose best C is known: it is
  measured on 20,000 fresh rows from the same distribution (and the Bayes rate in closed form).

The image sets are written under benchmarks/out/images and extracted with `pipeline features`
(random resnet18: no download). On each cache both heads run the whole protocol (45-value sweep on
val, refit on train+val, test once) with `--select top1` (argmax, the published protocol) and with
the default `top1-1se`; the `logloss` rule's choice is read off the same curves.

python -m benchmarks.selection            # prints the README table, writes
benchmarks/out/selection.json

About four minutes on a 2-core CPU; caches and image folders are reused when current.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline import registry
from pipeline.cache import reader as cache_reader
from pipeline.cache import writer as cache_writer
from pipeline.config import FeaturesConfig, HeadConfig
from pipeline.features import stage
from pipeline.heads import choice, fitting, protocol

OUT = Path("benchmarks/out")
HEADS = ("logreg", "torch")
RULES = ("top1", "top1-0.5se", "top1-1se", "logloss")
NAMES = {"top1": "argmax", "top1-0.5se": "half-SE", "top1-1se": "one-SE", "logloss": "log-loss"}
SHAPES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "hstripes",
    "vstripes",
    "diagonal",
    "checker",
    "dots",
)


# ------------------------------------------------------------------------------------- image sets


def _draw_shape(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One shape or texture of class `kind` at a random place, size and colour, on a noisy
    background."""
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    r = rng.uniform(0.18, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = (cx - r, cy - r, cx + r, cy + r)
    step = int(rng.integers(3, 7))
    if kind == "disc":
        draw.ellipse(box, fill=colour)
    elif kind == "square":
        draw.rectangle(box, fill=colour)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif kind == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif kind == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif kind in ("hstripes", "vstripes", "diagonal"):
        for k in range(-size, 2 * size, 2 * step):
            line = {
                "hstripes": (0, k, size, k),
                "vstripes": (k, 0, k, size),
                "diagonal": (k, 0, k - size, size),
            }[kind]
            draw.line(line, fill=colour, width=step)
    elif kind == "checker":
        for i in range(0, size, 2 * step):
            for j in range(0, size, 2 * step):
                draw.rectangle((i, j, i + step - 1, j + step - 1), fill=colour)
                draw.rectangle(
                    (i + step, j + step, i + 2 * step - 1, j + 2 * step - 1), fill=colour
                )
    else:  # dots
        for _ in range(int(rng.integers(6, 14))):
            x, y, d = *rng.uniform(0, size, 2), rng.uniform(1.5, 3.5)
            draw.ellipse((x - d, y - d, x + d, y + d), fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_shapes(root: Path, per_class: int = 200, size: int = 48, seed: int = 0) -> Path:
    """``ROOT/<shape>/<n>.png``: ten classes, `per_class` images each; kept when already there."""
    done = root / f".complete-{per_class}-{size}-{seed}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            _draw_shape(kind, rng, size).save(root / kind / f"{n:04d}.png")
    done.touch()
    return root


def write_patches(root: Path, per_class: int = 125, size: int = 48, seed: int = 0) -> Path:
    """``ROOT/<photo>-<region>/<n>.png``: crops from a 2 x 4 grid of regions of each of
    scikit-learn's two sample photos (china, flower), shifted, flipped, brightness-jittered and
    noised."""
    from sklearn.datasets import load_sample_images

    done = root / f".complete-{per_class}-{size}-{seed}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    photos = load_sample_images()
    for photo, name in zip(photos.images, ("china", "flower"), strict=True):
        height, width = photo.shape[0] // 2, photo.shape[1] // 4
        for region in range(8):
            top, left = (region // 4) * height, (region % 4) * width
            folder = root / f"{name}-{region}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                y = top + int(rng.integers(0, height - size))
                x = left + int(rng.integers(0, width - size))
                crop = photo[y : y + size, x : x + size].astype(np.float32)
                crop = crop[:, ::-1] if rng.random() < 0.5 else crop
                crop = crop * rng.uniform(0.7, 1.3) + rng.normal(0, 20, crop.shape)
                Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(
                    folder / f"{n:04d}.png"
                )
    done.touch()
    return root


def extract_folder(root: Path, out: Path, seed: int = 0) -> Path:
    cfg = FeaturesConfig(
        data=str(root),
        backbone="resnet18",
        weights="none",
        seed=seed,
        image_size=48,
        batch_size=128,
        out=str(out),
        progress=False,
    )
    stage.run(cfg)
    return out


def demo_cache(seed: int = 0) -> Path:
    """The demo's own cache, exactly as `make features` writes it (configs/demo.toml); another
    random backbone for `seed` > 0."""
    out = (
        Path("cache/digits-resnet18.h5")
        if seed == 0
        else OUT / f"selection-digits-resnet18-seed{seed}.h5"
    )
    cfg = FeaturesConfig(
        dataset="digits",
        root="cache/datasets",
        backbone="resnet18",
        weights="none",
        seed=seed,
        image_size=64,
        batch_size=128,
        out=str(out),
        progress=False,
    )
    stage.run(cfg)
    return out


# ------------------------------------------------------------------------------ the known optimum


class Gaussians:
    """Ten classes N(mu_k, I) in 128-d, signal in the first 16 dimensions only: a linear problem
    with a Bayes-optimal linear rule, where 112 pure-noise features make the regularisation matter.
    """

    def __init__(
        self,
        classes: int = 10,
        dim: int = 128,
        signal: int = 16,
        scale: float = 0.75,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        self.means = np.zeros((classes, dim))
        self.means[:, :signal] = rng.normal(0, scale, (classes, signal))
        self.classes, self.dim = classes, dim

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        y = np.arange(n) % self.classes
        rng.shuffle(y)
        return (self.means[y] + rng.normal(size=(n, self.dim))).astype(np.float32), y

    def bayes_accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        """Equal priors, identity covariance: the nearest mean is the Bayes-optimal rule."""
        distance = ((X[:, None, :] - self.means[None]) ** 2).sum(axis=2)
        return float((distance.argmin(axis=1) == y).mean())


def gaussian_cache(path: Path, g: Gaussians) -> Path:
    X, y = g.sample(2000, seed=1)
    split = np.repeat(np.array([0, 1, 2], dtype=np.int8), [1440, 160, 400])
    writer = cache_writer.CacheWriter.open(
        path,
        fingerprint={"backbone": "gaussian", "rows": 2000, "dim": g.dim, "seed": 1},
        ids=[f"row{i}" for i in range(2000)],
        labels=y,
        split=split,
        classes=[f"class_{k}" for k in range(g.classes)],
        dim=g.dim,
        store_dtype="float32",
    )
    writer.write(0, X)
    writer.finish()
    return path


def oracle(path: Path, g: Gaussians, fresh: int = 20_000) -> dict[str, Any]:
    """The C whose head, trained as the protocol trains it (standardised train+val, logreg), scores
    best on `fresh` new rows; and the Bayes rate on those rows."""
    from pipeline.heads import estimators

    fs = cache_reader.read_features(path, dtype=np.float32)
    X = np.concatenate([fs["train"].X, fs["val"].X])
    y = np.concatenate([fs["train"].y, fs["val"].y])
    X_new, y_new = g.sample(fresh, seed=2)
    prep = estimators.Preprocessor("standardize").fit(X)
    cfg = HeadConfig(features=str(path), progress=False)
    fits = fitting.fit_grid(cfg, prep.transform(X), y, g.classes, list(registry.DEFAULT_GRID))
    Z = prep.transform(X_new)
    accuracy = [float((fit.decision(Z).argmax(axis=1) == y_new).mean()) for fit in fits]
    best = int(np.argmax(accuracy))
    return {
        "fresh_rows": fresh,
        "C": fits[best].value,
        "index": best,
        "accuracy": accuracy[best],
        "accuracy_by_index": accuracy,  # on the default grid, in its order
        "bayes_accuracy": g.bayes_accuracy(X_new, y_new),
    }


# ------------------------------------------------------------------------------------------ runs


def run_head(cache: Path, head: str, select: str) -> dict[str, Any]:
    out = OUT / "selection" / f"{cache.stem}-{head}-{select}"
    cfg = HeadConfig(
        features=str(cache), head=head, select=select, out=str(out), progress=False, bootstrap=0
    )
    start = time.perf_counter()
    result = protocol.run(cfg)
    status = [row["status"] for row in result["curve"]]
    return {
        "C": result["chosen"]["C"],
        "index": result["chosen"]["index"],
        "test_top1": result["test"]["top1"],
        "test_log_loss": result["test"]["log_loss"],
        "selection": choice.selection(result["curve"], select),
        "status_counts": {name: status.count(name) for name in sorted(set(status))},
        "seconds": round(time.perf_counter() - start, 1),
        "curve": result["curve"],
    }


def run_rules(cache: Path, head: str) -> dict[str, Any]:
    """Every rule on one cache and head. The curve does not depend on the rule, so a rule that
    chooses the C another already chose shares its run; the others run the whole protocol with their
    own --select."""
    runs = {"top1-1se": run_head(cache, head, "top1-1se")}
    for rule in RULES:
        if rule in runs:
            continue
        same = [
            r for r in runs.values() if r["index"] == choice.choose(runs["top1-1se"]["curve"], rule)
        ]
        runs[rule] = (
            dict(same[0], selection=choice.selection(same[0]["curve"], rule)) if same else None
        )
        runs[rule] = runs[rule] or run_head(cache, head, rule)
    return {rule: {k: v for k, v in runs[rule].items() if k != "curve"} for rule in RULES} | {
        "curve": runs["top1-1se"]["curve"]
    }


def build_caches(seed: int = 0) -> dict[str, Path]:
    """The four caches. `seed` > 0 draws four new ones of the same kinds (other images, another
    random backbone, other Gaussian means): caches to test a rule on that it was not chosen on."""
    tag = "" if seed == 0 else f"-seed{seed}"
    images = OUT / f"images{tag}"
    return {
        "digits": demo_cache(seed),
        "shapes": extract_folder(
            write_shapes(images / "shapes", seed=seed),
            OUT / f"selection-shapes-resnet18{tag}.h5",
            seed,
        ),
        "patches": extract_folder(
            write_patches(images / "patches", seed=seed),
            OUT / f"selection-patches-resnet18{tag}.h5",
            seed,
        ),
        "gaussian": gaussian_cache(OUT / f"selection-gaussian{tag}.h5", Gaussians(seed=seed)),
    }


def steps(a: float, b: float) -> int:
    """Grid steps between two C values of the default grid (log-spaced, 4.4 per decade)."""
    per_step = math.log10(registry.DEFAULT_GRID[1] / registry.DEFAULT_GRID[0])
    return round(abs(math.log10(a / b)) / per_step)


def one_image_sensitivity(curve: list[dict[str, Any]], rule: str, n: int) -> int:
    """The most grid steps the rule's choice moves when one C's validation top-1 (n rows) changes by
    one image."""
    base, most = choice.choose(curve, rule), 0
    for k in range(len(curve)):
        for delta in (-1 / n, 1 / n):
            p = curve[k]["val_top1"] + delta
            if not 0 <= p <= 1:
                continue
            moved = [dict(row) for row in curve]
            moved[k] |= {"val_top1": p, "val_top1_se": float(np.sqrt(p * (1 - p) / n))}
            most = max(most, abs(choice.choose(moved, rule) - base))
    return most


def table(results: dict[str, Any]) -> str:
    head_row = " | ".join(f"{NAMES[r]}: C | {NAMES[r]}: test top-1" for r in RULES)
    lines = [
        f"| cache (train/val/test) | head | {head_row} |",
        "|---|---|" + "---|---|" * len(RULES),
    ]
    for name, entry in results["caches"].items():
        rows = entry["rows"]
        for head in HEADS:
            cells = " | ".join(
                f"{entry[head][r]['C']:.3g} | {entry[head][r]['test_top1']:.2%}" for r in RULES
            )
            lines.append(
                f"| {name} ({rows['train']}/{rows['val']}/{rows['test']}) | {head} | {cells} |"
            )
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> list[str]:
    caches = results["caches"]
    means = {
        r: np.mean([e[h][r]["test_top1"] for e in caches.values() for h in HEADS]) for r in RULES
    }
    lines = [
        "mean test top-1 over caches and heads: "
        + ", ".join(f"{NAMES[r]} {means[r]:.2%}" for r in RULES)
    ]
    for name, entry in caches.items():
        gaps = ", ".join(
            f"{NAMES[r]} {steps(entry['logreg'][r]['C'], entry['torch'][r]['C'])}" for r in RULES
        )
        lines.append(f"{name}: grid steps between the heads' C: {gaps}")
    for rule in ("top1", "top1-1se"):
        moves = [
            one_image_sensitivity(e[h]["curve"], rule, e["rows"]["val"])
            for e in caches.values()
            for h in HEADS
        ]
        lines.append(
            f"{NAMES[rule]}: most grid steps one image at one C moves the choice, per curve: "
            f"{moves}"
        )
    o = caches["gaussian"]["oracle"]
    expected = {r: o["accuracy_by_index"][caches["gaussian"]["logreg"][r]["index"]] for r in RULES}
    lines.append(
        f"gaussian: best C on {o['fresh_rows']:,} fresh rows {o['C']:.3g} ({o['accuracy']:.2%}; "
        "Bayes rate "
        f"{o['bayes_accuracy']:.2%}); on those rows the logreg head's choices score "
        + ", ".join(f"{NAMES[r]} {expected[r]:.2%}" for r in RULES)
    )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(OUT / "selection.json"))
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    caches = build_caches()
    results: dict[str, Any] = {"caches": {}}
    for name, path in caches.items():
        info = cache_reader.cache_info(path)
        entry: dict[str, Any] = {
            "path": str(path),
            "rows": {k: v for k, v in info.rows.items() if v},
        }
        for head in HEADS:
            entry[head] = run_rules(path, head)
            choices = ", ".join(
                f"{NAMES[r]} C={entry[head][r]['C']:.3g} test {entry[head][r]['test_top1']:.2%}"
                for r in RULES
            )
            print(f"{name:>9} {head:>6}: {choices}", flush=True)
        if name == "gaussian":
            entry["oracle"] = oracle(path, Gaussians())
        results["caches"][name] = entry
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["table"] = table(results)
    results["summary"] = summary(results)
    print()
    print(results["table"])
    print()
    print("\n".join(results["summary"]))
    print(f"\n{results['seconds']:.0f} s; wrote {args.out}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
