"""The mini-batch optimiser, once: Adam or SGD (Nesterov momentum 0.9) with a cosine schedule, all K
settings at once, taking its batches from memory (`memory_batches`) or from the cache file
(`pipeline.heads.stream`); and `measured`, the full-data gradient after the last epoch that says
whether each setting converged (max |gradient| <= tol), so convergence is measured, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from pipeline.heads.objective import Problem, Solution
from pipeline.heads.options import SolverOptions

# One optimiser step: the rows of `problem` (held in memory) that form the batch.
Batch = tuple[Problem, torch.Tensor]
Epochs = Callable[[int], Iterable[Batch]]  # epoch -> its batches, in order


def train(
    epochs_of: Epochs,
    theta: torch.Tensor,
    lambdas: torch.Tensor,
    options: SolverOptions,
    n_rows: int,
    weight_sum: float,
    steps: int,
    on_epoch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """`options.epochs` passes of `epochs_of(epoch)`; each step follows an unbiased estimate of the
    full objective's gradient (the batch's weighted loss rescaled to all `n_rows`, plus the
    penalty)."""
    param = theta.clone().requires_grad_(False)
    param.grad = torch.zeros_like(param)
    lr = options.learning_rate
    opt = (
        torch.optim.Adam([param], lr=lr)
        if options.solver == "adam"
        else torch.optim.SGD([param], lr=lr, momentum=0.9, nesterov=True)
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    for epoch in range(options.epochs):
        for problem, rows in epochs_of(epoch):
            _, grad = problem.loss_grad(
                param, lambdas, rows=rows, scale=n_rows / (len(rows) * weight_sum)
            )
            param.grad.copy_(grad)
            opt.step()
            schedule.step()
        if on_epoch is not None:
            on_epoch(epoch)
    return param.detach()


def memory_batches(problem: Problem, batch_size: int, seed: int, balanced_sampler: bool) -> Epochs:
    """Batches of rows held in memory: a fresh permutation per epoch, or (balanced sampler) n draws
    with replacement in which every class is equally likely, whatever its size."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    y_cpu = problem.y.cpu()
    if balanced_sampler:
        counts = torch.bincount(y_cpu, minlength=problem.n_classes).to(torch.float64)
        draw_p = (1.0 / counts)[y_cpu]
        draw_p /= draw_p.sum()

    def epoch(_: int) -> Iterator[Batch]:
        if balanced_sampler:
            order = torch.multinomial(draw_p, problem.n, replacement=True, generator=gen)
        else:
            order = torch.randperm(problem.n, generator=gen)
        order = order.to(problem.Xa.device)
        for start in range(0, problem.n, batch_size):
            yield problem, order[start : start + batch_size]

    return epoch


def measured(
    theta: torch.Tensor,
    problems: Iterable[Problem],
    lambdas: torch.Tensor,
    weight_sum: float,
    options: SolverOptions,
) -> Solution:
    """The objective and its full gradient at `theta`, summed over `problems` (all rows, in memory
    or block by block): converged means max |gradient| <= tol, as for L-BFGS."""
    loss = torch.zeros(theta.shape[1], dtype=theta.dtype, device=theta.device)
    grad = torch.zeros_like(theta)
    no_penalty = torch.zeros_like(lambdas)
    for problem in problems:
        part_loss, part_grad = problem.loss_grad(theta, no_penalty, scale=1.0 / weight_sum)
        loss += part_loss
        grad += part_grad
    W = theta[:-1]
    loss += 0.5 * lambdas * (W * W).sum(dim=(0, 2))
    grad[:-1] += lambdas[None, :, None] * W
    grad_max = grad.abs().amax(dim=(0, 2))
    k = theta.shape[1]
    epochs = np.full(k, options.epochs)
    return Solution.of(
        theta, epochs, grad_max <= options.tol, grad_max, loss, np.zeros(k, dtype=bool)
    )
