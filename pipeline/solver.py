"""Batched L2-regularised linear classifiers in torch: K regularisation settings trained together.

For setting k the objective is scikit-learn's, divided by C * sum(w):

    f_k(W, b) = sum_i w_i * loss(x_i W + b, y_i) / sum_i w_i  +  lambda_k / 2 * ||W||^2,
    lambda_k = 1 / (C_k * sum_i w_i)

with the multinomial cross-entropy for three or more classes and the binomial one (a single
output, like scikit-learn) for two; the intercept is not penalised. All K settings share one
augmented data matrix [X, 1], so one (N, D+1) @ (D+1, K*O) product evaluates every setting.

Solvers: `lbfgs` (full batch; a batched L-BFGS with a per-setting Armijo line search, stopping
each setting when max|grad| <= tol, exactly scikit-learn's criterion) and the mini-batch `adam`
and `sgd` (cosine schedule). The penalty is part of the gradient for every solver, so all of them
minimise the same objective and share one C scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SOLVERS = ("lbfgs", "adam", "sgd")
_CHUNK_BYTES = 256 << 20  # bound on the (rows, K*O) activations held at once


@dataclass
class Solution:
    """Per-setting weights (K, D, O), intercepts (K, O), and how the optimisation ended."""

    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray  # (K,) iterations (lbfgs) or epochs (mini-batch)
    converged: np.ndarray  # (K,) bool: max|grad| <= tol
    grad_max: np.ndarray  # (K,) max |grad| at the end
    loss: np.ndarray  # (K,) objective at the end


class Problem:
    """The data side of the objective: augmented X, targets, weights, penalties; loss and gradient."""

    def __init__(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        n_classes: int,
        sample_weight: torch.Tensor | None,
        label_smoothing: float,
    ) -> None:
        n, d = X.shape
        self.n, self.d = n, d
        self.outputs = 1 if n_classes == 2 else n_classes
        self.n_classes = n_classes
        self.Xa = torch.cat([X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)  # (N, D+1)
        self.y = y
        self.w = torch.ones(n, dtype=X.dtype, device=X.device) if sample_weight is None else sample_weight
        self.w_sum = float(self.w.sum())
        self.smoothing = label_smoothing

    def rows_per_chunk(self, k: int) -> int:
        return max(1, _CHUNK_BYTES // (4 * k * self.outputs + 1))

    def loss_grad(
        self, theta: torch.Tensor, lambdas: torch.Tensor, rows: torch.Tensor | None = None, scale: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (K,) and gradient (D+1, K, O) at theta (D+1, K, O), over `rows` (default: all)."""
        k, o = theta.shape[1], self.outputs
        flat = theta.reshape(self.d + 1, k * o)
        loss = torch.zeros(k, dtype=theta.dtype, device=theta.device)
        grad = torch.zeros_like(flat)
        index = torch.arange(self.n, device=theta.device) if rows is None else rows
        scale = 1.0 / self.w_sum if scale is None else scale
        step = self.rows_per_chunk(k)
        for start in range(0, len(index), step):
            chunk = index[start : start + step]
            xa = self.Xa[chunk] if rows is not None or step < self.n else self.Xa  # (B, D+1)
            z = (xa @ flat).view(-1, k, o)  # (B, K, O)
            yb, wb = self.y[chunk], self.w[chunk] * scale
            point_loss, dz = self._pointwise(z, yb)  # (B, K), (B, K, O)
            loss += wb @ point_loss
            dz *= wb[:, None, None]
            grad.addmm_(xa.T, dz.view(-1, k * o))  # (D+1, K*O)
        grad = grad.view(self.d + 1, k, o)
        W = theta[:-1]
        loss += 0.5 * lambdas * (W * W).sum(dim=(0, 2))
        grad[:-1] += lambdas[None, :, None] * W
        return loss, grad

    def _pointwise(self, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss (B, K) and its derivative in the logits (B, K, O)."""
        eps = self.smoothing
        if self.outputs == 1:  # binomial: t in [0, 1], loss = softplus(z) - t z
            t = (y.to(z.dtype) * (1 - eps) + eps / 2)[:, None, None]
            loss = torch.nn.functional.softplus(z) - t * z
            return loss[..., 0], torch.sigmoid(z) - t
        log_p = torch.log_softmax(z, dim=2)
        picked = log_p.gather(2, y[:, None, None].expand(-1, z.shape[1], 1))[..., 0]  # (B, K)
        loss = -(1 - eps) * picked - (eps / self.n_classes) * log_p.sum(dim=2)
        dz = log_p.exp_()
        dz.scatter_add_(2, y[:, None, None].expand(-1, z.shape[1], 1), torch.full_like(dz[..., :1], -(1 - eps)))
        if eps:
            dz -= eps / self.n_classes
        return loss, dz


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(0, 2))  # (D+1, K, O) x2 -> (K,)


def lbfgs(
    problem: Problem,
    lambdas: torch.Tensor,
    theta: torch.Tensor,
    max_iter: int,
    tol: float,
    memory: int = 10,
    on_done: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched L-BFGS; each setting stops on its own (max|grad| <= tol), its columns leave the batch."""
    k_all = theta.shape[1]
    n_iter = np.zeros(k_all, dtype=np.int64)
    grad_max = np.zeros(k_all)
    final_loss = np.zeros(k_all)
    converged = np.zeros(k_all, dtype=bool)
    active = torch.arange(k_all, device=theta.device)
    x = theta.clone()
    f, g = problem.loss_grad(x, lambdas)
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    R: list[torch.Tensor] = []
    it = 0
    stalled = torch.zeros(k_all, dtype=torch.bool, device=theta.device)  # line search found no step
    while True:
        gmax = g.abs().amax(dim=(0, 2))
        done = (gmax <= tol) | (it >= max_iter) | stalled
        if done.any():
            idx = done.nonzero()[:, 0]
            cols = active[idx].cpu().numpy()
            theta[:, active[idx]] = x[:, idx]
            n_iter[cols] = it
            grad_max[cols] = gmax[idx].cpu().numpy()
            final_loss[cols] = f[idx].cpu().numpy()
            converged[cols] = (gmax[idx] <= tol).cpu().numpy()
            if on_done is not None:
                on_done(len(cols))
            keep = (~done).nonzero()[:, 0]
            if len(keep) == 0:
                return theta, n_iter, converged, grad_max, final_loss
            active, x, f, g, lambdas = active[keep], x[:, keep], f[keep], g[:, keep], lambdas[keep]
            S, Y, R = [s[:, keep] for s in S], [y[:, keep] for y in Y], [r[keep] for r in R]
        # Two-loop recursion, per setting.
        q = g.clone()
        alphas = []
        for s, y, rho in zip(reversed(S), reversed(Y), reversed(R), strict=True):
            a = rho * _dot(s, q)
            q -= a[None, :, None] * y
            alphas.append(a)
        if S:
            sy, yy = _dot(S[-1], Y[-1]), _dot(Y[-1], Y[-1])
            gamma = torch.where(yy > 0, sy / yy.clamp_min(1e-30), torch.ones_like(sy))
            q *= gamma[None, :, None]
        for s, y, rho, a in zip(S, Y, R, reversed(alphas), strict=True):
            b = rho * _dot(y, q)
            q += (a - b)[None, :, None] * s
        d = -q
        slope = _dot(g, d)
        bad = slope >= 0  # not a descent direction: restart from steepest descent
        if bad.any():
            d[:, bad] = -g[:, bad]
            slope = _dot(g, d)
        t = torch.ones_like(f)
        if not S:
            t = torch.clamp(1.0 / g.abs().sum(dim=(0, 2)), max=1.0)
        # Armijo backtracking, each setting with its own step.
        x_new, f_new, g_new = x + t[None, :, None] * d, None, None
        pending = torch.ones_like(f, dtype=torch.bool)
        f_new = f.clone()
        g_new = g.clone()
        # Near the optimum a float32 loss stops resolving the decrease; then a step that keeps the
        # loss within rounding noise and shrinks the gradient is progress too.
        noise = 16 * torch.finfo(f.dtype).eps * torch.clamp(f.abs(), min=1.0)
        for _ in range(30):
            idx = pending.nonzero()[:, 0]
            fi, gi = problem.loss_grad(x_new[:, idx], lambdas[idx])
            f_new[idx], g_new[:, idx] = fi, gi
            armijo = fi <= f[idx] + 1e-4 * t[idx] * slope[idx]
            flat = ((fi - f[idx]).abs() <= noise[idx]) & (gi.abs().amax(dim=(0, 2)) < gmax[idx])
            ok = armijo | flat
            pending[idx[ok]] = False
            if not pending.any():
                break
            t[pending] *= 0.5
            x_new[:, pending] = x[:, pending] + t[pending][None, :, None] * d[:, pending]
        stalled = pending  # no acceptable step: as far as this precision goes
        s, y = x_new - x, g_new - g
        sy = _dot(s, y)
        rho = torch.where(sy > 1e-10, 1.0 / sy.clamp_min(1e-10), torch.zeros_like(sy))
        S.append(s)
        Y.append(y)
        R.append(rho)
        if len(S) > memory:
            S.pop(0)
            Y.pop(0)
            R.pop(0)
        x, f, g = x_new, f_new, g_new
        it += 1


def minibatch(
    problem: Problem,
    lambdas: torch.Tensor,
    theta: torch.Tensor,
    method: str,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    balanced_sampler: bool,
    on_epoch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Adam or SGD (momentum 0.9) with a cosine schedule over `epochs`, all settings at once."""
    param = theta.clone().requires_grad_(False)
    param.grad = torch.zeros_like(param)
    opt = (
        torch.optim.Adam([param], lr=lr)
        if method == "adam"
        else torch.optim.SGD([param], lr=lr, momentum=0.9, nesterov=True)
    )
    steps = epochs * math.ceil(problem.n / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    y_cpu = problem.y.cpu()
    if balanced_sampler:  # every class equally likely, whatever its size
        counts = torch.bincount(y_cpu, minlength=problem.n_classes).to(torch.float64)
        draw_p = (1.0 / counts)[y_cpu]
        draw_p /= draw_p.sum()
    for epoch in range(epochs):
        if balanced_sampler:
            order = torch.multinomial(draw_p, problem.n, replacement=True, generator=gen)
        else:
            order = torch.randperm(problem.n, generator=gen)
        order = order.to(problem.Xa.device)
        for start in range(0, problem.n, batch_size):
            rows = order[start : start + batch_size]
            # An unbiased estimate of the full-data gradient: rescale the batch to the whole sum.
            scale = len(order) / (len(rows) * problem.w_sum)
            _, grad = problem.loss_grad(param, lambdas, rows=rows, scale=scale)
            param.grad.copy_(grad)
            opt.step()
            schedule.step()
        if on_epoch is not None:
            on_epoch(epoch)
    return param.detach()


def solve(
    X: np.ndarray | torch.Tensor,
    y: np.ndarray,
    Cs: np.ndarray,
    *,
    n_classes: int,
    sample_weight: np.ndarray | None = None,
    label_smoothing: float = 0.0,
    method: str = "lbfgs",
    max_iter: int = 1000,
    tol: float = 1e-4,
    epochs: int = 30,
    batch_size: int = 512,
    lr: float | None = None,
    seed: int = 0,
    balanced_sampler: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Solution:
    """Fit one linear classifier per value in `Cs` on the same data, together."""
    X_t = X.to(device=device, dtype=dtype) if torch.is_tensor(X) else torch.tensor(X, dtype=dtype, device=device)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long, device=device)
    sw = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=dtype, device=device)
    problem = Problem(X_t, y_t, n_classes, sw, label_smoothing)
    Cs = np.asarray(Cs, dtype=np.float64)
    lambdas = torch.as_tensor(1.0 / (Cs * problem.w_sum), dtype=dtype, device=device)
    k, o = len(Cs), problem.outputs
    theta = torch.zeros(problem.d + 1, k, o, dtype=dtype, device=device)
    if init is not None:  # warm start: (K or 1, D, O) weights, (K or 1, O) intercepts
        coef, intercept = (torch.as_tensor(a, dtype=dtype, device=device) for a in init)
        theta[:-1] = coef.permute(1, 0, 2)
        theta[-1] = intercept
    if method == "lbfgs":
        theta, n_iter, converged, grad_max, loss = lbfgs(problem, lambdas, theta, max_iter, tol, on_done=progress)
    elif method in ("adam", "sgd"):
        lr = lr if lr is not None else (1e-3 if method == "adam" else 0.1)
        theta = minibatch(problem, lambdas, theta, method, epochs, batch_size, lr, seed, balanced_sampler)
        loss_t, grad = problem.loss_grad(theta, lambdas)
        grad_max = grad.abs().amax(dim=(0, 2)).cpu().numpy()
        loss, n_iter, converged = loss_t.cpu().numpy(), np.full(k, epochs), grad_max <= tol
        if progress is not None:
            progress(k)
    else:
        raise ValueError(f"unknown solver {method!r}; choose one of: {', '.join(SOLVERS)}")
    coef = theta[:-1].permute(1, 0, 2).cpu().numpy()  # (K, D, O)
    intercept = theta[-1].cpu().numpy()  # (K, O)
    return Solution(coef, intercept, n_iter, converged, grad_max, loss)
