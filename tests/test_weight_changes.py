"""Bounds follow every way a user can change a model's weights after a first bound: nothing about
a weight is remembered between calls (a stale |W| once made certificates wrong)."""
import copy

import pytest
import torch
from torch import nn

import pyibp


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 10)).eval()


def _change_data(m):
    with torch.no_grad():
        m[3].weight.data.mul_(3)      # bypasses the version counter
        m[0].weight.data.neg_()


def _change_vector(m):
    vec = nn.utils.parameters_to_vector(m.parameters())
    nn.utils.vector_to_parameters(vec * -2.0, m.parameters())


def _change_assign(m):
    m[3].weight = nn.Parameter(torch.randn_like(m[3].weight) * 2)


def _change_inplace(m):
    with torch.no_grad():
        m[5].weight.mul_(-4)


def _change_load(m):
    m.load_state_dict({k: v * 1.5 - 0.1 for k, v in m.state_dict().items()})


def _change_dtype(m):
    m.double()


@pytest.mark.parametrize("change", [_change_data, _change_vector, _change_assign, _change_inplace, _change_load,
                                    _change_dtype])
@pytest.mark.parametrize("grad", [False, True])
def test_bounds_after_a_weight_change_contain_sampled_outputs(change, grad):
    model = _model()
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    eps = 0.05
    with torch.set_grad_enabled(grad):
        pyibp.interval_bounds(model, x, eps)
        pyibp.margin_bounds(model, x, y, eps, method="crown-ibp")
    change(model)
    dtype = next(model.parameters()).dtype
    x = x.to(dtype)
    with torch.set_grad_enabled(grad):
        lb, ub = pyibp.interval_bounds(model, x, eps)
        margins = {m: pyibp.margin_bounds(model, x, y, eps, method=m) for m in ("ibp", "crown-ibp")}
    # A fresh copy holds new tensors: nothing any cache could remember about the old ones.
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        lb_f, ub_f = pyibp.interval_bounds(fresh, x, eps)
        torch.testing.assert_close(lb.detach(), lb_f, rtol=0, atol=0)
        torch.testing.assert_close(ub.detach(), ub_f, rtol=0, atol=0)
        for method, m in margins.items():
            torch.testing.assert_close(m.detach(), pyibp.margin_bounds(fresh, x, y, eps, method=method),
                                       rtol=0, atol=0)
        pts = (x[None] + eps * (2 * torch.rand((200,) + x.shape, dtype=dtype) - 1)).clamp(0, 1)
        out = model(pts.flatten(0, 1)).view(200, 6, 10)
    tol = 1e-5 * (1 + out.abs())
    assert (out >= lb - tol).all() and (out <= ub + tol).all()
    true_margin = out.gather(2, y[None, :, None].expand(200, 6, 1)) - out
    for method, m in margins.items():
        assert (true_margin >= m - 1e-4).all(), method
