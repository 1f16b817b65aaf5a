"""Issue 27, item 3: oneDNN fusion on the CPU, measured against what the pipeline runs now.

Forward-only images/s of a backbone as the pipeline builds it (`pipeline.backbones.backbone`,
`--weights none`: torchvision's architecture, seeded, eval mode, the classifier replaced by an
identity so the output is the pooled feature vector), channels-last, on one seeded random batch
(default 32 x 3 x 224 x 224), under `torch.inference_mode`, in these variants:

- `eager-fp32`; `eager-bf16`: `torch.autocast("cpu", bfloat16)`, what the pipeline does now
  (`pipeline.devices.autocast`, `pipeline/backbones/forward.py`);
- `jit-freeze-fp32`, `jit-ofi-fp32`: `torch.jit.trace` + `torch.jit.freeze` (BatchNorm folded
  into the convolutions, constants propagated), the second through
  `torch.jit.optimize_for_inference` (freeze + oneDNN conv/add/relu fusion and prepacked
  weights);
- `jit-freeze-bf16`, `jit-ofi-bf16`: the same, traced under bf16 autocast with the JIT's own
  autocast pass off (`torch._C._jit_set_autocast_mode(False)`), so the trace records the casts
  and freezing folds the bf16 weights into constants (only the input cast stays per call);
- `fold-fp32`, `fold-bf16`: conv-bn folding alone (`torch.fx.experimental.optimization.fuse`:
  BatchNorm folded into the conv weights, eager otherwise), fp32 and under bf16 autocast
  (only for backbones with BatchNorm).

Each variant is built (seconds reported), warmed up, then the variants alternate in --rounds
rounds (order rotated each round) of --batches forward calls; the median images/s of each is
reported, with its ratio to eager-fp32 and to eager-bf16 and its best round (on a shared machine
the best round is the least disturbed one), and the largest absolute difference
(also relative to the largest |value|) and the least row cosine of its pooled output against
eager-fp32 on the same batch.

    python -m benchmarks.fusion
    python -m benchmarks.fusion --backbones convnext_tiny --variants eager-fp32 eager-bf16 \\
        jit-freeze-fp32 jit-freeze-bf16

Prints a table per backbone and writes benchmarks/out/fusion.json (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

OUT = Path("benchmarks/out")
VARIANTS = [
    "eager-fp32",
    "eager-bf16",
    "jit-freeze-fp32",
    "jit-ofi-fp32",
    "jit-freeze-bf16",
    "jit-ofi-bf16",
    "fold-fp32",
    "fold-bf16",
]
BF16 = torch.bfloat16


def _model(name: str) -> torch.nn.Module:
    from pipeline.backbones import backbone

    body = backbone.build(backbone.describe(name, "none"), progress=False).body
    return body.eval().to(memory_format=torch.channels_last)


def _autocast(bf16: bool):
    import contextlib

    return torch.autocast("cpu", dtype=BF16) if bf16 else contextlib.nullcontext()


def build(variant: str, model: torch.nn.Module, x: torch.Tensor) -> Callable | None:
    """A callable images -> pooled features for `variant`; None where it does not apply."""
    kind, precision = variant.rsplit("-", 1)
    bf16 = precision == "bf16"
    if kind == "eager":

        def eager(inp: torch.Tensor) -> torch.Tensor:
            with _autocast(bf16):
                return model(inp)

        return eager
    if kind == "fold":
        if not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
            return None
        from torch.fx.experimental.optimization import fuse

        folded = fuse(model).eval().to(memory_format=torch.channels_last)

        def fold(inp: torch.Tensor) -> torch.Tensor:
            with _autocast(bf16):
                return folded(inp)

        return fold
    # jit: traced (under autocast for bf16, the JIT's autocast pass off so the casts are recorded)
    torch._C._jit_set_autocast_mode(False)
    with torch.no_grad(), _autocast(bf16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x)
        if kind == "jit-freeze":
            scripted = torch.jit.freeze(traced)
        else:
            scripted = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    return scripted


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.float(), ref.float()
    diff = float((out - ref).abs().max())
    return {
        "max_abs_diff": diff,
        "max_abs_diff_rel": diff / float(ref.abs().max()),
        "min_cosine": float(torch.nn.functional.cosine_similarity(out, ref, dim=1).min()),
        "mean_cosine": float(torch.nn.functional.cosine_similarity(out, ref, dim=1).mean()),
    }


def bench_backbone(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = _model(name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = model(x)
    fns: dict[str, Callable] = {}
    info: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        start = time.perf_counter()
        fn = build(variant, model, x)
        if fn is None:
            continue
        with torch.inference_mode():
            for _ in range(args.warmup):  # the JIT profiles and optimises on its first calls
                out = fn(x)
        info[variant] = {"build_and_warmup_s": time.perf_counter() - start, **compare(out, ref)}
        fns[variant] = fn
    times: dict[str, list[float]] = {v: [] for v in fns}
    names = list(fns)
    with torch.inference_mode():
        for r in range(args.rounds):
            for variant in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                for _ in range(args.batches):
                    fns[variant](x)
                times[variant].append(args.batch * args.batches / (time.perf_counter() - start))
    base = statistics.median(times["eager-fp32"]) if "eager-fp32" in times else None
    now = statistics.median(times["eager-bf16"]) if "eager-bf16" in times else None
    print(
        f"\n{name}, batch {args.batch}, {args.size} px, channels-last, median of {args.rounds} "
        f"rounds x {args.batches} batch(es); output scale max|eager-fp32| = "
        f"{float(ref.abs().max()):.4g}"
    )
    print(
        f"  {'variant':<17}{'img/s':>8}{'/fp32':>8}{'/bf16':>8}{'best':>8}{'build s':>9}"
        f"{'max|diff|':>11}{'rel':>10}{'min cos':>11}"
    )
    for variant in names:
        rate = statistics.median(times[variant])
        row = info[variant]
        row.update(
            images_per_s=rate,
            all_images_per_s=times[variant],
            vs_eager_fp32=None if base is None else rate / base,
            vs_eager_bf16=None if now is None else rate / now,
        )
        print(
            f"  {variant:<17}{rate:8.2f}{row['vs_eager_fp32'] or float('nan'):8.3f}"
            f"{row['vs_eager_bf16'] or float('nan'):8.3f}{max(times[variant]):8.2f}"
            f"{row['build_and_warmup_s']:9.1f}"
            f"{row['max_abs_diff']:11.3g}{row['max_abs_diff_rel']:10.2g}{row['min_cosine']:11.7f}",
            flush=True,
        )
    return {"output_scale": float(ref.abs().max()), "variants": info}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["resnet50"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=1, help="forward calls per timing")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after building")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", default=str(OUT / "fusion.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "args": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "backbones": {},
    }
    for name in args.backbones:
        report["backbones"][name] = bench_backbone(name, args)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
