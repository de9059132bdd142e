"""Sound mode: bounds of the network in exact real arithmetic (pyibp.bounds.sound).

References are exact: every weight and input is a float, so ``fractions.Fraction`` evaluates the
network in exact rational arithmetic; the sound bounds must contain every exact value, the
unsound (float round-to-nearest) ones must miss some on networks built to break rounding.
"""
import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyibp
from exact_support import cancelling, contains, exact_forward, fractions, long_sum, rounding_cases, tiny, vertices
from pyibp.testing import random_model


@pytest.mark.parametrize("seed", range(6))
def test_sound_bounds_contain_the_exact_network_at_the_boxvertices(seed):
    gen = torch.Generator().manual_seed(seed)
    n_in = [2, 3, 5, 16, 40, 7][seed]
    model = tiny(seed, n_in, 6, 3, normalize=seed % 2 == 1)
    x = torch.rand(2, n_in, generator=gen)
    eps = [0.0, 1e-7, 0.01, 0.1, 2.0 ** -20, 0.3][seed]
    lb, ub = pyibp.interval_bounds(model, x, eps, sound=True)
    for i in range(2):
        for vertex in vertices(x[i], eps, 64, gen):
            assert contains(lb[i], ub[i], exact_forward(model, vertex))


@pytest.mark.parametrize("n_in", [1, 2])
def test_sound_bounds_contain_the_exact_optimum_of_a_grid_search(n_in):
    """For 1-2 inputs: the exact outputs on a fine rational grid of the box (its optimum included
    up to the grid) all lie inside, and the bound is near the optimum (IBP on a tiny net)."""
    model = tiny(11 + n_in, n_in, 4, 2, normalize=False)
    x, eps = torch.full((1, n_in), 0.5), 0.25
    lb, ub = pyibp.interval_bounds(model, x, eps, sound=True)
    steps = [Fraction(1, 4) + Fraction(k, 40) for k in range(21)]
    outs = [exact_forward(model, list(p)) for p in itertools.product(steps, repeat=n_in)]
    assert all(contains(lb[0], ub[0], o) for o in outs)
    for j in range(2):
        assert float(max(o[j] for o in outs)) <= float(ub[0, j])


def _probe(model: nn.Sequential, x: torch.Tensor, eps: float):
    """(unsound misses, sound misses) of the exact outputs at x and at vertices of its box."""
    unsound = pyibp.interval_bounds(model, x, eps)
    sound = pyibp.interval_bounds(model, x, eps, sound=True)
    gen = torch.Generator().manual_seed(0)
    misses = [0, 0]
    for i in range(x.shape[0]):
        points = [fractions(x[i])] + (vertices(x[i], eps, 3, gen) if eps else [])
        for p in points:
            exact = exact_forward(model, p)
            misses[0] += not contains(unsound[0][i], unsound[1][i], exact)
            misses[1] += not contains(sound[0][i], sound[1][i], exact)
    return misses


@pytest.mark.parametrize("build, eps", [(cancelling, 0.0), (cancelling, 2.0 ** -40), (long_sum, 0.0),
                                        (long_sum, 2.0 ** -40)])
def test_networks_built_to_break_round_to_nearest(build, eps):
    """The unsound bound misses the exact value at least once, the sound one never."""
    unsound_misses = sound_misses = 0
    for model, x, g in rounding_cases(build):
        u, s = _probe(model, x, eps)
        unsound_misses += u
        sound_misses += s
    assert sound_misses == 0
    assert unsound_misses > 0


def test_unsound_misses_a_single_rounded_product_the_sound_mode_covers():
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1 + 2.0 ** -23, 1.0]]))
    x = torch.tensor([[1 + 2.0 ** -23, 2.0 ** -30]])
    exact = exact_forward(model, fractions(x[0]))
    domain = {"lower": -math.inf, "upper": math.inf}
    lb, ub = pyibp.interval_bounds(model, x, 0.0, **domain)
    assert not contains(lb[0], ub[0], exact)
    slb, sub = pyibp.interval_bounds(model, x, 0.0, sound=True, **domain)
    assert contains(slb[0], sub[0], exact)
    m = pyibp.margin_bounds(nn.Sequential(nn.Linear(2, 2)).eval(), x, torch.tensor([0]), 0.0, sound=True, **domain)
    assert m.shape == (1, 2) and m[0, 0] == 0


def test_sound_margins_are_below_the_exact_margins_at_thevertices():
    model = tiny(3, 5, 6, 4, normalize=False)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(3, 5, generator=gen), torch.tensor([0, 2, 3])
    m = pyibp.margin_bounds(model, x, y, 0.05, sound=True)
    unsound = pyibp.margin_bounds(model, x, y, 0.05)
    assert (m <= unsound).all()
    for i in range(3):
        for vertex in vertices(x[i], 0.05, 32, gen):
            out = exact_forward(model, vertex)
            for j in range(4):
                assert Fraction(float(m[i, j])) <= out[int(y[i])] - out[j]


