"""Bounds of models that are not nn.Sequential: functional forwards, concatenation, residual
blocks, every activation, VGG, torchvision's resnet18 and random DAGs. IBP against the
independent reference (the model's own forward on intervals, float64), soundness at sampled
points, CROWN-IBP sound and never looser than IBP, PGD inside the box, capture and errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyibp
from pyibp.bounds.crown import margin_pass
from pyibp.models import cifar_resnet
from pyibp.reference import interval_forward_ref
from pyibp.testing import randomize_batchnorm, sample_box


# ---------------------------------------------------------------------------------------------
# architectures of the kinds users write
class FunctionalNet(nn.Module):
    """F.relu, x.view(x.size(0), -1), buffers in the forward, a method-form activation."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 20), nn.Linear(20, 10)
        self.register_buffer("mean", torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = self.conv2(x).relu()
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class TwoBranch(nn.Module):
    """Two branches joined by torch.cat, channel slicing, F.pad and a 1-d convolution."""

    def __init__(self):
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2, dilation=1), nn.Tanh())
        self.mix = nn.Conv2d(8, 6, 3, stride=2)
        self.seq = nn.Conv1d(6, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4 * 36, 10)

    def forward(self, x):
        z = torch.cat([self.left(x), self.right(x)], dim=1)
        z = F.pad(z, (1, 1, 1, 1))
        z = self.mix(z)                                   # (B, 6, 6, 6)
        z = torch.cat((z[:, :3], -z[:, 3:] * 0.5), 1)
        z = F.leaky_relu(self.seq(torch.flatten(z, 2)), 0.2)
        return self.head(z.flatten(1))


