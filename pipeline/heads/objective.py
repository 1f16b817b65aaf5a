"""The objective every torch fitter minimises, for K regularisation settings at once:

    f_k(W, b) = sum_i w_i * loss(x_i W + b, y_i) / sum_i w_i  +  lambda_k / 2 * ||W||^2,
    lambda_k = 1 / (C_k * sum_i w_i)

with the multinomial cross-entropy for three or more classes and the binomial one (a single
output, like scikit-learn) for two; the intercept is not penalised. `Problem` holds rows in memory
(all of them, or one block of the file) and gives the loss and gradient; `Solution` is what a
fitter returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

_CHUNK_BYTES = 256 << 20  # bound on the (rows, K*O) activations held at once
_NARROW = (
    64  # logit columns up to which the gradient is formed as (dz^T X)^T (measured: 4-5x at 10)
)


@dataclass
class Solution:
    """Per-setting weights (K, D, O), intercepts (K, O), and how the optimisation ended."""

    coef: np.ndarray
    intercept: np.ndarray
    n_iter: np.ndarray  # (K,) iterations (lbfgs) or epochs (mini-batch)
    converged: np.ndarray  # (K,) bool: max|grad| <= tol
    grad_max: np.ndarray  # (K,) max |grad| at the end
    loss: np.ndarray  # (K,) objective at the end
    copied: np.ndarray  # (K,) bool: no step from the previous setting's solution (warm start only)

    @classmethod
    def of(
        cls, theta: torch.Tensor, n_iter: Any, converged: Any, grad_max: Any, loss: Any, copied: Any
    ) -> Solution:
        """From the augmented (D+1, K, O) parameters and per-setting arrays."""
        coef = theta[:-1].permute(1, 0, 2).cpu().numpy()  # (K, D, O)
        intercept = theta[-1].cpu().numpy()  # (K, O)
        as_np = lambda a: a.cpu().numpy() if torch.is_tensor(a) else np.asarray(a)  # noqa: E731
        return cls(
            coef,
            intercept,
            as_np(n_iter),
            as_np(converged),
            as_np(grad_max),
            as_np(loss),
            as_np(copied),
        )


class Problem:
    """The data side of the objective: augmented X, targets, weights, penalties; loss and
    gradient."""

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
        self.Xa = torch.cat(
            [X, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1
        )  # (N, D+1)
        self.y = y
        self.w = (
            torch.ones(n, dtype=X.dtype, device=X.device)
            if sample_weight is None
            else sample_weight
        )
        self.w_sum = float(self.w.sum())
        self.smoothing = label_smoothing

    def rows_per_chunk(self, k: int) -> int:
        return max(1, _CHUNK_BYTES // (4 * k * self.outputs + 1))

    def loss_grad(
        self,
        theta: torch.Tensor,
        lambdas: torch.Tensor,
        rows: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (K,) and gradient (D+1, K, O) at theta (D+1, K, O), over `rows` (default:
        all)."""
        k, o = theta.shape[1], self.outputs
        flat = theta.reshape(self.d + 1, k * o)
        loss = torch.zeros(
            k, dtype=torch.float64, device=theta.device
        )  # sums resolve what float32 cannot
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
            loss += wb.double() @ point_loss.double()
            dz *= wb[:, None, None]
            dz = dz.view(-1, k * o)
            if k * o <= _NARROW:  # (dz^T X)^T: a narrow X^T dz is several times slower in BLAS
                grad += (dz.T @ xa).T
            else:
                grad.addmm_(xa.T, dz)  # (D+1, K*O)
        grad = grad.view(self.d + 1, k, o)
        W = theta[:-1]
        loss += 0.5 * lambdas.double() * (W.double() ** 2).sum(dim=(0, 2))
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
        dz.scatter_add_(
            2, y[:, None, None].expand(-1, z.shape[1], 1), torch.full_like(dz[..., :1], -(1 - eps))
        )
        if eps:
            dz -= eps / self.n_classes
        return loss, dz
