"""The fused APGD update against its reference, and APGD, FAB, Square and the AutoAttack cascade:
the schedule of the original, the ball/domain/model contract, strength against PGD, and soundness
against IBP certificates."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyibp
from pyibp import ops
from pyibp.attacks import apgd, apgd_checkpoints, attack_loss, autoattack, fab, pgd, square
from pyibp.attacks.apgd import run_apgd
from pyibp.attacks.common import Evaluator, check_inputs, untouched
from pyibp.attacks.fab import run_fab
from pyibp.data import mnist5k
from pyibp.reference import apgd_step_ref
from pyibp.training import ibp_loss

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 2e-2}
UPDATES = {"linf": ops.apgd_linf_step_, "l2": ops.apgd_l2_step_}


def norms(delta, norm):
    flat = delta.double().flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def assert_contract(delta, x, eps, norm, lower, upper):
    """In the ball (l∞ in the dtype, l2 in float64) and in the domain, evaluated in x's dtype."""
    assert delta.dtype == x.dtype and delta.shape == x.shape
    if norm == "linf":
        assert (delta.abs() <= torch.as_tensor(eps, dtype=x.dtype)).all()
    else:
        assert (norms(delta, norm) <= eps).all()
    moved = x + delta
    assert (moved >= lower).all() and (moved <= upper).all()


# ---------------------------------------------------------------------------------------------
# the fused update
def update_case(norm, dtype, device, per_element, per_example, g):
    B, shape = 5, (5, 2, 3, 4)
    x = torch.rand(shape, generator=g, dtype=torch.float64).to(device, dtype)
    if per_element:
        lower = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.3).to(device, dtype)
        upper = (0.7 + torch.rand(shape, generator=g, dtype=torch.float64) * 0.3).to(device, dtype)
        x = torch.minimum(torch.maximum(x, lower), upper)
    else:
        lower, upper = torch.tensor(0.1, dtype=dtype, device=device), torch.tensor(0.7, dtype=dtype, device=device)
        x = x.clamp(0.1, 0.7)
    radius = 0.1 if norm == "linf" else 0.8
    eps = (torch.rand(B, generator=g, dtype=torch.float64) * radius + 0.01 if per_example
           else torch.tensor(radius, dtype=torch.float64)).to(device)
    step = 2 * eps
    delta, previous = torch.zeros_like(x), torch.zeros_like(x)
    for d in (delta, previous):   # valid perturbations: inside the ball and the domain
        d.copy_((torch.randn(shape, generator=g, dtype=torch.float64) * 0.05).to(device, dtype))
        e = (eps if eps.dim() == 0 else eps[:, None, None, None]).to(dtype)
        d.copy_(torch.minimum(torch.maximum(d, -e), e))
        d.copy_(torch.minimum(torch.maximum(x + d, lower), upper) - x)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
    return delta, previous, grad, x, eps, step, lower, upper


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("per_element", [False, True])
def test_update_matches_reference_and_stays_inside(device, dtype, norm, per_element):
    g = torch.Generator().manual_seed(7)
    for per_example, momentum, layout in [(False, 1.0, "contiguous"), (True, 0.75, "transposed"),
                                          (True, 0.3, "contiguous")]:
        delta, previous, grad, x, eps, step, lower, upper = update_case(norm, dtype, device, per_element,
                                                                        per_example, g)
        if layout == "transposed":  # in-place outputs that are not contiguous are written back
            delta = delta.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
        want, want_previous = apgd_step_ref(*(t.double() for t in (delta, previous, grad, x)), eps, step, momentum,
                                            lower.double(), upper.double(), norm)
        old = delta.clone()
        UPDATES[norm](delta, previous, grad, x, eps, step, momentum, lower, upper)
        assert torch.equal(previous, old)
        torch.testing.assert_close(delta.double(), want, atol=TOLERANCE[dtype], rtol=0)
        e = eps if eps.dim() == 0 else eps
        if norm == "linf":
            assert (delta.abs() <= (e if e.dim() == 0 else e[:, None, None, None]).to(dtype)).all()
        else:
            assert (norms(delta, norm) <= e.double()).all()
        assert ((x + delta) >= lower).all() and ((x + delta) <= upper).all()


