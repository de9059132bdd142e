"""Complete verification of a :class:`~pyibp.verifier.spec.Property`: falsify, bound, branch and bound.

:func:`complete_verify` answers ``sat`` (with a checked counterexample), ``unsat``, ``timeout`` or
``unknown``:

1. every (box, conjunction) subproblem is bounded over its whole box: the conjunction holds nowhere
   (the subproblem is ``unsat``) when some row's lower bound of ``C_i f(x) - d_i`` is > 0;
2. the falsifier (:mod:`pyibp.verifier.falsify`) searches briefly (one round of restarts) for a
   counterexample to the subproblems left open;
3. undecided subproblems with at most :data:`INPUT_SPLIT_DIMS` inputs are split on the input box
   (bisect the dimension of largest width x |gradient|, bound many subdomains per call, prune the
   verified ones, test every subdomain's centre and run the falsifier on the worst ones); larger
   ones go to :func:`pyibp.verifier.bab.relu_split_bab` (ReLU splitting, beta-CROWN);
4. when subproblems stay undecided, the falsifier searches again, for up to ``falsify_fraction``
   of the timeout.

``unsat`` comes only from bounds over boxes rounded outward (in sound mode, sound bounds); ``sat``
only from a point :func:`~pyibp.verifier.falsify.check_counterexample` confirms. The domain queue is
capped (``max_domains``): a full queue ends in ``unknown``, never in an out-of-memory error.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..bounds import interval_bounds, spec_bounds
from .bab import relu_split_bab
from .falsify import Counterexample, _Checker, _stack, falsify, model_dtype_device, rounded_box, search
from .spec import Case, Property

__all__ = ["complete_verify", "VerificationOutcome", "INPUT_SPLIT_DIMS", "STATUSES"]

INPUT_SPLIT_DIMS = 16
# the rough cost of each method in units of the one before it: CROWN's intermediate bounds take a
# backward pass per layer (hundreds of CROWN-IBP passes on the tutorial CNN), alpha-CROWN its 20 steps
COST = {"crown-ibp": 1, "crown": 400, "alpha-crown": 25}
STATUSES = ("sat", "unsat", "timeout", "unknown")


@dataclass
class VerificationOutcome:
    """What :func:`complete_verify` found.

    Attributes:
        status: ``"sat"`` (a counterexample exists: ``counterexample``), ``"unsat"`` (proved safe),
            ``"timeout"`` or ``"unknown"`` (undecided: a full domain queue, no ReLU branch and bound).
        counterexample: the checked counterexample when ``sat``.
        seconds: wall time.  stats: per stage: seconds, subproblems decided, domains bounded.
    """

    status: str
    counterexample: Optional[Counterexample] = None
    seconds: float = 0.0
    stats: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        cex = self.counterexample
        return {"status": self.status, "seconds": self.seconds, "stats": self.stats,
                "counterexample": None if cex is None else {"x": cex.x.flatten().tolist(), "y": cex.y.tolist(),
                                                           "case": cex.case, "conjunction": cex.conjunction}}


def _lower_bounds(model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor, d: Optional[Tensor], method: str,
                  sound: bool) -> Tensor:
    """Lower bounds (B, R) of ``C @ f(x).flatten() + d`` over ``lower <= x <= upper`` ((B, *shape) in
    the model's dtype; C (B, R, K), d (B, R) float64): :func:`pyibp.bounds.spec_bounds` by ``method``;
    in sound mode, sound IBP's output bounds (of the exact-arithmetic network) combined in float64,
    less a rounding allowance (spec_bounds has no sound arithmetic for general rows)."""
    if not sound:
        return spec_bounds(model, lower, upper, C.to(lower.dtype), None if d is None else d.to(lower.dtype),
                           method=method).double()
    mid = (lower + upper) / 2
    eps = (upper - lower).flatten(1).amax(1)        # the l∞ ball around mid covers the box; ∩ [lower, upper] is it
    lb, ub = interval_bounds(model, mid, eps, lower=lower, upper=upper, sound=True)
    lb, ub = lb.flatten(1).double(), ub.flatten(1).double()
    pos, neg = C.clamp(min=0), C.clamp(max=0)
    out = torch.einsum("brk,bk->br", pos, lb) + torch.einsum("brk,bk->br", neg, ub)
    if d is not None:
        out = out + d
    # float64 sums of K + 1 terms err by at most (K + 1) u sum |term| (u = 2^-53); doubled
    size = torch.einsum("brk,bk->br", pos, lb.abs()) - torch.einsum("brk,bk->br", neg, ub.abs())
    return out - (size + (0 if d is None else d.abs())) * (C.shape[-1] + 1) * 2.0 ** -52


class _Run:
    """One call of :func:`complete_verify`: the model, the deadline, the checker and the stats."""

    def __init__(self, model, prop, deadline, method, sound, batch, max_domains, seed):
        self.model, self.prop, self.deadline = model, prop, deadline
        self.method, self.sound, self.batch, self.max_domains, self.seed = method, sound, batch, max_domains, seed
        self.dtype, self.device = model_dtype_device(model)
        self.checker = _Checker(model, prop)
        self.stats: Dict[str, Any] = {"falsify_runs": 0, "falsify_seconds": 0.0, "bound_seconds": 0.0,
                                      "bab_seconds": 0.0, "subproblems": sum(len(c.conjunctions) for c in prop.cases),
                                      "decided_by_bound": 0, "domains": 0}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def falsify(self, seconds: float, rounds: Optional[int] = None,
                only: Optional[List[Tuple[int, int]]] = None) -> Optional[Counterexample]:
        """The falsifier on the whole property, or on the (case, conjunction) subproblems ``only``."""
        start = time.monotonic()
        prop, cases = self.prop, list(range(len(self.prop.cases)))
        if only is not None:
            cases = sorted({k for k, _ in only})
            prop = Property(tuple(Case(self.prop.cases[k].lower, self.prop.cases[k].upper,
                                       tuple(self.prop.cases[k].conjunctions[j] for kk, j in only if kk == k))
                                  for k in cases))
        # a new seed per run: a second search must not retrace the first one's restarts
        cex = falsify(self.model, prop, deadline=min(self.deadline, start + seconds), rounds=rounds,
                      seed=self.seed + self.stats["falsify_runs"], device=self.device)
        self.stats["falsify_runs"] += 1
        self.stats["falsify_seconds"] += time.monotonic() - start
        # indices of the property itself (the check is repeated on it)
        return None if cex is None else self.checker(cex.x.to(self.device), cases[cex.case])

    def bound(self, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor,
              method: Optional[str] = None) -> Tensor:
        """(N,) the largest row lower bound of ``C f - d`` per domain: > 0 proves it (lower, upper
        (N, *shape) outward-rounded, C (N, R, K), d (N, R))."""
        start = time.monotonic()
        with torch.no_grad():
            lb = _lower_bounds(self.model, lower, upper, C, -d, method or self.method, self.sound)
        self.stats["bound_seconds"] += time.monotonic() - start
        return lb.amax(1)

    def whole_boxes(self) -> List[Tuple[int, int]]:
        """Bounds every subproblem over its whole box; returns the undecided (case, conjunction) pairs.

        The methods run from the cheapest (CROWN-IBP) up to ``method``; the next one is skipped when
        the last one's time times its :data:`COST` would not fit in half of what is left, so that
        the bound step keeps to the timeout (CROWN's intermediate bounds are costly on CNNs)."""
        ladder = [self.method]
        if self.method in COST and not self.sound:
            ladder = [m for m in COST if list(COST).index(m) <= list(COST).index(self.method)]
        undecided = [(k, j) for k, case in enumerate(self.prop.cases) for j in range(len(case.conjunctions))]
        for step, method in enumerate(ladder):
            start = time.monotonic()
            undecided = self._bound_subproblems(undecided, method)
            if not undecided or (step + 1 < len(ladder)
                                 and COST[ladder[step + 1]] * (time.monotonic() - start) > self.left() / 2):
                break
        self.stats["decided_by_bound"] = self.stats["subproblems"] - len(undecided)
        return undecided

    def _bound_subproblems(self, subproblems: List[Tuple[int, int]], method: str) -> List[Tuple[int, int]]:
        """The subproblems ``method`` leaves undecided (one bound call per case)."""
        undecided = []
        for k in sorted({k for k, _ in subproblems}):
            case = self.prop.cases[k]
            js = [j for kk, j in subproblems if kk == k]
            lo, hi = rounded_box(case.lower, case.upper, self.dtype, inward=False)
            C, d = _stack([case.conjunctions[j] for j in js], torch.float64, self.device)
            J = C.shape[0]
            value = self.bound(lo.to(self.device).expand(J, *lo.shape), hi.to(self.device).expand(J, *hi.shape), C, d,
                               method)
            undecided += [(k, j) for j, v in zip(js, value.tolist()) if not v > 0]
        return undecided

    def input_split(self, k: int, j: int) -> Union[str, Counterexample]:
        """Branch and bound on the input box of case k for its conjunction j."""
        case = self.prop.cases[k]
        lo, hi = rounded_box(case.lower, case.upper, self.dtype, inward=False)
        inner = rounded_box(case.lower, case.upper, self.dtype, inward=True)
        C1, d1 = _stack(case.conjunctions[j:j + 1], self.dtype, self.device)          # for gradients
        C64, d64 = _stack(case.conjunctions[j:j + 1], torch.float64, self.device)     # for bounds
        lower, upper = lo.to(self.device)[None], hi.to(self.device)[None]
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        stuck = False
        rounds = 0
        while lower.shape[0]:
            if self.left() <= 0:
                return "timeout"
            order = value.argsort()                     # the most violated first
            lower, upper, value = lower[order], upper[order], value[order]
            n = min(self.batch, lower.shape[0])
            lo_b, hi_b = lower[:n], upper[:n]
            dim = self._split_dims(lo_b, hi_b, C1, d1)
            mid = ((lo_b + hi_b) / 2).flatten(1).gather(1, dim[:, None])
            left_hi, right_lo = hi_b.flatten(1).clone(), lo_b.flatten(1).clone()
            left_hi.scatter_(1, dim[:, None], mid)
            right_lo.scatter_(1, dim[:, None], mid)
            child_lo = torch.cat([lo_b, right_lo.view_as(lo_b)])
            child_hi = torch.cat([left_hi.view_as(hi_b), hi_b])
            flat = (child_hi - child_lo).flatten(1)
            degenerate = (flat.amax(1) <= 0) | ((child_lo + child_hi) / 2 == child_lo).flatten(1).all(1)
            found = self._centres(child_lo, child_hi, k, j, inner)
            if found is not None:
                return found
            N = child_lo.shape[0]
            child_value = self.bound(child_lo, child_hi, C64.expand(N, -1, -1), d64.expand(N, -1))
            self.stats["domains"] += N
            keep = (child_value <= 0) & ~degenerate
            stuck = stuck or bool(((child_value <= 0) & degenerate).any())
            lower = torch.cat([lower[n:], child_lo[keep]])
            upper = torch.cat([upper[n:], child_hi[keep]])
            value = torch.cat([value[n:], child_value[keep]])
            if lower.shape[0] > self.max_domains:
                return "unknown"
            rounds += 1
            if rounds % 8 == 0 and lower.shape[0]:
                found = self._attack(lower, upper, C1, d1, k, inner)
                if found is not None:
                    return found
        return "unknown" if stuck else "unsat"

    def _split_dims(self, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor) -> Tensor:
        """(n,) the dimension to bisect per domain: the largest width x |d violation / dx| at the centre
        (the widest where the gradient vanishes)."""
        width = (upper - lower).flatten(1)
        x = ((lower + upper) / 2).detach().requires_grad_(True)
        with torch.enable_grad():
            y = self.model(x).flatten(1)
            loss = (torch.einsum("rk,nk->nr", C[0], y) - d[0]).amax(1).sum()
            grad, = torch.autograd.grad(loss, x)
        score = width * (grad.flatten(1).abs() + 1e-3 * grad.flatten(1).abs().amax(1, keepdim=True) + 1e-30)
        return torch.where(width.amax(1, keepdim=True) > 0, score, width).argmax(1)

    def _centres(self, lower: Tensor, upper: Tensor, k: int, j: int, inner) -> Optional[Counterexample]:
        """A checked counterexample among the domains' centres (moved into the inward box), if any."""
        x = torch.minimum(torch.maximum((lower + upper) / 2, inner[0].to(lower)), inner[1].to(lower))
        with torch.no_grad():
            y = self.model(x).flatten(1)
        cj = self.prop.cases[k].conjunctions[j]
        for i in cj.holds(y).nonzero().flatten()[:8].tolist():
            cex = self.checker(x[i], k)
            if cex is not None:
                return cex
        return None

    def _attack(self, lower, upper, C1, d1, k, inner) -> Optional[Counterexample]:
        """PGD on the first domains of the queue, the most violated (intersected with the inward-rounded box)."""
        start = time.monotonic()
        n = min(32, lower.shape[0])
        lo = torch.maximum(lower[:n], inner[0].to(lower))
        hi = torch.minimum(upper[:n], inner[1].to(lower))
        ok = (lo <= hi).flatten(1).all(1)
        found = None
        if bool(ok.any()):
            target = torch.zeros(int(ok.sum()), dtype=torch.long, device=lo.device)
            for x in search(self.model, lo[ok], hi[ok], C1, d1, target, steps=20,
                            deadline=min(self.deadline, start + 1.0)):
                found = self.checker(x, k)
                if found is not None:
                    break
        self.stats["falsify_seconds"] += time.monotonic() - start
        return found

    def relu_split(self, k: int, j: int) -> Union[str, Counterexample]:
        """:func:`pyibp.verifier.bab.relu_split_bab` on subproblem (k, j) over its outward-rounded box
        (``"unknown"`` in sound mode where it has no sound bounds)."""
        case = self.prop.cases[k]
        cj = case.conjunctions[j]
        lo, hi = rounded_box(case.lower, case.upper, self.dtype, inward=False)
        try:
            result = relu_split_bab(self.model, lo[None], hi[None], cj.C, cj.d, deadline=self.deadline,
                                    device=self.device, sound=self.sound)
        except ValueError:
            if self.sound:
                return "unknown"
            raise
        self.stats["domains"] += int(result.domains)
        if result.status == "sat":
            # its point is checked again here, against the property itself (in the exact box)
            cex = None if result.x is None else self.checker(result.x.to(self.device, self.dtype).reshape(
                case.lower.shape), k)
            return cex if cex is not None else "unknown"
        return result.status if result.status in STATUSES else "unknown"


def complete_verify(model: nn.Module, prop: Property, *, timeout: float = 60.0, device: Union[str, torch.device,
                    None] = None, sound: bool = False, method: str = "alpha-crown", falsify_fraction: float = 0.1,
                    batch: int = 1024, max_domains: int = 200_000, seed: int = 0) -> VerificationOutcome:
    """Decides ``prop`` for ``model``: is there an input of one of its boxes whose outputs satisfy one
    of its conjunctions?

    Args:
        model: an nn.Module pyibp can bound (e.g. :func:`~pyibp.verifier.onnx.load_onnx`'s), moved to
            ``device`` and put in eval mode.  prop: the counterexample region.
        timeout: seconds for the whole call (honoured to within a bound call or a falsifier step).
        device: where to compute (default the model's).  sound: sound bounds for ``unsat``.
        method: the bounding method passed to ``pyibp.bounds.spec_bounds`` (IBP without it).
        falsify_fraction: the share of the timeout each falsifier run may use (at most 10 s): one
            round of restarts after the bounds, and a longer search after branch and bound when it
            left subproblems undecided.
        batch: subdomains bounded per call in input splitting.  max_domains: the queue's cap.
    Returns:
        a :class:`VerificationOutcome`.
    Example:
        >>> out = complete_verify(net, read_vnnlib("prop.vnnlib", (1, 28, 28)), timeout=60)
        >>> out.status in ("sat", "unsat", "timeout", "unknown")
        True
    """
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if batch < 1 or max_domains < 1:
        raise ValueError(f"batch and max_domains must be >= 1, got {batch} and {max_domains}")
    start = time.monotonic()
    if device is not None:
        model = model.to(device)
    model = model.eval()
    run = _Run(model, prop, start + timeout, method, sound, batch, max_domains, seed)

    def done(status: str, cex: Optional[Counterexample] = None) -> VerificationOutcome:
        run.stats = {k: round(v, 4) if isinstance(v, float) else v for k, v in run.stats.items()}
        return VerificationOutcome(status, cex, time.monotonic() - start, run.stats)

    budget = min(falsify_fraction * timeout, 10.0)
    try:
        undecided = run.whole_boxes()
    except TypeError as err:        # an op without a bound rule (pyibp names it): only the falsifier can decide
        if not str(err).startswith(("pyibp", "node ")):   # the bound graph's own errors, not a bug's
            raise
        run.stats["bound_error"] = str(err)
        cex = run.falsify(budget)
        return done("sat", cex) if cex is not None else done("timeout" if run.left() <= 0 else "unknown")
    if not undecided:
        return done("unsat")
    cex = run.falsify(budget, rounds=1, only=undecided)      # a quick look at what the bounds left open
    if cex is not None:
        return done("sat", cex)
    statuses = []
    bab_start = time.monotonic()
    small = prop.input_shape and int(torch.tensor(prop.input_shape).prod()) <= INPUT_SPLIT_DIMS
    for k, j in undecided:
        result = run.input_split(k, j) if small else run.relu_split(k, j)
        if isinstance(result, Counterexample):
            run.stats["bab_seconds"] = time.monotonic() - bab_start
            return done("sat", result)
        statuses.append(result)
        if result == "timeout":
            break
    run.stats["bab_seconds"] = time.monotonic() - bab_start
    if any(s != "unsat" for s in statuses) and run.left() > 0:
        # undecided by the bounds: a second, equal share of the time goes to looking for a counterexample
        cex = run.falsify(budget, only=[kj for kj, s in zip(undecided, statuses) if s != "unsat"])
        if cex is not None:
            return done("sat", cex)
    if all(s == "unsat" for s in statuses):
        return done("unsat")
    if "timeout" in statuses or run.left() <= 0:
        return done("timeout")
    return done("unknown")
