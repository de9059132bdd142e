"""FAB, the fast adaptive boundary attack (Croce & Hein 2020, "Minimally distorted adversarial
examples with a fast adaptive boundary attack"): :func:`fab`, targeted (FAB-T, as in AutoAttack)
or untargeted.

FAB looks for the smallest perturbation that changes the decision: each step linearises the
model at the iterate, projects both the iterate and the clean input onto the linearised decision
boundary (within the domain), and moves to a convex combination of the two projections,
overshooting by ``eta``; once the iterate is adversarial it steps back towards the input by
``beta``. An example counts as broken when the smallest adversarial perturbation found lies
inside the eps-ball. The projections onto a hyperplane inside a box are the original's
water-filling algorithms, for the box ``[lower, upper]`` rather than ``[0, 1]``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import unwrap
from .common import (NORMS, Bound, Domain, Eps, Evaluator, _check_choice, check_count, check_inputs,
                     per_example_view, project_, runs_at_once, take, untouched)

__all__ = ["fab"]

Tick = Callable[[int], None]
ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9


# ---------------------------------------------------------------------------------------------
# projections onto {z : w.z = b} ∩ [lo, hi] from t, minimal in l∞ / l2 (rows are examples)
def _project_linf(t: Tensor, w: Tensor, b: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The move d of least l∞ norm with w.(t + d) = b (as close as the box allows), t + d in the box."""
    sign = 2 * ((w * t).sum(1) - b >= 0).to(t.dtype) - 1
    w, b = w * sign[:, None], b * sign
    toward_upper = (w < 0).to(t.dtype)                 # the coordinates that lower w.z by rising
    bound = torch.where(w < 0, hi, lo)
    d = (bound - t) * (w != 0).to(t.dtype)
    room = (2 * toward_upper - 1) * (bound - t)        # distance to the box along the move, >= 0
    order = torch.argsort(room, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    order_desc = order.flip((1,))
    ws = w.gather(1, order_desc)
    bs2 = -ws * d.gather(1, order_desc)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0[:, None]
    b2 = sb[:, -1] - s[:, -1] * room.gather(1, order[:, :1])[:, 0]
    whole = b - b2 > 0
    partial = (b - b0 > 0) & (b - b2 <= 0)
    lb = torch.zeros(int(partial.sum()), device=t.device, dtype=t.dtype)
    ub = torch.full_like(lb, w.shape[1] - 1)
    order_p, sb_p, s_p, room_p, b_p = order[partial], sb[partial], s[partial], room[partial], b[partial]
    for _ in range(math.ceil(math.log2(max(w.shape[1], 2)))):
        mid = torch.floor((lb + ub) / 2)
        k = mid.long()[:, None]
        current = order_p.gather(1, order_p.shape[1] - 1 - k)
        c = b_p - (sb_p.gather(1, k) - s_p.gather(1, k) * room_p.gather(1, current))[:, 0] > 0
        lb, ub = torch.where(c, mid, lb), torch.where(c, ub, mid)
    k = lb.long()
    if whole.any():
        lam = ((b[whole] - sb[whole, -1]) / -s[whole, -1]).clamp_min(0)[:, None]
        d[whole] = (2 * toward_upper[whole] - 1) * lam
    if partial.any():
        rows = torch.arange(k.numel(), device=t.device)
        lam = ((b[partial] - sb[partial][rows, k]) / -s[partial][rows, k]).clamp_min(0)[:, None]
        up = toward_upper[partial]
        d[partial] = torch.minimum(lam, d[partial]) * up + torch.maximum(-lam, d[partial]) * (1 - up)
    return d * (w != 0).to(t.dtype)


def _project_l2(t: Tensor, w: Tensor, b: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The move d of least l2 norm with w.(t + d) = b (as close as the box allows), t + d in the box."""
    w = w.clone()
    c = (w * t).sum(1) - b
    flip = c < 0
    w[flip] *= -1
    c[flip] *= -1
    r = torch.maximum((t - lo) / w, (t - hi) / w).clamp(min=-1e12, max=1e12)
    r[w.abs() < 1e-8] = 1e12
    r[r == -1e12] *= -1
    rs, order = torch.sort(r, dim=1)
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs[rs == 1e12] = 0
    rs2[rs2 == 1e12] = 0
    w3s = (w ** 2).gather(1, order)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w) * (w.abs() > 1e-8).to(t.dtype)
    s = torch.cat(((-w5[:, 0] * rs[:, 0])[:, None], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, :1]), 1)
    c4 = s[:, 0] + c < 0
    c3 = (d * w).sum(dim=1) + c > 0
    c2 = ~c4 & ~c3
    lb = torch.zeros(int(c2.sum()), device=t.device, dtype=t.dtype)
    ub = torch.full_like(lb, w.shape[1] - 1)
    s_, c_ = s[c2], c[c2]
    for _ in range(math.ceil(math.log2(max(w.shape[1], 2)))):
        mid = torch.floor((lb + ub) / 2)
        above = s_.gather(1, mid.long()[:, None])[:, 0] + c_ > 0
        lb, ub = torch.where(above, mid, lb), torch.where(above, ub, mid)
    k = lb.long()
    if c4.any():
        d[c4] = -(c[c4] / w5[c4][:, 0])[:, None] * w[c4]
    if c2.any():
        rows = torch.arange(k.numel(), device=t.device)
        ws_k = ws[c2][rows, k]
        alpha = (s[c2][rows, k] + c[c2]) / torch.where(ws_k == 0, torch.ones_like(ws_k), ws_k) + rs[c2][rows, k]
        alpha = torch.where(ws_k == 0, torch.zeros_like(alpha), alpha)
        beyond = (alpha[:, None] > r[c2]).to(t.dtype)
        d[c2] = d[c2] * beyond - alpha[:, None] * w[c2] * (1 - beyond)
    return d * (w.abs() > 1e-8).to(t.dtype)


def _norms(t: Tensor, norm: str) -> Tensor:
    flat = t.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


# ---------------------------------------------------------------------------------------------
# the attack
def _boundary(ev: Evaluator, z: Tensor, y: Tensor, target: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Logit differences ``f_j - f_y`` (B, K') at z and their input gradients (B, K', *): for a
    target the one difference ``f_t - f_y``, else all j (with j = y set to 1e10, never chosen)."""
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = ev.logits(zz, y).to(torch.promote_types(z.dtype, torch.float32))
        rows = torch.arange(z.shape[0], device=z.device)
        if target is not None:
            diff = logits[rows, target] - logits[rows, y]
            (grad,) = torch.autograd.grad(diff.sum(), zz)
            return diff.detach()[:, None], grad[:, None]
        grads = [torch.autograd.grad(logits[:, j].sum(), zz, retain_graph=j < logits.shape[1] - 1)[0]
                 for j in range(logits.shape[1])]
    g = torch.stack(grads, 1)
    df = logits.detach() - logits.detach()[rows, y][:, None]
    dg = g - g[rows, y][:, None]
    df[rows, y] = 1e10
    return df, dg


def _fab_start(x: Tensor, eps: Tensor, domain: Domain, norm: str, generator: Optional[torch.Generator]) -> Tensor:
    """The original's random start of a restart: a uniform (l∞) or Gaussian (l2) direction at
    half the radius eps, clamped to the domain."""
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device) - 1
    else:
        t = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    z = x + per_example_view(eps.to(x.dtype), x) * t / per_example_view(_norms(t, norm), x) * 0.5
    return torch.maximum(torch.minimum(z, domain.upper), domain.lower)


def _fab_once(ev: Evaluator, x: Tensor, y: Tensor, target: Optional[Tensor], eps: Tensor, domain: Domain,
              start: Tensor, owner: Tensor, *, norm: str, steps: int, tick: Tick) -> Tuple[Tensor, Tensor]:
    """FAB from ``start`` on R rows of correctly classified points, each row one run (``owner``
    (R,) names the example of each row, as in APGD's batched runs). Returns per row
    ``(adversarial input, its norm)``, the norm 1e10 where none was found. Once a row's best
    norm is within eps its example is broken and all its rows leave the batch; the other rows'
    runs do not depend on them."""
    R = x.shape[0]
    project = _project_linf if norm == "linf" else _project_l2
    lo, hi = (domain.lower.expand(x.shape).flatten(1), domain.upper.expand(x.shape).flatten(1))
    view = lambda t: per_example_view(t, x)  # noqa: E731
    adv, best_norm = x.clone(), torch.full((R,), 1e10, dtype=torch.float64, device=x.device)
    z = start
    active = torch.arange(R, device=x.device)
    e = eps.to(torch.float64).expand(R)
    broken = torch.zeros(int(owner.max()) + 1 if R else 0, dtype=torch.bool, device=x.device)
    for step in range(steps):
        if active.numel() == 0:
            tick(steps - step)
            break
        xa, za, ya = x[active], z[active], y[active]
        n = xa.shape[0]
        df, dg = _boundary(ev, za, ya, None if target is None else target[active])
        dual = dg.flatten(2).abs().sum(-1) if norm == "linf" else dg.flatten(2).norm(dim=-1)
        choice = (df.abs() / (1e-12 + dual)).argmin(1)
        rows = torch.arange(n, device=x.device)
        w = dg[rows, choice].flatten(1).to(x.dtype)
        b = (-df[rows, choice] + (w * za.flatten(1)).sum(1)).to(x.dtype)
        la, ha = lo[active], hi[active]
        moves = project(torch.cat((za.flatten(1), xa.flatten(1))), torch.cat((w, w)), torch.cat((b, b)),
                        torch.cat((la, la)), torch.cat((ha, ha)))
        d_iter, d_input = moves[:n].reshape(xa.shape), moves[n:].reshape(xa.shape)
        sizes = _norms(moves, norm).clamp_min(1e-8)
        mix = (sizes[:n] / (sizes[:n] + sizes[n:])).clamp(0, ALPHA_MAX)
        za = (za + ETA * d_iter) * (1 - view(mix)) + (xa + ETA * d_input) * view(mix)
        za = torch.maximum(torch.minimum(za, ha.reshape(xa.shape)), la.reshape(xa.shape))
        with torch.no_grad():
            wrong = ev.logits(za, ya).argmax(1) != ya
        if wrong.any():
            size = _norms(za - xa, norm).to(torch.float64)
            better = wrong & (size < best_norm[active])
            adv[active[better]], best_norm[active[better]] = za[better], size[better]
            za[wrong] = xa[wrong] + (za[wrong] - xa[wrong]) * BETA
            broken[owner[active[better & (size <= e[active])]]] = True
        z[active] = za
        active = active[~broken[owner[active]]]
        tick(1)
    return adv, best_norm


def run_fab(ev: Evaluator, x: Tensor, y: Tensor, eps: Tensor, domain: Domain, *, norm: str, targeted: bool,
            n_target_classes: int, steps: int, restarts: int, generator: Optional[torch.Generator],
            tick: Tick, clean_logits: Optional[Tensor] = None, at_once: Optional[int] = None
            ) -> Tuple[Tensor, Tensor]:
    """FAB over target classes and restarts (the first run of each target from the input, later
    ones from random starts), each run on the examples not yet broken. Returns ``(delta, fooled)``.

    The runs go in groups of ``at_once`` rows per example (default :func:`runs_at_once`), as in
    :func:`pyibp.attacks.apgd.run_apgd`; random starts are drawn for all B examples in run order
    whatever the grouping. ``clean_logits`` (B, K), when the caller has them, spare a forward pass.
    """
    if not (torch.isfinite(domain.lower).all() and torch.isfinite(domain.upper).all()):
        raise ValueError("fab projects onto the input domain and needs finite lower and upper bounds")
    B = x.shape[0]
    delta = torch.zeros_like(x)
    fooled = torch.zeros(B, dtype=torch.bool, device=x.device)
    if not B:
        return delta, fooled
    with torch.no_grad():
        logits = clean_logits if clean_logits is not None else ev.logits(x, y)
    ranks: List[Optional[int]] = [None]
    if targeted:
        ranks = list(range(1, min(n_target_classes, logits.shape[1] - 1) + 1))
    correct = logits.argmax(1) == y
    ranked = logits.argsort(dim=1, descending=True)
    runs = [(rank, restart) for rank in ranks for restart in range(restarts)]
    group = at_once if at_once is not None else runs_at_once(x, len(runs))
    for first in range(0, len(runs), group):
        chosen = runs[first:first + group]
        g = len(chosen)
        starts = [_fab_start(x, eps, domain, norm, generator) if restart > 0 else x for _, restart in chosen]
        todo = (correct & ~fooled).nonzero()[:, 0]
        n = todo.numel()
        if n == 0:
            tick(steps * g)
            continue
        rows = todo.repeat(g)
        owner = torch.arange(n, device=x.device).repeat(g)
        target = None if not targeted else torch.cat([ranked[todo, rank] for rank, _ in chosen])
        start = torch.cat([st[todo] for st in starts])
        adv, size = _fab_once(ev, x[rows], y[rows], target, take(eps, rows), domain.take(rows), start, owner,
                              norm=norm, steps=steps, tick=lambda k: tick(k * g))
        won = size <= take(eps, rows).to(torch.float64)
        for j in reversed(range(g)):      # the first run that broke an example gives its delta
            part = slice(j * n, (j + 1) * n)
            hit = todo[won[part]]
            delta[hit] = adv[part][won[part]] - x[hit]
            fooled[hit] = True
    # Found perturbations lie within eps up to rounding; the projection makes that exact.
    return project_(delta, x, eps, domain, norm), fooled


def fab(model: nn.Module, x: Tensor, y: Tensor, eps: Eps, *, norm: str = "linf", targeted: bool = True,
        n_target_classes: int = 9, steps: int = 100, restarts: int = 1, lower: Bound = 0.0, upper: Bound = 1.0,
        generator: Optional[torch.Generator] = None) -> Tensor:
    """FAB (Croce & Hein 2020): minimum-norm adversarial perturbations, kept where within eps.

    With ``targeted`` (FAB-T, AutoAttack's) each of the ``n_target_classes`` runners-up of the
    clean logits is the target of ``restarts`` runs (one backward pass per step); untargeted FAB
    linearises every class boundary (K backward passes per step). Original settings:
    ``alpha_max = 0.1``, overshoot ``eta = 1.05``, backward step ``beta = 0.9``; restarts after
    the first start at random in the ball of half the radius.

    Args:
        model: maps (B, *) inputs to (B, K) logits.  x: (B, *) inputs in [lower, upper].
        y: (B,) integer labels.  eps: radius, a float or (B,).  norm: ``"linf"`` or ``"l2"``.
        steps: iterations per run.  lower, upper: the input domain (finite; floats or tensors as
            in :func:`pyibp.pgd`).  generator: for the random restarts.
    Returns:
        delta of x's shape and dtype, exactly inside the ball and the domain: the smallest
        misclassifying perturbation found where it lies within eps, else zero.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> delta = fab(model, x, y, 0.1, steps=10)
        >>> bool((delta.abs() <= 0.1).all())
        True
    """
    _check_choice("norm", norm, NORMS)
    check_count("steps", steps)
    check_count("restarts", restarts)
    check_count("n_target_classes", n_target_classes)
    eps_t, domain, y, _ = check_inputs(model, x, y, eps, lower, upper)
    model = unwrap(model)
    with untouched(model):
        delta, _ = run_fab(Evaluator(model), x.detach(), y, eps_t, domain, norm=norm, targeted=targeted,
                           n_target_classes=n_target_classes, steps=steps, restarts=restarts, generator=generator,
                           tick=lambda n: None)
    return delta