class ResidualNet(nn.Module):
    """A ResNet block with BatchNorm, `out + self.shortcut(x)`, adaptive average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        out = F.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def activations_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.LeakyReLU(0.1), nn.Conv2d(6, 6, 3), nn.ELU(),
                         nn.Conv2d(6, 6, 3), nn.Softplus(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(54, 16),
                         nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 12), nn.ReLU6(),
                         nn.Linear(12, 12), nn.Hardtanh(-0.5, 0.7), nn.Linear(12, 10))


def vgg_bn():
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*block(3, 8), *block(8, 8), nn.MaxPool2d(2), *block(8, 16), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32),
                         nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))


ARCHITECTURES = {"functional": FunctionalNet, "two-branch": TwoBranch, "residual": ResidualNet,
                 "activations": activations_net, "vgg-bn": vgg_bn,
                 "cifar-resnet": lambda: cifar_resnet(width=4, image_size=12),
                 "resnet18": lambda: torchvision.models.resnet18(num_classes=10)}
SIZES = {"resnet18": 32}


def _build(name, dtype=torch.float64):
    torch.manual_seed(0)
    model = randomize_batchnorm(ARCHITECTURES[name](), torch.Generator().manual_seed(0))
    return model.to(dtype).eval()


def _data(name, batch=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = SIZES.get(name, 12)
    return torch.rand(batch, 3, size, size, generator=gen, dtype=dtype), torch.randint(0, 10, (batch,), generator=gen)


def _eps(name):
    return 1e-4 if name == "resnet18" else 0.01


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_ibp_equals_the_reference_interval_forward(name):
    model = _build(name)
    x, _ = _data(name)
    lb, ub = pyibp.interval_bounds(model, x, _eps(name))
    ref_lb, ref_ub = interval_forward_ref(model, x, _eps(name))
    scale = float(ref_ub.detach().abs().max())
    torch.testing.assert_close(lb, ref_lb, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(ub, ref_ub, rtol=1e-9, atol=1e-9 * scale)


def _true_margins(out, y):
    return out.gather(-1, y[None, :, None].expand(out.shape[0], -1, 1)) - out


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_bounds_and_margins_are_sound_and_crown_is_never_looser(name):
    model = _build(name, torch.float32)
    x, y = _data(name, dtype=torch.float32)
    eps = _eps(name)
    lb, ub = pyibp.interval_bounds(model, x, eps)
    ibp = pyibp.margin_bounds(model, x, y, eps)
    crown = pyibp.margin_bounds(model, x, y, eps, method="crown-ibp")
    raw = margin_pass(model, x, y, eps).crown
    fused = pyibp.crown_ibp_robust_ce(model, x, y, eps)
    points = sample_box(x, torch.tensor(eps), 100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(points.flatten(0, 1)).reshape(points.shape[0], x.shape[0], -1)
    slack = 1e-4 * max(1.0, float(ub.detach().abs().max()))
    assert (out >= lb - slack).all() and (out <= ub + slack).all()
    true = _true_margins(out, y)
    for bound in (ibp, crown, raw):
        assert (bound <= true + slack).all()
    assert (crown >= ibp - 1e-6 * max(1.0, float(ibp.detach().abs().max()))).all()
    ce = F.cross_entropy(out.flatten(0, 1), y.repeat(out.shape[0]), reduction="none").view(out.shape[0], -1)
    assert (fused >= ce - slack).all()


@pytest.mark.parametrize("name", ["functional", "two-branch", "residual", "activations"])
def test_pgd_stays_in_the_box_and_below_the_bounds(name):
    model = _build(name, torch.float32)
    x, y = _data(name, dtype=torch.float32)
    delta = pyibp.pgd(model, x, y, 0.02, alpha=0.005, steps=10)
    assert (delta.abs() <= 0.02).all() and ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    lb, ub = pyibp.interval_bounds(model, x, 0.02)
    with torch.no_grad():
        out = model(x + delta)
    assert (out >= lb - 1e-4).all() and (out <= ub + 1e-4).all()


def test_fusion_and_elision_on_a_functional_forward():
    graph = pyibp.bound_graph(FunctionalNet())
    kinds = {n.name: n for n in graph.nodes}
    assert kinds["conv1"].fuse_relu and kinds["relu"].fused          # F.relu(self.conv1(x)) is one operator
    assert graph.nodes[graph.last_linear].name == "fc2"               # the specification folds into fc2


def test_graph_is_captured_once_reads_parameters_live_and_notices_structural_change():
    model = _build("functional")
    x, y = _data("functional")
    graph = pyibp.bound_graph(model)
    before = pyibp.interval_bounds(model, x, 0.01)
    with torch.no_grad():
        model.fc2.weight.mul_(2)
        model.mean.add_(0.1)                                           # a buffer read in forward
    assert pyibp.bound_graph(model) is graph
    after = pyibp.interval_bounds(model, x, 0.01)
    ref = interval_forward_ref(model, x, 0.01)
    torch.testing.assert_close(after[0], ref[0])
    assert not torch.allclose(before[0], after[0])
    model.fc2 = nn.Linear(20, 4).double()
    assert pyibp.bound_graph(model) is not graph
    assert pyibp.interval_bounds(model, x, 0.01)[0].shape == (3, 4)
    copied = copy.deepcopy(model)                                      # a copy captures its own graph
    assert pyibp.bound_graph(copied).nodes[1].module is not None
    torch.testing.assert_close(pyibp.interval_bounds(copied, x, 0.01)[0], pyibp.interval_bounds(model, x, 0.01)[0])


def test_pre_activations_list_every_relu_of_the_graph_in_order():
    model = _build("residual")
    x, y = _data("residual")
    p = margin_pass(model, x, y, 0.0, crown=False)
    relus = [n for n in pyibp.bound_graph(model).nodes if n.kind == "relu"]
    assert len(p.pre_activations) == len(relus) == 3
    stem_pre = model.stem[1](model.stem[0](x))
    torch.testing.assert_close(p.pre_activations[0][0], stem_pre)
    torch.testing.assert_close(p.pre_activations[0][1], stem_pre)


def test_certified_training_step_on_a_graph_with_batch_statistics():
    from pyibp.training import CROWNIBP, LinearRamp, train_epoch
    model = ResidualNet()
    x, y = torch.rand(8, 3, 12, 12), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    method = CROWNIBP(LinearRamp(0.0, 0.02, 0, 4), 0.5, reg_tightness=0.5, reg_relu=0.5)
    metrics, _ = train_epoch(model, method, [(x, y)], opt, quiet=True)
    assert all(torch.isfinite(torch.tensor(float(metrics[k]))) for k in ("loss", "robust_loss"))
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# random DAGs
ACTS = [nn.ReLU, lambda: nn.LeakyReLU(0.3), nn.ReLU6, lambda: nn.Hardtanh(-0.4, 0.6), nn.ELU, nn.Softplus,
        nn.Tanh, nn.Sigmoid]


class RandomDAG(nn.Module):
    """Nodes of shape (C, S, S): convolutions, BatchNorm, activations, residual adds, concatenation
    (then a 1x1 convolution), constant affine maps, pooling that keeps the shape, zero padding;
    a head of mean, adaptive pooling or flattening, then Linear. Drawn from ``seed`` alone."""

    def __init__(self, seed: int, channels: int = 3, size: int = 6):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        pick = lambda n: int(torch.randint(n, (1,), generator=gen))  # noqa: E731
        self.plan, self.layers = [], nn.ModuleList()
        self.register_buffer("scale", torch.randn(channels, 1, 1, generator=gen))
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        count = 1
        for _ in range(3 + pick(4)):
            kind = ["conv", "bn", "act", "add", "cat", "affine", "pool", "pad"][pick(8)]
            a, b = pick(count), pick(count)
            if kind == "conv":
                self.layers.append(nn.Conv2d(channels, channels, 3, padding=1))
            elif kind == "bn":
                self.layers.append(randomize_batchnorm(nn.BatchNorm2d(channels), gen))
            elif kind == "act":
                self.layers.append(ACTS[pick(len(ACTS))]())
            elif kind == "cat":
                self.layers.append(nn.Conv2d(2 * channels, channels, 1))
            elif kind == "pool":
                self.layers.append([nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1)][pick(2)])
            elif kind == "pad":
                self.layers.append(nn.Conv2d(channels, channels, 3))
            else:
                self.layers.append(nn.Identity())
            self.plan.append((kind, a, b))
            count += 1
        self.head = pick(3)
        self.fc = nn.Linear(channels * (size * size if self.head == 2 else 1), 5)

    def forward(self, x):
        values = [F.relu(self.stem(x))]
        for layer, (kind, a, b) in zip(self.layers, self.plan):
            u, v = values[a], values[b]
            if kind == "add":
                out = u + v if a != b else u - 0.5 * v
            elif kind == "cat":
                out = layer(torch.cat([u, v], 1))
            elif kind == "affine":
                out = u * self.scale + 0.1
            elif kind == "pad":
                out = layer(F.pad(u, [1, 1, 1, 1]))
            else:
                out = layer(u)
            values.append(out)
        z = values[-1]
        if self.head == 0:
            z = z.mean((2, 3))
        elif self.head == 1:
            z = F.adaptive_avg_pool2d(z, 1).flatten(1)
        else:
            z = z.reshape(z.shape[0], -1)
        return self.fc(z)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), eps=st.sampled_from([0.0, 1e-3, 0.03, 0.2]))
def test_random_dags_match_the_reference_and_are_sound(seed, eps):
    torch.manual_seed(seed)
    model = RandomDAG(seed).double().eval()
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(2, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 5, (2,), generator=gen)
    lb, ub = pyibp.interval_bounds(model, x, eps)
    ref_lb, ref_ub = interval_forward_ref(model, x, eps)
    scale = max(1.0, float(ref_ub.detach().abs().max()))
    torch.testing.assert_close(lb, ref_lb, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(ub, ref_ub, rtol=1e-9, atol=1e-9 * scale)
    ibp = pyibp.margin_bounds(model, x, y, eps)
    p = margin_pass(model, x, y, eps)
    points = sample_box(x, torch.tensor(eps, dtype=torch.float64), 200, generator=gen)
    with torch.no_grad():
        out = model(points.flatten(0, 1)).reshape(points.shape[0], 2, -1)
    slack = 1e-8 * scale
    assert (out >= lb - slack).all() and (out <= ub + slack).all()
    true = _true_margins(out, y)
    assert (ibp <= true + slack).all() and (p.crown <= true + slack).all()
    # (the IBP inside the CROWN pass runs unfused: equal to the fused one up to rounding)
    assert (pyibp.margin_bounds(model, x, y, eps, method="crown-ibp") >= ibp - 1e-12 * scale).all()
    if eps == 0.0:
        torch.testing.assert_close(p.crown, true[0], rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# errors
class _Mish(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.mish(self.fc(x))


class _Branching(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class _Product(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("model,message", [
    (_Mish(), r"pyibp cannot bound node 'mish' \(call_function F.mish\) at .*test_graph.py:\d+: "
              r"return F.mish\(self.fc\(x\)\)\. Supported: Linear"),
    (_Branching(), r"could not capture _Branching.forward with torch.fx at .*test_graph.py:\d+: if x.sum\(\) > 0"),
    (_Product(), r"node 'mul' \(call_function operator.mul\) at .*: mul of two bounded tensors is not linear"),
    (nn.Sequential(nn.Flatten(0)), r"changes the batch dimension"),
])
def test_unsupported_ops_name_node_target_and_line(model, message):
    with pytest.raises(TypeError, match=message):
        pyibp.interval_bounds(model, torch.rand(2, 4), 0.1)


def test_unsupported_forms_of_supported_ops_are_errors():
    class MeanAll(nn.Module):
        def forward(self, x):
            return x - x.mean()

    class CatBatch(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], 0)

    with pytest.raises(TypeError, match="mean over every dimension"):
        pyibp.interval_bounds(MeanAll(), torch.rand(2, 4), 0.1)
    with pytest.raises(TypeError, match="concatenates along the batch dimension"):
        pyibp.interval_bounds(CatBatch(), torch.rand(2, 4), 0.1)
    with pytest.raises(TypeError, match="negative_slope=-0.5"):
        pyibp.interval_bounds(nn.Sequential(nn.LeakyReLU(-0.5)), torch.rand(2, 4), 0.1)


# ---------------------------------------------------------------------------------------------
# relaxations
RELAXED = [nn.ReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(1.5), nn.ReLU6(), nn.Hardtanh(-0.5, 0.8), nn.ELU(),
           nn.ELU(2.0), nn.Softplus(), nn.Softplus(beta=3.0), nn.Tanh(), nn.Sigmoid()]


@pytest.mark.parametrize("module", RELAXED, ids=lambda m: repr(m))
def test_relaxations_hold_on_every_kind_of_box(module):
    from pyibp.bounds.relaxations import relaxation
    gen = torch.Generator().manual_seed(0)
    centre = torch.cat([torch.randn(300, generator=gen, dtype=torch.float64) * 4,
                        torch.tensor([0.0, -3.0, 3.0, 6.0, 0.8, -0.5], dtype=torch.float64)])
    width = torch.cat([torch.rand(300, generator=gen, dtype=torch.float64) * 6,
                       torch.tensor([0.0, 1e-9, 2.0, 0.5, 0.0, 4.0], dtype=torch.float64)])
    lower, upper = centre - width / 2, centre + width / 2
    a_low, b_low, a_up, b_up = relaxation(module, lower, upper)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)[:, None]
    z = lower + t * (upper - lower)
    f = module(z)
    assert (a_low * z + b_low <= f + 1e-9).all() and (f <= a_up * z + b_up + 1e-9).all()
    # exact on a box where the function is linear
    if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.Hardtanh)):
        flat = (upper <= -1) | ((lower >= 1) & (upper <= 6) if isinstance(module, nn.ReLU6) else lower >= 1)
        if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
            flat = (upper <= module.min_val) | (lower >= module.max_val)
        torch.testing.assert_close((a_low * z + b_low)[:, flat], f[:, flat])
        torch.testing.assert_close((a_up * z + b_up)[:, flat], f[:, flat])


class AllForms(nn.Module):
    """Each op in its functional, torch.*, method and inplace forms."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(6) * 0.1)
        self.w2 = nn.Parameter(torch.randn(10, 24) * 0.3)
        self.register_buffer("shift", torch.randn(1, 6, 1, 1) * 0.1)

    def forward(self, x):
        z = F.conv2d(x, self.w1, self.b1, stride=1, padding=1)           # (B, 6, 8, 8)
        z = F.relu(z)
        z = torch.add(z, self.shift).mul(2.0).div(3.0) - 0.1
        a = F.leaky_relu(z, 0.2) + F.relu6(z) - F.hardtanh(z, -0.5, 0.8)
        b = torch.tanh(F.elu(z)) + torch.sigmoid(F.softplus(z)).sigmoid() + z.tanh()
        z = F.max_pool2d(a, 2) + F.avg_pool2d(-b, 2, stride=2)           # (B, 6, 4, 4)
        z = z.permute(0, 2, 3, 1).contiguous().transpose(1, 3)          # (B, 6, 4, 4) reordered
        z = F.dropout(z, 0.5, training=False)
        z = torch.mean(z, dim=2, keepdim=True).squeeze(2)               # (B, 6, 4)
        z = torch.unsqueeze(z, 1)[:, 0, 1:5]                            # (B, 4, 4)
        z = torch.cat([z, F.adaptive_avg_pool2d(a, 2).flatten(2)[:, :2]], 1)   # (B, 6, 4)
        z = torch.relu(1.0 - z).reshape(z.shape[0], -1)                 # (B, 24)
        return F.linear(z, self.w2)


