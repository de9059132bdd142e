"""APGD, FAB, Square and AutoAttack configured once, called on batches: the attack objects that
share the calling convention of :class:`~pyibp.attacks.PGD` and :class:`~pyibp.attacks.FGSM`
(see :mod:`pyibp.attacks`): ``attack(x, y) -> x_adv``.

Example:
    >>> attack = APGD(model, eps=0.1, loss="dlr")
    >>> x_adv = attack(x, y)                       # (B, *), inside the eps-ball and [0, 1]
    >>> evaluate(model, loader(test, 500), attack=AutoAttack(model, eps=0.1))["adv_error"]
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..bounds import Bound, Eps
from .apgd import apgd
from .autoattack import AutoAttackResult, autoattack
from .fab import fab
from .square import square

__all__ = ["Attack", "APGD", "FAB", "Square", "AutoAttack"]

Attack = Callable[[Tensor, Tensor], Tensor]   # attack(x, y) -> x_adv, both (B, *)


class _Configured:
    """An attack function with its model and keyword arguments fixed; ``attack(x, y) = x + fn(model, x, y, ...)``.

    A seed (instead of a generator) makes every call draw the same random starts: batch after
    batch, as the function called with ``torch.Generator().manual_seed(seed)`` each time.
    """

    def __init__(self, model: nn.Module, eps: Eps, *, seed: Optional[int] = None, **options: Any):
        self.model, self.eps, self.seed, self.options = model, eps, seed, options

    def _generator(self, x: Tensor) -> Optional[torch.Generator]:
        return None if self.seed is None else torch.Generator(x.device).manual_seed(self.seed)

    def __repr__(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(eps={self.eps}{options})"


class APGD(_Configured):
    """Auto-PGD (:func:`pyibp.attacks.apgd`) configured once; ``APGD(model, eps, **options)(x, y)``
    returns ``x + apgd(model, x, y, eps, **options)``.

    Args:
        seed: seeds the random starts of each call (default: the global generator).
        options: ``norm``, ``loss``, ``targeted``, ``n_target_classes``, ``steps``, ``restarts``,
            ``lower``, ``upper``, as :func:`~pyibp.attacks.apgd`.

    Example:
        >>> x_adv = APGD(model, 0.1, loss="dlr", targeted=True)(x, y)
    """

    def __init__(self, model: nn.Module, eps: Eps, *, norm: str = "linf", loss: Optional[str] = None,
                 targeted: bool = False, n_target_classes: int = 9, steps: int = 100, restarts: int = 1,
                 lower: Bound = 0.0, upper: Bound = 1.0, seed: Optional[int] = None):
        super().__init__(model, eps, seed=seed, norm=norm, loss=loss, targeted=targeted,
                         n_target_classes=n_target_classes, steps=steps, restarts=restarts, lower=lower, upper=upper)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return x + apgd(self.model, x, y, self.eps, generator=self._generator(x), **self.options)


class FAB(_Configured):
    """FAB (:func:`pyibp.attacks.fab`) configured once; ``FAB(model, eps, **options)(x, y)`` returns
    ``x + fab(model, x, y, eps, **options)``.

    Args:
        seed: seeds the random starts of each call (default: the global generator).
        options: ``norm``, ``targeted``, ``n_target_classes``, ``steps``, ``restarts``, ``lower``,
            ``upper``, as :func:`~pyibp.attacks.fab`.

    Example:
        >>> x_adv = FAB(model, 0.1, steps=20)(x, y)
    """

    def __init__(self, model: nn.Module, eps: Eps, *, norm: str = "linf", targeted: bool = True,
                 n_target_classes: int = 9, steps: int = 100, restarts: int = 1, lower: Bound = 0.0,
                 upper: Bound = 1.0, seed: Optional[int] = None):
        super().__init__(model, eps, seed=seed, norm=norm, targeted=targeted, n_target_classes=n_target_classes,
                         steps=steps, restarts=restarts, lower=lower, upper=upper)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return x + fab(self.model, x, y, self.eps, generator=self._generator(x), **self.options)


class Square(_Configured):
    """Square Attack (:func:`pyibp.attacks.square`) configured once; ``Square(model, eps, **options)(x, y)``
    returns ``x + square(model, x, y, eps, **options)``.

    Args:
        seed: seeds the random search of each call (default: the global generator).
        options: ``norm``, ``n_queries``, ``p_init``, ``loss``, ``lower``, ``upper``, as
            :func:`~pyibp.attacks.square`.

    Example:
        >>> x_adv = Square(model, 0.1, n_queries=1000, seed=0)(x, y)
    """

    def __init__(self, model: nn.Module, eps: Eps, *, norm: str = "linf", n_queries: int = 5000,
                 p_init: float = 0.8, loss: str = "margin", lower: Bound = 0.0, upper: Bound = 1.0,
                 seed: Optional[int] = None):
        super().__init__(model, eps, seed=seed, norm=norm, n_queries=n_queries, p_init=p_init, loss=loss,
                         lower=lower, upper=upper)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return x + square(self.model, x, y, self.eps, generator=self._generator(x), **self.options)


class AutoAttack(_Configured):
    """The AutoAttack cascade (:func:`pyibp.attacks.autoattack`) configured once;
    ``AutoAttack(model, eps, **options)(x, y)`` returns ``x + autoattack(model, x, y, eps, **options).delta``,
    the worst case found per example (``x`` itself where none was). :attr:`last` holds the last
    call's :class:`~pyibp.attacks.AutoAttackResult` (its per-attack report).

    Args:
        seed: seeds each attack's generator (the default 0 makes results repeat, as the function).
        options: ``norm``, ``version``, ``attacks``, ``lower``, ``upper``, ``batch_size``, ``steps``,
            ``n_queries``, ``progress``, ``skip_verified``, as :func:`~pyibp.attacks.autoattack`.

    Example:
        >>> attack = AutoAttack(model, 0.1, version="standard")
        >>> x_adv = attack(x, y)
        >>> attack.last.report()["attacks"]
    """

    def __init__(self, model: nn.Module, eps: Eps, *, seed: int = 0, **options: Any):
        super().__init__(model, eps, seed=seed, **options)
        self.last: Optional[AutoAttackResult] = None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        self.last = autoattack(self.model, x, y, self.eps, seed=self.seed, **self.options)
        return x + self.last.delta
