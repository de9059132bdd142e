"""Projected gradient descent (Madry et al. 2018): :func:`pgd` and the class :class:`PGD`."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from .common import (LOSSES, NORMS, Bound, Domain, Eps, Evaluator, _check_choice, attack_loss, check_alpha,
                     check_count, check_inputs, check_scalar_eps, misclassified, pgd_step_, project_, take,
                     uniform_start, untouched)

__all__ = ["pgd", "PGD"]


def check_pgd_config(norm: str, loss: str, steps: int, restarts: int, random_start: bool) -> None:
    _check_choice("norm", norm, NORMS)
    _check_choice("loss", loss, LOSSES)
    check_count("steps", steps)
    check_count("restarts", restarts)
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts={restarts} needs random_start=True: from zero every restart is the same run")


def run_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: Tensor, alpha: Tensor, domain: Domain, *, steps: int,
            norm: str, random_start: bool, restarts: int, loss: str, target: Optional[Tensor],
            generator: Optional[torch.Generator]) -> Tensor:
    """The PGD loop on checked inputs (see :func:`pgd`)."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    evaluator = Evaluator(model)
    everyone = torch.arange(x.shape[0], device=x.device)
    best = torch.zeros_like(x)
    best_loss = torch.full((x.shape[0],), float("-inf"), dtype=torch.float64, device=x.device)
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with untouched(model):
        for restart in range(restarts):
            # Later restarts only attack the examples no earlier restart has fooled.
            todo = everyone if restart == 0 else everyone[~fooled]
            xs, ys, e, a, dom = x[todo], y[todo], take(eps, todo), take(alpha, todo), domain.take(todo)
            ts = None if target is None else target[todo]
            if random_start:
                delta = project_(uniform_start(xs, e, norm, generator), xs, e, dom, norm)
            else:
                delta = torch.zeros_like(xs)
            for _ in range(steps):
                grad, _, _ = evaluator.grad(xs, delta, ys, loss, ts)
                pgd_step_(delta, grad, xs, e, a, dom, norm)
            if restarts == 1:
                return delta
            with torch.no_grad():
                logits = evaluator.logits(xs + delta, ys)
                value = attack_loss(logits, ys, loss, ts).to(torch.float64)
                wrong = misclassified(logits, ys, ts)
            # Among examples not yet fooled, a fooling delta wins, then the higher loss.
            better = wrong | (value > best_loss[todo])
            chosen = todo[better]
            best[chosen], best_loss[chosen] = delta[better], value[better]
            fooled[todo] = wrong
            if bool(fooled.all()):
                break
    return best


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, alpha: Eps, steps: int, norm: str = "linf",
        random_start: bool = False, restarts: int = 1, lower: Bound = 0.0, upper: Bound = 1.0,
        loss: str = "ce", target: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Projected gradient descent (Madry et al. 2018) in the l∞ or l2 ball, with restarts.

    Each step ascends the loss (sign of the gradient for l∞, normalised gradient for l2) and
    projects onto the ball ``||delta|| <= eps`` and the domain ``lower <= x + delta <= upper``.
    With ``restarts > 1`` (which needs ``random_start``) every restart begins from a fresh random
    point and, per example, the result is the first perturbation that fools the model, otherwise
    the one with the highest loss; later restarts only run on the examples not yet fooled.

    Args:
        model: maps (B, *) inputs to (B, K) logits; it runs in the mode it is in (use ``eval()``).
            A half or bfloat16 model gets the inputs cast to its dtype.
        x: (B, *) floating-point inputs in [lower, upper].  y: (B,) integer labels in [0, K).
        eps: radius, a float or a tensor of shape () or (B,).
        alpha: step size (> 0), a float or a tensor of shape () or (B,).  steps: steps per restart.
        norm: ``"linf"`` or ``"l2"`` (norms over all but the batch dimension).
        random_start: start from a point uniform in the ball (l∞: uniform per coordinate; l2:
            uniform direction, radius ``eps * U^(1/d)``), projected onto the domain.
        restarts: number of runs (>= 1).  loss: ``"ce"``, ``"margin"`` or ``"dlr"`` (see :func:`attack_loss`).
        lower, upper: the input domain: floats (-inf, inf for none), or tensors of shape (C,) (per
            channel, as for normalised images) or broadcastable to x.
        target: (B,) target classes for a targeted attack (it maximises the targeted objective
            of :func:`attack_loss` and succeeds when the model predicts the target), or None.
        generator: the random generator for the random starts (default: the global one).
    Returns:
        delta of x's shape and dtype. One restart of l∞ PGD equals the tutorial's ``pgd_linf``::

            delta = torch.zeros_like(x, requires_grad=True)
            for _ in range(steps):
                loss = F.cross_entropy(model(x + delta), y, reduction="sum")
                g, = torch.autograd.grad(loss, delta)
                delta.data = (delta + alpha * g.sign()).clamp(-eps, eps)
                delta.data = torch.clamp(delta, lower - x, upper - x)

        with each update one fused pass (:func:`pyibp.ops.pgd_linf_step_`) and no parameter
        gradients computed; parameters and buffers are left as they were.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> delta = pgd(model, x, y, 1.0, alpha=0.2, steps=10, norm="l2", random_start=True, restarts=3)
        >>> bool((delta.flatten(1).norm(dim=1) <= 1.0).all())
        True
    """
    check_pgd_config(norm, loss, steps, restarts, random_start)
    eps_t, domain, y, target = check_inputs(model, x, y, eps, lower, upper, target)
    alpha_t = check_alpha(alpha, x)
    # A DDP wrapper would expect a parameter backward after each forward; attack the module inside.
    return run_pgd(unwrap(model), x.detach(), y, eps_t, alpha_t, domain, steps=steps, norm=norm,
                   random_start=random_start, restarts=restarts, loss=loss, target=target, generator=generator)


class PGD:
    """PGD configured once, called on batches; returns adversarial inputs ``x + delta``.

    Arguments as in :func:`pgd`; ``random_start`` defaults to True here, as in torchattacks.

    Example:
        >>> attack = PGD(model, eps=0.1, alpha=0.01, steps=40)
        >>> x_adv = attack(x, y)
    """

    def __init__(self, model: nn.Module, eps: Eps, alpha: Eps, steps: int, *, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, loss: str = "ce", lower: Bound = 0.0,
                 upper: Bound = 1.0, generator: Optional[torch.Generator] = None):
        check_pgd_config(norm, loss, steps, restarts, random_start)
        check_scalar_eps(eps)
        if not isinstance(alpha, Tensor) and not (math.isfinite(float(alpha)) and float(alpha) > 0):
            raise ValueError(f"alpha (the step size) must be finite and > 0, got {alpha!r}")
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, steps
        self.norm, self.random_start, self.restarts, self.loss = norm, random_start, restarts, loss
        self.lower, self.upper, self.generator = lower, upper, generator

    def __call__(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return x + pgd(self.model, x, y, self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                       random_start=self.random_start, restarts=self.restarts, lower=self.lower,
                       upper=self.upper, loss=self.loss, target=target, generator=self.generator)

    def __repr__(self) -> str:
        return (f"PGD(eps={self.eps}, alpha={self.alpha}, steps={self.steps}, norm={self.norm!r}, "
                f"random_start={self.random_start}, restarts={self.restarts}, loss={self.loss!r})")
