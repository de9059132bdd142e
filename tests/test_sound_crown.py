"""Sound CROWN-IBP (pyibp.bounds.sound_crown): margin lower bounds of the network in exact real
arithmetic, checked against exact rational evaluation (tests/exact_support.py)."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyibp
from exact_support import cancelling, exact_forward, fractions, long_sum, rounding_cases, tiny, vertices
from pyibp.testing import random_model, sample_box


def _crown(model, x, y, eps, method="crown-ibp", **kw):
    return pyibp.margin_bounds(model, x, y, eps, method=method, **kw).detach()


def _below_exact_margins(m, model, points, y, shape=None) -> bool:
    """Whether every bound m[j] is <= the exact margin logit_y - logit_j at every point."""
    for p in points:
        out = exact_forward(model, p, shape)
        if any(Fraction(float(m[j])) > out[y] - out[j] for j in range(len(out))):
            return False
    return True


@pytest.mark.parametrize("seed", range(5))
def test_sound_crown_is_below_the_exact_margins_at_the_box_vertices(seed):
    gen = torch.Generator().manual_seed(seed)
    n_in = [2, 3, 5, 16, 7][seed]
    model = tiny(seed, n_in, 6, 3, normalize=seed % 2 == 1)
    x, y = torch.rand(2, n_in, generator=gen), torch.tensor([0, 2])
    eps = [1e-7, 0.01, 0.1, 2.0 ** -20, 0.3][seed]
    m = _crown(model, x, y, eps, sound=True)
    assert (m <= _crown(model, x, y, eps)).all()
    for i in range(2):
        assert _below_exact_margins(m[i], model, vertices(x[i], eps, 64, gen), int(y[i]))


def test_sound_crown_of_a_convolutional_network_is_below_the_exact_margins():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16, 3)).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 1, 5, 5, generator=gen), torch.tensor([1, 2])
    m = _crown(model, x, y, 0.05, sound=True)
    assert (m <= _crown(model, x, y, 0.05)).all()
    for i in range(2):
        points = [fractions(x[i])] + vertices(x[i], 0.05, 24, gen)
        assert _below_exact_margins(m[i], model, points, int(y[i]), (1, 5, 5))


def _exact_minimum(model: nn.Sequential, lo: Fraction, hi: Fraction, y: int) -> list:
    """The exact minimum over [lo, hi] of every margin of a one-input ReLU network: the network is
    linear between the points where some pre-activation crosses 0, found layer by layer (each
    pre-activation is linear between the breakpoints found so far), so the minimum is at one of them."""
    points = [lo, hi]
    layers = list(model)
    for k, layer in enumerate(layers):
        if not isinstance(layer, nn.ReLU):
            continue
        head = nn.Sequential(*layers[:k])
        values = [exact_forward(head, [p]) for p in points]
        found = set(points)
        for (a, va), (b, vb) in zip(zip(points, values), zip(points[1:], values[1:])):
            for za, zb in zip(va, vb):
                if (za < 0 < zb) or (zb < 0 < za):
                    found.add(a + (b - a) * za / (za - zb))
        points = sorted(found)
    outs = [exact_forward(model, [p]) for p in points]
    return [min(o[y] - o[j] for o in outs) for j in range(len(outs[0]))]


@pytest.mark.parametrize("seed", range(4))
def test_sound_crown_is_below_the_exact_optimum_of_a_one_input_network(seed):
    model = tiny(20 + seed, 1, 8, 3, normalize=seed % 2 == 0)
    x, y, eps = torch.tensor([[0.5]]), torch.tensor([seed % 3]), 0.25
    m = _crown(model, x, y, eps, sound=True)
    exact = _exact_minimum(model, Fraction(0.25), Fraction(0.75), seed % 3)
    for j in range(3):
        assert Fraction(float(m[0, j])) <= exact[j]
    # and CROWN is no toy on it: within the unsound bound's reach of the optimum
    assert (m <= _crown(model, x, y, eps)).all()


@pytest.mark.parametrize("build, eps", [(cancelling, 0.0), (cancelling, 2.0 ** -40), (long_sum, 0.0),
                                        (long_sum, 2.0 ** -30)])
def test_networks_built_to_break_round_to_nearest(build, eps):
    """The unsound CROWN-IBP bound lies above the exact margin at least once, the sound one never."""
    unsound_misses = sound_misses = 0
    for model, x, g in rounding_cases(build):
        for label in (0, 1):
            y = torch.full((2,), label)
            unsound, sound = _crown(model, x, y, eps), _crown(model, x, y, eps, sound=True)
            for i in range(2):
                points = [fractions(x[i])] + (vertices(x[i], eps, 3, g) if eps else [])
                unsound_misses += not _below_exact_margins(unsound[i], model, points, label)
                sound_misses += not _below_exact_margins(sound[i], model, points, label)
    assert sound_misses == 0
    assert unsound_misses > 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.sampled_from([0.0, 1e-3, 0.03, 0.2]))
def test_random_architectures_sound_crown_contains_unsound_and_float64(seed, eps):
    model, shape = random_model(seed, size=6, allow_pool=False)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(2, *shape, generator=gen), torch.randint(0, 5, (2,), generator=gen)
    sound = _crown(model, x, y, eps, sound=True)
    # Guaranteed: below the (nearly exact) float64 bound. The float32 one may round below the sound one.
    assert (sound.double() <= _crown(model.double(), x.double(), y, eps)).all()
    assert (sound >= pyibp.margin_bounds(model.float(), x, y, eps, sound=True)).all()   # never looser than sound IBP
    with torch.no_grad():
        points = sample_box(x.double(), torch.tensor(eps, dtype=torch.float64), 20, generator=gen)
        out = model.double()(points.flatten(0, 1)).view(20, 2, -1)
    margins = out.gather(2, y[None, :, None].expand(20, 2, 1)) - out
    assert (margins >= sound.double()).all()


@pytest.mark.parametrize("method", ["crown", "alpha-crown"])
@pytest.mark.parametrize("seed", range(3))
def test_sound_crown_and_alpha_crown_are_below_the_exact_margins(seed, method):
    """CROWN's boxes by sound passes, and alpha-CROWN's float-optimised slopes in the sound pass."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny(seed, 4, 8, 3, normalize=seed == 1)
    x, y, eps = torch.rand(2, 4, generator=gen), torch.tensor([0, 2]), [0.01, 0.1, 0.3][seed]
    sound = _crown(model, x, y, eps, method, sound=True)
    assert (sound <= _crown(model, x, y, eps, method)).all()
    assert (sound >= _crown(model, x, y, eps, sound=True) - 1e-6).all()          # about as tight as sound CROWN-IBP or more
    for i in range(2):
        assert _below_exact_margins(sound[i], model, vertices(x[i], eps, 32, gen), int(y[i]))
    if method == "alpha-crown":
        for model, x, g in rounding_cases(cancelling):
            y = torch.zeros(2, dtype=torch.long)
            sound = _crown(model, x, y, 2.0 ** -40, method, sound=True)
            for i in range(2):
                assert _below_exact_margins(sound[i], model, [fractions(x[i])] + vertices(x[i], 2.0 ** -40, 3, g), 0)


