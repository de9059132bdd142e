"""Schedules, the certified-training loss and loop, Shi et al.'s initialisation and regularisers,
verification and the robustness report; certified training on mnist-5k against a standard model."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyibp
from pyibp.attacks import pgd
from pyibp.evaluation import robustness_report, verify
from pyibp.bounds.crown import margin_pass
from pyibp.data import loader, mnist5k
from pyibp.models import cnn7, resnet_small
from pyibp.training import (CROWNIBP, IBP, Constant, LinearRamp, SmoothRamp, StepList, as_schedule, ibp_init, ibp_loss,
                            shi_regularizer, train_epoch)
from pyibp.testing import random_model

EPS = 0.1


def small_cnn() -> nn.Sequential:
    """The "small" CNN of Wong & Kolter (2018) and Zhang et al. (2020)."""
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


# ---------------------------------------------------------------------------------------------
# schedules
def test_linear_ramp():
    s = LinearRamp(0.0, 0.4, begin_step=10, ramp_steps=20)
    assert [s(t) for t in (0, 10, 15, 20, 30, 1000)] == [0.0, 0.0, 0.1, 0.2, 0.4, 0.4]
    assert s.final == 0.4
    assert LinearRamp(1.0, 0.5, 0, 0)(0) == 0.5  # no ramp: the end value from begin_step on
    assert LinearRamp(1.0, 0.0, 0, 4)(1) == 0.75  # decreasing ramps (kappa, beta)


def test_smooth_ramp_is_continuous_monotone_and_reaches_the_end():
    s = SmoothRamp(0.0, 0.3, begin_step=5, ramp_steps=400)
    values = [s(t) for t in range(0, 420)]
    assert values[:6] == [0.0] * 6 and values[405:] == [0.3] * 15
    diffs = [b - a for a, b in zip(values, values[1:])]
    assert all(d >= 0 for d in diffs)
    # polynomial start: far below the linear ramp early on, and C1 at the switch (t = 100 after begin)
    assert s(5 + 50) < 0.1 * LinearRamp(0.0, 0.3, 5, 400)(5 + 50)
    switch = 5 + 100
    left, right = s(switch) - s(switch - 1), s(switch + 1) - s(switch)
    assert math.isclose(left, right, rel_tol=0.05)
    assert math.isclose(right, (0.3 - s(switch)) / 300, rel_tol=1e-9)


def test_step_list_and_constants():
    s = StepList([0.0, 0.001, 0.01, 0.1], steps_per_epoch=10)
    assert [s(t) for t in (0, 9, 10, 25, 39, 40, 10 ** 6)] == [0.0, 0.0, 0.001, 0.01, 0.1, 0.1, 0.1]
    assert s.final == 0.1
    assert Constant(0.5)(12) == 0.5 and as_schedule(0.25)(3) == 0.25 and as_schedule(s) is s


@pytest.mark.parametrize("make,message", [
    (lambda: LinearRamp(0, 1, -1, 10), r"begin_step must be >= 0, got -1"),
    (lambda: LinearRamp(0, 1, 0, -5), r"ramp_steps must be >= 0, got -5"),
    (lambda: SmoothRamp(0, 1, 0, 10, mid=1.0), r"mid must lie in \[0, 1\), got 1.0"),
    (lambda: SmoothRamp(0, 1, 0, 10, power=0.5), r"power must be >= 1, got 0.5"),
    (lambda: StepList([], 10), r"values_per_epoch must hold at least one value"),
    (lambda: StepList([0.1], 0), r"steps_per_epoch must be >= 1, got 0"),
    (lambda: LinearRamp(0, 1, 0, 10)(-3), r"step must be >= 0, got -3"),
    (lambda: as_schedule(float("nan"), "eps_schedule"), r"eps_schedule must be a finite number"),
])
def test_schedule_errors_name_the_value(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---------------------------------------------------------------------------------------------
# loss, initialisation, regularisers
def test_ibp_loss_is_the_kappa_mix_of_clean_and_robust_cross_entropy():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    m = pyibp.margin_bounds(model, x, y, EPS)
    expected = 0.3 * F.cross_entropy(model(x), y) + 0.7 * F.cross_entropy(-m, y)
    torch.testing.assert_close(ibp_loss(model, x, y, EPS, 0.3), expected)
    torch.testing.assert_close(ibp_loss(model, x, y, EPS, 1.0), F.cross_entropy(model(x), y))
    mixed = pyibp.bounds.crown.crown_ibp_mixed_margins(model, x, y, EPS, 0.4)
    torch.testing.assert_close(ibp_loss(model, x, y, EPS, 0.0, method="crown-ibp", beta=0.4),
                               F.cross_entropy(-mixed, y))
    fused = pyibp.bounds.crown.crown_ibp_robust_ce(model, x, y, EPS)
    torch.testing.assert_close(ibp_loss(model, x, y, EPS, 0.3, method="crown-ibp", beta=0.4, loss_fusion=True),
                               0.3 * F.cross_entropy(model(x), y)
                               + 0.7 * (0.4 * fused + 0.6 * F.cross_entropy(-m, y, reduction="none")).mean())
    # the robust term bounds the worst case: it is at least the loss at any point of the box
    worst_point = x + pgd(model.eval(), x, y, EPS, alpha=EPS / 4, steps=10)
    assert F.cross_entropy(-m, y, reduction="none").ge(
        F.cross_entropy(model(worst_point), y, reduction="none") - 1e-5).all()


@pytest.mark.parametrize("kappa", [0.0, 0.3])
def test_a_training_step_is_one_optimizer_step_on_ibp_loss(kappa):
    """At κ = 0 the clean pass runs without a graph (it only feeds the metrics): same step."""
    torch.manual_seed(0)
    model, reference = mlp(), mlp()
    reference.load_state_dict(model.state_dict())
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with torch.no_grad():
        error_before = float((model(x).argmax(1) != y).float().mean())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics, _ = train_epoch(model, IBP(EPS, kappa), [(x, y)], opt, quiet=True)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ibp_loss(reference, x, y, EPS, kappa).backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert metrics["error"] == pytest.approx(error_before)


def test_ibp_init_takes_models_with_batchnorm_and_residual_blocks_in_training_mode():
    for model in (cnn7(in_channels=1, image_size=28), resnet_small()):
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        before = last.weight.detach().clone()
        ibp_init(model)
        assert model.training and torch.equal(last.weight, before)
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert float(first.weight.detach().std()) == pytest.approx(math.sqrt(2 * math.pi) / first.weight[0].numel(), rel=0.2)


def test_ibp_init_follows_shi_et_al():
    torch.manual_seed(0)
    model = small_cnn()
    last_before = model[-1].weight.detach().clone()
    ibp_init(model)
    for layer in (model[0], model[2], model[5]):
        fan_in = layer.weight[0].numel()
        assert math.isclose(float(layer.weight.detach().std()), math.sqrt(2 * math.pi) / fan_in, rel_tol=0.1)
    assert torch.equal(model[-1].weight, last_before)


def test_ibp_init_keeps_interval_widths_from_exploding():
    """Shi et al.'s point: with the default init the width grows layer after layer; with theirs it does not."""
    def growth(model):
        x = torch.rand(64, 1, 28, 28) * 0.8 + 0.1
        with torch.no_grad():
            p = margin_pass(model, x, torch.zeros(64, dtype=torch.long), 0.01, crown=False)
        widths = [float((hi - lo).mean()) for lo, hi in p.pre_activations]
        return widths[-1] / widths[0]

    torch.manual_seed(0)
    widths = [784, 256, 256, 256, 256]
    deep = nn.Sequential(nn.Flatten(), *[m for n_in, n_out in zip(widths, widths[1:])
                                         for m in (nn.Linear(n_in, n_out), nn.ReLU())], nn.Linear(256, 10))
    standard = growth(deep)
    initialised = growth(ibp_init(deep))
    assert standard > 4 and 0.25 < initialised < 4


