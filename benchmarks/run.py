"""`make bench`: the project's speed claims, measured side by side in one run on this machine.

1. extraction: `pipeline features` images/s (its start-up excluded: minus a rerun on the current
   cache) versus the same backbone's forward pass on ready tensors (same batch size, precision,
   memory format), resnet18 and resnet50 at 224 px, on photo-like 500x375 JPEGs and on 100
   photo-like 4000x3000 (12-MP) JPEGs, with `--decode cpu` (reduced JPEG decoding, the default)
   and `--decode exact`; and peak memory of a features run on N and 4N images.
   backbones: ConvNeXt-T and EfficientNet-B0 the same way on the 500x375 set (target >= 0.9), and
   the cost of storing intermediate layers: resnet50 with --layers layer1,layer2,layer3,layer4
   versus without (one forward pass either way; the extra is pooling and writing).
2. the torch head's whole 45-value sweep (select on val, refit, test) versus one scikit-learn
   LogisticRegression fit at the chosen C, on a CIFAR-100-shaped cache; and versus the logreg
   head's own 45-value sweep.
   The matrix: the torch head's whole protocol against the logreg head's on synthetic caches of
   N in {2k, 15k, 50k} train rows x D in {512, 2048} x K in {10, 100} classes (time, top-1 gap).
3. reading a 50,000 x 2,048 feature matrix from the cache versus np.load of the same array.
4. `pipeline head` on the demo cache, each head.
5. the knn head's neighbour search: a 50,000 x 2,048 bank answering 10,000 queries (k = 20) within
   its memory budget, versus scikit-learn's brute-force cosine `KNeighborsClassifier` on the same
   rows (and the two agree on the neighbours).
6. `pipeline rank`: every feature score (LogME, H-score, LOO NCM and kNN) of a 50,000 x 2,048 x
   100 cache versus one scikit-learn LogisticRegression fit on the same rows (target: under a
   tenth of it) and versus the torch head's whole protocol (sweep, refit, test: the answer
   without rank); LEEP and NCE on 50,000 x 1,000 logits; and the scores' peak memory
   (tracemalloc) at 10,000 and 50,000 train rows (target: flat in N).
7. precision: resnet18 and resnet50 (`--precision-backbones`) at 224 px on this CPU, forward-only
   bf16 / fp32 images/s and
   `pipeline features` with the default `--precision auto` / `--precision fp32` (target for
   resnet50 on a CPU with native bf16: >= 1.7), with the least cosine of an auto row to its fp32
   row, and the whole command against a plain fp32 torchvision loop (ImageFolder, DataLoader,
   forward; target on a bf16 CPU for the convolutional nets: >= 2); channels-last (the pipeline's
   layout) against contiguous inputs in fp32 and bf16; and bf16 under torch.compile against eager
   (forward-only, with the seconds the compilation took).
8. finetune (`benchmarks/finetune.py`): bytes per image at resnet50's cut points; one epoch of
   `--head tail` after layer3 from the cached cut versus the plain torch loop that decodes the
   images and runs the frozen trunk every epoch (target: >= 3x faster per epoch on the CPU).

Prints a table with each ratio and its target, and writes benchmarks/out/bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import extraction_rate, forward_rate, plain_loop_rate
from benchmarks.synthetic import matrix_cache
from pipeline.synthetic import write_photo_folder, write_synthetic_cache

OUT = Path("benchmarks/out")
ROWS: list[dict] = []


def row(
    name: str, value: float, unit: str, target: str = "", ok: bool | None = None, **detail
) -> None:
    entry = {"benchmark": name, "value": value, "unit": unit, "target": target, "ok": ok, **detail}
    ROWS.append(entry)
    mark = "" if ok is None else ("PASS" if ok else "MISS")
    print(f"  {name:<52} {value:>10.3f} {unit:<8} {target:<16} {mark}", flush=True)


def bench_extraction(n: int, batch: int) -> None:

    sets = {
        "500x375": (write_photo_folder(OUT / f"photos-{n}", n), n, {"resnet18": 0.85}),
        "4000x3000": (
            write_photo_folder(OUT / "photos-12mp-100", 100, size=(4000, 3000)),
            100,
            {"resnet50": 0.9},
        ),
    }
    for label, (photos, count, targets) in sets.items():
        print(
            f"extraction: {count} photo-like {label} JPEGs (quality 90), 224 px, batch {batch}, "
            "fp32",
            flush=True,
        )
        for name in ("resnet18", "resnet50"):
            before = forward_rate(name, "fp32", False, "cpu", batch, batches=4)
            rates = {
                mode: extraction_rate(
                    photos, count, name, batch, mode, OUT / f"{photos.name}-{name}-{mode}.h5"
                )
                for mode in ("cpu", "exact")
            }
            reference = (before + forward_rate(name, "fp32", False, "cpu", batch, batches=4)) / 2
            row(f"{name} {label}: forward-only images/s (mean of before/after)", reference, "img/s")
            for mode, rate in rates.items():
                row(f"{name} {label}: pipeline images/s, --decode {mode}", rate, "img/s")
            target = targets.get(name)
            ratio = rates["cpu"] / reference
            row(
                f"{name} {label}: pipeline / forward-only",
                ratio,
                "ratio",
                f">= {target}" if target else "",
                None if target is None else ratio >= target,
            )


def bench_backbones(n: int, batch: int) -> None:
    photos = write_photo_folder(OUT / f"photos-{n}", n)
    print(f"backbones: {n} photo-like 500x375 JPEGs, 224 px, batch {batch}, fp32", flush=True)
    for name in ("convnext_tiny", "efficientnet_b0"):
        before = forward_rate(name, "fp32", False, "cpu", batch, batches=4)
        rate = extraction_rate(photos, n, name, batch, "cpu", OUT / f"{photos.name}-{name}.h5")
        reference = (before + forward_rate(name, "fp32", False, "cpu", batch, batches=4)) / 2
        row(f"{name} 500x375: forward-only images/s (mean of before/after)", reference, "img/s")
        row(f"{name} 500x375: pipeline images/s", rate, "img/s")
        row(
            f"{name} 500x375: pipeline / forward-only",
            rate / reference,
            "ratio",
            ">= 0.9",
            rate / reference >= 0.9,
        )
    layers = "layer1,layer2,layer3,layer4"
    plain = extraction_rate(
        photos, n, "resnet50", batch, "cpu", OUT / f"{photos.name}-resnet50-plain.h5"
    )
    layered = extraction_rate(
        photos,
        n,
        "resnet50",
        batch,
        "cpu",
        OUT / f"{photos.name}-resnet50-layers.h5",
        layers=layers,
    )
    row("resnet50 500x375: pipeline images/s, features only", plain, "img/s")
    row(f"resnet50 500x375: pipeline images/s, --layers {layers}", layered, "img/s")
    row(
        "resnet50: extra time per stored layer (of the features-only run)",
        (plain / layered - 1) / 4,
        "fraction",
    )


# VmHWM is this process's own peak; ru_maxrss survives exec on Linux and can report the parent's.
_PEAK = """
import sys
from pipeline import cli
code = cli.main(sys.argv[1:])
print("PEAK_RSS_KB", next(int(l.split()[1]) for l in open("/proc/self/status") if
l.startswith("VmHWM")))
sys.exit(code)
"""


def peak_rss_mb(folder: Path, out: Path, backbone: str = "resnet18") -> float:
    args = [
        "features",
        "--data",
        str(folder),
        "--backbone",
        backbone,
        "--weights",
        "none",
        "--out",
        str(out),
    ]
    args += ["--force", "--no-progress", "--val-fraction", "0", "--test-fraction", "0"]
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, check=True
    )
    kb = next(
        int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB")
    )
    return kb / 1024


def bench_memory(n: int, backbone: str = "resnet18") -> None:
    print(
        f"memory: peak RSS of the main process, {backbone} features on N={n} and 4N={4 * n} images",
        flush=True,
    )
    big = write_photo_folder(OUT / f"photos-{4 * n}", 4 * n)
    small = OUT / f"photos-{n}-subset"
    if not small.exists():
        for path in sorted(big.rglob("*.jpg"))[:n]:
            (small / path.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, small / path.parent.name / path.name)
    # The peak moves by a few % from run to run (when a batch's transient buffers coincide), so
    # each size is measured three times, interleaved, and the medians are compared.
    runs: dict[int, list[float]] = {n: [], 4 * n: []}
    for _ in range(3):
        runs[n].append(peak_rss_mb(small, OUT / "mem-n.h5", backbone))
        runs[4 * n].append(peak_rss_mb(big, OUT / "mem-4n.h5", backbone))
    a, b = float(np.median(runs[n])), float(np.median(runs[4 * n]))
    row(f"{backbone} peak RSS, N = {n} (median of 3)", a, "MB", runs=runs[n])
    row(f"{backbone} peak RSS, 4N = {4 * n} (median of 3)", b, "MB", runs=runs[4 * n])
    row(f"{backbone} peak RSS 4N / N", b / a, "ratio", "<= 1.10", b / a <= 1.10)


def bench_sweep(sklearn_sweep: bool) -> None:
    from sklearn.linear_model import LogisticRegression

    from pipeline import read_features
    from pipeline.config import HeadConfig
    from pipeline.heads import protocol
    from pipeline.heads.estimators import Preprocessor
    from pipeline.splits import stratified_holdout

    cache = OUT / "cifar100-like.h5"
    if not cache.exists():
        write_synthetic_cache(cache)
    print(
        "sweep: CIFAR-100-shaped cache (50,000 train + 10,000 test, 2,048-d float16, 100 classes)",
        flush=True,
    )
    cfg = HeadConfig(
        features=str(cache), head="torch", out=str(OUT / "sweep-torch"), progress=False, bootstrap=0
    )
    result = protocol.run(cfg)
    t = result["timings"]
    ours = t["sweep"] + t["refit"] + t["test"]
    C = result["chosen"]["C"]
    row("torch head: 45-value sweep + refit + test", ours, "s", chosen_C=C, timings=t)
    row("torch head: same, with reading the cache", ours + t["read"], "s")
    # One scikit-learn fit at the chosen C, on exactly the rows and preprocessing of our refit.
    fs = read_features(cache, dtype=np.float32)
    train, test = fs["train"], fs["test"]
    held = stratified_holdout(train.y, cfg.val_fraction, cfg.seed, salt=3)
    X_all = np.concatenate([train.X[~held], train.X[held]])
    y_all = np.concatenate([train.y[~held], train.y[held]])
    prep = Preprocessor(cfg.preprocessing).fit(X_all)
    X_fit, X_test = prep.transform(X_all), prep.transform(test.X)
    fits = {}
    for tol in (cfg.tol, 1e-4):  # the protocol's tolerance (the target), and scikit-learn's default
        start = time.perf_counter()
        model = LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=tol).fit(X_fit, y_all)
        fits[tol] = time.perf_counter() - start
        row(
            f"scikit-learn: one fit at C = {C:.3g}, tol {tol:g}",
            fits[tol],
            "s",
            n_iter=int(model.n_iter_.max()),
        )
        if tol == cfg.tol:
            sk_top1 = float((model.predict(X_test) == test.y).mean())
    single = fits[cfg.tol]
    ratio = ours / single
    row(
        f"sweep time / one scikit-learn fit at the same tol ({cfg.tol:g})",
        ratio,
        "ratio",
        "< 1",
        ratio < 1,
    )
    row("sweep time / one scikit-learn fit at tol 1e-4", ours / fits[1e-4], "ratio")
    gap = abs(result["test"]["top1"] - sk_top1) * 100
    row("test top-1: torch sweep", result["test"]["top1"] * 100, "%")
    row("test top-1: scikit-learn fit", sk_top1 * 100, "%")
    row("test top-1 gap", gap, "points", "<= 0.5", gap <= 0.5)
    if sklearn_sweep:
        logreg = protocol.run(
            HeadConfig(
                features=str(cache),
                head="logreg",
                out=str(OUT / "sweep-logreg"),
                progress=False,
                bootstrap=0,
            )
        )
        lt = logreg["timings"]
        theirs = lt["sweep"] + lt["refit"] + lt["test"]
        row(
            "logreg head (scikit-learn, joblib): 45-value sweep + refit + test",
            theirs,
            "s",
            chosen_C=logreg["chosen"]["C"],
        )
        row("torch sweep / scikit-learn sweep", ours / theirs, "ratio")


MATRIX = [(n, d, k) for n in (2_000, 15_000, 50_000) for d in (512, 2048) for k in (10, 100)]


def bench_matrix(cells: list[tuple[int, int, int]] = MATRIX) -> None:
    """The torch head's protocol (45-value sweep, refit, test) against the logreg head's on
    synthetic caches of N train rows (+ N/5 test), D dimensions and K classes, both at their
    defaults (tol 1e-6); time ratio, top-1 gap and the grid steps between their chosen C. Both heads
    first run once on the smallest cache, untimed, so neither pays its start-up (joblib's worker
    processes, torch's threads) inside a cell."""
    from pipeline.config import HeadConfig
    from pipeline.heads import protocol

    print(
        "sweep matrix: torch head vs logreg head, whole protocol (45 C, refit, test), N x D x K",
        flush=True,
    )
    table = [
        "| N x D x K | torch head | logreg head | speed-up | test top-1 torch / logreg | grid "
        "steps apart |",
        "|---|---|---|---|---|---|",
    ]

    def run(cache: Path, head: str) -> dict:
        cfg = HeadConfig(
            features=str(cache),
            head=head,
            out=str(OUT / f"matrix-{head}"),
            progress=False,
            bootstrap=0,
            force=True,
        )
        return protocol.run(cfg)

    for head in ("torch", "logreg"):  # warm-up, untimed
        run(matrix_cache(OUT, *min(cells)), head)
    for n, d, k in cells:
        cache = matrix_cache(OUT, n, d, k)
        seconds, top1, index = {}, {}, {}
        for head in ("torch", "logreg"):
            result = run(cache, head)
            t = result["timings"]
            seconds[head], top1[head] = t["sweep"] + t["refit"] + t["test"], result["test"]["top1"]
            index[head] = result["chosen"]["index"]
        ratio, gap = seconds["logreg"] / seconds["torch"], abs(top1["torch"] - top1["logreg"]) * 100
        steps = abs(index["torch"] - index["logreg"])
        label = f"N={n:,} D={d} K={k}"
        row(
            f"{label}: torch / logreg seconds",
            seconds["torch"],
            "s",
            logreg_seconds=seconds["logreg"],
        )
        row(f"{label}: torch speed-up over logreg", ratio, "ratio", "> 1", ratio > 1)
        row(
            f"{label}: test top-1 gap",
            gap,
            "points",
            "<= 0.3",
            gap <= 0.3,
            top1=top1,
            chosen_index=index,
        )
        table.append(
            f"| {n:,} x {d:,} x {k} | {seconds['torch']:.2f} s | {seconds['logreg']:.2f} s | "
            f"**{ratio:.1f}x** | "
            f"{top1['torch']:.2%} / {top1['logreg']:.2%} ({gap:.2f} points) | {steps} |"
        )
    print("\n".join(table), flush=True)


def bench_reads() -> None:
    import h5py

    from pipeline import read_features
    from pipeline.cache import reader as cache_reader
    from pipeline.cache import schema

    cache = OUT / "cifar100-like.h5"
    if not cache.exists():
        write_synthetic_cache(cache)
    with h5py.File(cache) as f:
        array = f["features"][:50_000]
    npy = OUT / "features-50000.npy"
    np.save(npy, array)
    print(
        f"reads: {array.shape} {array.dtype} ({array.nbytes / 1e6:.0f} MB), best of 3, warm page "
        "cache",
        flush=True,
    )
    matrix, full, numpy = [], [], []
    for _ in range(3):
        start = time.perf_counter()
        with cache_reader.open_cache(cache) as f:
            X = schema.read_block(f["features"], 0, 50_000)
        matrix.append(time.perf_counter() - start)
        start = time.perf_counter()
        split = read_features(cache, splits=("train",))["train"]
        full.append(time.perf_counter() - start)
        start = time.perf_counter()
        Y = np.load(npy)
        numpy.append(time.perf_counter() - start)
    assert (
        X.shape == Y.shape == (50_000, 2048) and np.array_equal(X, Y) and np.array_equal(split.X, Y)
    )
    row("the feature matrix from the cache (open + one block read)", min(matrix), "s")
    row("read_features: the matrix + labels + ids (the head's read)", min(full), "s")
    row("np.load of the same array", min(numpy), "s")
    ratio = min(numpy) / min(matrix)
    row("feature matrix read speed / np.load speed", ratio, "ratio", ">= 0.8", ratio >= 0.8)
    row("read_features speed / np.load speed", min(numpy) / min(full), "ratio")


def bench_knn(budget_mb: int = 256) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    from pipeline import read_features
    from pipeline.heads.kinds.knn import CosineKNN

    cache = OUT / "cifar100-like.h5"
    if not cache.exists():
        write_synthetic_cache(cache)
    fs = read_features(cache, dtype=np.float32)
    bank, labels = fs["train"].X, fs["train"].y
    queries = fs["test"].X[:10_000]
    print(
        f"knn: {bank.shape} bank, {queries.shape[0]} queries, k = 20, {budget_mb} MB of "
        "similarities at a time"
    )
    ours = CosineKNN(n_neighbors=20, max_memory=budget_mb * 2**20).fit(bank, labels)
    start = time.perf_counter()
    pred = ours.predict(queries)
    seconds = time.perf_counter() - start
    row(
        "knn head: 10,000 queries against a 50,000 x 2,048 bank",
        seconds,
        "s",
        "seconds",
        seconds < 60,
    )
    theirs = KNeighborsClassifier(
        n_neighbors=20, metric="cosine", algorithm="brute", n_jobs=-1
    ).fit(bank, labels)
    start = time.perf_counter()
    _, rows = theirs.kneighbors(queries[:2_000])
    sk_seconds = (time.perf_counter() - start) * 5  # 2,000 queries, scaled to 10,000
    row("scikit-learn brute cosine kNN, same queries (from 2,000)", sk_seconds, "s")
    row(
        "knn head speed / scikit-learn speed",
        sk_seconds / seconds,
        "ratio",
        ">= 1",
        sk_seconds / seconds >= 1,
    )
    mine = np.sort(ours.kneighbors_rows(queries[:2_000]), axis=1)
    agree = float((mine == np.sort(rows, axis=1)).all(axis=1).mean())
    row(
        "queries whose 20 neighbours equal scikit-learn's",
        agree,
        "fraction",
        ">= 0.99",
        agree >= 0.99,
        top1=float((pred == fs["test"].y[:10_000]).mean()),
    )


def bench_demo_heads() -> None:
    print(
        "demo: `pipeline head --config configs/demo.toml` wall time (a fresh process each)",
        flush=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "features",
            "--config",
            "configs/demo.toml",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    for head in ("logreg", "torch", "knn", "ncm", "mlp"):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "head",
                "--config",
                "configs/demo.toml",
                "--head",
                head,
                "--out",
                str(OUT / f"demo-{head}"),
                "--no-progress",
            ],
            check=True,
            capture_output=True,
        )
        row(f"make head on the demo cache, {head}", time.perf_counter() - start, "s")


