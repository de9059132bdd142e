"""Complete verification by branch and bound over ReLU splits, with beta-CROWN bounds.

The question: is there an input x in the box ``[lower, upper]`` with ``C f(x) <= d`` on every row
(a counterexample)? Branch and bound (Bunel et al., JMLR 2020; beta-CROWN, Wang et al. NeurIPS
2021) answers it by cutting the box into *domains*: the box plus, for some ReLU neurons, a split
``z_j >= 0`` (active) or ``z_j <= 0`` (inactive) of their pre-activation. A domain is closed
(verified) when some row has a lower bound of ``C_i f(x) - d_i`` > 0 over it; the answer is
``unsat`` when every domain is closed, ``sat`` when a point of the box satisfies every row.

Each round bounds many domains at once, one per batch entry:

* the splits clamp the boxes in front of their ReLUs (active: ``l = max(l, 0)``, inactive:
  ``u = min(u, 0)``), intersected with the parent's boxes (valid on the child) and IBP's
  (:func:`pyibp.bounds.intermediate.crown_trace`'s ``known``); with ``intermediate=True`` CROWN's
  boxes after the newest split are recomputed too (the earlier ones cannot change);
* the rows are bounded by alpha-CROWN with the split constraints as Lagrangian terms ``-beta s z_j``
  (:func:`pyibp.bounds.alpha.optimize_bound`), slopes and multipliers warm-started from the parent;
* an open domain is split on the unstable neuron whose upper relaxation costs its best row the most
  (BaBSR-like: the intercept ``-l u / (u - l)`` times the coefficient that reaches the ReLU);
* the domains with the lowest bounds are split first; the model is evaluated at the corner of the
  box that minimises each domain's linear bound, and a few signed-gradient steps start from the
  corners of the worst domains.

A point is reported only after a forward pass of the model at it, in the model's dtype and again in
float64, gives ``C f(x) <= d`` on every row; ``unsat`` comes only from bounds.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..bounds.alpha import AlphaOptions, optimize_bound
from ..bounds.crown import _backward, _ChannelsLastBackend, _crown_bound
from ..bounds.graph import BoundGraph, bound_graph
from ..bounds.ibp import Trace, _full_precision
from ..bounds.specs import _start, _walk

__all__ = ["BabOutcome", "relu_split_bab"]

Pair = Tuple[Tensor, Tensor]
STATUSES = ("unsat", "sat", "timeout", "unknown")
# alpha-CROWN on the whole box, then alpha-beta-CROWN per round: warm-started, 10 steps at a larger
# rate solved 4 hard MNIST-MLP properties in 18 s where 20 steps at (0.1, 0.05) took 25 s
_ROOT_OPTIONS = AlphaOptions(steps=30, lr=0.1, lr_decay=0.98, beta_lr=0.05)
_ROUND_OPTIONS = AlphaOptions(steps=10, lr=0.2, lr_decay=0.98, beta_lr=0.1)
_FINAL_OPTIONS = AlphaOptions(steps=100, lr=0.2, lr_decay=0.98, beta_lr=0.1)
# slopes and multipliers are kept in half precision: any slope in [0, 1] and any multiplier >= 0 is
# sound, so rounding costs only a little warm start, and the queue takes half the memory
_STORE = torch.float16
_PGD_STEPS = 10
_PGD_POINTS = 16
# branching neurons kept per domain: a small queue splits each domain on several at once
_CANDIDATES = 4


@dataclass
class BabOutcome:
    """What :func:`relu_split_bab` found.

    Attributes:
        status: ``"unsat"`` (every domain verified by bounds), ``"sat"`` (``x`` is a counterexample),
            ``"timeout"`` (the deadline came first) or ``"unknown"`` (the domain queue outgrew
            ``max_domains``, or a domain with every ReLU fixed could not be verified).
        x: the counterexample (the input's shape as given), checked by forward passes; else None.
        domains: how many domains were bounded (the whole box included).
        seconds: the time spent.
        bound: the lowest best-row lower bound of the open domains (of the closed ones when unsat):
            how far the bounds were from closing the search.
        reason: a few words on why the search ended.
    """

    status: str
    x: Optional[Tensor]
    domains: int
    seconds: float
    bound: float = -math.inf
    reason: str = ""


class _Falsifier:
    """Checks candidate points against the property and searches near them."""

    def __init__(self, model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor):
        self.model, self.lower, self.upper, self.C, self.d = model, lower, upper, C, d
        self._model64: Optional[nn.Module] = None

    def violation(self, x: Tensor, model: Optional[nn.Module] = None) -> Tensor:
        """(N,): ``max_i (C_i f(x) - d_i)``, <= 0 exactly at a counterexample."""
        model = model or self.model
        out = model(x).flatten(1)
        return (out @ self.C.to(out.dtype).t() - self.d.to(out.dtype)).amax(1)

    def check(self, x: Tensor) -> Optional[Tensor]:
        """The first of the points x (N, *input shape) that is a counterexample in the model's dtype
        and in float64, else None."""
        x = torch.minimum(torch.maximum(x.detach(), self.lower), self.upper)
        with torch.no_grad():
            hits = (self.violation(x) <= 0).nonzero()[:, 0]
            if hits.numel() == 0:
                return None
            if self._model64 is None:
                self._model64 = copy.deepcopy(self.model).double()
            confirmed = self.violation(x[hits].double(), self._model64) <= 0
        return x[hits[confirmed][0]][None] if bool(confirmed.any()) else None

    def search(self, starts: Tensor, steps: int) -> Optional[Tensor]:
        """Signed-gradient descent on the violation from the points ``starts``, each step checked."""
        found = self.check(starts)
        x = starts.detach().clone()
        size = (self.upper - self.lower) / 4
        for k in range(steps):
            if found is not None:
                return found
            x.requires_grad_()
            with torch.enable_grad():
                grad, = torch.autograd.grad(self.violation(x).sum(), x)
            x = torch.minimum(torch.maximum(x.detach() - size * (0.8 ** k) * grad.sign(), self.lower), self.upper)
            found = self.check(x)
        return found


class _Domains:
    """A batch of domains: named tensors sharing their first dimension.

    ``fields``: per split node p, ``("split", p)`` (N, *shape) int8 in {-1, 0, +1} and the boxes
    ``("lower", p)``, ``("upper", p)`` known to hold; once bounded, per ReLU node r ``("slopes", r)``
    and per split node ``("betas", p)`` (N, R, *shape), the warm starts of the children.
    ``bounds``: (N, R).  ``branch``: (N, _CANDIDATES) the next neurons to split.  ``since``: (N,)
    the lowest node index split since the boxes were computed (the boxes of the nodes up to it
    are final).
    """

    def __init__(self, fields: Dict[Tuple[str, int], Tensor], bounds: Tensor, branch: Tensor, since: Tensor):
        self.fields, self.bounds, self.branch, self.since = fields, bounds, branch, since

    def __len__(self) -> int:
        return self.bounds.shape[0]

    def take(self, index: Tensor) -> "_Domains":
        return _Domains({k: v.index_select(0, index) for k, v in self.fields.items()},
                        *(t.index_select(0, index) for t in (self.bounds, self.branch, self.since)))

    @staticmethod
    def cat(parts: List["_Domains"]) -> "_Domains":
        parts = [p for p in parts if len(p)] or parts[:1]     # the empty ones add nothing (not even fields)
        if len(parts) == 1:
            return parts[0]
        return _Domains({k: torch.cat([p.fields[k] for p in parts]) for k in parts[0].fields},
                        *(torch.cat([getattr(p, name) for p in parts]) for name in ("bounds", "branch", "since")))


class _Problem:
    """The graph, box and rows of one property, and the bound of a batch of domains."""

    def __init__(self, model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor, intermediate: bool):
        self.graph: BoundGraph = bound_graph(model)
        self.lower, self.upper, self.C, self.d = lower, upper, C, d
        self.box = ops.interval_to_center(lower, upper)
        self.backend = _ChannelsLastBackend()
        self.rows = C.shape[0]
        self.intermediate = intermediate
        # the ReLUs before the specification's start node, and the nodes they read (the split nodes)
        trace, env = _walk(self.graph, self.box, self.backend, None, False, Trace())
        self.start = _start(self.graph, env, C[None], -d[None], None)[0]
        self.relus = [n.index for n in self.graph.nodes[:self.start + 1] if n.kind == "relu"]
        self.input_of = {r: self.graph.nodes[r].inputs[0] for r in self.relus}
        self.split_nodes = sorted(set(self.input_of.values()))
        self.shapes = {p: trace.shapes[p] for p in self.split_nodes}
        sizes = [math.prod(self.shapes[p]) for p in self.split_nodes]
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        self.sizes = sizes

    def root(self) -> _Domains:
        """The whole box: no split, no known bound beyond IBP's."""
        fields: Dict[Tuple[str, int], Tensor] = {}
        for p in self.split_nodes:
            shape = (1,) + self.shapes[p]
            fields["split", p] = torch.zeros(shape, dtype=torch.int8, device=self.lower.device)
            fields["lower", p] = torch.full(shape, -math.inf, dtype=self.lower.dtype, device=self.lower.device)
            fields["upper", p] = torch.full(shape, math.inf, dtype=self.lower.dtype, device=self.lower.device)
        long = dict(dtype=torch.long, device=self.lower.device)
        return _Domains(fields, self.lower.new_zeros(1, self.rows), torch.zeros(1, _CANDIDATES, **long),
                        torch.zeros(1, **long))

    def bound(self, doms: _Domains, options: AlphaOptions, deadline: float) -> Tuple[_Domains, Tensor]:
        """Bounds the rows on each domain (its fields: splits and known boxes, optional warm starts).

        Returns ``(domains, corners)``: the domains with their new bounds (N, R), tighter boxes,
        slopes, multipliers and branching choice (-1: no unstable neuron left), and the corners of
        the box (N, R, *input shape) that minimise each row's linear bound.
        """
        n = len(doms)
        mu, rad = (t.expand((n,) + t.shape[1:]) for t in self.box)
        known = {p: (doms.fields["lower", p], doms.fields["upper", p]) for p in self.split_nodes}
        splits = {p: doms.fields["split", p] for p in self.split_nodes}
        slopes = {r: doms.fields["slopes", r] for r in self.relus if ("slopes", r) in doms.fields}
        betas = {p: doms.fields["betas", p] for p in self.split_nodes if ("betas", p) in doms.fields}
        with _full_precision(mu):
            with torch.no_grad():
                first_new = int(doms.since.min())
                if not self.intermediate and first_new > 0:     # below the root: the parents' boxes
                    first_new = len(self.graph.nodes)
                fixed = [p for p in self.split_nodes if p <= first_new]
                trace, env = _walk(self.graph, (mu, rad), self.backend, None, True, None, known, fixed, deadline)
                start, A, const = _start(self.graph, env, self.C.expand(n, -1, -1), -self.d.expand(n, -1), None)
                crown = torch.nan_to_num(_crown_bound(self.graph, trace, A, const, (mu, rad), start, None),
                                         nan=-math.inf)
            out = optimize_bound(self.graph, trace, A, const, (mu, rad), start, None, crown, options,
                                 slopes=slopes, splits=splits, betas=betas, any_row=True, deadline=deadline)
            with torch.no_grad():
                # one more pass with the best slopes and multipliers: Λ for the corners, and the
                # coefficients reaching each ReLU for the branching scores
                trace.alphas = {r: s.to(A.dtype) for r, s in out.slopes.items()}
                trace.extra = {p: -b.to(A.dtype) * splits[p][:, None].to(A.dtype) for p, b in out.betas.items()}
                arrived: Dict[int, Tensor] = {}
                lam, _ = _backward(self.graph, trace, A, const, start, None, arrived)
        corners = torch.where(lam > 0, self.lower, self.upper)
        fields = dict(doms.fields)
        for r in self.relus:
            p = self.input_of[r]
            low, up = ops.center_to_interval(*trace.boxes[r])
            fields["lower", p], fields["upper", p] = low.contiguous(), up.contiguous()
            default = (trace.boxes[r][0] > 0).to(_STORE)[:, None].expand((n, self.rows) + self.shapes[p])
            fields["slopes", r] = out.slopes[r].to(_STORE) if r in out.slopes else default.contiguous()
        for p in self.split_nodes:
            fields["betas", p] = (out.betas[p].to(_STORE) if p in out.betas
                                  else torch.zeros((n, self.rows) + self.shapes[p], dtype=_STORE, device=mu.device))
        result = _Domains(fields, out.bounds, doms.branch, torch.full_like(doms.since, len(self.graph.nodes)))
        result.branch = self._branch(result, trace, arrived, out.bounds)
        return result, corners

    def _branch(self, doms: _Domains, trace: Trace, arrived: Dict[int, Tensor], bounds: Tensor) -> Tensor:
        """(N, _CANDIDATES): the neurons each domain splits next, best first (flat indices over the
        split nodes), -1 where fewer are unstable.

        Score of an unstable neuron for the domain's best row, whose coefficient at the ReLU is a:
        what its relaxation costs that row, ``a⁻ (-l u / (u - l))`` (the upper line's intercept)
        plus half the largest gap of the lower line ``alpha z`` times ``a⁺``; a tiny multiple of
        ``u - l`` breaks ties, so that every unstable neuron scores above the stable ones.
        """
        n = len(doms)
        row = bounds.argmax(1)
        pick = torch.arange(n, device=row.device)
        scores = {p: torch.full((n,) + self.shapes[p], -1.0, dtype=bounds.dtype, device=row.device)
                  for p in self.split_nodes}
        for r in self.relus:
            p = self.input_of[r]
            low, up = ops.center_to_interval(*trace.boxes[r])
            unstable = (low < 0) & (up > 0)
            a = arrived[r][pick, row] if r in arrived else torch.zeros_like(low)
            alpha = doms.fields["slopes", r][pick, row].to(a.dtype)
            width = torch.where(unstable, up - low, torch.ones_like(up))
            intercept = -low * up / width
            gap = torch.maximum((1 - alpha) * up, -alpha * low)
            score = a.clamp(max=0).neg() * intercept + 0.5 * a.clamp(min=0) * gap + 1e-6 * width
            scores[p] = torch.where(unstable, torch.maximum(scores[p], score.nan_to_num(0.0)), scores[p])
        flat = torch.cat([scores[p].reshape(n, -1) for p in self.split_nodes], 1)
        best, index = flat.topk(min(_CANDIDATES, flat.shape[1]), 1)
        return torch.where(best >= 0, index, torch.full_like(index, -1))

    def children(self, doms: _Domains, levels: int) -> _Domains:
        """The children of each domain split on its first ``levels`` branching neurons (up to
        ``2 ** levels`` each; a domain with fewer candidates has fewer children)."""
        for level in range(levels):
            valid = doms.branch[:, level] >= 0
            doms = _Domains.cat([self._split(doms.take(valid.nonzero()[:, 0]), level),
                                 doms.take((~valid).nonzero()[:, 0])])
        return doms

    def _split(self, doms: _Domains, level: int) -> _Domains:
        """Two children per domain, split on its branching neuron ``level``: active first, then inactive."""
        n = len(doms)
        both = doms.take(torch.arange(n, device=doms.branch.device).repeat(2))
        neuron = both.branch[:, level]
        sign = torch.cat([torch.ones(n, dtype=torch.int8), -torch.ones(n, dtype=torch.int8)]).to(neuron.device)
        fields, since = dict(both.fields), both.since.clone()
        for p, offset, size in zip(self.split_nodes, self.offsets, self.sizes):
            mine = (neuron >= offset) & (neuron < offset + size)
            if not bool(mine.any()):
                continue
            since[mine] = torch.clamp(since[mine], max=p)
            k, j = mine.nonzero()[:, 0], neuron[mine] - offset
            split, low, up = (fields[name, p].reshape(2 * n, -1).clone() for name in ("split", "lower", "upper"))
            split[k, j] = sign[k]
            active = sign[k] > 0
            low[k, j] = torch.where(active, low[k, j].clamp(min=0), low[k, j])
            up[k, j] = torch.where(active, up[k, j], up[k, j].clamp(max=0))
            shape = (2 * n,) + self.shapes[p]
            fields["split", p], fields["lower", p], fields["upper", p] = (t.view(shape) for t in (split, low, up))
        return _Domains(fields, both.bounds, both.branch, since)


def _check_args(lower: Tensor, upper: Tensor, C: Tensor, d: Tensor, deadline: float, batch_size: int,
                max_domains: int) -> None:
    for name, t in (("lower", lower), ("upper", upper), ("C", C), ("d", d)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got "
                             f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if lower.shape != upper.shape:
        raise ValueError(f"lower and upper must have one shape, got {tuple(lower.shape)} and {tuple(upper.shape)}")
    if not (torch.isfinite(lower).all() and torch.isfinite(upper).all()):
        raise ValueError("lower and upper must be finite")
    if (lower > upper).any():
        raise ValueError(f"lower must be <= upper everywhere; {int((lower > upper).sum())} elements have lower > upper")
    if C.dim() != 2 or C.shape[0] == 0 or tuple(d.shape) != (C.shape[0],):
        raise ValueError(f"C must be (R, K) with R >= 1 and d (R,), got C {tuple(C.shape)} and d {tuple(d.shape)}")
    if not math.isfinite(deadline):
        raise ValueError(f"deadline must be a finite time.monotonic() value, got {deadline!r}")
    if int(batch_size) != batch_size or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 (two children per split), got {batch_size!r}")
    if int(max_domains) != max_domains or max_domains < 1:
        raise ValueError(f"max_domains must be an integer >= 1, got {max_domains!r}")


def relu_split_bab(model: nn.Module, lower: Tensor, upper: Tensor, C: Tensor, d: Tensor, *, deadline: float,
                   device: Optional[torch.device] = None, sound: bool = False, batch_size: int = 256,
                   max_domains: int = 20000, intermediate: bool = False) -> BabOutcome:
    """Decides whether some x in the box ``[lower, upper]`` has ``C f(x) <= d`` on every row, by
    branch and bound over ReLU splits with beta-CROWN bounds (see the module docstring).

    Args:
        model: an nn.Module :func:`pyibp.bounds.graph.bound_graph` captures, in eval mode.
        lower, upper: (1, *input shape), or (*input shape) when its first dimension is not 1: one box.
        C: (R, K) rows over the K flattened outputs.  d: (R,).
        deadline: the ``time.monotonic()`` value to stop by: a round in progress stops there
            (between two backward passes), and the next one does not start when it would likely
            end after it.
        device: where to compute (the model is copied there when it lives elsewhere); default the model's.
        sound: bounds in sound arithmetic; not offered by alpha/beta-CROWN yet (ValueError).
        batch_size: domains bounded per round (two children of each of ``batch_size // 2`` parents).
        max_domains: the largest queue of open domains; beyond it the search ends in ``"unknown"``.
        intermediate: recompute CROWN's boxes in front of the ReLUs after the newest split of each
            domain (tighter domains, each costlier); by default a domain keeps its parent's boxes,
            clamped by its splits and intersected with IBP's (as alpha,beta-CROWN's fixed
            intermediate bounds): on MNIST MLPs about twice the domains per second, and tighter
            bounds within a time limit.
    Returns:
        :class:`BabOutcome`; ``x`` (the input's shape as given) when ``status == "sat"``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
        >>> C, d = torch.tensor([[1.0, -1.0]]), torch.tensor([0.0])     # is f_0 <= f_1 somewhere?
        >>> out = relu_split_bab(model, -torch.ones(2), torch.ones(2), C, d, deadline=time.monotonic() + 10)
        >>> out.status in ("sat", "unsat")
        True
    """
    began = time.monotonic()
    _check_args(lower, upper, C, d, deadline, batch_size, max_domains)
    if sound:
        raise ValueError("sound=True: branch and bound needs sound alpha/beta-CROWN bounds, which "
                         "pyibp.bounds does not offer yet; run with sound=False")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else lower.dtype
    device = torch.device(device) if device is not None else (param.device if param is not None else lower.device)
    if param is not None and param.device != device:
        model = copy.deepcopy(model).to(device)
    given_shape = lower.shape
    batched = lower.dim() >= 2 and lower.shape[0] == 1
    lower, upper = ((t if batched else t[None]).to(device, dtype) for t in (lower, upper))
    C, d = C.to(device, dtype), d.to(device, dtype)
    falsifier = _Falsifier(model, lower, upper, C, d)

    def outcome(status: str, x: Optional[Tensor], domains: int, bound: float, reason: str) -> BabOutcome:
        x = x.reshape(given_shape) if x is not None else None
        return BabOutcome(status, x, domains, time.monotonic() - began, bound, reason)

    starts = torch.cat([(lower + upper) / 2, lower + (upper - lower) * torch.rand(
        (_PGD_POINTS - 1,) + lower.shape[1:], device=device, dtype=dtype)])
    found = falsifier.search(starts, _PGD_STEPS)
    if found is not None:
        return outcome("sat", found, 0, -math.inf, "a point near the centre")
    if C.shape[0] > 1:
        # the mean of the rows is <= 0 wherever every row is: one more row to prove > 0, which
        # closes domains where each row alone can be negative but not all at once
        C, d = torch.cat([C, C.mean(0, keepdim=True)]), torch.cat([d, d.mean(0, keepdim=True)])
    problem = _Problem(model, lower, upper, C, d, intermediate)
    try:
        fresh, corners = problem.bound(problem.root(), _ROOT_OPTIONS, deadline)
    except TimeoutError:
        return outcome("timeout", None, 0, -math.inf, "the deadline, during the whole box's bound")
    queue = fresh.take(fresh.branch.new_zeros(0))
    count, stuck, closed_floor, last_round = 1, 0, math.inf, 0.0
    while True:
        # settle the freshly bounded domains: drop the verified, try the corners of the others
        best_row = fresh.bounds.amax(1)
        closed = best_row > 0
        if bool(closed.any()):
            closed_floor = min(closed_floor, float(best_row[closed].min()))
        open_ = (~closed).nonzero()[:, 0]
        if open_.numel():
            found = falsifier.check(corners[open_].flatten(0, 1))
            if found is None:
                worst = open_[best_row[open_].argsort()[:max(1, _PGD_POINTS // problem.rows)]]
                found = falsifier.search(corners[worst].flatten(0, 1), _PGD_STEPS)
            if found is not None:
                return outcome("sat", found, count, float(best_row.min()), "near the minimiser of a domain's bound")
        fresh = fresh.take(open_)
        dead = fresh.branch[:, 0] < 0           # every ReLU fixed, and still open
        if bool(dead.any()):
            # no split left: the multipliers get a longer optimisation (its limit is the LP's bound)
            try:
                again, _ = problem.bound(fresh.take(dead.nonzero()[:, 0]), _FINAL_OPTIONS, deadline)
            except TimeoutError:
                return outcome("timeout", None, count, float(best_row.min()), "the deadline")
            stuck += int((again.bounds.amax(1) <= 0).sum())
        queue = _Domains.cat([queue, fresh.take((~dead).nonzero()[:, 0])])
        floor = float(queue.bounds.amax(1).min()) if len(queue) else closed_floor
        if len(queue) == 0:
            if stuck:
                return outcome("unknown", None, count, floor, f"{stuck} domains with every ReLU fixed stayed open")
            return outcome("unsat", None, count, floor, "every domain verified")
        if len(queue) > max_domains:
            return outcome("unknown", None, count, floor, f"more than max_domains={max_domains} open domains")
        if time.monotonic() + 0.5 * last_round > deadline:
            return outcome("timeout", None, count, floor, "the deadline")
        round_began = time.monotonic()
        order = queue.bounds.amax(1).argsort()
        take = min(len(queue), batch_size // 2)
        # while the queue is short, several splits per domain fill the batch
        levels = max(1, min(_CANDIDATES, int(math.log2(batch_size / take))))
        parents, rest = queue.take(order[:take]), queue.take(order[take:])
        try:
            fresh, corners = problem.bound(problem.children(parents, levels), _ROUND_OPTIONS, deadline)
        except TimeoutError:
            return outcome("timeout", None, count, floor, "the deadline")
        queue = rest
        count += len(fresh)
        last_round = time.monotonic() - round_began
