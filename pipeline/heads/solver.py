"""Batched L2-regularised linear classifiers in torch: K regularisation settings trained together.

For setting k the objective is scikit-learn's, divided by C * sum(w):

    f_k(W, b) = sum_i w_i * loss(x_i W + b, y_i) / sum_i w_i  +  lambda_k / 2 * ||W||^2,
    lambda_k = 1 / (C_k * sum_i w_i)

with the multinomial cross-entropy for three or more classes and the binomial one (a single
output, like scikit-learn) for two; the intercept is not penalised. All K settings share one
augmented data matrix [X, 1], so one (N, D+1) @ (D+1, K*O) product evaluates every setting.

The stopping rule is on this mean scale: max |grad f_k| <= tol. That is scikit-learn's rule too:
since 1.2 its lbfgs divides C * sum(w * loss) + ||W||^2 / 2 by C * sum(w) and hands `tol` to
scipy's L-BFGS-B as `gtol` (max |projected gradient|); on the undivided scale the same stop is a
gradient of tol * C * sum(w).

Solvers: `lbfgs` (full batch; the batched L-BFGS run of the function `lbfgs`, with a line search
and a stopping rule per setting), run along the regularisation path in blocks of settings with
warm starts (see `path`), and the mini-batch `adam` and `sgd` (cosine schedule, all settings at
once). The penalty is part of the gradient for every solver, so all of them minimise the same
objective and share one C scale.

What keeps the path short, besides the line search: the intercept starts at the class log-priors
(its optimum at W = 0), and each C starts from a secant prediction along the path with the
previous solution's curvature pairs (see `path`).

One batched L-BFGS run (`lbfgs`): K settings minimised together, each with its own line search
and stopping rule, each leaving the batch when done; its pair history and end state are the warm
start the path carries to the next setting. Where float32 logits limit what the loss resolves, the
line search is built around it: the loss is summed in float64; a step whose decrease is below
rounding is accepted on the approximate Wolfe conditions (Hager & Zhang 2005), and one that is too
short (loss within rounding, slope still steep) is lengthened rather than halved; steps are judged
only against a loss computed in a product of the same width; the initial inverse Hessian has one
scale for the penalised weights and one for the intercept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.heads import minibatch
from pipeline.heads.objective import Problem, Solution
from pipeline.heads.options import DEFAULTS, SolverOptions, penalties

PATIENCE = 50  # iterations without a smaller max|grad| or a lower f before a setting is stalled
# L-BFGS pairs kept. scipy's (and so scikit-learn's) default is 10; measured along the 45-value path
# at
# tol 1e-6 (`python -m benchmarks.solver`), 40 needs 14-36% fewer data passes than 10 (50k x 2048 x
# 100:
# 341 -> 289; 15k x 512 x 10: 1286 -> 827), and 80-160 little more, at a growing cost per iteration.
MEMORY = 40


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(0, 2))  # (D+1, K, O) x2 -> (K,)


@dataclass
class Curvature:
    """Where one setting ended: point, data-loss value and gradient (penalty excluded), L-BFGS
    pairs."""

    x: torch.Tensor  # (D+1, 1, O)
    f_data: torch.Tensor  # (1,)
    g_data: torch.Tensor  # (D+1, 1, O)
    S: list[torch.Tensor]
    Y: list[torch.Tensor]  # gradient differences of the data loss only
    lam: float


def lbfgs(
    problem: Problem,
    lambdas: torch.Tensor,
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
    memory: int = MEMORY,
    on_done: Callable[[int], None] | None = None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    history: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    track: int | None = None,
    start_width: int | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray, Curvature | None]:
    """Batched L-BFGS; each setting stops on its own (max|grad| <= tol), its columns leave the
    batch.

    `start` is the objective and gradient at `theta` when already known (a warm start costs no data
    pass then), computed with `start_width` settings in one product; `history` seeds the curvature
    pairs; `track` names the setting whose end state is returned for the next warm start.

    A step is refused only on objectives computed with the same number of settings in one product:
    BLAS kernels of different widths round float32 logits differently, by ~1e-9 in f, more than the
    last decreases before a tight tolerance. Where a trial point fails against an f computed at
    another width (settings left the block, or the line search went on with the pending subset), f
    at x is recomputed at the trial's width and the test repeated, before the step is changed.
    """
    k_all = theta.shape[1]
    n_iter = np.zeros(k_all, dtype=np.int64)
    grad_max = np.zeros(k_all)
    final_loss = np.zeros(k_all)
    converged = np.zeros(k_all, dtype=bool)
    active = torch.arange(k_all, device=theta.device)
    x = theta.clone()
    f, g = start if start is not None else problem.loss_grad(x, lambdas)
    # per setting, how many settings shared the product that gave its f and g (0: not known)
    width = torch.full(
        (k_all,), k_all if start is None else (start_width or 0), device=theta.device
    )
    S: list[torch.Tensor] = list(history[0]) if history else []
    Y: list[torch.Tensor] = list(history[1]) if history else []
    R: list[torch.Tensor] = [_inverse_curvature(s, y) for s, y in zip(S, Y, strict=True)]
    tracked = None
    it = 0
    stalled = torch.zeros(k_all, dtype=torch.bool, device=theta.device)  # line search found no step
    # At the precision floor of float32 logits (large weights, unstandardised features) the gradient
    # stops shrinking while steps are still accepted within rounding of f: a setting whose max|grad|
    # has not improved and whose f has not fallen by more than rounding in PATIENCE iterations is
    # stalled too, instead of running to max_iter. (max|grad| alone is no measure of progress: on an
    # ill-conditioned fit it can stay above its best for 50 iterations while f keeps falling.)
    best = torch.full((k_all,), math.inf, dtype=torch.float64, device=theta.device)
    f_ref = torch.full((k_all,), math.inf, dtype=torch.float64, device=theta.device)
    since = torch.zeros(k_all, dtype=torch.long, device=theta.device)
    while True:
        gmax = g.abs().amax(dim=(0, 2))
        fell = f < f_ref - torch.finfo(x.dtype).eps * f.abs()
        f_ref = torch.where(fell, f, f_ref)
        improved = (gmax < best) | fell
        best = torch.minimum(gmax.double(), best)
        since = torch.where(improved, torch.zeros_like(since), since + 1)
        done = (gmax <= tol) | (it >= max_iter) | stalled | (since >= PATIENCE)
        if done.any():
            idx = done.nonzero()[:, 0]
            cols = active[idx].cpu().numpy()
            theta[:, active[idx]] = x[:, idx]
            n_iter[cols] = it
            grad_max[cols] = gmax[idx].cpu().numpy()
            final_loss[cols] = f[idx].cpu().numpy()
            converged[cols] = (gmax[idx] <= tol).cpu().numpy()
            if track is not None and track in cols:
                j = idx[list(cols).index(track)]
                lam = lambdas[j]
                W = x[:-1, j : j + 1]
                g_data = g[:, j : j + 1].clone()
                g_data[:-1] -= lam * W
                tracked = Curvature(
                    x=x[:, j : j + 1].clone(),
                    f_data=f[j : j + 1] - 0.5 * lam * (W * W).sum(),
                    g_data=g_data,
                    S=[s_[:, j : j + 1] for s_ in S],
                    Y=[
                        _without_penalty(y_, s_[:, j : j + 1], lam)
                        for s_, y_ in zip(S, [y[:, j : j + 1] for y in Y], strict=True)
                    ],
                    lam=float(lam),
                )
            if on_done is not None:
                on_done(len(cols))
            keep = (~done).nonzero()[:, 0]
            if len(keep) == 0:
                return theta, n_iter, converged, grad_max, final_loss, tracked
            active, x, f, g, lambdas = active[keep], x[:, keep], f[keep], g[:, keep], lambdas[keep]
            best, f_ref, since, stalled, width = (
                best[keep],
                f_ref[keep],
                since[keep],
                stalled[keep],
                width[keep],
            )
            S, Y, R = [s[:, keep] for s in S], [y[:, keep] for y in Y], [r[keep] for r in R]
        # Two-loop recursion, per setting.
        q = g.clone()
        alphas = []
        for s, y, rho in zip(reversed(S), reversed(Y), reversed(R), strict=True):
            a = rho * _dot(s, q)
            q -= a[None, :, None] * y
            alphas.append(a)
        # H0: one scale for the penalised weights, one for the intercept (their curvatures differ
        if S:
            # by the penalty, a factor of 100-1000 at strong regularisation); where the last step
            # did not
            # move a part (the intercept at its log-prior start), that part takes the whole vector's
            # scale
            sy, yy = _dot(S[-1], Y[-1]), _dot(Y[-1], Y[-1])
            whole = torch.where((yy > 0) & (sy > 0), sy / yy.clamp_min(1e-30), torch.ones_like(sy))
            for part in (slice(None, -1), slice(-1, None)):
                s_, y_ = S[-1][part], Y[-1][part]
                sy, yy = _dot(s_, y_), _dot(y_, y_)
                gamma = torch.where((yy > 0) & (sy > 0), sy / yy.clamp_min(1e-30), whole)
                q[part] *= gamma[None, :, None]
        for s, y, rho, a in zip(S, Y, R, reversed(alphas), strict=True):
            b = rho * _dot(y, q)
            q += (a - b)[None, :, None] * s
        d = -q
        slope = _dot(g, d)
        bad = slope >= 0  # not a descent direction: restart from steepest descent
        if bad.any():
            d[:, bad] = -g[:, bad]
            slope = _dot(g, d)
        t = torch.ones_like(slope)
        if not S:
            t = torch.clamp(1.0 / g.abs().sum(dim=(0, 2)), max=1.0)
        # Armijo backtracking, each setting with its own step.
        x_new = x + t[None, :, None] * d
        pending = torch.ones_like(f, dtype=torch.bool)
        f_new, g_new, width_new = f.clone(), g.clone(), width.clone()
        # Near the optimum the loss of float32 logits stops resolving the decrease; then a step is
        # accepted on the approximate Wolfe conditions (Hager & Zhang 2005): the loss within
        # rounding
        # noise of f, and the slope along d at the new point between 0.9 and -0.8 times the slope at
        # x
        # (the step lands near the minimum along the line). A step refused while f is within
        # rounding
        # and the slope is still steep is too short, not too long: it is lengthened (x10 until a
        # step
        # is too long, then bisected between the two), where halving would shrink it to nothing (a
        # cold start on features scaled ~1e-4 used to halve to a vanished step, taken as a
        # decrease).
        noise = _rounding(f, x.dtype)
        short_t = torch.zeros_like(t)  # longest step found too short, shortest found too long
        long_t = torch.full_like(t, math.inf)
        for _ in range(30):
            idx = pending.nonzero()[:, 0]
            fi, gi = problem.loss_grad(x_new[:, idx], lambdas[idx])
            f_new[idx], g_new[:, idx], width_new[idx] = fi, gi, len(idx)
            slope_i = _dot(gi, d[:, idx])
            curve = (slope_i >= 0.9 * slope[idx]) & (slope_i <= -0.8 * slope[idx])
            ok = _acceptable(fi, f[idx], t[idx] * slope[idx], noise[idx], curve)
            if (~ok & (width[idx] != len(idx))).any():  # refused against an f of another width
                f[idx], g[:, idx] = problem.loss_grad(x[:, idx], lambdas[idx])
                width[idx] = len(idx)
                ok = _acceptable(fi, f[idx], t[idx] * slope[idx], noise[idx], curve)
            pending[idx[ok]] = False
            if not pending.any():
                break
            short = (fi - f[idx] <= noise[idx]) & (slope_i < 0.9 * slope[idx])
            short_t[idx[~ok & short]] = t[idx[~ok & short]]
            long_t[idx[~ok & ~short]] = t[idx[~ok & ~short]]
            t = torch.where(long_t.isinf(), 10 * short_t, (short_t + long_t) / 2)
            x_new[:, pending] = x[:, pending] + t[pending][None, :, None] * d[:, pending]
        stalled = pending  # no acceptable step: as far as this precision goes
        s, y = x_new - x, g_new - g
        S.append(s)
        Y.append(y)
        R.append(_inverse_curvature(s, y))
        if len(S) > memory:
            S.pop(0)
            Y.pop(0)
            R.pop(0)
        x, f, g, width = x_new, f_new, g_new, width_new
        it += 1


def _acceptable(
    f_new: torch.Tensor,
    f: torch.Tensor,
    decrease: torch.Tensor,
    noise: torch.Tensor,
    curve: torch.Tensor,
) -> torch.Tensor:
    """Armijo (sufficient decrease), or the approximate Wolfe conditions: f within rounding and
    `curve`. The decrease is compared as a difference: f + 1e-4 t slope rounds back to f for a
    vanishing step."""
    return (f_new - f <= 1e-4 * decrease) | ((f_new - f <= noise) & curve)


def _rounding(f: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """How far f can move by rounding of the logits alone: 16 ulp of the data type, relative
    (absolute below 1)."""
    return 16 * torch.finfo(dtype).eps * torch.clamp(f.abs(), min=1.0)


def _inverse_curvature(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 / (s.y) per setting; 0 (the pair is ignored) where the curvature condition fails."""
    sy = _dot(s, y)
    return torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))