def test_eps_and_domain_are_rounded_outward():
    """eps = 0.1 is not a float32: the box must reach x + 0.1 (the real number the float64 0.1 is)."""
    model = nn.Sequential(nn.Linear(1, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.tensor([[0.5]])
    lb, ub = pyibp.interval_bounds(model, x, 0.1, sound=True, lower=-math.inf, upper=math.inf)
    assert Fraction(float(ub)) >= Fraction(0.5) + Fraction(0.1)
    assert Fraction(float(lb)) <= Fraction(0.5) - Fraction(0.1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.sampled_from([0.0, 1e-3, 0.03, 0.2]))
def test_random_architectures_sound_contains_unsound_and_float64(seed, eps):
    model, shape = random_model(seed, size=6)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(2, *shape, generator=gen), torch.randint(0, 5, (2,), generator=gen)
    slb, sub = pyibp.interval_bounds(model, x, eps, sound=True)
    lb, ub = pyibp.interval_bounds(model, x, eps)
    dlb, dub = pyibp.interval_bounds(model, x, eps, dtype=torch.float64)
    assert (slb <= lb).all() and (sub >= ub).all()
    assert (slb.double() <= dlb).all() and (sub.double() >= dub).all()
    assert (pyibp.margin_bounds(model, x, y, eps, sound=True) <= pyibp.margin_bounds(model, x, y, eps)).all()
    with torch.no_grad():
        out = model.double()(pyibp.testing.sample_box(x.double(), torch.tensor(eps, dtype=torch.float64), 30,
                                                      generator=gen).flatten(0, 1))
    assert (out >= slb.double().repeat(30, 1)).all() and (out <= sub.double().repeat(30, 1)).all()


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        z = F.relu(self.conv1(x))
        z = F.relu(self.conv2(z) + z) * 0.5 - 0.1
        z = F.adaptive_avg_pool2d(torch.cat([z, F.pad(z, (0, 0, 0, 0))], 1)[:, :4], 2)
        return self.fc(z.flatten(1))


def test_residual_add_cat_pad_pool_and_constants_are_sound():
    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.rand(3, 2, 6, 6)
    slb, sub = pyibp.interval_bounds(model, x, 0.05, sound=True)
    dlb, dub = pyibp.interval_bounds(model.double(), x.double(), 0.05)
    assert (slb.double() <= dlb).all() and (sub.double() >= dub).all()


@pytest.mark.parametrize("layer", [nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.1), nn.ELU(), nn.Softplus()])
def test_ops_without_a_sound_rule_are_refused_by_name(layer):
    model = nn.Sequential(nn.Linear(3, 3), layer, nn.Linear(3, 2)).eval()
    with pytest.raises(TypeError, match=f"sound=True cannot bound node.*{type(layer).__name__}"):
        pyibp.interval_bounds(model, torch.rand(2, 3), 0.1, sound=True)
    pyibp.interval_bounds(model, torch.rand(2, 3), 0.1)        # the unsound mode still bounds it


def test_sound_options_that_are_not_supported_say_so():
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    x, y = torch.rand(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="backend='fused'"):
        pyibp.interval_bounds(model, x, 0.1, backend="torch", sound=True)


def test_overflowing_centres_give_trivial_bounds():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3e38, 3e38], [1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[-1.0, 1.0]]))
        model[2].bias.zero_()
    lb, ub = pyibp.interval_bounds(model, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), 0.0, sound=True)
    assert lb[0] == -math.inf and ub[0] == math.inf
    assert math.isfinite(float(lb[1])) and lb[1] <= 0 <= ub[1]


def test_a_linear_over_the_last_dimension_keeps_one_flag_per_example():
    """A Linear on (B, T, F) runs on B·T rows: an overflow in one row voids that example only, and
    sound CROWN-IBP, which takes Linear layers on (B, F), refuses such a node by name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(15, 2)).eval()
    x = torch.rand(6, 3, 4)
    lb, ub = pyibp.interval_bounds(model, x, 0.1, sound=True)
    lb0, ub0 = pyibp.interval_bounds(model, x, 0.1)
    assert (lb <= lb0).all() and (ub >= ub0).all() and torch.isfinite(lb).all()
    with torch.no_grad():
        model[0].weight[:, 0] = 10.0
    x[1, 2, 0] = 3e38
    lb, ub = pyibp.interval_bounds(model, x, 0.0, sound=True, upper=math.inf)
    assert (lb[1] == -math.inf).all() and (ub[1] == math.inf).all()
    assert torch.isfinite(lb[[0, 2, 3, 4, 5]]).all()
    with pytest.raises(TypeError, match=r"cannot bound node '_0' \(call_module 0: Linear\).*inputs of shape \(B, 3, 4\)"):
        pyibp.margin_bounds(model, x[:1] * 0, torch.zeros(1, dtype=torch.long), 0.1, method="crown-ibp", sound=True)


def test_verify_reports_the_kind_of_certificate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    data = (torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,)))
    sound = pyibp.verify(model, data, 0.01, sound=True)
    plain = pyibp.verify(model, data, 0.01)
    assert sound.sound and not plain.sound and "sound=True" in repr(sound)
    assert (sound.worst_margin <= plain.worst_margin).all()
    assert not (sound.verified & ~plain.verified).any()
