"""alpha-CROWN: optimised lower slopes of the unstable ReLUs (Xu et al., "Fast and Complete: Enabling
Complete Neural Network Verification with Rapid and Massively Parallel Incomplete Verifiers", ICLR 2021).

Any line ``alpha z`` with ``alpha`` in [0, 1] lies below ReLU on the whole real line, so CROWN's
backward pass is sound for every choice of the lower slopes of the unstable neurons. alpha-CROWN makes
them variables, one per unstable neuron and per specification row (the best slope for one row is not
the best for another), starts from CROWN's (1 where ``u > -l``, else 0), and maximises the bounds by
projected Adam with a decaying learning rate, keeping the best bound each row has seen: the result
is never looser than CROWN. The pre-activation boxes stay those of CROWN
(:mod:`pyibp.bounds.intermediate`), as in auto_LiRPA's default. An example whose every row is
verified (> 0) leaves the optimisation early; the rest go on with a smaller batch.

The ReLU step with given slopes is one fused operator (:func:`pyibp.ops.crown_relu_alpha_step`) that
also returns the slopes' gradient.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .crown import _crown_bound
from .graph import BoundGraph
from .ibp import Trace

__all__ = ["AlphaOptions", "Optimized", "optimize_slopes", "optimize_bound"]

Pair = Tuple[Tensor, Tensor]


@dataclass(frozen=True)
class AlphaOptions:
    """The optimisation of alpha-CROWN (defaults as auto_LiRPA's).

    Attributes:
        steps: Adam steps (each one CROWN backward pass from the specification); 0 gives CROWN.
        lr: Adam's learning rate for the slopes.
        lr_decay: the learning rate is multiplied by this after every step.
        beta_lr: Adam's learning rate for beta-CROWN's split multipliers (:func:`optimize_bound`).
    """

    steps: int = 20
    lr: float = 0.5
    lr_decay: float = 0.98
    beta_lr: float = 0.05

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"alpha-CROWN steps must be an integer >= 0, got {self.steps!r}")
        for name in ("lr", "beta_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"alpha-CROWN {name} must be a finite number > 0, got {value!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"alpha-CROWN lr_decay must lie in (0, 1], got {self.lr_decay!r}")


class Optimized(NamedTuple):
    """What :func:`optimize_bound` returns.

    Attributes:
        bounds: (B, R) the best bound per row.
        slopes: per ReLU node, the slopes (B, R, *its shape) that gave it.
        betas: per split node, the multipliers (B, R, *its shape) that gave it.
    """

    bounds: Tensor
    slopes: Dict[int, Tensor]
    betas: Dict[int, Tensor]


def _initial_slopes(trace: Trace, relus, rows: int, start: Dict[int, Tensor]) -> Dict[int, Tensor]:
    """The slopes of ``start`` where given (broadcast to (B, R, *shape)), else CROWN's lower slopes
    (1 where ``u > -l``), one per example, row and neuron of each ReLU."""
    alphas = {}
    for i in relus:
        mu, rad = trace.boxes[i]
        slope = start[i].to(mu.dtype) if i in start else (mu > 0).to(mu.dtype)[:, None]   # u > -l  <=>  mu > 0
        alphas[i] = slope.expand((mu.shape[0], rows) + tuple(mu.shape[1:])).clone()
    return alphas


def _unstable(trace: Trace, i: int) -> bool:
    mu, rad = trace.boxes[i]
    return bool((rad > mu.abs()).any())


def optimize_slopes(graph: BoundGraph, trace: Trace, A: Tensor, const: Tensor, box: Pair, start: int,
                    dtype: Optional[torch.dtype], initial: Tensor, options: AlphaOptions
                    ) -> Tuple[Tensor, Dict[int, Tensor]]:
    """alpha-CROWN lower bounds of ``A z + const`` (z: node ``start``'s value) over the input box.

    Args:
        trace: the IBP/CROWN trace whose ReLU boxes the pass relaxes (no gradient is taken through it).
        A: (B, R, *shape of node start).  const: (B, R).  box: the input box ``(mu, rad)``.
        initial: (B, R) a sound bound already known for each row (e.g. CROWN's): the result is never below it.
    Returns:
        ``(bounds (B, R), slopes)``: the best bound per row, and for each ReLU node the slopes
        (B, R, *its shape) that gave it (CROWN's for a row never improved).

    Example:
        >>> bounds, slopes = optimize_slopes(graph, trace, A, const, box, start, None, crown, AlphaOptions())
    """
    result = optimize_bound(graph, trace, A, const, box, start, dtype, initial, options)
    return result.bounds, result.slopes


def optimize_bound(graph: BoundGraph, trace: Trace, A: Tensor, const: Tensor, box: Pair, start: int,
                   dtype: Optional[torch.dtype], initial: Tensor, options: AlphaOptions, *,
                   slopes: Optional[Dict[int, Tensor]] = None, splits: Optional[Dict[int, Tensor]] = None,
                   betas: Optional[Dict[int, Tensor]] = None, any_row: bool = False,
                   deadline: Optional[float] = None) -> Optimized:
    """alpha-CROWN (and, with ``splits``, beta-CROWN) lower bounds of ``A z + const`` over the input box.

    beta-CROWN (Wang et al., "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split
    Constraints for Neural Network Robustness Verification", NeurIPS 2021): a split constraint
    ``s z_j >= 0`` on neuron j of node p (s = +1 active, -1 inactive) gives, for every ``beta >= 0``,
    ``A z + const >= A z + const - beta s z_j`` on the subdomain, so the walker adds ``-beta s`` to
    the coefficients reaching node p (``trace.extra``) and ``beta`` is maximised with the slopes.

    Args:
        trace, A, const, box, start, dtype, initial, options: as for :func:`optimize_slopes`.
        slopes: per ReLU node, start slopes (B or 1, R or 1, *shape) (e.g. a parent domain's); else CROWN's.
        splits: per node p, (B, *shape of p) in {-1, 0, +1}: the split constraints ``s z >= 0`` (0: none).
        betas: per split node, start multipliers (B, R, *shape) >= 0; else 0.
        any_row: an example is done (leaves the loop) when any row is > 0, rather than every row.
        deadline: a ``time.monotonic()`` value after which no further step starts.
    Returns:
        :class:`Optimized` ``(bounds, slopes, betas)``; bounds never below ``initial``.

    Example:
        >>> out = optimize_bound(graph, trace, A, const, box, start, None, crown, AlphaOptions(),
        ...                      splits={p: s}, any_row=True)
    """
    batch, rows = A.shape[:2]
    relus = [n.index for n in graph.nodes[:start + 1] if n.kind == "relu" and n.index in trace.boxes
             and _unstable(trace, n.index)]
    splits = {p: s for p, s in (splits or {}).items() if bool((s != 0).any())}
    betas = betas or {}
    # one Adam loop over named variables: ("alpha", ReLU node) in [0, 1], ("beta", split node) >= 0
    values = {("alpha", i): a for i, a in _initial_slopes(trace, relus, rows, slopes or {}).items()}
    for p, s in splits.items():
        start_beta = betas.get(p)
        values[("beta", p)] = (start_beta.to(A.dtype).clamp(min=0.0).expand((batch, rows) + s.shape[1:]).clone()
                               if start_beta is not None else A.new_zeros((batch, rows) + s.shape[1:]))
    project = {"alpha": lambda t: t.clamp_(0.0, 1.0), "beta": lambda t: t.clamp_(min=0.0)}
    lrs = {"alpha": options.lr, "beta": options.beta_lr}
    best = initial.detach().clone()
    best_values = {k: v.clone() for k, v in values.items()}

    def result() -> Optimized:
        return Optimized(best, {i: v for (kind, i), v in best_values.items() if kind == "alpha"},
                         {p: v for (kind, p), v in best_values.items() if kind == "beta"})

    if not values or options.steps == 0 or batch == 0:
        return result()
    keys = list(values)
    first, second = ({k: torch.zeros_like(v) for k, v in values.items()} for _ in range(2))
    beta1, beta2, tiny = 0.9, 0.999, 1e-8
    decay = 1.0
    active = torch.arange(batch, device=A.device)
    sub = trace.select(active)
    mu, rad = box
    for step in range(1, options.steps + 1):
        if deadline is not None and time.monotonic() > deadline:
            break
        leaves = {k: values[k].index_select(0, active).requires_grad_() for k in keys}
        sub.alphas = {i: leaves[("alpha", i)] for i in relus}
        # -beta s on node p's coefficients: (b, R, *shape) * (b, 1, *shape)
        sub.extra = {p: -leaves[("beta", p)] * s.index_select(0, active)[:, None].to(A.dtype)
                     for p, s in splits.items()}
        with torch.enable_grad():
            bound = _crown_bound(graph, sub, A.index_select(0, active), const.index_select(0, active),
                                 (mu.index_select(0, active), rad.index_select(0, active)), start, dtype)
            grads = torch.autograd.grad(bound.sum(), [leaves[k] for k in keys], allow_unused=True)
        bound = torch.nan_to_num(bound.detach(), nan=-math.inf)
        improved = bound > best.index_select(0, active)
        best.index_copy_(0, active, torch.maximum(bound, best.index_select(0, active)))
        for k in keys:
            view = improved.reshape(improved.shape + (1,) * (values[k].dim() - 2))
            best_values[k].index_copy_(0, active, torch.where(view, leaves[k].detach(),
                                                              best_values[k].index_select(0, active)))
        # projected Adam ascent on the bound
        correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
        for k, g in zip(keys, grads):
            if g is None:
                continue
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            m = first[k].index_select(0, active).mul_(beta1).add_(g, alpha=1 - beta1)
            v = second[k].index_select(0, active).mul_(beta2).addcmul_(g, g, value=1 - beta2)
            first[k].index_copy_(0, active, m)
            second[k].index_copy_(0, active, v)
            update = (m / correction1) / ((v / correction2).sqrt_().add_(tiny))
            values[k].index_copy_(0, active, project[k[0]](leaves[k].detach() + lrs[k[0]] * decay * update))
        decay *= options.lr_decay
        verified = best.index_select(0, active) > 0
        done = verified.any(1) if any_row else verified.all(1)
        if bool(done.any()):
            active = active[~done]
            if active.numel() == 0:
                break
            sub = trace.select(active)
    return result()