def test_shi_regularizer_values():
    rad_in = torch.full((2, 3), 0.1)
    # one layer of radius 0.5 (ratio 0.1 / 0.5 -> tightness term (0.5 - 0.2) / 0.5 = 0.6); centres +1 active,
    # -1 inactive
    lo = torch.tensor([[0.5, -1.5, 0.5, -1.5]])
    hi = torch.tensor([[1.5, -0.5, 1.5, -0.5]])
    tightness, balance = shi_regularizer((torch.zeros(2, 3), rad_in), [(lo, hi)])
    torch.testing.assert_close(tightness, torch.tensor(0.6))
    torch.testing.assert_close(balance, torch.tensor(0.0))  # perfectly balanced
    # all neurons inactive: no active set, the balance ratio is 0 -> both terms are 1 each
    _, dead = shi_regularizer((torch.zeros(2, 3), rad_in), [(lo - 3, hi - 3)])
    torch.testing.assert_close(dead, torch.tensor(2.0))
    # all unstable: neither set exists, the ratios are undefined and add nothing (no NaN)
    _, skipped = shi_regularizer((torch.zeros(2, 3), rad_in), [(lo * 0 - 1, hi * 0 + 1)])
    assert skipped == 0.0
    zero_t, zero_b = shi_regularizer((torch.zeros(2, 3), rad_in), [])
    assert zero_t == 0 and zero_b == 0


