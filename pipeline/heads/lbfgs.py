"""One batched L-BFGS run: K regularisation settings minimised together, each with its own line
search and stopping rule (max |grad f_k| <= tol), each leaving the batch when done; the pair history
and end state a warm start along the path (`pipeline.heads.solver.path`) carries to the next
setting.

Where float32 logits limit what the loss resolves, the line search is built around it: the loss is
summed in float64; a step whose decrease is below rounding is accepted on the approximate Wolfe
conditions (Hager & Zhang 2005), and one that is too short (loss within rounding, slope still steep)
is lengthened rather than halved; steps are judged only against a loss computed in a product of the
same width; the initial inverse Hessian has one scale for the penalised weights and one for the
intercept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.heads.objective import Problem

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