def test_every_form_of_every_op_matches_the_reference_and_crown_is_sound():
    torch.manual_seed(0)
    model = AllForms().double().eval()
    graph = pyibp.bound_graph(model)
    assert all(n.kind != "const" or not n.inputs or n.call is not None for n in graph.nodes)
    x, y = torch.rand(3, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 4, 9])
    for eps in (0.0, 0.02):
        lb, ub = pyibp.interval_bounds(model, x, eps)
        ref_lb, ref_ub = interval_forward_ref(model, x, eps)
        torch.testing.assert_close(lb, ref_lb, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ub, ref_ub, rtol=1e-10, atol=1e-10)
        points = sample_box(x, torch.tensor(eps, dtype=torch.float64), 200)
        with torch.no_grad():
            out = model(points.flatten(0, 1)).reshape(200, 3, -1)
        p = margin_pass(model, x, y, eps)
        assert (p.crown <= _true_margins(out, y) + 1e-9).all()
        assert (pyibp.crown_ibp_robust_ce(model, x, y, eps) >= F.cross_entropy(
            out.flatten(0, 1), y.repeat(200), reduction="none").view(200, 3) - 1e-9).all()
    torch.testing.assert_close(p.crown if eps == 0 else margin_pass(model, x, y, 0.0).crown,
                               _true_margins(model(x)[None], y)[0])


