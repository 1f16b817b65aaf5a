"""Issue 27, item 4: bf16 products for the early L-BFGS iterations of each C, with an fp32 finish.

Measures, side by side in one process (ratios only; the machine may be shared):

1. `pass`: one forward + backward product pass at N x (D+1) x K*O (default 40,000 x 2,049 x 100):
   z = Xa @ W and the gradient Xa^T dz, in fp32 (as `Problem.loss_grad` does: `addmm_` with
   Xa.T), in bf16 with X cast once (gradient through Xa_bf16.T, and through a transposed
   contiguous bf16 copy), under `torch.autocast` (X cast on every pass); and the whole
   `Problem.loss_grad` (softmax, float64 loss sums) in fp32 against its bf16 twin below. The
   variants alternate in rounds; medians are reported.
2. `sweep`: the torch head's whole protocol (`pipeline.heads.protocol.run`: the default 45-value
   grid on the stratified holdout, refit on train+val, test once; tol 1e-6) on the sweep matrix's
   synthetic caches (`benchmarks.synthetic.matrix_cache`), stock fp32 against a variant that runs
   every warm-started L-BFGS call in two phases: L-BFGS on a bf16 twin of the `Problem` (X cast
   to bf16 once, plus a transposed copy; the weights cast per pass; logits and gradient back to
   fp32 for the softmax, the float64 loss sums and the penalty) until max|grad| <= --warm-tol or
   --warm-iter iterations, then the stock fp32 L-BFGS from that point to the same tol, seeded
   with the warm phase's curvature pairs (`--finish-history warm`) or the path's (`path`).
   A C whose start already passes --warm-tol goes straight to fp32 (so values that cost no data
   pass still cost none). The variant lives in this file (`solver.lbfgs` is swapped in-process
   for the run); the library is not changed. Per cell and variant: wall time of sweep + refit +
   test (median over --repeats, variants alternating), data passes in fp32 and in bf16, the
   chosen C, test top-1, test predictions identical to stock, the largest change of the
   validation top-1 along the grid.

    python -m benchmarks.bf16_sweep --only pass
    python -m benchmarks.bf16_sweep --only sweep --cells 2000x512x10 15000x2048x100 --repeats 2

Prints a table per part and writes benchmarks/out/bf16_sweep.json (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.synthetic import matrix_cache
from pipeline.heads import solver
from pipeline.heads.objective import _NARROW, Problem

OUT = Path("benchmarks/out")
BF16 = torch.bfloat16
CELLS = [f"{n}x{d}x{k}" for n in (2_000, 15_000) for d in (512, 2048) for k in (10, 100)]
GRAD_BINS = (1e-2, 1e-3, 1e-4)
PASSES: dict[str, int] = {}  # data passes (settings x products) of the current run


# ---------------------------------------------------------------------------------------------
# The bf16 twin of a Problem, and the two-phase L-BFGS


class Bf16Problem(Problem):
    """The same rows, weights and targets as `base`; products in bf16 (inputs rounded to bf16,
    fp32 accumulation inside oneDNN/MKL, outputs rounded to bf16: CPU torch has no bf16 x bf16 ->
    fp32 matmul), the rest in fp32/float64 as `Problem.loss_grad`."""

    def __init__(self, base: Problem) -> None:  # no super().__init__: share base's tensors
        self.__dict__.update(base.__dict__)
        self.Xb = base.Xa.to(BF16)  # (N, D+1)
        self.XbT = self.Xb.T.contiguous()  # (D+1, N): the wide gradient product reads it row-major

    def loss_grad(
        self,
        theta: torch.Tensor,
        lambdas: torch.Tensor,
        rows: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, o = theta.shape[1], self.outputs
        PASSES["bf16"] = PASSES.get("bf16", 0) + k
        flat = theta.reshape(self.d + 1, k * o)
        flat_b = flat.to(BF16)
        loss = torch.zeros(k, dtype=torch.float64, device=theta.device)
        grad = torch.zeros_like(flat)
        scale = 1.0 / self.w_sum if scale is None else scale
        step = self.rows_per_chunk(k)
        count = self.n if rows is None else len(rows)
        for start in range(0, count, step):
            if rows is None:
                sl = slice(start, start + step)
                xb, xbT = self.Xb[sl], self.XbT[:, sl]
                yb, wb = self.y[sl], self.w[sl] * scale
            else:
                chunk = rows[start : start + step]
                xb = self.Xb[chunk]
                xbT = xb.T
                yb, wb = self.y[chunk], self.w[chunk] * scale
            z = (xb @ flat_b).float().view(-1, k, o)
            point_loss, dz = self._pointwise(z, yb)
            loss += wb.double() @ point_loss.double()
            dz *= wb[:, None, None]
            dzb = dz.view(-1, k * o).to(BF16)
            if k * o <= _NARROW:
                grad += (dzb.T @ xb).T.float()
            else:
                grad += (xbT @ dzb).float()
        grad = grad.view(self.d + 1, k, o)
        W = theta[:-1]
        loss += 0.5 * lambdas.double() * (W.double() ** 2).sum(dim=(0, 2))
        grad[:-1] += lambdas[None, :, None] * W
        return loss, grad


def _twin(problem: Problem) -> Bf16Problem:
    twin = problem.__dict__.get("_bf16_twin")
    if twin is None:
        twin = Bf16Problem(problem)
        problem.__dict__["_bf16_twin"] = twin
    return twin


def two_phase_lbfgs(stock: Callable, warm_tol: float, warm_iter: int, finish_history: str):
    """A drop-in for `solver.lbfgs`: a bf16 warm phase, then the stock fp32 run to `tol`."""

    def lbfgs(
        problem,
        lambdas,
        theta,
        max_iter,
        tol,
        memory=solver.MEMORY,
        on_done=None,
        start=None,
        history=None,
        track=None,
        start_width=None,
    ):
        plain = (problem, lambdas, theta, max_iter, tol, memory, on_done)
        if isinstance(problem, Bf16Problem) or warm_tol <= tol:
            return stock(*plain, start, history, track, start_width)
        if start is not None and float(start[1].abs().amax()) <= warm_tol:
            return stock(*plain, start, history, track, start_width)  # near already: fp32 only
        single = theta.shape[1] == 1
        x1, it1, _, _, _, warm = stock(
            _twin(problem),
            lambdas,
            theta.clone(),
            min(warm_iter, max_iter),
            warm_tol,
            memory,
            None,
            None,  # f and g recomputed in bf16: steps are judged on one arithmetic
            history,
            0 if single else None,
            None,
        )
        seed = history
        if finish_history == "warm" and single and warm is not None:
            seed = (
                warm.S,
                [solver._with_penalty(y, s, lambdas) for s, y in zip(warm.S, warm.Y, strict=True)],
            )
        x, it2, conv, gmax, loss, tracked = stock(
            problem,
            lambdas,
            x1,
            max(1, max_iter - int(it1.max())),
            tol,
            memory,
            on_done,
            None,
            seed,
            track,
            None,
        )
        return x, it1 + it2, conv, gmax, loss, tracked

    return lbfgs


@contextlib.contextmanager
def variant(name: str, args: argparse.Namespace) -> Iterator[None]:
    """`fp32` (stock) or `bf16@TOL`: solver.lbfgs swapped for the two-phase one; passes counted."""
    stock_lbfgs, stock_loss_grad = solver.lbfgs, Problem.loss_grad

    def counted(self, theta, lambdas, *a, **kw):
        PASSES["fp32"] += theta.shape[1]
        f, g = stock_loss_grad(self, theta, lambdas, *a, **kw)
        gmax = g.abs().amax(dim=(0, 2))
        for bound in GRAD_BINS:  # fp32 passes evaluated where max|grad| > bound
            PASSES[f"fp32 at max|grad| > {bound:g}"] += int((gmax > bound).sum())
        return f, g

    Problem.loss_grad = counted
    if name != "fp32":
        warm_tol = float(name.split("@")[1])
        solver.lbfgs = two_phase_lbfgs(stock_lbfgs, warm_tol, args.warm_iter, args.finish_history)
    PASSES.clear()
    PASSES.update({"fp32": 0, "bf16": 0} | {f"fp32 at max|grad| > {b:g}": 0 for b in GRAD_BINS})
    try:
        yield
    finally:
        solver.lbfgs, Problem.loss_grad = stock_lbfgs, stock_loss_grad


# ---------------------------------------------------------------------------------------------
# 1. one product pass


def _median_rounds(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for r in range(rounds):
        names = list(fns)
        names = names[r % len(names) :] + names[: r % len(names)]  # rotate the order each round
        for name in names:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_pass(shape: str, rounds: int) -> dict:
    n, d1, ko = (int(v) for v in shape.lower().split("x"))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d1, generator=g)
    X[:, -1] = 1.0
    W = torch.randn(d1, ko, generator=g) * 0.02
    dz = torch.softmax(torch.randn(n, ko, generator=g), 1) / n
    Xb = X.to(BF16)
    XbT = Xb.T.contiguous()
    grad = torch.zeros(d1, ko)

    def fp32_fwd():
        return X @ W

    def fp32_bwd():
        return grad.zero_().addmm_(X.T, dz)

    def bf16_fwd():
        return (Xb @ W.to(BF16)).float()

    def bf16_bwd_view():
        return (Xb.T @ dz.to(BF16)).float()

    def bf16_bwd_copy():
        return (XbT @ dz.to(BF16)).float()

    def autocast_pass():
        with torch.autocast("cpu", dtype=BF16):
            (X @ W).float()
            (X.T @ dz).float()

    y = torch.randint(0, ko, (n,), generator=g)
    problem = Problem(X[:, :-1].contiguous(), y, ko, None, 0.0)
    twin = Bf16Problem(problem)
    theta = (torch.randn(d1, 1, ko, generator=g) * 0.02).contiguous()
    lam = torch.tensor([1e-3])
    fns = {
        "fp32 forward": fp32_fwd,
        "fp32 gradient (addmm_, X.T)": fp32_bwd,
        "bf16 forward (X cast once)": bf16_fwd,
        "bf16 gradient, X_bf16.T view": bf16_bwd_view,
        "bf16 gradient, transposed bf16 copy": bf16_bwd_copy,
        "autocast forward+gradient (X cast per pass)": autocast_pass,
        "Problem.loss_grad fp32": lambda: Problem.loss_grad(problem, theta, lam),
        "Problem.loss_grad bf16 twin": lambda: twin.loss_grad(theta, lam),
    }
    med = _median_rounds(fns, rounds)
    # agreement of the bf16 pass with fp32
    f32, g32 = Problem.loss_grad(problem, theta, lam)
    fb, gb = twin.loss_grad(theta, lam)
    fp32_pass = med["fp32 forward"] + med["fp32 gradient (addmm_, X.T)"]
    out = {
        "shape": [n, d1, ko],
        "rounds": rounds,
        "median_ms": {k: v * 1e3 for k, v in med.items()},
        "fp32 pass / bf16 pass (view)": fp32_pass
        / (med["bf16 forward (X cast once)"] + med["bf16 gradient, X_bf16.T view"]),
        "fp32 pass / bf16 pass (transposed copy)": fp32_pass
        / (med["bf16 forward (X cast once)"] + med["bf16 gradient, transposed bf16 copy"]),
        "fp32 pass / autocast pass": fp32_pass / med["autocast forward+gradient (X cast per pass)"],
        "loss_grad fp32 / bf16 twin": med["Problem.loss_grad fp32"]
        / med["Problem.loss_grad bf16 twin"],
        "bf16 twin: relative loss error": float(abs(fb - f32) / abs(f32)),
        "bf16 twin: max|grad error| / max|grad|": float((gb - g32).abs().max() / g32.abs().max()),
        "bf16 twin: grad cosine": float(
            torch.nn.functional.cosine_similarity(gb.flatten(), g32.flatten(), dim=0)
        ),
    }
    print(f"\none product pass, N x (D+1) x K*O = {n:,} x {d1:,} x {ko}, median of {rounds}")
    for name, ms in out["median_ms"].items():
        print(f"  {name:<46} {ms:9.1f} ms")
    for key, value in out.items():
        if isinstance(value, float):
            print(f"  {key:<46} {value:9.4g}")
    return out


# ---------------------------------------------------------------------------------------------
# 2. the whole torch-head protocol on the sweep matrix


def _run_protocol(cache: Path, out: Path) -> dict:
    from pipeline.config import HeadConfig
    from pipeline.heads import protocol

    cfg = HeadConfig(
        features=str(cache), head="torch", out=str(out), progress=False, bootstrap=0, force=True
    )
    return protocol.run(cfg)


def _cell_pass_ms(n: int, d: int, k: int, rounds: int = 5) -> dict[str, float]:
    """One data pass (one setting) at the sweep's shape of a cell, fp32 and bf16 twin, median ms."""
    g = torch.Generator().manual_seed(0)
    rows = n - n // 10  # the sweep's rows: train less the 10% holdout
    problem = Problem(torch.randn(rows, d, generator=g), torch.arange(rows) % k, k, None, 0.0)
    twin = Bf16Problem(problem)
    theta = torch.randn(d + 1, 1, problem.outputs, generator=g) * 0.02
    lam = torch.tensor([1e-3])
    med = _median_rounds(
        {
            "fp32": lambda: Problem.loss_grad(problem, theta, lam),
            "bf16": lambda: twin.loss_grad(theta, lam),
        },
        rounds,
    )
    return {key: 1e3 * value for key, value in med.items()}