def test_sound_crown_costs_no_tightness_worth_mentioning():
    """The sound bound is the unsound one up to rounding-sized terms, not a looser method."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 40), nn.ReLU(),
                          nn.Linear(40, 10)).eval()
    x, y = torch.rand(8, 1, 14, 14), torch.randint(0, 10, (8,))
    sound, unsound = _crown(model, x, y, 0.01, sound=True), _crown(model, x, y, 0.01)
    assert (unsound - sound).max() < 1e-3 * (1 + unsound.abs().max())


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)) + x)


@pytest.mark.parametrize("model, name", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 3)), "MaxPool2d"),
    (_Residual(), "add"),
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 3)), "Tanh")])
def test_ops_without_a_sound_crown_rule_are_refused_by_name(model, name):
    model.eval()
    x = torch.rand(2, 1, 4, 4) if not isinstance(model, _Residual) else torch.rand(2, 4)
    with pytest.raises(TypeError, match=f"sound=True.*{name}"):
        _crown(model, x, torch.tensor([0, 1]), 0.1, sound=True)
    _crown(model, x, torch.tensor([0, 1]), 0.1)              # the unsound mode still bounds it


def test_overflowing_centres_give_trivial_bounds():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3e38, 3e38], [1.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[-1.0, 1.0], [1.0, 0.0]]))
        model[2].bias.zero_()
    m = _crown(model, torch.tensor([[1.0, 1.0], [0.2, 0.1]]), torch.tensor([0, 0]), 0.0, sound=True)
    assert m[0, 1] == -math.inf
    assert math.isfinite(float(m[1, 1]))


def test_verify_and_certify_report_sound_crown_certificates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    data = (torch.rand(10, 1, 2, 2), torch.randint(0, 3, (10,)))
    sound = pyibp.verify(model, data, 0.01, method="crown-ibp", sound=True)
    plain = pyibp.verify(model, data, 0.01, method="crown-ibp")
    assert sound.sound and sound.method == "crown-ibp" and not plain.sound
    assert (sound.worst_margin <= plain.worst_margin).all()
    assert not (sound.verified & ~plain.verified).any()