def bench_precision(n: int, batch: int, names: tuple[str, ...] = ("resnet18", "resnet50")) -> None:
    """fp32 against bf16 on this CPU: forward-only images/s, `pipeline features` images/s with
    --precision fp32 and with the default (auto), and how far auto's features are from fp32's."""
    from pipeline import devices, read_features

    chosen, why = devices.auto_precision(devices.choose_device("cpu"))
    photos = write_photo_folder(OUT / f"photos-{n}", n)
    print(
        f"precision: {n} photo-like 500x375 JPEGs, 224 px, batch {batch}; auto is {chosen} ({why})"
    )
    for name in names:
        forward = {
            p: forward_rate(name, p, False, "cpu", batch, batches=4) for p in ("fp32", "bf16")
        }
        for p in ("fp32", "bf16"):
            plain = forward_rate(name, p, False, "cpu", batch, batches=4, channels_last=False)
            row(
                f"{name}: forward-only {p}, channels-last / contiguous images/s",
                forward[p] / plain,
                "ratio",
                images_per_s={"channels-last": forward[p], "contiguous": plain},
            )
        start = time.perf_counter()
        compiled = forward_rate(name, "bf16", True, "cpu", batch, batches=4)
        row(
            f"{name}: forward-only bf16, torch.compile (inductor) / eager images/s",
            compiled / forward["bf16"],
            "ratio",
            seconds_with_compilation=time.perf_counter() - start,
            images_per_s=compiled,
        )
        row(
            f"{name}: forward-only bf16 / fp32 images/s",
            forward["bf16"] / forward["fp32"],
            "ratio",
            images_per_s=forward,
        )
        outs = {p: OUT / f"{photos.name}-{name}-precision-{p}.h5" for p in ("fp32", "auto")}
        rates = {
            p: extraction_rate(photos, n, name, batch, "cpu", outs[p], device="cpu", precision=p)
            for p in ("fp32", "auto")
        }
        ratio = rates["auto"] / rates["fp32"]
        target = ">= 1.7" if name == "resnet50" and chosen == "bf16" else ""
        row(
            f"{name}: pipeline features, default (auto) / --precision fp32 images/s",
            ratio,
            "ratio",
            target,
            ratio >= 1.7 if target else None,
            images_per_s=rates,
        )
        plain = plain_loop_rate(photos, n, name, batch)
        whole = rates["auto"] / plain
        target = ">= 2" if chosen == "bf16" and name.startswith(("resnet", "convnext")) else ""
        row(
            f"{name}: pipeline features (auto) / a plain fp32 torchvision loop, images/s",
            whole,
            "ratio",
            target,
            whole >= 2 if target else None,
            images_per_s={"auto": rates["auto"], "plain fp32 loop": plain},
        )
        a, b = (
            read_features(outs[p], splits=("train",))["train"].X.astype(np.float64)
            for p in ("fp32", "auto")
        )
        cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        row(
            f"{name}: least cosine of an auto row to its fp32 row",
            float(cosine.min()),
            "cosine",
            mean=float(cosine.mean()),
        )