def test_update_rejects_bad_arguments():
    x = torch.rand(2, 3)
    d, p, g = torch.zeros(2, 3), torch.zeros(2, 3), torch.randn(2, 3)
    e, lo, hi = torch.tensor(0.1), torch.tensor(0.0), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="momentum must lie in"):
        ops.apgd_linf_step_(d, p, g, x, e, e, 1.5, lo, hi)
    with pytest.raises(RuntimeError, match="lower must hold one value or one per element"):
        ops.apgd_linf_step_(d, p, g, x, e, e, 1.0, torch.zeros(3), hi)
    with pytest.raises(RuntimeError, match="delta and previous must have the same shape"):
        ops.apgd_l2_step_(d, torch.zeros(2, 4), g, x, e, e, 1.0, lo, hi)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_update_opcheck(norm):
    op = getattr(torch.ops.pyibp, f"apgd_{norm}_step_").default
    x = torch.rand(4, 3, 5)
    full_lo, full_hi = torch.zeros(4, 3, 5), torch.ones(4, 3, 5)
    cases = [
        (torch.zeros(4, 3, 5), torch.zeros(4, 3, 5), torch.randn(4, 3, 5), x, torch.tensor(0.1), torch.tensor(0.2),
         0.75, torch.tensor(0.0), torch.tensor(1.0)),
        (torch.zeros(5, 3, 4).permute(2, 1, 0), torch.zeros(4, 3, 5),
         torch.randn(4, 3, 5), x, torch.rand(4, dtype=torch.float64), torch.full((4,), 0.05), 1.0, full_lo, full_hi),
        (torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), torch.tensor(0.1),
         torch.tensor(0.1), 0.75, torch.tensor(0.0), torch.tensor(1.0)),
    ]
    for args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# APGD's schedule and losses
