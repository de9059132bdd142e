"""interval_bounds / margin_bounds: agreement of the fused and tutorial backends on random
architectures, soundness against sampled and attacked points, gradients, and bad input."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyibp
from pyibp import ops
from pyibp.models import tutorial_cnn
from pyibp.testing import random_model, randomize_batchnorm, sample_box

seeds = st.integers(0, 2**31 - 1)
eps_values = st.sampled_from([0.0, 1e-3, 0.02, 0.1, 0.3])


def _inputs(shape, batch, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch,) + shape, generator=gen, dtype=dtype), torch.randint(0, 5, (batch,), generator=gen)


def assert_agree(a, b, rtol):
    scale = max(1.0, float(b.detach().abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


@given(seed=seeds, eps=eps_values, dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fused_backend_agrees_with_tutorial_formulas(seed, eps, dtype):
    model, shape = random_model(seed)
    model = model.to(dtype)
    x, y = _inputs(shape, 3, seed, dtype)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    for f, t in zip(pyibp.interval_bounds(model, x, eps), pyibp.interval_bounds(model, x, eps, backend="torch")):
        assert_agree(f, t, rtol)
    assert_agree(pyibp.margin_bounds(model, x, y, eps), pyibp.margin_bounds(model, x, y, eps, backend="torch"), rtol)


def _attack_points(model, x, eps, n_targets=4, steps=20):
    """Points of the box found by PGD that push random logit combinations up or down."""
    gen = torch.Generator().manual_seed(1)
    e = torch.as_tensor(eps, dtype=x.dtype)
    found = []
    for _ in range(n_targets):
        with torch.no_grad():
            direction = torch.randn(model(x).shape, generator=gen, dtype=x.dtype)
        delta = torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            (g,) = torch.autograd.grad((model(x + delta) * direction).sum(), delta)
            delta = delta.detach()
            ops.pgd_linf_step_(delta, g, x, e, e / 4, 0.0, 1.0)
        found.append(x + delta)
    return torch.stack(found)


@settings(max_examples=30)
@given(seed=seeds, eps=st.sampled_from([1e-3, 0.02, 0.1]))
def test_bounds_contain_outputs_at_sampled_and_attacked_points(seed, eps):
    model, shape = random_model(seed)
    x, y = _inputs(shape, 2, seed)
    lb, ub = pyibp.interval_bounds(model, x, eps)
    margins = pyibp.margin_bounds(model, x, y, eps)
    assert (lb <= ub).all()
    points = torch.cat([sample_box(x, torch.tensor(eps), 1000, generator=torch.Generator().manual_seed(seed)),
                        _attack_points(model, x, eps)])
    with torch.no_grad():
        out = model(points.flatten(0, 1)).reshape(points.shape[0], x.shape[0], -1)
    slack = 1e-5 * max(1.0, float(ub.detach().abs().max()))
    assert (out >= lb - slack).all() and (out <= ub + slack).all()
    true_margins = out.gather(2, y[None, :, None].expand(out.shape[0], -1, 1)) - out
    assert (margins <= true_margins + slack).all()


@given(seed=seeds)
def test_zero_eps_gives_the_output(seed):
    model, shape = random_model(seed)
    x, _ = _inputs(shape, 3, seed, torch.float64)
    model = model.double()
    lb, ub = pyibp.interval_bounds(model, x, 0.0)
    torch.testing.assert_close(lb, model(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ub, model(x), rtol=1e-10, atol=1e-10)


def test_margin_elision_is_never_looser_than_logit_bounds():
    torch.manual_seed(0)
    model = tutorial_cnn().eval()
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    lb, ub = pyibp.interval_bounds(model, x, 0.01)
    naive = (lb.gather(1, y[:, None]) - ub).scatter(1, y[:, None], 0.0)
    elided = pyibp.margin_bounds(model, x, y, 0.01)
    assert (elided >= naive - 1e-4).all()
    assert (elided > naive + 1e-3).any()  # and strictly tighter somewhere


def test_per_example_eps_equals_separate_calls():
    model, shape = random_model(3)
    x, y = _inputs(shape, 3, 3)
    eps = torch.tensor([0.0, 0.05, 0.2])
    lb, ub = pyibp.interval_bounds(model, x, eps)
    m = pyibp.margin_bounds(model, x, y, eps)
    for i in range(3):
        lb_i, ub_i = pyibp.interval_bounds(model, x[i:i + 1], float(eps[i]))
        torch.testing.assert_close(lb[i:i + 1], lb_i)
        torch.testing.assert_close(ub[i:i + 1], ub_i)
        torch.testing.assert_close(m[i:i + 1], pyibp.margin_bounds(model, x[i:i + 1], y[i:i + 1], float(eps[i])))


def test_float64_bounds_on_a_float32_model():
    model, shape = random_model(5)
    x, y = _inputs(shape, 2, 5)
    lb64, ub64 = pyibp.interval_bounds(model, x, 0.05, dtype=torch.float64)
    assert lb64.dtype == torch.float64
    lb32, ub32 = pyibp.interval_bounds(model, x, 0.05)
    assert_agree(lb32.double(), lb64, 1e-5)
    assert pyibp.margin_bounds(model, x, y, 0.05, dtype=torch.float64).dtype == torch.float64


@given(seed=seeds)
def test_gradients_match_the_tutorial_formulas(seed):
    model, shape = random_model(seed)
    model = model.double()
    x, y = _inputs(shape, 3, seed, torch.float64)
    grads = []
    for backend in ("fused", "torch"):
        model.zero_grad()
        loss = pyibp.margin_bounds(model, x, y, 0.05, backend=backend).sum()
        lb, ub = pyibp.interval_bounds(model, x, 0.05, backend=backend)
        (loss + (ub - lb).sum()).backward()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
    for f, t in zip(*grads):
        assert_agree(f, t, 1e-8)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_empty_batch_and_noncontiguous_input():
    model = tutorial_cnn().eval()
    lb, ub = pyibp.interval_bounds(model, torch.rand(0, 1, 28, 28), 0.1)
    assert lb.shape == (0, 10) and ub.shape == (0, 10)
    assert pyibp.margin_bounds(model, torch.rand(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), 0.1).shape == (0, 10)
    x = torch.rand(2, 1, 56, 56)[:, :, ::2, ::2]
    assert not x.is_contiguous()
    for a, b in zip(pyibp.interval_bounds(model, x, 0.1), pyibp.interval_bounds(model, x.contiguous(), 0.1)):
        torch.testing.assert_close(a, b)


def test_unsupported_layer_names_node_target_and_what_is_supported():
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Mish()), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"node '_1_2' \(call_module 1.2: Mish\)\. Supported: Linear, Conv1d"):
        pyibp.interval_bounds(model, torch.rand(1, 4), 0.1)
    with pytest.raises(TypeError, match=r"pyibp cannot bound node '_0' \(call_module 0: LSTM\)"):
        pyibp.interval_bounds(nn.LSTM(2, 2), torch.rand(1, 2), 0.1)


def test_batchnorm_in_training_mode_is_rejected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).train()
    message = r"node '_2' \(call_module 2: BatchNorm1d\) is in training mode.*model.eval\(\)"
    with pytest.raises(ValueError, match=message):
        pyibp.interval_bounds(model, torch.rand(2, 4), 0.1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(eps=-0.1), r"eps must be >= 0, got -0.1"),
    (dict(eps=float("nan")), r"eps must be finite"),
    (dict(eps=torch.tensor([0.1, 0.2, 0.3])), r"eps must be a float or a tensor of shape \(\) or \(2,\)"),
    (dict(x=torch.ones(2, 4, dtype=torch.long)), r"x must be a floating-point tensor, got torch.int64"),
    (dict(x=torch.tensor([[0.5, float("nan"), 0.1, 0.2]] * 2)), r"x must be finite"),
    (dict(x=torch.full((2, 4), 3.0)), r"x has values in \[3, 3\], outside the input domain \[0.0, 1.0\]"),
    (dict(lower=1.0, upper=0.0), r"lower \(1.0\) must be <= upper \(0.0\)"),
    (dict(y=torch.tensor([0, 1, 2])), r"y must have shape \(2,\)"),
    (dict(y=torch.tensor([0, 7])), r"labels y must lie in \[0, 3\), got values in \[0, 7\]"),
    (dict(y=torch.tensor([0.0, 1.0])), r"y must be an integer tensor"),
])
def test_bad_input_is_a_value_error_naming_the_value(kwargs, message):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    args = dict(x=torch.rand(2, 4), y=torch.tensor([0, 2]), eps=0.1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pyibp.margin_bounds(model, args.pop("x"), args.pop("y"), args.pop("eps"), **args)


def test_unbounded_domain_accepts_any_input():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(2, 4) * 10
    lb, ub = pyibp.interval_bounds(model, x, 0.1, lower=-float("inf"), upper=float("inf"))
    assert torch.isfinite(lb).all() and (lb <= model(x)).all() and (model(x) <= ub).all()


def test_compiles_without_graph_breaks():
    model = tutorial_cnn().eval()
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))

    def bounds(x, y):
        return pyibp.margin_bounds(model, x, y, 0.1), pyibp.interval_bounds(model, x, 0.1)

    compiled = torch.compile(bounds, fullgraph=True, backend="aot_eager")
    m, (lb, ub) = compiled(x, y)
    torch.testing.assert_close(m, pyibp.margin_bounds(model, x, y, 0.1))
    torch.testing.assert_close(lb, pyibp.interval_bounds(model, x, 0.1)[0])


@pytest.mark.parametrize("name", ["cnn7", "resnet-small"])
def test_model_zoo_bounds_are_sound(name):
    from pyibp.models import build_model
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(name, 3, 10, 16), torch.Generator().manual_seed(0)).eval()
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([1, 7])
    lb, ub = pyibp.interval_bounds(model, x, 0.01)
    tlb, tub = pyibp.interval_bounds(model, x, 0.01, backend="torch")
    assert_agree(lb, tlb, 1e-4)
    assert_agree(ub, tub, 1e-4)
    with torch.no_grad():
        out = model(sample_box(x, torch.tensor(0.01), 200).flatten(0, 1)).reshape(200, 2, 10)
    slack = 1e-5 * max(1.0, float(ub.detach().abs().max()))
    assert (out >= lb - slack).all() and (out <= ub + slack).all()
    assert (pyibp.margin_bounds(model, x, y, 0.01) <= out.gather(2, y[None, :, None].expand(200, 2, 1)) - out + slack).all()


def test_residual_with_an_unsupported_layer_names_the_branch():
    from pyibp.nn import Residual
    model = nn.Sequential(nn.Flatten(), Residual(nn.Sequential(nn.Linear(4, 4), nn.Mish())), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"node '_1_body_1' \(call_module 1.body.1: Mish\)"):
        pyibp.interval_bounds(model, torch.rand(1, 4), 0.1)


def test_bounds_ignore_autocast():
    model, shape = random_model(11)
    x, y = _inputs(shape, 3, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lb, ub = pyibp.interval_bounds(model, x, 0.05)
        m = pyibp.margin_bounds(model, x, y, 0.05)
    assert lb.dtype == ub.dtype == m.dtype == torch.float32
    torch.testing.assert_close(m, pyibp.margin_bounds(model, x, y, 0.05))
    torch.testing.assert_close(lb, pyibp.interval_bounds(model, x, 0.05)[0])


# ---------------------------------------------------------------------------------------------
# inputs users have
def test_per_channel_domain_tensors():
    torch.manual_seed(0)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    lower, upper = (0 - mean) / std, (1 - mean) / std                  # the domain of normalised data
    x = ((torch.rand(2, 3, 6, 6) - mean[:, None, None]) / std[:, None, None])
    y = torch.tensor([1, 3])
    lb, ub = pyibp.interval_bounds(model, x, 0.3, lower=lower, upper=upper)
    box_lo = torch.maximum(x - 0.3, lower[:, None, None])
    box_hi = torch.minimum(x + 0.3, upper[:, None, None])
    points = box_lo + (box_hi - box_lo) * torch.rand((300,) + x.shape)
    with torch.no_grad():
        out = model(points.flatten(0, 1)).view(300, 2, 5)
    assert (out >= lb - 1e-5).all() and (out <= ub + 1e-5).all()
    # the same as a per-element domain, and tighter than the loosest scalar domain
    full = pyibp.interval_bounds(model, x, 0.3, lower=lower[:, None, None].expand(3, 6, 6),
                                 upper=upper[:, None, None].expand(3, 6, 6))
    torch.testing.assert_close(full[0], lb)
    loose = pyibp.interval_bounds(model, x, 0.3, lower=float(lower.min()), upper=float(upper.max()))
    assert (lb >= loose[0] - 1e-6).all() and (ub <= loose[1] + 1e-6).all()
    for method in ("ibp", "crown-ibp"):
        m = pyibp.margin_bounds(model, x, y, 0.3, lower=lower, upper=upper, method=method)
        assert (m <= out.gather(2, y[None, :, None].expand(300, 2, 1)) - out + 1e-5).all()
    ce = pyibp.crown_ibp_robust_ce(model, x, y, 0.3, lower=lower, upper=upper)
    assert torch.isfinite(ce).all()
    with pytest.raises(ValueError, match=r"x has \d+ values outside the input domain"):
        pyibp.interval_bounds(model, x, 0.3, lower=lower + 10, upper=upper + 20)
    with pytest.raises(ValueError, match=r"lower must be a float, a tensor of one value per channel \(3,\)"):
        pyibp.interval_bounds(model, x, 0.3, lower=torch.zeros(4), upper=upper)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_models_get_float32_bounds(dtype):
    model, shape = random_model(4)
    x, y = _inputs(shape, 3, 4)
    reduced = copy.deepcopy(model).to(dtype)
    lb, ub = pyibp.interval_bounds(reduced, x.to(dtype), 0.05)
    assert lb.dtype == torch.float32
    exact = copy.deepcopy(reduced).float()                 # the same (rounded) weights in float32
    torch.testing.assert_close(lb, pyibp.interval_bounds(exact, x.to(dtype).float(), 0.05)[0])
    for method in ("ibp", "crown-ibp"):
        m = pyibp.margin_bounds(reduced, x, y, 0.05, method=method)
        torch.testing.assert_close(m, pyibp.margin_bounds(exact, x, y, 0.05, method=method))
    assert pyibp.crown_ibp_robust_ce(reduced, x, y, 0.05).dtype == torch.float32


def test_float64_x_with_a_float32_model_names_what_was_passed():
    model, shape = random_model(4)
    x, y = _inputs(shape, 2, 4, torch.float64)
    message = r"x is torch.float64 but the model's parameters are torch.float32; pass x.to\(torch.float32\)"
    with pytest.raises(ValueError, match=message):
        pyibp.interval_bounds(model, x, 0.05)
    with pytest.raises(ValueError, match=message):
        pyibp.margin_bounds(model, x, y, 0.05, method="crown-ibp")
    assert pyibp.interval_bounds(model, x, 0.05, dtype=torch.float64)[0].dtype == torch.float64


def test_unbatched_input_is_a_value_error_saying_so():
    model = tutorial_cnn().eval()
    with pytest.raises(ValueError, match=r"Conv2d\) expects inputs of shape \(B, 1, H, W\), got a box of shape "
                                         r"\(1, 28, 28\); was x passed without its batch dimension"):
        pyibp.interval_bounds(model, torch.rand(1, 28, 28), 0.1)


def test_huge_eps_on_an_unbounded_domain_gives_infinite_bounds_not_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    kw = dict(lower=-float("inf"), upper=float("inf"))
    lb, ub = pyibp.interval_bounds(model, x, 3e38, **kw)
    assert not torch.isnan(lb).any() and not torch.isnan(ub).any()
    assert (lb <= model(x)).all() and (model(x) <= ub).all()
    for method in ("ibp", "crown-ibp"):
        m = pyibp.margin_bounds(model, x, y, 3e38, method=method, **kw)
        assert not torch.isnan(m).any() and (m <= 0).all()
    assert not torch.isnan(pyibp.crown_ibp_robust_ce(model, x, y, 3e38, **kw)).any()
