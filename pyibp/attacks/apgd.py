"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"): :func:`apgd`, and :func:`apgd_checkpoints`, its step-size schedule.

APGD is PGD with momentum and a step size that adapts itself: it starts at ``2 eps`` and halves at
the checkpoints ``w_j = ceil(p_j N)`` with ``p_0 = 0``, ``p_1 = 0.22`` and
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` whenever, since the last checkpoint, at most
75 % of the steps raised the loss, or neither the step size nor the best loss changed; the iterate
then restarts from the best point found. Each update (step, projection, momentum 0.75,
projection) is one fused pass, :func:`pyibp.ops.apgd_linf_step_` / :func:`pyibp.ops.apgd_l2_step_`.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..distributed import unwrap
from .common import (LOSSES, NORMS, Bound, Domain, Eps, Evaluator, _check_choice, check_count, check_inputs,
                     misclassified, per_example_view, project_, runs_at_once, take, untouched)

__all__ = ["apgd", "apgd_checkpoints"]

Tick = Callable[[int], None]
MOMENTUM = 0.75
RHO = 0.75  # the fraction of loss-raising steps below which the step size halves


def apgd_checkpoints(steps: int) -> List[int]:
    """The iterations after which APGD checks its step size, for a run of ``steps`` iterations.

    The first check comes after ``max(int(0.22 N), 1)`` steps, and each interval is shorter than
    the last by ``max(int(0.03 N), 1)``, but no shorter than ``max(int(0.06 N), 1)``: the
    checkpoints ``p_j N`` of the paper, rounded as the original implementation rounds them.

    Example:
        >>> apgd_checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
    """
    check_count("steps", steps)
    interval, shortest, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    points, at = [], interval
    while at <= steps:
        points.append(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return points


class _State:
    """The per-example tensors of one APGD run; examples leave it once fooled."""

    NAMES = ("index", "x", "y", "target", "eps", "lower", "upper", "delta", "previous", "grad", "best",
             "best_grad", "best_loss", "step", "history", "best_at_check", "reduced_at_check")

    def keep(self, rows: Tensor) -> None:
        for name in self.NAMES:
            value = getattr(self, name)
            if value is None or value.dim() == 0:
                continue
            setattr(self, name, value[:, rows] if name == "history" else value[rows])


def _start(x: Tensor, eps: Tensor, domain: Domain, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    """The original's random start: a uniform (l∞) or Gaussian (l2) draw scaled onto the sphere of
    radius eps in the norm (l∞: the largest coordinate at ±eps), then projected onto the domain."""
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 1
        size = t.flatten(1).abs().amax(1)
    else:
        t = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        size = t.flatten(1).norm(dim=1)
    delta = per_example_view(eps.to(x.dtype), x) * t / (per_example_view(size, x) + 1e-12)
    return project_(delta, x, eps, domain, norm)


def _run_once(ev: Evaluator, x: Tensor, y: Tensor, target: Optional[Tensor], eps: Tensor, domain: Domain,
              start: Tensor, owner: Tensor, *, loss: str, norm: str, steps: int, tick: Tick
              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """APGD from ``start`` on R rows at once, each row one run: an example under several targets
    (or restarts) has one row per run, ``owner`` (R,) naming its example. Returns per row
    ``(delta, fooled, best, best_loss)``: a fooling delta where the row found one, whether it
    did, and the row's highest-loss delta and its loss.

    Once a row fools the model, every row of its example leaves the batch (the example is
    broken; its other runs could only find it broken again). Every row's run is independent of
    the others, so the rows that stay go on exactly as they would alone.
    """
    R = x.shape[0]
    update = ops.apgd_linf_step_ if norm == "linf" else ops.apgd_l2_step_
    s = _State()
    s.index, s.x, s.y, s.target = torch.arange(R, device=x.device), x, y, target
    s.eps = eps.expand(R).clone() if eps.dim() == 0 else eps
    s.lower, s.upper = domain.lower, domain.upper
    s.delta = start
    s.previous = s.delta.clone()
    s.grad, logits, value = ev.grad(x, s.delta, y, loss, target)
    s.best, s.best_grad, s.best_loss = s.delta.clone(), s.grad.clone(), value
    s.step = 2 * s.eps.to(torch.float64)
    s.history = value.new_empty((steps + 1, R))
    s.history[0] = value
    s.best_at_check, s.reduced_at_check = value.clone(), torch.ones(R, dtype=torch.bool, device=x.device)

    best, best_loss = s.delta.clone(), value.clone()      # results, indexed by the original rows
    fooled = torch.zeros(R, dtype=torch.bool, device=x.device)
    adversarial = torch.zeros_like(x)
    broken = torch.zeros(int(owner.max()) + 1 if R else 0, dtype=torch.bool, device=x.device)
    checkpoints, last_check = set(apgd_checkpoints(steps)), 0

    def finish_fooled(wrong: Tensor) -> None:
        rows = s.index[wrong]
        adversarial[rows], fooled[rows] = s.delta[wrong], True
        broken[owner[rows]] = True
        leave = broken[owner[s.index]]
        gone = s.index[leave]
        best[gone], best_loss[gone] = s.best[leave], s.best_loss[leave]
        s.keep(~leave)

    wrong = misclassified(logits, y, None)
    if wrong.any():
        finish_fooled(wrong)
    for i in range(steps):
        if s.index.numel() == 0:
            tick(steps - i)
            break
        update(s.delta, s.previous, s.grad, s.x, s.eps, s.step, 1.0 if i == 0 else MOMENTUM, s.lower, s.upper)
        s.grad, logits, value = ev.grad(s.x, s.delta, s.y, loss, s.target)
        improved = value > s.best_loss
        # torch.where, not a masked copy: no host synchronisation on an accelerator
        s.best = torch.where(per_example_view(improved, s.x), s.delta, s.best)
        s.best_grad = torch.where(per_example_view(improved, s.x), s.grad, s.best_grad)
        s.best_loss = torch.where(improved, value, s.best_loss)
        s.history[i + 1] = value
        if i + 1 in checkpoints:
            k = i + 1 - last_check
            raised = (s.history[last_check + 1:i + 2] > s.history[last_check:i + 1]).sum(0)
            reduce = (raised <= RHO * k) | (~s.reduced_at_check & (s.best_at_check >= s.best_loss))
            s.reduced_at_check, s.best_at_check, last_check = reduce, s.best_loss.clone(), i + 1
            s.step = torch.where(reduce, s.step / 2, s.step)
            s.delta[reduce], s.grad[reduce] = s.best[reduce], s.best_grad[reduce]
        wrong = misclassified(logits, s.y, None)
        if wrong.any():
            finish_fooled(wrong)
        tick(1)
    best[s.index], best_loss[s.index] = s.best, s.best_loss
    return torch.where(per_example_view(fooled, x), adversarial, best), fooled, best, best_loss


def run_apgd(ev: Evaluator, x: Tensor, y: Tensor, eps: Tensor, domain: Domain, *, norm: str, loss: str,
             targeted: bool, n_target_classes: int, steps: int, restarts: int,
             generator: Optional[torch.Generator], tick: Tick, clean_logits: Optional[Tensor] = None,
             at_once: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """APGD over restarts (and target classes when ``targeted``) on checked inputs, each run only on
    the examples no earlier run has fooled. Returns ``(delta, fooled)``.

    The runs go in groups of ``at_once`` (default :func:`runs_at_once`), a group as one batch of
    (runs x examples) rows. The random start of every run is drawn for all B examples, in run
    order, whatever the grouping: a seeded attack finds the same examples broken either way.
    ``clean_logits`` (B, K), when the caller has them, spare APGD-T a forward pass.
    """
    B = x.shape[0]
    result = torch.zeros_like(x)
    fooled = torch.zeros(B, dtype=torch.bool, device=x.device)
    best_loss = torch.full((B,), float("-inf"), dtype=torch.float64, device=x.device)
    ranked: Optional[Tensor] = None
    ranks: List[Optional[int]] = [None]
    if targeted and B:
        with torch.no_grad():
            logits = clean_logits if clean_logits is not None else ev.logits(x, y)
        ranked = logits.argsort(dim=1, descending=True)   # the original's targets: the runners-up
        ranks = list(range(1, min(n_target_classes, ranked.shape[1] - 1) + 1))
    runs = [rank for rank in ranks for _ in range(restarts)]
    group = at_once if at_once is not None else runs_at_once(x, len(runs))
    for first in range(0, len(runs), group):
        chosen = runs[first:first + group]
        g = len(chosen)
        starts = [_start(x, eps, domain, norm, generator) for _ in chosen]
        todo = (~fooled).nonzero()[:, 0]
        n = todo.numel()
        if n == 0:
            tick(steps * g)
            continue
        rows = todo.repeat(g)
        owner = torch.arange(n, device=x.device).repeat(g)
        target = None if ranked is None else torch.cat([ranked[todo, rank] for rank in chosen])
        start = torch.cat([st[todo] for st in starts])
        delta, won, best, value = _run_once(ev, x[rows], y[rows], target, take(eps, rows), domain.take(rows),
                                            start, owner, norm=norm, loss=loss, steps=steps,
                                            tick=lambda k: tick(k * g))
        value = value.to(torch.float64)
        for j in reversed(range(g)):      # the first run that fooled an example gives its delta
            part = slice(j * n, (j + 1) * n)
            result[todo[won[part]]], fooled[todo[won[part]]] = delta[part][won[part]], True
        for j in range(g):                # else the highest loss, the earliest run on ties
            part = slice(j * n, (j + 1) * n)
            higher = ~fooled[todo] & (value[part] > best_loss[todo])
            result[todo[higher]], best_loss[todo[higher]] = best[part][higher], value[part][higher]
    return result, fooled


def check_apgd_config(norm: str, loss: str, steps: int, restarts: int, n_target_classes: int) -> None:
    _check_choice("norm", norm, NORMS)
    _check_choice("loss", loss, LOSSES)
    check_count("steps", steps)
    check_count("restarts", restarts)
    check_count("n_target_classes", n_target_classes)


def apgd(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, norm: str = "linf", loss: Optional[str] = None,
         targeted: bool = False, n_target_classes: int = 9, steps: int = 100, restarts: int = 1,
         lower: Bound = 0.0, upper: Bound = 1.0, generator: Optional[torch.Generator] = None) -> Tensor:
    """Auto-PGD (Croce & Hein 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

    Follows the original algorithm: a start drawn on the sphere of radius eps, first step
    ``2 eps``, momentum 0.75 (none on the first step), the checkpoints of
    :func:`apgd_checkpoints` where the step halves and the iterate returns to the best point (see
    the module), ``restarts`` runs from fresh random starts on the examples not yet fooled, and,
    when ``targeted``, ``restarts`` runs for each of the ``n_target_classes`` runners-up of the
    clean logits as target (the loss then targets that class; success is a misclassification).

    Args:
        model: maps (B, *) inputs to (B, K) logits; it runs in the mode it is in (use ``eval()``).
        x: (B, *) floating-point inputs in [lower, upper].  y: (B,) integer labels in [0, K).
        eps: radius, a float or a tensor of shape () or (B,).
        norm: ``"linf"`` or ``"l2"``.  loss: ``"ce"``, ``"dlr"`` or ``"margin"`` (see
            :func:`attack_loss`); default ``"ce"``, and ``"dlr"`` when ``targeted`` (APGD-T). DLR
            needs K >= 3 classes, targeted DLR K >= 4; ``loss="ce"`` with ``targeted`` is the
            targeted cross-entropy.
        n_target_classes: targets of APGD-T (at most K - 1 are used).  steps: iterations per run.
        lower, upper: the input domain, as in :func:`pyibp.pgd`.
        generator: the random generator of the starts (default: the global one).
    Returns:
        delta of x's shape and dtype: per example the first fooling perturbation found, otherwise
        the one of highest loss over all runs; exactly inside the ball and the domain.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> delta = apgd(model, x, y, 0.1, loss="dlr", steps=20)
        >>> bool((delta.abs() <= 0.1).all())
        True
    """
    loss = loss if loss is not None else ("dlr" if targeted else "ce")
    check_apgd_config(norm, loss, steps, restarts, n_target_classes)
    eps_t, domain, y, _ = check_inputs(model, x, y, eps, lower, upper)
    model = unwrap(model)
    with untouched(model):
        delta, _ = run_apgd(Evaluator(model), x.detach(), y, eps_t, domain, norm=norm, loss=loss, targeted=targeted,
                            n_target_classes=n_target_classes, steps=steps, restarts=restarts,
                            generator=generator, tick=lambda n: None)
    return delta
