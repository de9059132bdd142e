"""Verification properties: input boxes and linear constraints on the outputs, as VNN-LIB states them.

A :class:`Property` describes the *counterexample region*, as VNN-LIB does: it is ``sat`` when
some input of one of its boxes makes the network's outputs satisfy one of that box's output
conjunctions, and ``unsat`` when no input does (the network is safe). Each :class:`Case` pairs
an input box with a disjunction of :class:`Conjunction` s; a property is a disjunction of cases::

    sat  <=>  exists case, exists (C, d) in case.conjunctions, exists x in [case.lower, case.upper]:
              C @ f(x).flatten() <= d  (every row)

Bounds are kept in float64, as written in the property; the verifier rounds them to the network's
dtype (outward for bounds, inward for counterexamples).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Conjunction", "Case", "Property", "robustness_property"]


@dataclass(frozen=True)
class Conjunction:
    """Rows of linear inequalities ``C @ y <= d`` over the flattened outputs y, all of which hold.

    Attributes:
        C: (R, K) float64, K the number of outputs.  d: (R,) float64. R = 0 holds everywhere.
    Example:
        >>> Conjunction(torch.tensor([[1.0, -1.0]]), torch.tensor([0.0])).holds(torch.tensor([0.5, 2.0]))
        tensor(True)
    """

    C: Tensor
    d: Tensor

    def __post_init__(self) -> None:
        if self.C.dim() != 2 or self.d.shape != (self.C.shape[0],):
            raise ValueError(f"a conjunction needs C of shape (R, K) and d of shape (R,), got C "
                             f"{tuple(self.C.shape)} and d {tuple(self.d.shape)}")

    def violation(self, y: Tensor) -> Tensor:
        """``max_i (C_i y - d_i)`` for y of shape (..., K): <= 0 exactly where the conjunction holds
        (-inf for R = 0). Computed in y's dtype."""
        C, d = self.C.to(y), self.d.to(y)
        if C.shape[0] == 0:
            return torch.full(y.shape[:-1], -torch.inf, dtype=y.dtype, device=y.device)
        return (y @ C.T - d).amax(-1)

    def holds(self, y: Tensor) -> Tensor:
        """Whether every row holds at y (..., K)."""
        return self.violation(y) <= 0


@dataclass(frozen=True)
class Case:
    """An input box and the output conjunctions any of which is a counterexample inside it.

    Attributes:
        lower, upper: float64 tensors of the model input's shape without the batch dimension.
        conjunctions: the disjunction of output constraints.
    """

    lower: Tensor
    upper: Tensor
    conjunctions: Tuple[Conjunction, ...]

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape:
            raise ValueError(f"lower and upper must have one shape, got {tuple(self.lower.shape)} and "
                             f"{tuple(self.upper.shape)}")
        if bool((self.lower > self.upper).any()):
            i = int((self.lower > self.upper).flatten().nonzero()[0])
            raise ValueError(f"the input box is empty: X_{i} has lower bound {self.lower.flatten()[i].item()!r} > "
                             f"upper bound {self.upper.flatten()[i].item()!r}")


@dataclass(frozen=True)
class Property:
    """A disjunction of :class:`Case` s: the region of counterexamples of a safety property.

    Example:
        >>> prop = robustness_property(torch.full((1, 2, 2), 0.5), label=3, eps=0.1, num_classes=10)
        >>> [(tuple(lo.shape), tuple(C.shape)) for lo, hi, C, d in prop.subproblems()][:1]
        [((1, 2, 2), (1, 10))]
    """

    cases: Tuple[Case, ...]

    def __post_init__(self) -> None:
        if not self.cases:
            raise ValueError("a property needs at least one case (an input box with output constraints)")
        shapes = {tuple(c.lower.shape) for c in self.cases}
        outputs = {cj.C.shape[1] for c in self.cases for cj in c.conjunctions}
        if len(shapes) != 1 or len(outputs) > 1:
            raise ValueError(f"every case must have one input shape and one number of outputs, got input shapes "
                             f"{sorted(shapes)} and output sizes {sorted(outputs)}")

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.cases[0].lower.shape)

    @property
    def num_outputs(self) -> Optional[int]:
        """K, or None when no case constrains the outputs."""
        return next((cj.C.shape[1] for c in self.cases for cj in c.conjunctions), None)

    def subproblems(self) -> Iterator[Tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Every ``(lower, upper, C, d)``: one box with one conjunction, in order."""
        for case in self.cases:
            for cj in case.conjunctions:
                yield case.lower, case.upper, cj.C, cj.d

    def contains(self, x: Tensor) -> Tensor:
        """Which cases' boxes contain x (input shape), as a (cases,) bool tensor (compared in float64)."""
        x = x.to(torch.float64)
        return torch.stack([((c.lower <= x) & (x <= c.upper)).all() for c in self.cases])

    @staticmethod
    def product(boxes: Sequence[Tuple[Tensor, Tensor]], conjunctions: Sequence[Conjunction]) -> "Property":
        """The property ``(x in one of boxes) and (one of conjunctions holds)``."""
        return Property(tuple(Case(lo.to(torch.float64), hi.to(torch.float64), tuple(conjunctions))
                              for lo, hi in boxes))


def robustness_property(x: Tensor, label: int, eps: Union[float, Tensor], *, num_classes: int,
                        lower: Union[float, Tensor] = 0.0, upper: Union[float, Tensor] = 1.0) -> Property:
    """The counterexample region of l∞ robustness at x: some input of ``|x' - x| <= eps`` inside
    ``[lower, upper]`` where another class scores at least as high as ``label``.

    Its conjunctions are ``y_label - y_j <= 0`` for every ``j != label`` (one row each).

    Args:
        x: an input without the batch dimension, e.g. (1, 28, 28).  label: the class x must keep.
        eps: the radius.  num_classes: K.  lower, upper: the input domain (floats or broadcastable).
    Example:
        >>> prop = robustness_property(torch.rand(1, 28, 28), label=7, eps=0.02, num_classes=10)
        >>> len(prop.cases[0].conjunctions)
        9
    """
    if not 0 <= label < num_classes:
        raise ValueError(f"label must lie in [0, {num_classes}), got {label}")
    x = x.detach().to(torch.float64).cpu()
    lo = torch.clamp(x - torch.as_tensor(eps, dtype=torch.float64), min=torch.as_tensor(lower, dtype=torch.float64))
    hi = torch.clamp(x + torch.as_tensor(eps, dtype=torch.float64), max=torch.as_tensor(upper, dtype=torch.float64))
    conjunctions = []
    for j in range(num_classes):
        if j != label:
            C = torch.zeros(1, num_classes, dtype=torch.float64)
            C[0, label], C[0, j] = 1.0, -1.0
            conjunctions.append(Conjunction(C, torch.zeros(1, dtype=torch.float64)))
    return Property.product([(lo, hi)], conjunctions)

