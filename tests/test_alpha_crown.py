"""CROWN and alpha-CROWN: agreement with an independent dense float64 CROWN, the order
ibp <= crown-ibp <= crown <= alpha-crown, soundness at sampled and attacked points, optimal slopes on
one- and two-neuron networks, GELU/SiLU, general specifications over any box, errors."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyibp
from pyibp.bounds import AlphaOptions, spec_bounds
from pyibp.bounds.relaxations import activation_interval, relaxation
from pyibp.models import resnet_small
from pyibp.nn import Normalize
from pyibp.testing import random_model

from test_crown import _dense_ops, _ibp, _crown_back, _leaves

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


# ---------------------------------------------------------------------------------------------
# An independent CROWN: explicit matrices, one example at a time, float64.
def _box(lam, const, lo, hi):
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    return lam @ mid - lam.abs() @ rad + const


def dense_crown(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lower=0.0, upper=1.0):
    """(B, K) CROWN margins: every box an activation reads (a ReLU's output too, when a MaxPool reads
    it) by its own backward pass (over the relaxations of the boxes before it), intersected with the
    IBP box propagated from the refined boxes; the
    margins by one more pass, and their maximum with the CROWN-IBP and IBP margins."""
    ops, _ = _dense_ops(_leaves(model.double()), tuple(x.shape[1:]))
    assert all(op[0] in ("affine", "relu", "maxpool") for op in ops)
    out = []
    for xi, yi in zip(x.double(), y):
        lo0 = (xi - eps).clamp(min=lower).flatten()
        hi0 = (xi + eps).clamp(max=upper).flatten()
        records, lo, hi = [], lo0, hi0
        for k, op in enumerate(ops[:-1]):
            lo, hi = _ibp([op], lo, hi, [] if op[0] == "affine" else records)
            if op[0] != "maxpool":
                if ops[k + 1][0] in ("relu", "maxpool"):
                    n = lo.numel()
                    eye = torch.eye(n, dtype=torch.float64)
                    lam, c = _crown_back(ops[:k + 1], eye, torch.zeros(n, dtype=torch.float64), list(records))
                    low = _box(lam, c, lo0, hi0)
                    lam, c = _crown_back(ops[:k + 1], -eye, torch.zeros(n, dtype=torch.float64), list(records))
                    up = -_box(lam, c, lo0, hi0)
                    keep = ((lo < 0) & (hi > 0)) if ops[k + 1][0] == "relu" else torch.ones_like(lo, dtype=torch.bool)
                    lo, hi = torch.where(keep, torch.maximum(lo, low), lo), torch.where(keep, torch.minimum(hi, up), hi)
                    lo = torch.minimum(lo, hi)
        _, W, b = ops[-1]
        K = W.shape[0]
        C = torch.zeros(K, K, dtype=torch.float64)
        C[:, int(yi)] += 1
        C -= torch.eye(K, dtype=torch.float64)
        lam, c = _crown_back(ops[:-1], C @ W, C @ b, list(records))
        crown = _box(lam, c, lo0, hi0)
        ibp_records = []
        last_lo, last_hi = _ibp(ops[:-1], lo0, hi0, ibp_records)
        lam, c = _crown_back(ops[:-1], C @ W, C @ b, ibp_records)
        crown_ibp = _box(lam, c, lo0, hi0)
        ibp = _box(C @ W, C @ b, last_lo, last_hi)
        out.append(torch.maximum(torch.maximum(crown, crown_ibp), ibp))
    return torch.stack(out)


def _sequential_model(seed: int, size: int):
    torch.manual_seed(seed)
    model, shape = random_model(seed, in_channels=2, size=size, nest=False)
    return model.double(), shape


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), eps=st.sampled_from([0.0, 0.01, 0.05, 0.2]), size=st.integers(4, 7))
def test_crown_matches_dense_float64_implementation(seed, eps, size):
    model, shape = _sequential_model(seed, size)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((3,) + shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (3,), generator=gen)
    got = pyibp.margin_bounds(model, x, y, eps, method="crown")
    want = dense_crown(model, x, y, eps)
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-7), (got - want).abs().max()


# ---------------------------------------------------------------------------------------------
# models for the order and soundness tests
def _mlp(seed, activation=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), activation(), nn.Linear(16, 16), activation(),
                         nn.Linear(16, 5)).eval(), (6,)


def _residual(seed):
    torch.manual_seed(seed)
    return resnet_small(in_channels=2, num_classes=5, image_size=8, width=3).eval(), (2, 8, 8)


def _cnn(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize([0.3, 0.5], [0.5, 2.0]), nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 1 * 1, 8), nn.ReLU(), nn.Linear(8, 5))
    with torch.no_grad():
        model[2].running_mean.uniform_(-0.2, 0.2)
        model[2].running_var.uniform_(0.5, 1.5)
    return model.eval(), (2, 6, 6)


MODELS = {"mlp": _mlp, "gelu": lambda s: _mlp(s, nn.GELU), "silu": lambda s: _mlp(s, nn.SiLU),
          "tanh": lambda s: _mlp(s, nn.Tanh), "residual": _residual, "cnn": _cnn,
          "random": lambda s: random_model(s, in_channels=2, size=6)}


def _attack(model, x, y, eps, rows, steps=30):
    """The smallest margin ``f_y - f_j`` PGD finds per example and row j over the box (B, K)."""
    best = None
    for j in range(rows):
        delta = (torch.rand_like(x) * 2 - 1) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            out = model((x + delta).clamp(0, 1))
            margin = out.gather(1, y[:, None])[:, 0] - out[:, j]
            grad, = torch.autograd.grad(margin.sum(), delta)
            delta = (delta.detach() - eps / 8 * grad.sign()).clamp(-eps, eps)
        with torch.no_grad():
            out = model((x + delta).clamp(0, 1))
            m = (out.gather(1, y[:, None]) - out)[:, j]
        best = m[:, None] if best is None else torch.cat([best, m[:, None]], 1)
    return best


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_methods_are_ordered_and_sound(kind):
    model, shape = MODELS[kind](8)
    torch.manual_seed(0)
    x, y, eps = torch.rand((6,) + shape), torch.randint(0, 5, (6,)), 0.03
    bounds = {m: pyibp.margin_bounds(model, x, y, eps, method=m) for m in METHODS}
    for loose, tight in zip(METHODS, METHODS[1:]):
        assert (bounds[tight] >= bounds[loose] - 1e-5).all(), (loose, tight)
    assert (bounds["crown"] > bounds["crown-ibp"] + 1e-4).any()          # strictly tighter somewhere
    samples = (x[:, None] + (torch.rand((6, 500) + shape) * 2 - 1) * eps).clamp(0, 1)
    with torch.no_grad():
        out = model(samples.flatten(0, 1)).view(6, 500, -1)
    sampled = (out.gather(2, y[:, None, None].expand(-1, 500, 1)) - out).min(1).values
    attacked = _attack(model, x, y, eps, 5)
    for worst in (sampled, attacked):
        assert (bounds["alpha-crown"] <= worst + 1e-5).all()


def test_alpha_crown_improves_on_crown_and_stops_when_verified():
    model, shape = _mlp(5)
    torch.manual_seed(1)
    x, y = torch.rand((8,) + shape), torch.randint(0, 5, (8,))
    crown = pyibp.margin_bounds(model, x, y, 0.1, method="crown")
    alpha = pyibp.margin_bounds(model, x, y, 0.1, method="alpha-crown", alpha=AlphaOptions(steps=30))
    assert (alpha >= crown - 1e-6).all() and (alpha > crown + 1e-3).any()
    zero_steps = pyibp.margin_bounds(model, x, y, 0.1, method="alpha-crown", alpha=AlphaOptions(steps=0))
    assert torch.equal(zero_steps, crown)


# ---------------------------------------------------------------------------------------------
# the optimal slopes of small networks, by grid search
def _grid_best(bound_of_slopes, n_slopes, points=101):
    grid = torch.linspace(0, 1, points, dtype=torch.float64)
    return max(bound_of_slopes(s) for s in itertools.product(grid.tolist(), repeat=n_slopes))


def test_one_neuron_slope_reaches_the_grid_optimum():
    # f(x) = relu(2x - 1) - 0.8 relu(x + 1) on [0, 1]: neuron 1 unstable, neuron 2 active. With the
    # lower line a z of neuron 1 the bound is min(-a - 0.8, a - 1.6), best at a = 0.4 (-1.2 = min f).
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0], [1.0]])), model[0].bias.copy_(torch.tensor([-1.0, 1.0]))
        model[2].weight.copy_(torch.tensor([[1.0, -0.8]])), model[2].bias.zero_()
    lo, hi = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    got = float(spec_bounds(model, lo, hi, torch.ones(1, 1, dtype=torch.float64), method="alpha-crown",
                            steps=60, lr=0.1))
    best = _grid_best(lambda s: min(-s[0] - 0.8, s[0] - 1.6), 1)
    assert best == pytest.approx(-1.2)
    assert best - 1e-3 <= got <= -1.2 + 1e-9              # optimal, and a bound (min f = -1.2)
    crown = float(spec_bounds(model, lo, hi, torch.ones(1, 1, dtype=torch.float64), method="crown"))
    assert crown < best - 0.1                  # CROWN's slope (0 or 1) is far from it


def test_two_neuron_slopes_reach_the_grid_optimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -0.5], [0.4, 1.0]]))
        model[0].bias.copy_(torch.tensor([-0.2, -0.6]))
        model[2].weight.copy_(torch.tensor([[1.0, 0.7]]))
        model[2].bias.zero_()
    lo, hi = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    C = torch.ones(1, 1, dtype=torch.float64)
    got = float(spec_bounds(model, lo, hi, C, method="alpha-crown", steps=100, lr=0.05))
    W1, b1, w2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()[0]

    def bound(slopes):                       # both neurons unstable on the box, w2 > 0: lower lines only
        lam = (w2 * torch.tensor(slopes, dtype=torch.float64)) @ W1
        const = (w2 * torch.tensor(slopes, dtype=torch.float64)) @ b1
        return float(-lam.abs().sum() + const)
    assert got >= _grid_best(bound, 2, 51) - 1e-4
    # and it is a bound
    xs = torch.rand(20000, 2, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        assert got <= float(model(xs).min()) + 1e-9


# ---------------------------------------------------------------------------------------------
# GELU and SiLU
@pytest.mark.parametrize("module", [nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()])
def test_gelu_silu_interval_and_lines_contain_the_function(module):
    gen = torch.Generator().manual_seed(0)
    centres = torch.cat([torch.linspace(-6, 6, 60), torch.randn(200, generator=gen) * 3])
    widths = torch.cat([torch.full((60,), 0.5), torch.rand(200, generator=gen) * 8])
    lower, upper = (centres - widths / 2).double(), (centres + widths / 2).double()
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    z = lower + t * (upper - lower)                                    # (points, boxes)
    f = module(z)
    lo, hi = activation_interval(module, lower, upper)
    assert (f >= lo - 1e-12).all() and (f <= hi + 1e-12).all()
    assert (f.min(0).values - lo < 1e-3).all()                         # and tight
    a_low, b_low, a_up, b_up = relaxation(module, lower, upper)
    assert (a_low * z + b_low <= f + 1e-9).all()
    assert (a_up * z + b_up >= f - 1e-9).all()


# ---------------------------------------------------------------------------------------------
# general specifications
def test_spec_bounds_over_any_box_hold_and_match_margins():
    model, shape = _residual(2)
    torch.manual_seed(2)
    centre = torch.rand((3,) + shape)
    lower, upper = centre - torch.rand_like(centre) * 0.05, centre + torch.rand_like(centre) * 0.05
    C = torch.randn(3, 4, 5)
    d = torch.randn(4)
    samples = lower[:, None] + torch.rand((3, 400) + shape) * (upper - lower)[:, None]
    with torch.no_grad():
        values = torch.einsum("brk,bnk->bnr", C, model(samples.flatten(0, 1)).view(3, 400, 5)) + d
    for method in METHODS:
        low = spec_bounds(model, lower, upper, C, d, method=method)
        assert low.shape == (3, 4)
        assert (low <= values.min(1).values + 1e-5).all(), method
    # margins are the rows e_y - e_j over the l∞ box
    x, y = torch.rand((2,) + shape), torch.tensor([1, 3])
    rows = torch.eye(5)[y][:, None] - torch.eye(5)[None]
    low = spec_bounds(model, (x - 0.02).clamp(0, 1), (x + 0.02).clamp(0, 1), rows, method="crown")
    assert torch.allclose(low, pyibp.margin_bounds(model, x, y, 0.02, method="crown"), atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda m: spec_bounds(m, torch.zeros(1, 6), torch.zeros(1, 5), torch.eye(5)), "one shape"),
    (lambda m: spec_bounds(m, torch.ones(1, 6), torch.zeros(1, 6), torch.eye(5)), "lower must be <= upper"),
    (lambda m: spec_bounds(m, torch.zeros(1, 6), torch.ones(1, 6), torch.eye(4)), "one column per output"),
    (lambda m: spec_bounds(m, torch.zeros(1, 6), torch.ones(1, 6), torch.eye(5), torch.ones(3)), "d must be"),
    (lambda m: spec_bounds(m, torch.zeros(1, 6), torch.ones(1, 6), torch.eye(5), method="lp"), "method must be"),
    (lambda m: spec_bounds(m, torch.zeros(1, 6), torch.ones(1, 6), torch.eye(5), method="alpha-crown", steps=-1),
     "steps must be"),
])
def test_bad_specifications_are_value_errors(call, message):
    model, _ = _mlp(0)
    with pytest.raises(ValueError, match=message):
        call(model)
