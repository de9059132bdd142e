"""Branch and bound over ReLU splits (pyibp.verifier.bab): tiny networks on 2-d boxes, where a dense
grid of the box tells which answers would be wrong."""
import time

import pytest
import torch
from torch import nn

from pyibp.bounds import spec_bounds
from pyibp.verifier.bab import BabOutcome, relu_split_bab

LOWER, UPPER = -torch.ones(1, 2), torch.ones(1, 2)
GRID = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 201), torch.linspace(-1, 1, 201), indexing="ij"),
                   -1).reshape(-1, 2)


def mlp(seed: int, widths=(8, 8), outputs: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    layers, width = [], 2
    for w in widths:
        layers += [nn.Linear(width, w), nn.ReLU()]
        width = w
    return nn.Sequential(*layers, nn.Linear(width, outputs)).eval()


def rows_on_grid(model: nn.Module, C: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(GRID) @ C.t()


def assert_not_wrong(model: nn.Module, C: torch.Tensor, d: torch.Tensor, out: BabOutcome) -> None:
    assert out.status in ("unsat", "sat", "timeout", "unknown")
    if out.status == "unsat":          # no grid point may satisfy every row
        assert not bool((rows_on_grid(model, C) <= d).all(1).any())
    if out.status == "sat":
        x = out.x
        assert x.shape == LOWER.shape and bool(((x >= LOWER) & (x <= UPPER)).all())
        with torch.no_grad():
            assert bool((model(x) @ C.t() <= d).all())
    else:
        assert out.x is None


@pytest.mark.parametrize("seed,intermediate", [(0, False), (2, False), (0, True)])
def test_unsat_where_alpha_crown_alone_cannot_decide(seed, intermediate):
    model, C = mlp(seed), torch.tensor([[1.0, -1.0]])
    v = rows_on_grid(model, C)
    d = v.min(0).values - 0.05 * (v.max() - v.min())
    assert float(spec_bounds(model, LOWER, UPPER, C, -d, method="alpha-crown")) < 0
    out = relu_split_bab(model, LOWER, UPPER, C, d, deadline=time.monotonic() + 30, intermediate=intermediate)
    assert out.status == "unsat" and out.domains > 1 and out.bound > 0
    assert_not_wrong(model, C, d, out)


@pytest.mark.parametrize("seed", [1, 2])
def test_never_wrong_on_conjunctions(seed):
    """Two rows that must hold together, at thresholds from clearly unsat to clearly sat."""
    model = mlp(seed, (8, 8, 8), 3)
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    v = rows_on_grid(model, C)
    for q in (-0.05, 0.02, 0.3):
        d = v.min(0).values + q * (v.max(0).values - v.min(0).values)
        out = relu_split_bab(model, LOWER, UPPER, C, d, deadline=time.monotonic() + 0.5)
        assert_not_wrong(model, C, d, out)


def test_sat_with_a_checked_counterexample_in_a_small_region():
    model, C = mlp(3), torch.tensor([[1.0, -1.0]])
    v = rows_on_grid(model, C)
    d = v.min(0).values + 0.01 * (v.max() - v.min())      # only points near the minimiser qualify
    out = relu_split_bab(model, LOWER[0], UPPER[0], C, d, deadline=time.monotonic() + 30)
    assert out.status == "sat" and out.x.shape == (2,)     # the shape given
    assert_not_wrong(model, C, d, BabOutcome("sat", out.x[None], out.domains, out.seconds))


def test_conv_model_is_never_wrong_against_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(1, 1, 5, 5)
    lo, hi = x - 0.3, x + 0.3
    C = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0]])
    with torch.no_grad():
        v = model(lo + (hi - lo) * torch.rand(4000, 1, 5, 5)) @ C.t()
    for q in (0.0, 0.5):
        d = v.min(0).values - 0.05 + q * (v.max(0).values - v.min(0).values)
        out = relu_split_bab(model, lo, hi, C, d, deadline=time.monotonic() + 0.5)
        if out.status == "unsat":
            assert not bool((v <= d).all(1).any())
        if out.status == "sat":
            assert bool(((out.x >= lo) & (out.x <= hi)).all()) and bool((model(out.x) @ C.t() <= d).all())


def hard_case():
    model, C = mlp(4, (16, 16, 12), 3), torch.tensor([[1.0, -1.0, 0.0]])
    v = rows_on_grid(model, C)
    return model, C, v.min(0).values - 0.01 * (v.max() - v.min())


def test_deadline_is_honoured():
    model, C, d = hard_case()
    began = time.monotonic()
    out = relu_split_bab(model, LOWER, UPPER, C, d, deadline=began + 0.5)
    assert out.status == "timeout" and out.domains > 1
    assert time.monotonic() - began < 1.5


def test_max_domains_gives_unknown():
    model, C, d = hard_case()
    out = relu_split_bab(model, LOWER, UPPER, C, d, deadline=time.monotonic() + 30, max_domains=1)
    assert out.status == "unknown" and "max_domains" in out.reason


def test_bad_arguments():
    model, C, d = mlp(0), torch.tensor([[1.0, -1.0]]), torch.tensor([0.0])
    deadline = time.monotonic() + 5
    with pytest.raises(ValueError, match="sound"):
        relu_split_bab(model, LOWER, UPPER, C, d, deadline=deadline, sound=True)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        relu_split_bab(model, UPPER, LOWER, C, d, deadline=deadline)
    with pytest.raises(ValueError, match="C must be"):
        relu_split_bab(model, LOWER, UPPER, C, torch.zeros(2), deadline=deadline)
    with pytest.raises(ValueError, match="batch_size"):
        relu_split_bab(model, LOWER, UPPER, C, d, deadline=deadline, batch_size=1)