def test_shi_regularizer_has_gradients():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    p = margin_pass(model, x, y, 0.05, crown=False)
    tightness, balance = shi_regularizer(p.input_box, p.pre_activations)
    (tightness + balance).backward()
    grad = model[1].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# the training loop
def _subset(dataset, n):
    x, y = dataset.tensors
    return torch.utils.data.TensorDataset(x[:n], y[:n])


@pytest.fixture(scope="module")
def data():
    train, test = mnist5k()
    return train, test


def test_epoch_counts_steps_follows_schedules_and_steps_the_lr(data):
    train, _ = data
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    batches = loader(_subset(train, 1000), 100)  # 10 steps
    eps = LinearRamp(0.0, 0.2, begin_step=0, ramp_steps=100)
    metrics, step = train_epoch(model, IBP(eps, 0.5), batches, opt, step=30, scheduler=sched, quiet=True)
    assert step == 40 and metrics["steps"] == 10 and metrics["examples"] == 1000
    assert metrics["eps"] == eps(39) and metrics["kappa"] == 0.5
    assert metrics["lr"] == pytest.approx(0.1 * 0.5 ** 2)
    assert 0 <= metrics["error"] <= metrics["verified_error"] <= 1
    assert all(math.isfinite(metrics[k]) for k in ("loss", "robust_loss", "seconds"))


def test_gradient_clipping_bounds_the_update(data):
    train, _ = data
    torch.manual_seed(0)
    model = mlp()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_epoch(model, IBP(0.1, 0.5), loader(_subset(train, 50), 50), opt, grad_clip=1e-3, quiet=True)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < float((after - before).norm()) <= 1e-3 * (1 + 1e-5)


