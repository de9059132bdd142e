"""The fast gradient sign method (Goodfellow, Shlens, Szegedy 2015): :func:`fgsm` and :class:`FGSM`."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..distributed import unwrap
from .common import Bound, Eps, check_inputs, check_scalar_eps
from .pgd import check_pgd_config, run_pgd

__all__ = ["fgsm", "FGSM"]


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, norm: str = "linf", loss: str = "ce",
         lower: Bound = 0.0, upper: Bound = 1.0, target: Optional[Tensor] = None) -> Tensor:
    """Fast Gradient Sign Method (Goodfellow, Shlens, Szegedy 2015): one step of size eps.

    Args:
        model: maps (B, *) inputs to (B, K) logits.
        x: (B, *) floating-point inputs in [lower, upper].  y: (B,) integer labels in [0, K).
        eps: radius, a float or a tensor of shape () or (B,) (one per example).
        norm: ``"linf"`` (the sign of the gradient) or ``"l2"`` (the normalised gradient, the
            fast gradient method).  loss: ``"ce"``, ``"margin"`` or ``"dlr"`` (see :func:`attack_loss`).
        lower, upper: the input domain, as in :func:`pgd`.  target: (B,) classes for a targeted step, or None.
    Returns:
        delta of x's shape and dtype: ``pgd(..., alpha=eps, steps=1)``. For l∞ and cross-entropy,
        equivalent to::

            delta = torch.zeros_like(x, requires_grad=True)
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            g, = torch.autograd.grad(loss, delta)
            delta = torch.clamp(eps * g.sign(), lower - x, upper - x)

        (the tutorial's ``fgsm``, projected onto the domain), without touching parameter gradients.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> delta = fgsm(model, x, y, 0.1)
        >>> bool((delta.abs() <= 0.1).all())
        True
    """
    check_pgd_config(norm, loss, 1, 1, False)
    eps_t, domain, y, target = check_inputs(model, x, y, eps, lower, upper, target)
    return run_pgd(unwrap(model), x.detach(), y, eps_t, eps_t.to(torch.float64), domain, steps=1, norm=norm,
                   random_start=False, restarts=1, loss=loss, target=target, generator=None)


class FGSM:
    """FGSM configured once, called on batches; returns adversarial inputs ``x + delta``.

    Example:
        >>> attack = FGSM(model, eps=0.1)
        >>> x_adv = attack(x, y)                  # (B, *), inside [0, 1] and the eps-box of x
    """

    def __init__(self, model: nn.Module, eps: Eps, *, norm: str = "linf", loss: str = "ce", lower: Bound = 0.0,
                 upper: Bound = 1.0):
        check_pgd_config(norm, loss, 1, 1, False)
        check_scalar_eps(eps)
        self.model, self.eps, self.norm, self.loss, self.lower, self.upper = model, eps, norm, loss, lower, upper

    def __call__(self, x: Tensor, y: Tensor, target: Optional[Tensor] = None) -> Tensor:
        return x + fgsm(self.model, x, y, self.eps, norm=self.norm, loss=self.loss, lower=self.lower,
                        upper=self.upper, target=target)

    def __repr__(self) -> str:
        return f"FGSM(eps={self.eps}, norm={self.norm!r}, loss={self.loss!r}, lower={self.lower}, upper={self.upper})"