def bench_sweep(args: argparse.Namespace) -> list[dict]:
    names = ["fp32"] + [f"bf16@{t:g}" for t in args.warm_tol]
    cells = [tuple(int(v) for v in c.lower().split("x")) for c in args.cells]
    for c in cells:
        matrix_cache(OUT, *c)  # written before anything is timed
    smallest = matrix_cache(OUT, 2_000, 512, 10)
    for name in names:  # warm-up on a small cache, untimed: threads, imports, first-call costs
        with variant(name, args):
            _run_protocol(smallest, OUT / "bf16-sweep-run" / name)
    rows = []
    for n, d, k in cells:
        cache = matrix_cache(OUT, n, d, k)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                folder = OUT / "bf16-sweep-run" / f"{n}-{d}-{k}-{name}"
                with variant(name, args):
                    result = _run_protocol(cache, folder)
                    passes = dict(PASSES)
                t = result["timings"]
                runs[name].append(
                    {
                        "seconds": t["sweep"] + t["refit"] + t["test"],
                        "passes": passes,
                        "result": result,
                        "pred": np.load(folder / "predictions.npz")["y_pred"],
                        "coef": np.load(folder / "head.npz")["coef"],
                    }
                )
        pass_ms = _cell_pass_ms(n, d, k)
        base = runs["fp32"][0]
        base_cost = base["passes"]["fp32"] * pass_ms["fp32"]
        base_s = statistics.median(x["seconds"] for x in runs["fp32"])
        for name in names:
            first = runs[name][0]
            res = first["result"]
            curve = [c["val_top1"] for c in res["curve"]]
            base_curve = [c["val_top1"] for c in base["result"]["curve"]]
            seconds = statistics.median(x["seconds"] for x in runs[name])
            rows.append(
                {
                    "cell": [n, d, k],
                    "variant": name,
                    "seconds": seconds,
                    "all_seconds": [x["seconds"] for x in runs[name]],
                    "speedup_vs_fp32": base_s / seconds,
                    "passes_fp32": first["passes"]["fp32"],
                    "passes_bf16": first["passes"]["bf16"],
                    "passes": first["passes"],
                    "pass_ms": pass_ms,
                    "pass_cost_speedup": base_cost
                    / (
                        first["passes"]["fp32"] * pass_ms["fp32"]
                        + first["passes"]["bf16"] * pass_ms["bf16"]
                    ),
                    "iterations": int(sum(c["n_iter"] for c in res["curve"])),
                    "not_converged": int(sum(not c["converged"] for c in res["curve"])),
                    "chosen_index": res["chosen"]["index"],
                    "chosen_C": res["chosen"]["C"],
                    "test_top1": res["test"]["top1"],
                    "same_chosen_C": res["chosen"]["index"] == base["result"]["chosen"]["index"],
                    "same_top1": res["test"]["top1"] == base["result"]["test"]["top1"],
                    "same_predictions": float(np.mean(first["pred"] == base["pred"])),
                    "coef_max_rel_diff": float(
                        np.abs(first["coef"] - base["coef"]).max()
                        / max(np.abs(base["coef"]).max(), 1e-30)
                    ),
                    "val_top1_max_change_along_grid": float(
                        np.max(np.abs(np.subtract(curve, base_curve)))
                    ),
                }
            )
            r = rows[-1]
            early = r["passes"]["fp32 at max|grad| > 0.001"]
            print(
                f"  {n:>6}x{d:<4}x{k:<3} {name:<10}{seconds:8.2f}{r['speedup_vs_fp32']:8.2f}"
                f"{r['passes_fp32']:>7}{r['passes_bf16']:>6}{early:>7}"
                f"{r['pass_cost_speedup']:>8.2f}{r['chosen_index']:>4} {r['chosen_C']:<9.3g}"
                f"{r['test_top1']:>8.2%} {r['same_chosen_C']!s:>5} {r['same_top1']!s:>5}"
                f"{r['same_predictions']:>7.4f}{r['val_top1_max_change_along_grid']:>7.4f}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=["pass", "sweep"], default=["pass", "sweep"])
    parser.add_argument("--pass-shape", default="40000x2049x100", help="N x (D+1) x K*O")
    parser.add_argument("--pass-rounds", type=int, default=7)
    parser.add_argument("--cells", nargs="+", default=CELLS, help="NxDxK, e.g. 2000x512x10")
    parser.add_argument("--repeats", type=int, default=1, help="protocol runs per cell and variant")
    parser.add_argument("--warm-tol", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--warm-iter", type=int, default=3, help="most bf16 iterations per call")
    parser.add_argument("--finish-history", choices=["warm", "path"], default="warm")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", default=str(OUT / "bf16_sweep.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    OUT.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "args": vars(args),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    if "pass" in args.only:
        report["pass"] = bench_pass(args.pass_shape, args.pass_rounds)
    if "sweep" in args.only:
        print(
            f"\nthe torch head's protocol, stock fp32 vs bf16 warm phase (warm-iter "
            f"{args.warm_iter}, finish history {args.finish_history}), {args.repeats} run(s) each"
        )
        print(
            f"  {'N x D x K':<15} {'variant':<10}{'wall s':>8}{'wall x':>8}{'fp32':>7}{'bf16':>6}"
            f"{'>1e-3':>7}{'cost x':>8}{'C#':>4} {'C':<9}{'top1':>8} {'sameC':>5} {'same1':>5}"
            f"{'pred=':>7}{'dval':>7}"
        )
        report["sweep"] = bench_sweep(args)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