@pytest.mark.parametrize("loss_fusion", [False, True])
def test_crown_ibp_training_with_beta_ramp_and_regularisers_runs_and_learns(data, loss_fusion):
    train, _ = data
    torch.manual_seed(0)
    model = ibp_init(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = loader(_subset(train, 1000), 100, shuffle=True)
    eps = LinearRamp(0.0, 0.05, begin_step=0, ramp_steps=30)
    beta = LinearRamp(1.0, 0.0, begin_step=0, ramp_steps=30)
    step, history = 0, []
    for _ in range(3):
        method = CROWNIBP(eps, 0.5, beta=beta, loss_fusion=loss_fusion, reg_tightness=0.5, reg_relu=0.5)
        metrics, step = train_epoch(model, method, batches, opt, step=step, grad_clip=10.0, quiet=True)
        history.append(metrics)
    assert [m["beta"] for m in history] == [beta(9), beta(19), beta(29)]
    assert all(math.isfinite(m["loss"]) for m in history)
    assert history[-1]["error"] < 0.5


def test_regularisers_need_a_schedule_with_a_final_value(data):
    train, _ = data
    with pytest.raises(ValueError, match="eps needs a `final` attribute"):
        IBP(lambda t: 0.1, 0.5, reg_tightness=0.5)


@pytest.mark.parametrize("method,kwargs,message", [
    (IBP(0.1, 1.5), {}, r"kappa must lie in \[0, 1\], got 1.5"),
    (IBP(0.1, 0.5), dict(grad_clip=0.0), r"grad_clip must be > 0 or None, got 0.0"),
    (IBP(0.1, 0.5), dict(step=-1), r"step must be >= 0, got -1"),
    (lambda: IBP(0.1, 0.5, bn_stats="batches"), {}, r"bn_stats must be one of \('batch', 'running'\), got 'batches'"),
    (lambda: ibp_loss(mlp(), torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), 0.1, 0.5, loss_fusion=True),
     {}, r"loss_fusion applies to the CROWN-IBP bound only, got method='ibp'"),
    (lambda: ibp_loss(mlp(), torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), 0.1, 0.5, method="crown"),
     {}, r"method must be one of \('ibp', 'crown-ibp'\)"),
])
def test_training_errors_name_the_value(data, method, kwargs, message):
    train, _ = data
    model = mlp()
    with pytest.raises(ValueError, match=message):
        method = method() if callable(method) else method
        train_epoch(model, method, loader(_subset(train, 10), 10), torch.optim.SGD(model.parameters(), 0.1),
                    quiet=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# certified training on mnist-5k, against a standard model
@pytest.fixture(scope="module")
def trained(data):
    """(certified model, standard model), both small CNNs trained on the 4,000 mnist-5k digits."""
    train, _ = data
    torch.manual_seed(0)
    certified = ibp_init(small_cnn())
    opt = torch.optim.Adam(certified.parameters(), lr=1e-3)
    batches = loader(train, 100, shuffle=True, seed=0)           # 40 steps per epoch
    eps = LinearRamp(0.0, EPS, begin_step=40, ramp_steps=160)
    kappa = LinearRamp(1.0, 0.5, begin_step=40, ramp_steps=160)
    step = 0
    for _ in range(8):
        _, step = train_epoch(certified, IBP(eps, kappa), batches, opt, step=step, grad_clip=10.0, quiet=True)
    standard = small_cnn()
    opt = torch.optim.Adam(standard.parameters(), lr=1e-3)
    for _ in range(3):  # eps = 0, kappa = 1: plain cross-entropy training
        train_epoch(standard, IBP(0.0, 1.0), batches, opt, quiet=True)
    return certified.eval(), standard.eval()


@pytest.mark.slow
def test_certified_training_verifies_most_of_what_standard_training_cannot(data, trained):
    _, test = data
    certified, standard = trained
    x, y = test.tensors                                            # all 1,000 test digits
    ibp_cert = verify(certified, (x, y), EPS, method="ibp")
    crown_cert = verify(certified, (x, y), EPS, method="crown-ibp")
    ibp_std = verify(standard, (x, y), EPS, method="ibp")
    print(f"\nverified error at eps={EPS}: certified IBP {ibp_cert.verified_error:.3f}, CROWN-IBP "
          f"{crown_cert.verified_error:.3f} (clean {ibp_cert.clean_error:.3f}); standard IBP "
          f"{ibp_std.verified_error:.3f} (clean {ibp_std.clean_error:.3f})")
    assert ibp_std.clean_error < 0.2 and ibp_std.verified_error > 0.95
    assert ibp_cert.verified_error < 0.6 and ibp_cert.clean_error < 0.2
    # CROWN-IBP certifies every example IBP does (it is never looser)
    assert bool((crown_cert.verified >= ibp_cert.verified).all())
    assert crown_cert.verified_error <= ibp_cert.verified_error


@pytest.mark.slow
def test_no_certified_example_is_broken_by_pgd_with_restarts(data, trained):
    _, test = data
    certified, _ = trained
    x, y = test.tensors[0][:300], test.tensors[1][:300]
    verified = verify(certified, (x, y), EPS, method="ibp").verified | \
        verify(certified, (x, y), EPS, method="crown-ibp").verified
    assert verified.sum() > 100
    xv, yv = x[verified], y[verified]
    delta = pgd(certified, xv, yv, EPS, alpha=EPS / 8, steps=30, restarts=3, random_start=True,
                generator=torch.Generator().manual_seed(0))
    assert bool((delta.abs() <= torch.tensor(EPS, dtype=delta.dtype)).all())
    with torch.no_grad():
        assert bool((certified(xv + delta).argmax(1) == yv).all())


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1])
def test_robustness_report_orders_clean_pgd_and_verified_error(data, trained, which):
    _, test = data
    model = trained[which]
    x, y = test.tensors[0][:200], test.tensors[1][:200]
    report = robustness_report(model, loader(torch.utils.data.TensorDataset(x, y), 100), EPS, pgd_steps=20,
                               pgd_restarts=2, generator=torch.Generator().manual_seed(0))
    assert report["examples"] == 200 and report["contradictions"] == 0
    for method in ("ibp", "crown-ibp"):
        assert report["clean_error"] <= report["pgd_error"] <= report["verified_error"][method]
    assert report["verified_error"]["crown-ibp"] <= report["verified_error"]["ibp"]
    assert report["pgd_error"] > report["clean_error"] or which == 0  # PGD breaks the standard model


# ---------------------------------------------------------------------------------------------
# verify
def test_verify_matches_margin_bounds_and_does_not_depend_on_batching():
    model, shape = random_model(1, num_classes=5)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand((40,) + shape, generator=gen), torch.randint(0, 5, (40,), generator=gen)
    model.train()
    r = verify(model, (x, y), 0.01, method="crown-ibp", batch_size=7)
    assert model.training  # the mode is restored
    model.eval()
    m = pyibp.margin_bounds(model, x, y, 0.01, method="crown-ibp")
    worst = m.scatter(1, y[:, None], math.inf).amin(1)
    correct = model(x).argmax(1) == y
    torch.testing.assert_close(r.worst_margin, worst.detach())
    assert torch.equal(r.correct, correct) and torch.equal(r.verified, correct & (worst > 0))
    r_all = verify(model, loader(torch.utils.data.TensorDataset(x, y), 1000), 0.01, method="crown-ibp")
    assert torch.equal(r_all.verified, r.verified)
    assert len(r) == 40 and r.verified_error == 1 - r.verified.double().mean().item()


