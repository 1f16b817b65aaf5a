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

Solvers: `lbfgs` (full batch; the batched L-BFGS of `pipeline.heads.lbfgs`, with a line search
and a stopping rule per setting), run along the regularisation path in blocks of settings with
warm starts (see `path`), and the mini-batch `adam` and `sgd` (cosine schedule, all
settings at once). The penalty is part of the gradient for every solver, so all of them minimise
the same objective and share one C scale.

What keeps the path short, besides the line search (`pipeline.heads.lbfgs`): the intercept starts
at the class log-priors (its optimum at W = 0), and each C starts from a secant prediction along
the path with the previous solution's curvature pairs (see `path`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from pipeline.heads import minibatch
from pipeline.heads.lbfgs import Curvature, lbfgs
from pipeline.heads.objective import Problem, Solution
from pipeline.heads.options import DEFAULTS, SolverOptions, penalties


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