def bench_rank() -> None:
    import tracemalloc

    from sklearn.linear_model import LogisticRegression

    from pipeline import rank, read_features
    from pipeline.heads.estimators import Preprocessor

    cache = matrix_cache(OUT, 50_000, 2048, 100)
    print("rank: the feature scores of a 50,000 x 2,048 x 100 cache (train rows)")
    start = time.perf_counter()
    scores = rank.score_cache(cache)
    seconds = time.perf_counter() - start
    row("rank: logme + hscore + ncm_loo + knn_loo", seconds, "s", logme=scores["logme"])
    train = read_features(cache, splits=("train",), dtype=np.float32)["train"]
    X = Preprocessor("standardize").fit(train.X).transform(train.X)
    start = time.perf_counter()
    LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, tol=1e-4).fit(X, train.y)
    fit = time.perf_counter() - start
    row("scikit-learn: one LogisticRegression fit (C = 1, tol 1e-4)", fit, "s")
    row(
        "rank seconds / one logistic-regression fit",
        seconds / fit,
        "ratio",
        "< 0.1",
        seconds / fit < 0.1,
    )
    from pipeline.config import HeadConfig
    from pipeline.heads import protocol

    start = time.perf_counter()
    head = HeadConfig(features=str(cache), out=str(OUT / "rank-torch-head"), force=True)
    protocol.run(dataclasses.replace(head, progress=False, bootstrap=0))
    whole = time.perf_counter() - start
    row("the torch head's whole protocol on the same cache (the answer without rank)", whole, "s")
    row("rank seconds / the torch head's protocol", seconds / whole, "ratio")
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50_000, 1000)), rng.integers(0, 100, 50_000)
    start = time.perf_counter()
    rank.leep(logits, labels), rank.nce(logits, labels)
    row("rank: leep + nce of 50,000 x 1,000 logits", time.perf_counter() - start, "s")
    peaks = {}
    for n in (10_000, 50_000):
        small = matrix_cache(OUT, n, 2048, 100)  # written (when missing) before measuring
        tracemalloc.start()
        rank.score_cache(small)
        peaks[n] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        row(f"rank: peak memory at {n:,} train rows", peaks[n], "MiB")
    growth = peaks[50_000] / peaks[10_000]
    row("rank: peak memory 50,000 rows / 10,000 rows", growth, "ratio", "<= 1.2", growth <= 1.2)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parts = [
        "extraction",
        "backbones",
        "memory",
        "sweep",
        "matrix",
        "reads",
        "knn",
        "rank",
        "precision",
        "finetune",
        "demo",
    ]
    parser.add_argument("--only", nargs="+", choices=parts)
    parser.add_argument(
        "--images", type=int, default=1000, help="images for the extraction benchmark"
    )
    parser.add_argument(
        "--backbone-images", type=int, default=400, help="images for the backbones benchmark"
    )
    parser.add_argument("--memory-backbones", nargs="+", default=["resnet18", "efficientnet_b0"])
    parser.add_argument(
        "--memory-images", type=int, default=250, help="N of the memory benchmark (4N too)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--precision-images", type=int, default=200, help="images for the precision benchmark"
    )
    parser.add_argument(
        "--precision-backbones",
        nargs="+",
        default=["resnet18", "resnet50"],
        help="backbones of the precision benchmark (e.g. convnext_tiny vit_b_16 too)",
    )
    parser.add_argument(
        "--finetune-images", type=int, default=64, help="images for the finetune benchmark"
    )
    parser.add_argument(
        "--finetune-cuts",
        nargs="+",
        default=["resnet50:layer3", "vit_b_16:encoder.layers.encoder_layer_10"],
        help="BACKBONE:MODULE cut points of the finetune benchmark",
    )
    parser.add_argument(
        "--no-sklearn-sweep",
        action="store_true",
        help="skip the (slow) scikit-learn 45-value sweep",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    chosen = set(args.only or parts)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(f"machine: {machine}\n")
    started = time.perf_counter()
    if "extraction" in chosen:
        bench_extraction(args.images, args.batch_size)
    if "backbones" in chosen:
        bench_backbones(args.backbone_images, args.batch_size)
    if "memory" in chosen:
        for name in args.memory_backbones:
            bench_memory(args.memory_images, name)
    if "sweep" in chosen:
        bench_sweep(not args.no_sklearn_sweep)
    if "matrix" in chosen:
        bench_matrix()
    if "reads" in chosen:
        bench_reads()
    if "knn" in chosen:
        bench_knn()
    if "rank" in chosen:
        bench_rank()
    if "precision" in chosen:
        bench_precision(args.precision_images, args.batch_size, tuple(args.precision_backbones))
    if "finetune" in chosen:
        from benchmarks.finetune import bench_finetune

        for pair in args.finetune_cuts:
            name, cut = pair.split(":", 1)
            bench_finetune(row, OUT, args.finetune_images, name, cut)
    if "demo" in chosen:
        bench_demo_heads()
    import importlib.metadata as md

    versions = {
        n: md.version(n)
        for n in ("torch", "torchvision", "numpy", "scikit-learn", "h5py", "pipeline")
    }
    report = {
        "machine": machine,
        "versions": versions,
        "seconds": time.perf_counter() - started,
        "rows": ROWS,
    }
    (OUT / "bench.json").write_text(json.dumps(report, indent=2))
    missed = [r["benchmark"] for r in ROWS if r["ok"] is False]
    print(
        f"\nwrote {OUT / 'bench.json'}; {len(missed)} target(s) missed"
        + (f": {missed}" if missed else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