def published_checkpoints(steps):
    """p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), as fractions of the run."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return [round(q * steps) for q in p[1:]]


@pytest.mark.parametrize("steps", [100, 1000, 200])
def test_apgd_checkpoints_are_the_published_ones(steps):
    assert apgd_checkpoints(steps) == published_checkpoints(steps)
    assert published_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_losses_and_their_class_requirements():
    logits = torch.tensor([[4.0, 3.0, 1.0, 0.0], [0.0, 5.0, 1.0, 3.0]])
    y, target = torch.tensor([0, 3]), torch.tensor([2, 1])
    # -(z_y - max_{j != y} z_j) / (z_π1 - z_π3)
    torch.testing.assert_close(attack_loss(logits, y, "dlr"), torch.tensor([-(4 - 3) / (4 - 1), -(3 - 5) / (5 - 1)]))
    # -(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)
    torch.testing.assert_close(attack_loss(logits, y, "dlr", target),
                               torch.tensor([-(4 - 1) / (4 - 0.5), -(3 - 5) / (5 - 0.5)]))
    with pytest.raises(ValueError, match="needs at least 4 classes"):
        attack_loss(logits[:, :3], y.clamp(max=2), "dlr", target.clamp(max=2))
    with pytest.raises(ValueError, match="needs at least 3 classes"):
        attack_loss(logits[:, :2], y.clamp(max=1), "dlr")


# ---------------------------------------------------------------------------------------------
# the contract of every attack
def small_conv(classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 7 * 7, classes))


ATTACKS = {
    "apgd-ce": lambda m, x, y, e, norm, **kw: apgd(m, x, y, e, norm=norm, steps=12, **kw),
    "apgd-t": lambda m, x, y, e, norm, **kw: apgd(m, x, y, e, norm=norm, steps=6, targeted=True,
                                                   n_target_classes=2, **kw),
    "fab-t": lambda m, x, y, e, norm, **kw: fab(m, x, y, e, norm=norm, steps=6, n_target_classes=2, restarts=2, **kw),
    "fab": lambda m, x, y, e, norm, **kw: fab(m, x, y, e, norm=norm, steps=4, targeted=False, **kw),
    "square": lambda m, x, y, e, norm, **kw: square(m, x, y, e, norm=norm, n_queries=30, **kw),
}


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attacks_stay_in_ball_and_domain_and_leave_the_model(name, norm, dtype):
    model = small_conv().to(dtype).train()   # training mode: BatchNorm would update its statistics
    lower, upper = 0.1, 0.7
    x = (torch.rand(6, 1, 14, 14, dtype=dtype) * 0.6 + 0.1).clamp(lower, upper)
    y = torch.randint(0, 10, (6,)).int()     # int32 labels work
    eps = 0.2 if norm == "linf" else 2.0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    delta = ATTACKS[name](model, x, y, eps, norm, lower=lower, upper=upper, generator=torch.Generator().manual_seed(1))
    assert_contract(delta, x, eps, norm, lower, upper)
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["apgd-ce", "fab-t", "square"])
def test_attacks_take_per_channel_domains_and_per_example_eps(name):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    lower, upper = torch.tensor([-1.0, -0.5, 0.0]), torch.tensor([1.0, 0.5, 2.0])
    x = torch.rand(4, 3, 8, 8) * (upper - lower)[:, None, None] + lower[:, None, None]
    eps = torch.tensor([0.05, 0.1, 0.2, 0.3])
    delta = ATTACKS[name](model, x, torch.arange(4), eps, "linf", lower=lower, upper=upper)
    assert (delta.abs() <= eps[:, None, None, None]).all()
    assert ((x + delta) >= lower[:, None, None]).all() and ((x + delta) <= upper[:, None, None]).all()


def test_apgd_runs_a_bfloat16_model():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).bfloat16().eval()
    x = torch.rand(4, 1, 28, 28)
    for inputs in (x, x.bfloat16()):
        delta = apgd(model, inputs, torch.arange(4), 0.1, steps=5)
        assert_contract(delta, inputs, 0.1, "linf", 0.0, 1.0)


def test_autoattack_refuses_models_with_too_few_classes():
    model = small_conv(classes=3).eval()
    x, y = torch.rand(4, 1, 14, 14), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="3 classes; apgd-t need at least 4"):
        autoattack(model, x, y, 0.1)
    result = autoattack(model, x, y, 0.1, attacks=("apgd-ce", "square"), steps=5, n_queries=10)
    assert [a.name for a in result.attacks] == ["apgd-ce", "square"]


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("targeted", [True, False])
def test_fab_finds_the_minimal_perturbation_of_a_linear_model(norm, targeted):
    """The boundary of a linear two-class model lies at |f| / ||w||_dual: FAB reaches it from just
    outside (2 % more radius) and, being sound, never breaks an example from just inside."""
    torch.manual_seed(0)
    linear = nn.Linear(10, 2)
    x = torch.rand(16, 10) * 2 - 1
    with torch.no_grad():
        y = linear(x).argmax(1)
        f = (linear(x)[:, 1] - linear(x)[:, 0]).abs()
        w = linear.weight[1] - linear.weight[0]
        distance = f / (w.abs().sum() if norm == "linf" else w.norm())
    for scale, broken in ((1.02, 16), (0.98, 0)):
        delta = fab(linear, x, y, distance * scale, norm=norm, targeted=targeted, steps=20, lower=-10.0, upper=10.0)
        with torch.no_grad():
            assert int((linear(x + delta).argmax(1) != y).sum()) == broken


@pytest.mark.parametrize("version", ["standard", "plus", "rand"])
def test_autoattack_versions_report_and_progress(version):
    model = small_conv().eval()
    x, y = torch.rand(6, 1, 14, 14), torch.randint(0, 10, (6,))
    seen = {}
    result = autoattack(model, x, y, 0.05, version=version, steps=3, n_queries=5, batch_size=4,
                        progress=lambda name, done, total: seen.setdefault(name, []).append((done, total)))
    names = {"standard": ["apgd-ce", "apgd-t", "fab-t", "square"],
             "plus": ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"], "rand": ["apgd-ce", "apgd-dlr"]}
    assert [a.name for a in result.attacks] == names[version]
    for name, ticks in seen.items():   # a bar per attack that ends full
        assert ticks[-1][0] == ticks[-1][1] and all(a <= b for (a, _), (b, _) in zip(ticks, ticks[1:]))
    report = result.report()
    assert report["examples"] == 6 and len(report["attacks"]) == len(names[version])
    with torch.no_grad():
        wrong = model(x + result.delta).argmax(1) != y
    assert torch.equal(~wrong, result.robust)
    assert result.robust_error == pytest.approx(wrong.float().mean().item())
    assert_contract(result.delta, x, 0.05, "linf", 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# on trained models: strength and soundness
@pytest.fixture(scope="module")
def trained():
    """Two small MNIST models, trained in a few seconds: standard and IBP (eps 0.1)."""
    train, test = mnist5k()
    X, Y = train.tensors
    models = {}
    for method in ("standard", "ibp"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        for epoch in range(3):
            order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(X), 100):
                xb, yb = X[order[i:i + 100]], Y[order[i:i + 100]]
                loss = (F.cross_entropy(model(xb), yb) if method == "standard"
                        else ibp_loss(model, xb, yb, 0.1 * min(1.0, (epoch + 1) / 2), kappa=0.5))
                opt.zero_grad()
                loss.backward()
                opt.step()
        models[method] = model.eval()
    chosen = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[:200]   # every class
    return models, test.tensors[0][chosen], test.tensors[1][chosen]


def error(model, x, y, delta):
    with torch.no_grad():
        return (model(x + delta).argmax(1) != y).float().mean().item()


@pytest.mark.parametrize("method", ["standard", "ibp"])
def test_apgd_is_at_least_as_strong_as_pgd_with_restarts(trained, method):
    models, x, y = trained
    model, eps = models[method], 0.08 if method == "standard" else 0.15
    g = torch.Generator().manual_seed(0)
    pgd40 = error(model, x, y, pgd(model, x, y, eps, alpha=eps / 4, steps=40))
    pgd_restarts = error(model, x, y, pgd(model, x, y, eps, alpha=eps / 4, steps=100, random_start=True,
                                          restarts=3, generator=g))
    apgd_ce = error(model, x, y, apgd(model, x, y, eps, generator=g))
    assert apgd_ce >= max(pgd40, pgd_restarts)
    assert apgd_ce > error(model, x, y, torch.zeros_like(x))   # it does break examples


def test_no_certified_example_is_broken(trained):
    """Examples that IBP or CROWN-IBP verifies stay robust under every attack."""
    models, x, y = trained
    model, eps = models["ibp"], 0.1
    certified = torch.zeros_like(y, dtype=torch.bool)
    for method in ("ibp", "crown-ibp"):
        margins = pyibp.margin_bounds(model, x, y, eps, method=method)
        certified |= margins.scatter(1, y[:, None], math.inf).amin(1) > 0
    assert certified.sum() >= 20    # the check has examples to check
    result = autoattack(model, x, y, eps, steps=25, n_queries=300, skip_verified=False)
    assert not (certified & ~result.robust).any()
    assert result.robust_error > result.clean_error      # and the cascade breaks uncertified ones
    assert_contract(result.delta, x, eps, "linf", 0.0, 1.0)
    errors = [a.robust_error for a in result.attacks]
    assert errors == sorted(errors) and [a.name for a in result.attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    for name in ("apgd-ce", "apgd-t", "fab-t"):   # each attack on its own, on every example
        with torch.no_grad():
            wrong = model(x + ATTACKS[name](model, x, y, eps, "linf")).argmax(1) != y
        assert not (certified & wrong).any(), name


def test_examples_the_sound_bounds_verify_are_not_attacked(trained):
    """skip_verified (the default): what sound IBP / CROWN-IBP certify is robust without an attack,
    every other correctly classified example goes through the whole cascade."""
    models, x, y = trained
    model, eps = models["ibp"], 0.1
    sound = torch.zeros_like(y, dtype=torch.bool)
    for method in ("ibp", "crown-ibp"):
        margins = pyibp.margin_bounds(model, x, y, eps, method=method, sound=True)
        sound |= margins.scatter(1, y[:, None], math.inf).amin(1) > 0
    result = autoattack(model, x, y, eps, steps=25, n_queries=300)
    assert result.verification == "sound ibp + crown-ibp"
    assert torch.equal(result.verified, sound) and sound.sum() >= 20
    assert result.robust[sound].all() and (result.delta[sound] == 0).all()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert result.attacks[0].attacked == int((correct & ~sound).sum())
    report = result.report()
    assert report["verified"] == int(sound.sum()) and report["verification_seconds"] >= 0
    full = autoattack(model, x, y, eps, steps=25, n_queries=300, skip_verified=False)
    assert full.verified.sum() == 0 and full.verification == "off"
    assert abs(full.robust_error - result.robust_error) <= 2 / len(y)   # the same up to the random draws


def test_models_the_bounds_refuse_are_attacked_in_full():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10)).eval()
    x = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)            # all correct: all to verify
    result = autoattack(model, x, y, 0.05, attacks=("apgd-ce",), steps=3)
    assert result.verification.startswith("skipped: sound=True cannot bound") and "Tanh" in result.verification
    assert result.verified.sum() == 0
    assert result.attacks[0].attacked == 6


class RowCounter(nn.Module):
    """The model, counting the rows it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize("kind", ["apgd-t", "fab-t"])