def test_verify_and_robustness_report_on_a_graph():
    from pyibp.evaluation import robustness_report, verify
    model = _build("residual", torch.float32)
    x, y = _data("residual", batch=6, dtype=torch.float32)
    result = verify(model, [(x, y)], 0.001, method="crown-ibp")
    assert result.verified.shape == (6,) and not (result.verified & ~result.correct).any()
    report = robustness_report(model, [(x, y)], 0.001, pgd_steps=3)
    assert report["contradictions"] == 0
    assert report["clean_error"] <= report["pgd_error"] <= report["verified_error"]["crown-ibp"]
    assert report["verified_error"]["crown-ibp"] <= report["verified_error"]["ibp"]


class LogSoftmaxNet(nn.Module):
    """pytorch/examples' MNIST classifier shape: F.max_pool2d(F.relu(conv)), view, log_softmax."""

    def __init__(self, final: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1, self.fc2 = nn.Linear(4 * 5 * 5, 16), nn.Linear(16, 10)
        self.final = final

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), (2, 2))
        x = F.dropout(F.relu(self.fc1(x.view(-1, 4 * 5 * 5))), training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1) if self.final else x


def test_a_final_log_softmax_keeps_the_margins_of_the_logits():
    torch.manual_seed(0)
    model = LogSoftmaxNet().double().eval()
    logits = LogSoftmaxNet(final=False).double().eval()
    logits.load_state_dict(model.state_dict())
    x, y = _data("log-softmax", batch=4)
    assert pyibp.bound_graph(model).nodes[pyibp.bound_graph(model).last_linear].name == "fc2"
    for method in ("ibp", "crown-ibp"):
        torch.testing.assert_close(pyibp.margin_bounds(model, x, y, 0.02, method=method),
                                   pyibp.margin_bounds(logits, x, y, 0.02, method=method))
    torch.testing.assert_close(pyibp.crown_ibp_robust_ce(model, x, y, 0.02),
                               pyibp.crown_ibp_robust_ce(logits, x, y, 0.02))
    lb, ub = pyibp.interval_bounds(model, x, 0.02)
    with torch.no_grad():
        out = model(sample_box(x, torch.tensor(0.02, dtype=torch.float64), 300).flatten(0, 1)).view(300, 4, 10)
    assert (out >= lb - 1e-9).all() and (out <= ub + 1e-9).all() and (ub <= 0).all()
    exact = pyibp.interval_bounds(model, x, 0.0)
    torch.testing.assert_close(exact[0], model(x))
    torch.testing.assert_close(exact[1], model(x))


def test_a_log_softmax_inside_the_model_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.LogSoftmax(1), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"log_softmax is supported as the model's last op only"):
        pyibp.interval_bounds(model, torch.rand(2, 4), 0.1)
