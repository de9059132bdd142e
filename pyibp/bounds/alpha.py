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
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .crown import _crown_bound
from .graph import BoundGraph
from .ibp import Trace

__all__ = ["AlphaOptions", "optimize_slopes"]

Pair = Tuple[Tensor, Tensor]


@dataclass(frozen=True)
class AlphaOptions:
    """The optimisation of alpha-CROWN (defaults as auto_LiRPA's).

    Attributes:
        steps: Adam steps (each one CROWN backward pass from the specification); 0 gives CROWN.
        lr: Adam's learning rate for the slopes.
        lr_decay: the learning rate is multiplied by this after every step.
    """

    steps: int = 20
    lr: float = 0.5
    lr_decay: float = 0.98

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"alpha-CROWN steps must be an integer >= 0, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"alpha-CROWN lr must be a finite number > 0, got {self.lr!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"alpha-CROWN lr_decay must lie in (0, 1], got {self.lr_decay!r}")


def _initial_slopes(trace: Trace, relus, rows: int) -> Dict[int, Tensor]:
    """CROWN's lower slopes (1 where ``u > -l``), one per example, row and neuron of each ReLU."""
    alphas = {}
    for i in relus:
        mu, rad = trace.boxes[i]
        slope = (mu > 0).to(mu.dtype)          # u > -l  <=>  mu > 0
        alphas[i] = slope[:, None].expand((-1, rows) + tuple(slope.shape[1:])).contiguous()
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
    batch, rows = A.shape[:2]
    relus = [n.index for n in graph.nodes[:start + 1] if n.kind == "relu" and n.index in trace.boxes
             and _unstable(trace, n.index)]
    best = initial.detach().clone()
    alphas = _initial_slopes(trace, relus, rows)
    best_alphas = {i: a.clone() for i, a in alphas.items()}
    if not relus or options.steps == 0 or batch == 0:
        return best, best_alphas
    first, second = {i: torch.zeros_like(a) for i, a in alphas.items()}, {i: torch.zeros_like(a) for i, a in alphas.items()}
    beta1, beta2, tiny = 0.9, 0.999, 1e-8
    lr = options.lr
    active = torch.arange(batch, device=A.device)
    sub = trace.select(active)
    mu, rad = box
    for step in range(1, options.steps + 1):
        leaves = {i: alphas[i].index_select(0, active).requires_grad_() for i in relus}
        sub.alphas = leaves
        with torch.enable_grad():
            bound = _crown_bound(graph, sub, A.index_select(0, active), const.index_select(0, active),
                                 (mu.index_select(0, active), rad.index_select(0, active)), start, dtype)
            grads = torch.autograd.grad(bound.sum(), [leaves[i] for i in relus], allow_unused=True)
        bound = torch.nan_to_num(bound.detach(), nan=-math.inf)
        improved = bound > best.index_select(0, active)
        best.index_copy_(0, active, torch.maximum(bound, best.index_select(0, active)))
        for i in relus:
            view = improved.reshape(improved.shape + (1,) * (alphas[i].dim() - 2))
            best_alphas[i].index_copy_(0, active, torch.where(view, leaves[i].detach(),
                                                              best_alphas[i].index_select(0, active)))
        # projected Adam ascent on the bound
        correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
        for i, g in zip(relus, grads):
            if g is None:
                continue
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
            m = first[i].index_select(0, active).mul_(beta1).add_(g, alpha=1 - beta1)
            v = second[i].index_select(0, active).mul_(beta2).addcmul_(g, g, value=1 - beta2)
            first[i].index_copy_(0, active, m)
            second[i].index_copy_(0, active, v)
            update = (m / correction1) / ((v / correction2).sqrt_().add_(tiny))
            alphas[i].index_copy_(0, active, (leaves[i].detach() + lr * update).clamp_(0.0, 1.0))
        lr *= options.lr_decay
        done = (best.index_select(0, active) > 0).all(1)
        if bool(done.any()):
            active = active[~done]
            if active.numel() == 0:
                break
            sub = trace.select(active)
    return best, best_alphas