def test_batched_targets_break_what_the_sequential_runs_break(trained, kind):
    """APGD-T / FAB-T with their 9 targets as one batch of 9 x B rows (as on accelerators) break,
    on a seeded run, exactly the examples the runs one target at a time (as on the CPU) break, and
    drop every row of an example once one of them breaks it."""
    models, x, y = trained
    model = RowCounter(copy.deepcopy(models["standard"]).double())   # float64: batching changes no rounding
    x, y = x[:50].double(), y[:50]
    eps, domain, y, _ = check_inputs(model, x, y, 0.08, 0.0, 1.0)
    with torch.no_grad():
        correct = model.model(x).argmax(1) == y
    found, rows = {}, {}
    for at_once in (1, 9):
        model.rows = 0
        with untouched(model):
            ev = Evaluator(model)
            common = dict(norm="linf", targeted=True, n_target_classes=9, steps=10, restarts=1,
                          generator=torch.Generator().manual_seed(0), tick=lambda n: None, at_once=at_once)
            if kind == "apgd-t":
                delta, fooled = run_apgd(ev, x, y, eps, domain, loss="dlr", **common)
            else:
                delta, fooled = run_fab(ev, x, y, eps, domain, **common)
        found[at_once], rows[at_once] = fooled & correct, model.rows
        assert_contract(delta, x, 0.08, "linf", 0.0, 1.0)
        with torch.no_grad():
            assert torch.equal((model.model(x + delta).argmax(1) != y) & correct, fooled & correct)
    assert torch.equal(found[1], found[9])
    assert 0 < int(found[9].sum()) < int(correct.sum())
    steps_per_run = 11 if kind == "apgd-t" else 20     # APGD: a gradient per step; FAB: a gradient and a check
    assert rows[9] < 9 * int(correct.sum()) * steps_per_run        # broken examples left the batch early
