"""Counterexample search: PGD with random restarts inside a property's input boxes, every find checked.

The falsifier minimises, for each restart, the violation ``max_i (C_i f(x) - d_i)`` of one output
conjunction (restarts are spread over the conjunctions of a box), with signed-gradient steps whose
size shrinks geometrically, projected onto the box. Any iterate at which some conjunction holds is
a candidate; :func:`check_counterexample` then confirms it: the point lies in the property's box
(compared in float64), and the conjunction holds on the network's float32 outputs (as an ONNX
runtime would compute them) *and* on its float64 outputs. Only confirmed points are returned:
every ``sat`` pyibp reports is a checked counterexample.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .spec import Conjunction, Property

__all__ = ["Counterexample", "falsify", "check_counterexample", "rounded_box", "search", "model_dtype_device"]


@dataclass(frozen=True)
class Counterexample:
    """A checked counterexample.

    Attributes:
        x: the input (the property's input shape, the network's dtype, on the CPU).
        y: the network's flattened outputs at x (K,), in that dtype.
        case, conjunction: which case of the property and which of its conjunctions hold.
    """

    x: Tensor
    y: Tensor
    case: int
    conjunction: int


def model_dtype_device(model: nn.Module) -> Tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating-point tensor (float32 on the CPU when none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def rounded_box(lower: Tensor, upper: Tensor, dtype: torch.dtype, *, inward: bool) -> Tuple[Tensor, Tensor]:
    """The float64 box ``[lower, upper]`` in ``dtype``: rounded ``inward`` (every point of the result
    is in the box: for counterexamples; may be empty) or outward (it contains the box: for bounds).

    Example:
        >>> lo, hi = rounded_box(torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64),
        ...                      torch.float32, inward=True)
        >>> bool(lo.double() >= 0.1) and bool(hi.double() <= 0.3)
        True
    """
    lo, hi = lower.to(dtype), upper.to(dtype)
    up, down = torch.full_like(lo, math.inf), torch.full_like(lo, -math.inf)
    if inward:
        lo = torch.where(lo.double() < lower, torch.nextafter(lo, up), lo)
        hi = torch.where(hi.double() > upper, torch.nextafter(hi, down), hi)
    else:
        lo = torch.where(lo.double() > lower, torch.nextafter(lo, down), lo)
        hi = torch.where(hi.double() < upper, torch.nextafter(hi, up), hi)
    return lo, hi


class _Checker:
    """Confirms candidates with the float32 network and a float64 copy of it (made once)."""

    def __init__(self, model: nn.Module, prop: Property):
        self.model, self.prop, self.model64 = model, prop, None

    def __call__(self, x: Tensor, case: int) -> Optional[Counterexample]:
        box = self.prop.cases[case]
        x = x.detach()
        x64 = x.double().cpu()
        if not bool(((box.lower <= x64) & (x64 <= box.upper)).all()):
            return None
        if self.model64 is None:
            self.model64 = copy.deepcopy(self.model).double().eval()
        with torch.no_grad():
            y = self.model(x[None]).flatten().cpu()
            y64 = self.model64(x[None].double()).flatten().cpu()
        for j, cj in enumerate(box.conjunctions):
            # the float32 outputs, compared exactly (in float64), and the float64 network's
            if bool(cj.holds(y.double())) and bool(cj.holds(y64)):
                return Counterexample(x.cpu(), y, case, j)
        return None


def check_counterexample(model: nn.Module, prop: Property, x: Tensor) -> Optional[Counterexample]:
    """The :class:`Counterexample` x is, or None: x (input shape) must lie in one of the property's
    boxes and make one of its conjunctions hold on both the float32 and the float64 network.

    Example:
        >>> cex = check_counterexample(net, prop, torch.zeros(1, 28, 28))
    """
    checker = _Checker(model, prop)
    for case in range(len(prop.cases)):
        found = checker(x, case)
        if found is not None:
            return found
    return None


def _stack(conjunctions: Sequence[Conjunction], dtype: torch.dtype, device) -> Tuple[Tensor, Tensor]:
    """(J, R, K) and (J, R): the conjunctions padded to R rows with rows that never bind (0 <= 1)."""
    rows = max(1, max(cj.C.shape[0] for cj in conjunctions))
    K = conjunctions[0].C.shape[1]
    C = torch.zeros(len(conjunctions), rows, K, dtype=dtype, device=device)
    d = torch.ones(len(conjunctions), rows, dtype=dtype, device=device)
    for j, cj in enumerate(conjunctions):
        C[j, :cj.C.shape[0]] = cj.C.to(dtype)
        d[j, :cj.C.shape[0]] = cj.d.to(dtype)
    empty = torch.tensor([cj.C.shape[0] == 0 for cj in conjunctions], device=device)
    d[empty] = 0.0             # a conjunction without rows holds everywhere: violation 0
    return C, d


def search(model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor, target: Tensor, *, steps: int,
           deadline: float, generator: Optional[torch.Generator] = None, start: Optional[Tensor] = None) -> Tensor:
    """Signed-gradient descent on the violation of conjunction ``target[n]`` in box n; returns the
    iterates (N, *shape) at which some conjunction held, in the order found (possibly none).

    Args:
        lower, upper: (N, *shape) one box per restart, in the network's dtype (rounded inward).
        C: (J, R, K), d: (J, R) the padded conjunctions.  target: (N,) conjunction per restart.
        steps: the most gradient steps.  deadline: ``time.monotonic()`` value to stop at.
        start: (N, *shape) starting points (default uniform in the boxes).
    """
    width = upper - lower
    if start is None:
        u = torch.rand(lower.shape, generator=generator, dtype=lower.dtype).to(lower.device)
        start = lower + u * width
    x = start.clone()
    found: List[Tensor] = []
    Ct, dt = C[target], d[target]
    for step in range(steps + 1):
        x.requires_grad_(True)
        y = model(x).flatten(1)
        violation = torch.einsum("jrk,nk->njr", C, y.detach()).sub(d).amax(-1)      # (N, J)
        hit = (violation <= 0).any(1)
        if bool(hit.any()):
            found.append(x.detach()[hit])
            break
        if step == steps or time.monotonic() > deadline:
            break
        loss = (torch.einsum("nrk,nk->nr", Ct, y) - dt).amax(-1).sum()
        grad, = torch.autograd.grad(loss, x)
        alpha = 0.25 * 0.01 ** (step / max(1, steps - 1))        # from a quarter of the box to 0.25 %
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - alpha * width * grad.sign(), lower), upper)
    return torch.cat(found) if found else start[:0]


def falsify(model: nn.Module, prop: Property, *, deadline: float, restarts: int = 32, steps: int = 100,
            rounds: Optional[int] = None, seed: int = 0, device=None) -> Optional[Counterexample]:
    """PGD with random restarts over every box of ``prop`` until a checked counterexample is found,
    ``deadline`` (a ``time.monotonic()`` value) passes or ``rounds`` rounds are done (None: no
    limit); None when none was found.

    Rounds of ``restarts`` restarts (spread over the box's conjunctions; the first starts at the
    box's centre) of at most ``steps`` steps each, cycling over the cases.

    Example:
        >>> cex = falsify(net, robustness_property(x, 7, 0.05, num_classes=10), deadline=time.monotonic() + 2)
        >>> cex is None or bool(prop.cases[cex.case].conjunctions[cex.conjunction].holds(cex.y.double()))
        True
    """
    dtype, model_device = model_dtype_device(model)
    device = device if device is not None else model_device
    checker = _Checker(model, prop)
    generator = torch.Generator().manual_seed(seed)
    boxes = []
    for case in prop.cases:
        lo, hi = rounded_box(case.lower, case.upper, dtype, inward=True)
        if bool((lo <= hi).all()) and case.conjunctions:
            boxes.append((lo.to(device), hi.to(device), *_stack(case.conjunctions, dtype, device)))
        else:
            boxes.append(None)
    round_ = 0
    while time.monotonic() < deadline and any(b is not None for b in boxes) and (rounds is None or round_ < rounds):
        for k, box in enumerate(boxes):
            if box is None or time.monotonic() >= deadline:
                continue
            lo, hi, C, d = box
            lower, upper = lo.expand(restarts, *lo.shape), hi.expand(restarts, *hi.shape)
            target = (torch.arange(restarts, device=device) + round_) % C.shape[0]
            start = None
            if round_ == 0:
                u = torch.rand(lower.shape, generator=generator, dtype=dtype).to(device)
                u[0] = 0.5
                start = lower + u * (upper - lower)
            for x in search(model, lower, upper, C, d, target, steps=steps, deadline=deadline,
                            generator=generator, start=start):
                cex = checker(x, k)
                if cex is not None:
                    return cex
        round_ += 1
    return None