def _without_penalty(y: torch.Tensor, s: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    out = y.clone()
    out[:-1] -= lam * s[:-1]
    return out


def _with_penalty(y: torch.Tensor, s: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    out = y.expand(-1, len(lambdas), -1).clone()
    out[:-1] += lambdas[None, :, None] * s[:-1]
    return out


def path(
    problem: Problem,
    lambdas: torch.Tensor,
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
    block: int,
    on_done: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The regularisation path, strongest penalty first, `block` settings trained together.

    Each block starts from the previous block's last solution with that solution's L-BFGS pairs.
    Where the last two solutions differ, the start is the secant prediction along the path, x_prev +
    (x_prev - x_before) * (log lambda - log lambda_prev) / (log lambda_prev - log lambda_before),
    when its objective (one data pass) is lower than the plain warm start's; it halves the
    iterations at tight tolerances. Otherwise the data loss and its gradient at the warm start are
    known, so the start costs no data pass: a setting whose gradient ``g_data + lambda * W`` is
    already within `tol` is done without touching the data, which is what happens along the flat,
    weakly regularised end of the grid. Such a setting keeps the previous solution's weights; it is
    reported as `copied` (warm start only).
    """
    k_all = theta.shape[1]
    order = torch.argsort(lambdas, descending=True)  # strong -> weak regularisation
    n_iter, converged, copied = (
        np.zeros(k_all, dtype=np.int64),
        np.zeros(k_all, dtype=bool),
        np.zeros(k_all, bool),
    )
    grad_max, final_loss = np.zeros(k_all), np.zeros(k_all)
    x0 = theta[:, order[:1]].clone()
    f_data, g_data = problem.loss_grad(x0, torch.zeros(1, dtype=theta.dtype, device=theta.device))
    previous = Curvature(x0, f_data, g_data, [], [], 0.0)
    before: Curvature | None = None  # the solution before `previous`, for the secant predictor
    moved = False
    for start in range(0, k_all, block):
        cols = order[start : start + block]
        lam = lambdas[cols]
        W = previous.x[:-1]
        f0 = previous.f_data + 0.5 * lam * (W * W).sum()
        g0 = previous.g_data.expand(-1, len(cols), -1).clone()
        g0[:-1] += lam[None, :, None] * W
        S = [s.expand(-1, len(cols), -1) for s in previous.S]
        Y = [_with_penalty(y, s, lam) for s, y in zip(previous.S, previous.Y, strict=True)]
        x = previous.x.expand(-1, len(cols), -1).clone()
        predicted = torch.zeros(len(cols), dtype=torch.bool, device=x.device)
        if (
            before is not None and before.lam > 0 and moved
        ):  # secant step along the path in log(lambda)
            step = (torch.log(lam) - math.log(previous.lam)) / (
                math.log(previous.lam) - math.log(before.lam)
            )
            x_pred = previous.x + step[None, :, None] * (previous.x - before.x)
            f_p, g_p = problem.loss_grad(x_pred, lam)
            predicted = f_p < f0  # else the plain warm start
            x[:, predicted], f0[predicted], g0[:, predicted] = (
                x_pred[:, predicted],
                f_p[predicted],
                g_p[:, predicted],
            )
        x, it, conv, gmax, loss, tracked = lbfgs(
            problem,
            lam,
            x,
            max_iter,
            tol,
            on_done=on_done,
            start=(f0, g0),
            history=(S, Y),
            track=len(cols) - 1,
            start_width=1
            if block == 1
            else None,  # one setting at a time: every value came from width 1
        )
        theta[:, cols] = x
        index = cols.cpu().numpy()
        n_iter[index], converged[index], grad_max[index], final_loss[index] = it, conv, gmax, loss
        copied[index] = (
            (it == 0) & (start > 0) & ~predicted.cpu().numpy()
        )  # the previous weights, unchanged
        moved = bool(it[-1] > 0 or predicted[-1])
        before, previous = previous, tracked
    return theta, n_iter, converged, grad_max, final_loss, copied


def default_block(settings: int, device: str) -> int:
    """Settings trained together along the path: all on a GPU, where many cost about as much as one;
    one on a CPU. Measured here with the secant start (N in 2k-15k, D in 512-2048, K in 10-100, tol
    1e-4 and 1e-6): blocks of 3 or 6 settings were 0.9-1.6x the time of one at a time, never faster
    by more than 10%, since each setting in a block starts further from its solution."""
    return settings if device == "cuda" else 1


def _prior_logits(problem: Problem) -> torch.Tensor:
    """The intercept minimising the loss at W = 0: log class frequencies (weighted, smoothed as the
    targets are), centred; for two classes the log-odds of the second."""
    counts = torch.zeros(problem.n_classes, dtype=torch.float64, device=problem.y.device)
    counts.index_add_(0, problem.y, problem.w.double())
    p = counts / counts.sum() * (1 - problem.smoothing) + problem.smoothing / problem.n_classes
    p = p.clamp_min(1e-12)  # a class absent from these rows: a large negative logit, not -inf
    if problem.outputs == 1:
        return torch.log(p[1:] / p[0]).to(problem.Xa.dtype)
    return (torch.log(p) - torch.log(p).mean()).to(problem.Xa.dtype)


def solve(
    X: np.ndarray | torch.Tensor,
    y: np.ndarray,
    Cs: np.ndarray | list[float],
    *,
    n_classes: int,
    options: SolverOptions = DEFAULTS,
    sample_weight: np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
    block: int | None = None,
) -> Solution:
    """Fit one linear classifier per value in `Cs` on the same rows in memory.

    L-BFGS walks the C values from the strongest penalty to the weakest in blocks of `block`
    settings trained together (default: all at once), each block warm-started from the previous
    block's last solution and curvature. `block=1` is the sequential warm-started path. The
    mini-batch solvers train every setting at once (`pipeline.heads.minibatch`).
    """
    if sample_weight is not None:
        w = np.asarray(sample_weight, dtype=np.float64)
        if w.shape != (len(y),) or not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError(
                f"sample_weight: expected {len(y)} finite non-negative weights, not all zero; got "
                f"shape {w.shape}, "
                f"sum {w.sum() if w.size else 0.0:g}"
            )
    device = options.device
    X_t = (
        X.to(device=device, dtype=dtype)
        if torch.is_tensor(X)
        else torch.tensor(X, dtype=dtype, device=device)
    )
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
    sw = (
        None
        if sample_weight is None
        else torch.as_tensor(sample_weight, dtype=dtype, device=device)
    )
    problem = Problem(X_t, y_t, n_classes, sw, options.label_smoothing)
    lambdas = torch.as_tensor(penalties(Cs, problem.w_sum), dtype=dtype, device=device)
    k, o = len(Cs), problem.outputs
    theta = torch.zeros(problem.d + 1, k, o, dtype=dtype, device=device)
    if init is not None:  # warm start: (K or 1, D, O) weights, (K or 1, O) intercepts
        coef, intercept = (torch.as_tensor(a, dtype=dtype, device=device) for a in init)
        theta[:-1] = coef.permute(1, 0, 2)
        theta[-1] = intercept
    else:  # W = 0 with the intercept that is optimal there: the (weighted) class log-priors
        theta[-1] = _prior_logits(problem)
    if options.solver == "lbfgs":
        block = k if block is None else max(1, min(block, k))
        theta, n_iter, converged, grad_max, loss, copied = path(
            problem, lambdas, theta, options.max_iter, options.tol, block, progress
        )
        return Solution.of(theta, n_iter, converged, grad_max, loss, copied)
    batches = minibatch.memory_batches(
        problem, options.batch_size, options.seed, options.balanced_sampler
    )
    steps = options.epochs * math.ceil(problem.n / options.batch_size)
    theta = minibatch.train(batches, theta, lambdas, options, problem.n, problem.w_sum, steps)
    solution = minibatch.measured(theta, [problem], lambdas, problem.w_sum, options)
    if progress is not None:
        progress(k)
    return solution
