"""What a training method is: an object configured once with its hyper-parameters, whose
:meth:`Method.loss` turns one batch into the loss the epoch loop minimises.

Adding a method: a subclass with ``loss`` (and ``from_recipe`` when it reads hyper-parameters of
the recipe), and one line in :mod:`pyibp.training.registry`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Method", "StepLoss"]


@dataclass
class StepLoss:
    """What a method computes on one batch (B examples, K classes).

    Attributes:
        loss: (B,) the per-example training loss; its mean is minimised unless ``objective`` is given.
        logits: (B, K) the predictions the training error is counted on.
        objective: a scalar to minimise instead of ``loss.mean()`` (e.g. with regularisers added).
        sums: further per-example metrics of the batch, summed (e.g. ``{"verified_error": count}``):
            the epoch reports each divided by the number of examples.
        values: values at this step (e.g. ``{"eps": 0.1}``): the epoch reports the last step's.
    """

    loss: Tensor
    logits: Tensor
    objective: Optional[Tensor] = None
    sums: Dict[str, Tensor] = field(default_factory=dict)
    values: Dict[str, float] = field(default_factory=dict)


class Method(abc.ABC):
    """A training method, configured once; :meth:`loss` on a batch at a global step.

    Class attributes read by the recipe, the run loop and ``pyibp train``:

    * ``name``: set by :func:`pyibp.training.register`.
    * ``certified``: trained against bounds (IBP initialisation, the ε/κ/β ramps, a verified error
      among the training metrics, bf16 only in the clean forward pass).
    * ``options``: the recipe fields of its hyper-parameters (shown in ``pyibp train --help``).
    * ``defaults``: recipe values of the method (:meth:`pyibp.runs.TrainConfig.for_method`).

    Example:
        >>> class Clean(Method):
        ...     def loss(self, model, x, y, step, generator=None):
        ...         logits = model(x)
        ...         return StepLoss(F.cross_entropy(logits, y, reduction="none"), logits)
        >>> register("clean", Clean)
        >>> metrics, step = train_epoch(model, Clean(), loader, optimizer)
    """

    name: ClassVar[str] = ""
    certified: ClassVar[bool] = False
    options: ClassVar[Tuple[str, ...]] = ()
    defaults: ClassVar[Dict[str, Any]] = {}

    @classmethod
    def from_recipe(cls, config: Any, steps_per_epoch: int) -> "Method":
        """The method configured by the recipe ``config`` (a :class:`pyibp.runs.TrainConfig`) for a
        run of ``steps_per_epoch`` steps per epoch. The base class takes no hyper-parameter."""
        return cls()

    @abc.abstractmethod
    def loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int,
             generator: Optional[torch.Generator] = None) -> StepLoss:
        """The loss of batch ``x`` (B, *), labels ``y`` (B,), at global step ``step``; random draws
        (attack starts) come from ``generator``. ``model`` is in training mode."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