def test_verify_float64_and_zero_eps():
    model, shape = random_model(2, num_classes=5)
    x, y = torch.rand((10,) + shape), torch.randint(0, 5, (10,))
    r = verify(model, (x, y), 0.0, dtype=torch.float64)
    assert r.worst_margin.dtype == torch.float64
    # at eps = 0 every correctly classified example with a strict margin is verified
    assert torch.equal(r.verified, r.correct & (r.worst_margin > 0))


@pytest.mark.parametrize("call,message", [
    (lambda m, d: verify(m, d, -0.1), r"eps must be a finite value >= 0, got -0.1"),
    (lambda m, d: verify(m, d, 0.1, method="lp"),
     r"method must be one of \('ibp', 'crown-ibp', 'crown', 'alpha-crown'\), got 'lp'"),
    (lambda m, d: robustness_report(m, d, 0.1, methods=()), r"methods must name at least one"),
    (lambda m, d: verify(m, (d[0], d[1][:3]), 0.1), r"x and y must hold the same number of examples, got 4 and 3"),
])
def test_certify_errors_name_the_value(call, message):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=message):
        call(model, (torch.rand(4, 4), torch.randint(0, 3, (4,))))


# ---------------------------------------------------------------------------------------------
# BatchNorm with batch statistics (Shi et al. 2021)
def bn_cnn(track_running_stats: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4, track_running_stats=track_running_stats),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
                         nn.BatchNorm1d(8, track_running_stats=track_running_stats), nn.ReLU(), nn.Linear(8, 3))


def test_bounds_with_batch_statistics_are_the_bounds_of_the_network_with_those_statistics():
    torch.manual_seed(0)
    model = bn_cnn().double()
    x, y = torch.rand(6, 1, 14, 14, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pyibp.batch_statistics(model) as stats:
        model.train()(x)
        model.eval()
        inside = pyibp.margin_bounds(model, x, y, 0.05)
        inside_crown = pyibp.bounds.crown.crown_ibp_robust_ce(model, x, y, 0.05)
    assert len(stats) == 2
    fixed = copy.deepcopy(model)   # the same network with the batch statistics as running statistics
    with torch.no_grad():
        for layer, (mean, var) in zip([fixed[1], fixed[5]], stats.values()):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    torch.testing.assert_close(inside, pyibp.margin_bounds(fixed, x, y, 0.05))
    torch.testing.assert_close(inside_crown, pyibp.bounds.crown.crown_ibp_robust_ce(fixed, x, y, 0.05))
    # outside the block the running statistics are back
    assert not torch.allclose(pyibp.margin_bounds(model, x, y, 0.05), inside)


def test_gradients_flow_through_the_batch_statistics():
    torch.manual_seed(0)
    model = bn_cnn().double()
    x, y = torch.rand(5, 1, 14, 14, dtype=torch.float64), torch.randint(0, 3, (5,))
    weight = model[0].weight

    def loss(w):
        with torch.no_grad():
            weight.copy_(w)
        model.train()
        return ibp_loss(model, x, y, 0.02, 0.0, bn_stats="batch")

    w0 = weight.detach().clone()
    model.zero_grad()
    loss(w0).backward()
    analytic = weight.grad.clone()
    step = 1e-6
    direction = torch.randn_like(w0)
    numeric = (loss(w0 + step * direction).item() - loss(w0 - step * direction).item()) / (2 * step)
    assert float((analytic * direction).sum()) == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_training_with_batch_statistics_needs_no_running_statistics_and_learns(data):
    train, _ = data
    torch.manual_seed(0)
    model = bn_cnn(track_running_stats=False)
    small = torch.utils.data.TensorDataset(*(torch.nn.functional.avg_pool2d(t, 2) if t.dim() == 4 else t % 3
                                             for t in _subset(train, 600).tensors))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history, step = [], 0
    for _ in range(3):
        metrics, step = train_epoch(model, IBP(0.01, 0.0), loader(small, 100, shuffle=True), opt, step=step,
                                    quiet=True)
        history.append(metrics)
    assert history[-1]["robust_loss"] < history[0]["robust_loss"]
    with pytest.raises(ValueError, match="track_running_stats=False"):
        train_epoch(model, IBP(0.01, 0.0, bn_stats="running"), loader(small, 100), opt, quiet=True)
