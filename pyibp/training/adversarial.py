"""Standard and adversarial training: the training inputs are clean, or points of the ε-box an
attack finds.

* :class:`Standard`: cross-entropy on clean inputs.
* :class:`PGDTraining`: PGD training (Madry et al. 2018); the tutorial's recipe on MNIST is ε=0.1,
  α=0.01, 20 steps, SGD with lr 0.1, then 0.01 after 5 epochs.
* :class:`FGSMTraining`: "Fast is better than free" (Wong, Rice, Kolter 2020): FGSM from a random
  start, α = 1.25ε, with the cyclic learning rate of :func:`pyibp.training.cyclic_lr`.

Modes: the training step runs in ``model.train()``; the attack that makes its inputs runs in
``model.eval()`` (BatchNorm with its running statistics, no dropout), so that the attack's own
forward passes neither update BatchNorm's running averages nor see batch statistics of half-made
adversarial inputs.

Example:
    >>> train, test = pyibp.data.mnist5k()
    >>> model = pyibp.models.tutorial_cnn()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> method = PGDTraining(eps=0.1, alpha=0.01, steps=20)
    >>> for epoch in range(10):
    ...     train_epoch(model, method, loader(train, 100, shuffle=True, seed=epoch), opt)
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks import pgd
from ..attacks.pgd import check_pgd_config
from ..models import eval_mode
from .method import Method, StepLoss

__all__ = ["Standard", "PGDTraining", "FGSMTraining"]

# Adversarial training keeps PyTorch's initialisation and neither clips gradients nor regularises.
_ADVERSARIAL = dict(ibp_init=False, grad_clip=None, reg_weight=0.0)


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return eps


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> StepLoss:
    logits = model(x)
    return StepLoss(F.cross_entropy(logits, y, reduction="none"), logits, values={"eps": eps})


class Standard(Method):
    """Standard training: the mean cross-entropy of the clean inputs.

    Equivalent to the tutorial's ``epoch(loader, model, opt)`` with ``model.train()``.

    Example:
        >>> train_epoch(model, Standard(), loader(train, 100, shuffle=True), torch.optim.SGD(model.parameters(), 0.1))
    """

    defaults: Dict[str, Any] = dict(epochs=10, lr=1e-3, lr_schedule="step", lr_decay_at=(0.6, 0.85), lr_decay=0.1,
                                    **_ADVERSARIAL)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int,
             generator: Optional[torch.Generator] = None) -> StepLoss:
        return _cross_entropy(model, x, y, 0.0)


class PGDTraining(Method):
    """PGD adversarial training (Madry et al. 2018): cross-entropy at ``x + pgd(model, x, y, eps, ...)``.

    Args:
        eps, alpha, steps, norm, random_start, restarts, lower, upper, loss: as in
            :func:`pyibp.attacks.pgd`. The tutorial's MNIST recipe: eps=0.1, alpha=0.01, steps=20.
            Recipe default: α = 2.5 ε / steps (Madry et al.), from a random start.

    Equivalent to the tutorial's ``epoch_adversarial(loader, model, pgd_linf, opt, ...)``.

    Example:
        >>> train_epoch(model, PGDTraining(eps=0.1, alpha=0.01, steps=20), loader(train, 100, shuffle=True), opt)
    """

    options = ("attack_steps", "attack_alpha", "attack_random_start")
    defaults: Dict[str, Any] = dict(epochs=15, lr=1e-3, lr_schedule="step", lr_decay_at=(0.6, 0.85), lr_decay=0.1,
                                    attack_steps=10, **_ADVERSARIAL)

    def __init__(self, eps: float, alpha: float, steps: int, *, norm: str = "linf", random_start: bool = True,
                 restarts: int = 1, lower: float = 0.0, upper: float = 1.0, loss: str = "ce"):
        check_pgd_config(norm, loss, steps, restarts, random_start)
        self.eps, self.alpha, self.steps = _check_eps(eps), float(alpha), steps
        self.norm, self.random_start, self.restarts = norm, random_start, restarts
        self.lower, self.upper, self.attack_loss = lower, upper, loss

    @classmethod
    def from_recipe(cls, config: Any, steps_per_epoch: int) -> "PGDTraining":
        eps = config.target_eps
        alpha = config.attack_alpha if config.attack_alpha is not None else 2.5 * eps / config.attack_steps
        return cls(eps, alpha, config.attack_steps, random_start=config.attack_random_start)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int,
             generator: Optional[torch.Generator] = None) -> StepLoss:
        with eval_mode(model):
            x = x + pgd(model, x, y, self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                        random_start=self.random_start, restarts=self.restarts, lower=self.lower, upper=self.upper,
                        loss=self.attack_loss, generator=generator)
        return _cross_entropy(model, x, y, self.eps)


class FGSMTraining(Method):
    """"Fast" FGSM adversarial training (Wong, Rice, Kolter 2020).

    Each batch is attacked by a single l∞ step of size ``alpha`` (default ``1.25 * eps``) from a
    point uniform in the eps-box, i.e. ``pgd(..., steps=1, random_start=True)``; pair it with
    :func:`pyibp.training.cyclic_lr` stepped per batch (the paper: SGD, lr peaking at 0.2 on CIFAR-10).

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        >>> sched = cyclic_lr(opt, total_steps=epochs * len(train_loader))
        >>> for _ in range(epochs):
        ...     train_epoch(model, FGSMTraining(eps=0.1), train_loader, opt, scheduler=sched)
    """

    options = ("attack_alpha",)
    defaults: Dict[str, Any] = dict(epochs=10, lr=5e-3, lr_schedule="cyclic", **_ADVERSARIAL)

    def __init__(self, eps: float, alpha: Optional[float] = None, *, lower: float = 0.0, upper: float = 1.0):
        self.eps = _check_eps(eps)
        self.alpha = 1.25 * self.eps if alpha is None else float(alpha)
        self.lower, self.upper = lower, upper

    @classmethod
    def from_recipe(cls, config: Any, steps_per_epoch: int) -> "FGSMTraining":
        return cls(config.target_eps, config.attack_alpha)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int,
             generator: Optional[torch.Generator] = None) -> StepLoss:
        with eval_mode(model):
            x = x + pgd(model, x, y, self.eps, alpha=self.alpha, steps=1, random_start=True, lower=self.lower,
                        upper=self.upper, generator=generator)
        return _cross_entropy(model, x, y, self.eps)
