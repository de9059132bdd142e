"""CROWN-IBP margin bounds and the loss-fusion bound of the cross-entropy: agreement with an
independent dense float64 implementation, soundness at sampled and attacked points, never looser
than IBP, gradients, errors."""
import copy
import itertools
import math
from typing import List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyibp
import torch.nn.functional as F

from pyibp.bounds.crown import (_back_relu, crown_ibp_margin_bounds, crown_ibp_mixed_margins, crown_ibp_robust_ce,
                         margin_pass)
from pyibp.models import resnet_small
from pyibp.nn import Normalize, Residual
from pyibp.testing import devices, random_model, randomize_batchnorm, sample_box

seeds = st.integers(0, 2**31 - 1)
eps_values = st.sampled_from([0.0, 1e-3, 0.02, 0.1, 0.3])


# ---------------------------------------------------------------------------------------------
# An independent implementation: every layer as an explicit matrix, bounds per example in float64.
def _leaves(module: nn.Module) -> List[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _leaves(child)]
    return [module]


def _dense_ops(layers: List[nn.Module], shape: Tuple[int, ...]):
    """Each layer as ('affine', M, c), ('relu',), ('maxpool', windows, n_out) or ('residual', body, shortcut);
    affine maps are read off by applying the layer to 0 and to the identity's columns."""
    ops = []
    for layer in layers:
        n = torch.Size(shape).numel()
        if isinstance(layer, nn.ReLU):
            ops.append(("relu",))
            continue
        if isinstance(layer, Residual):
            body, out_shape = _dense_ops(_leaves(layer.body), shape)
            shortcut, _ = _dense_ops(_leaves(layer.shortcut), shape)
            ops.append(("residual", body, shortcut))
            shape = out_shape
            continue
        if isinstance(layer, nn.MaxPool2d):
            ops.append(("maxpool", _windows(layer, shape)))
            with torch.no_grad():
                shape = tuple(layer(torch.zeros((1,) + shape, dtype=torch.float64)).shape[1:])
            continue
        with torch.no_grad():
            inputs = torch.cat([torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)])
            out = layer(inputs.reshape((n + 1,) + shape))
        c = out[0].flatten()
        ops.append(("affine", (out[1:].reshape(n, -1) - c).T.clone(), c.clone()))
        shape = tuple(out.shape[1:])
    return ops, shape


def _windows(layer: nn.MaxPool2d, shape) -> List[List[int]]:
    """Flat input indices of each output of a max pooling, output by output, in row-major window order."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(pair, (layer.kernel_size, layer.stride or layer.kernel_size,
                                                        layer.padding, layer.dilation))
    c, h, w = shape
    out_h, out_w = layer(torch.zeros(1, c, h, w)).shape[2:]
    windows = []
    for ch, oh, ow in itertools.product(range(c), range(out_h), range(out_w)):
        members = [ch * h * w + r * w + q
                   for a, b in itertools.product(range(kh), range(kw))
                   for r, q in [(oh * sh - ph + a * dh, ow * sw - pw + b * dw)] if 0 <= r < h and 0 <= q < w]
        windows.append(members)
    return windows


def _ibp(ops, lo, hi, record):
    for op in ops:
        if op[0] == "affine":
            _, M, c = op
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
            mid, rad = M @ mid + c, M.abs() @ rad
            lo, hi = mid - rad, mid + rad
        elif op[0] == "relu":
            record.append((lo, hi))
            lo, hi = lo.clamp(min=0), hi.clamp(min=0)
        elif op[0] == "maxpool":
            record.append((lo, hi))
            lo = torch.stack([lo[w].max() for w in op[1]])
            hi = torch.stack([hi[w].max() for w in op[1]])
        else:
            (lb, hb), (ls, hs) = _ibp(op[1], lo, hi, record), _ibp(op[2], lo, hi, record)
            lo, hi = lb + ls, hb + hs
    return lo, hi


def _crown_back(ops, lam, const, boxes):
    """Λ z + c -> Λ' x + c' through ``ops`` (reversed); boxes: the IBP records, consumed from the end."""
    for op in reversed(ops):
        if op[0] == "affine":
            const = const + lam @ op[2]
            lam = lam @ op[1]
        elif op[0] == "relu":
            lo, hi = boxes.pop()
            unstable = (lo < 0) & (hi > 0)
            up = torch.where(unstable, hi / (hi - lo), (lo >= 0).double())
            icpt = torch.where(unstable, -lo * hi / (hi - lo), torch.zeros_like(lo))
            low = torch.where(unstable, (hi > -lo).double(), (lo >= 0).double())
            pos, neg = lam.clamp(min=0), lam.clamp(max=0)
            const = const + neg @ icpt
            lam = pos * low + neg * up
        elif op[0] == "maxpool":
            lo, hi = boxes.pop()
            new = torch.zeros(lam.shape[0], lo.numel(), dtype=torch.float64)
            for o, members in enumerate(op[1]):
                k = members[int(torch.argmax(lo[members]))]   # the first maximum, as torch.max
                others = [hi[j] for j in members if j != k]
                dominated = not others or bool(lo[k] >= max(others))
                pos, neg = lam[:, o].clamp(min=0), lam[:, o].clamp(max=0)
                new[:, k] += pos + (neg if dominated else 0)
                if not dominated:
                    const = const + neg * hi[members].max()
            lam = new
        else:
            # the shortcut's records come after the body's: undo them first
            lam_s, const = _crown_back(op[2], lam, const, boxes)
            lam_b, const = _crown_back(op[1], lam, const, boxes)
            lam = lam_b + lam_s
    return lam, const


def _count_records(ops):
    return sum(1 if op[0] in ("relu", "maxpool") else
               (_count_records(op[1]) + _count_records(op[2]) if op[0] == "residual" else 0) for op in ops)


def _dense_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lower: float, upper: float):
    """Per example, in float64: ``(label, input box (mid, rad), box (mid, rad) in front of the last
    layer, its W and b, a function (Λ, c) -> the CROWN lower bound of Λ z + c over the input box)``."""
    ops, _ = _dense_ops(_leaves(copy.deepcopy(model).double()), tuple(x.shape[1:]))
    for xi, yi in zip(x.double(), y):
        lo = (xi - eps).clamp(min=lower).flatten()
        hi = (xi + eps).clamp(max=upper).flatten()
        records = []
        last_lo, last_hi = _ibp(ops[:-1], lo, hi, records)
        _, W, b = ops[-1]
        in_mid, in_rad = (hi + lo) / 2, (hi - lo) / 2

        def crown(lam, const, records=records):
            lam, const = _crown_back(ops[:-1], lam, const, records)
            assert not records
            return lam @ in_mid - lam.abs() @ in_rad + const

        yield int(yi), ((last_hi + last_lo) / 2, (last_hi - last_lo) / 2), W, b, crown


def dense_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lower=0.0, upper=1.0):
    """(IBP margins with last-layer elision, CROWN-IBP margins), (B, K) float64, by explicit matrices."""
    ibp_out, crown_out = [], []
    for yi, (mid, rad), W, b, crown in _dense_examples(model, x, y, eps, lower, upper):
        K = W.shape[0]
        C = torch.zeros(K, K, dtype=torch.float64)
        C[:, yi] += 1
        C -= torch.eye(K, dtype=torch.float64)
        CW, Cb = C @ W, C @ b
        ibp_out.append(CW @ mid - CW.abs() @ rad + Cb)
        crown_out.append(crown(CW, Cb))
    return torch.stack(ibp_out), torch.stack(crown_out)


def dense_fused_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, lower=0.0, upper=1.0):
    """(B,) the loss-fusion bound of max CE over the box, float64, by explicit matrices: IBP bounds
    [l_j, u_j] of d_j = z_j - z_y, exp below its chord on each, one CROWN row sum_j w_j (W_y - W_j)."""
    out = []
    for yi, (mid, rad), W, b, crown in _dense_examples(model, x, y, eps, lower, upper):
        others = [j for j in range(W.shape[0]) if j != yi]
        D = W[others] - W[yi]                                   # rows of d_j
        d_mid, d_rad = D @ mid + b[others] - b[yi], D.abs() @ rad
        l, u = d_mid - d_rad, d_mid + d_rad
        M = max(0.0, float(u.max()))
        w = torch.where(u - l > 1e-6, (torch.exp(u - M) - torch.exp(l - M)) / (u - l).clamp(min=1e-300),
                        torch.exp(u - M))
        offset = math.exp(-M) + float((torch.exp(l - M) - w * l).sum())
        low_bound = float(crown(-(w @ D)[None], -(w @ (b[others] - b[yi]))[None]))
        out.append(M + math.log(max(offset - low_bound, math.exp(-M))))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# models
def _randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> nn.Module:
    return randomize_batchnorm(model, gen).eval()


def residual_model(seed: int) -> Tuple[nn.Module, Tuple[int, ...]]:
    torch.manual_seed(seed)
    model = resnet_small(in_channels=2, num_classes=5, image_size=8, width=3)
    return _randomize_batchnorm(model, torch.Generator().manual_seed(seed)), (2, 8, 8)


def pooled_head_model(seed: int) -> Tuple[nn.Module, Tuple[int, ...]]:
    """No final Linear: global average pooling over 5 channels gives the 5 logits."""
    torch.manual_seed(seed)
    model = nn.Sequential(Normalize([0.3, 0.5], [0.5, 2.0]), nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                          nn.AvgPool2d(4, ceil_mode=True), nn.Flatten())
    return model.eval(), (2, 7, 7)


def _inputs(shape, batch, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((batch,) + shape, generator=gen, dtype=dtype), torch.randint(0, 5, (batch,), generator=gen)


def _any_model(kind: str, seed: int, in_channels: int = 2, size: int = 8):
    if kind == "random":
        return random_model(seed, in_channels=in_channels, size=size)
    return {"residual": residual_model, "pooled": pooled_head_model}[kind](seed)


kinds = st.sampled_from(["random", "random", "residual", "pooled"])
channels, sizes = st.integers(1, 3), st.integers(4, 10)


# ---------------------------------------------------------------------------------------------
# agreement with the dense implementation
def _tested_and_dense_reference(kind: str, seed: int, in_channels: int, size: int):
    """(model, the model the dense implementation reads, input shape), in float64. A model without
    a final Linear ("pooled") gets the identity map as the reference's last layer."""
    model, shape = _any_model(kind, seed, in_channels, size)
    model = model.double()
    if kind != "pooled":
        return model, model, shape
    reference = nn.Sequential(model, nn.Linear(5, 5).double().requires_grad_(False))
    with torch.no_grad():
        reference[-1].weight.copy_(torch.eye(5))
        reference[-1].bias.zero_()
    return model, reference, shape


@settings(max_examples=30)
@given(seed=seeds, eps=eps_values, kind=kinds, in_channels=channels, size=sizes)
def test_ibp_and_crown_ibp_match_dense_float64_implementation(seed, eps, kind, in_channels, size):
    tested, reference_model, shape = _tested_and_dense_reference(kind, seed, in_channels, size)
    x, y = _inputs(shape, 2, seed)
    ibp_ref, crown_ref = dense_margins(reference_model, x, y, eps)
    p = margin_pass(tested, x, y, eps)
    scale = max(1.0, float(crown_ref.abs().max()), float(ibp_ref.abs().max()))
    torch.testing.assert_close(p.ibp, ibp_ref, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(p.crown, crown_ref, rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(crown_ibp_margin_bounds(tested, x, y, eps), torch.maximum(crown_ref, ibp_ref),
                               rtol=1e-9, atol=1e-9 * scale)
    torch.testing.assert_close(crown_ibp_mixed_margins(tested, x, y, eps, 0.3), 0.3 * crown_ref + 0.7 * ibp_ref,
                               rtol=1e-9, atol=1e-9 * scale)


@settings(max_examples=20)
@given(seed=seeds, eps=eps_values, kind=kinds, in_channels=channels, size=sizes)
def test_loss_fusion_matches_dense_float64_implementation(seed, eps, kind, in_channels, size):
    model, reference_model, shape = _tested_and_dense_reference(kind, seed, in_channels, size)
    x, y = _inputs(shape, 2, seed)
    expected = dense_fused_ce(reference_model, x, y, eps)
    fused = crown_ibp_robust_ce(model, x, y, eps)
    torch.testing.assert_close(fused, expected, rtol=1e-8, atol=1e-8)


def test_float64_computation_of_a_float32_model_matches_dense_reference():
    model, shape = random_model(11)
    x, y = _inputs(shape, 3, 11, torch.float32)
    m = crown_ibp_margin_bounds(model, x, y, 0.05, dtype=torch.float64)
    assert m.dtype == torch.float64
    ibp_ref, crown_ref = dense_margins(model, x, y, 0.05)
    # BatchNorm's and Normalize's affine maps are formed in float32 before the cast: agreement to float32's
    # rounding of those coefficients, far closer than a float32 computation of the bounds gets.
    torch.testing.assert_close(m, torch.maximum(ibp_ref, crown_ref), rtol=1e-7, atol=1e-7)


def test_margin_bounds_dispatches_to_crown_ibp():
    model, shape = random_model(4)
    x, y = _inputs(shape, 3, 4, torch.float32)
    torch.testing.assert_close(pyibp.margin_bounds(model, x, y, 0.05, method="crown-ibp"),
                               crown_ibp_margin_bounds(model, x, y, 0.05))


# ---------------------------------------------------------------------------------------------
# soundness and tightness
def _margin_attack_points(model, x, y, eps, steps=20):
    """For each class j, PGD on logit_y - logit_j (pushed down) inside the box: (K, B, *)."""
    with torch.no_grad():
        num_classes = model(x).shape[1]
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    found = []
    for j in range(num_classes):
        z = x.clone()
        for _ in range(steps):
            z.requires_grad_(True)
            out = model(z)
            (g,) = torch.autograd.grad((out.gather(1, y[:, None]) - out[:, j:j + 1]).sum(), z)
            z = torch.minimum(torch.maximum(z.detach() - eps / 4 * g.sign(), lo), hi)
        found.append(z)
    return torch.stack(found)


@settings(max_examples=30)
@given(seed=seeds, eps=st.sampled_from([1e-3, 0.02, 0.1]), kind=kinds, in_channels=channels, size=sizes,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_crown_ibp_is_sound_and_never_looser_than_ibp(seed, eps, kind, in_channels, size, dtype):
    model, shape = _any_model(kind, seed, in_channels, size)
    model = model.to(dtype)
    x, y = _inputs(shape, 2, seed, dtype)
    crown = crown_ibp_margin_bounds(model, x, y, eps)
    raw = margin_pass(model, x, y, eps).crown
    ibp = pyibp.margin_bounds(model, x, y, eps)
    assert (crown >= ibp - 1e-5).all()
    points = torch.cat([sample_box(x, torch.tensor(eps, dtype=dtype), 1000,
                                   generator=torch.Generator().manual_seed(seed)),
                        _margin_attack_points(model, x, y, eps)])
    with torch.no_grad():
        out = model(points.flatten(0, 1)).reshape(points.shape[0], x.shape[0], -1)
    true = (out.gather(2, y[None, :, None].expand(out.shape[0], -1, 1)) - out).amin(0)
    slack = (1e-4 if dtype == torch.float32 else 1e-10) * max(1.0, float(out.abs().max()))
    assert (crown <= true + slack).all()
    assert (raw <= true + slack).all()


def _ce_attack_points(model, x, y, eps, steps=20, restarts=2, seed=0):
    """PGD on the cross-entropy inside the box, from random starts: (restarts, B, *)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    found = []
    for _ in range(restarts):
        z = lo + (hi - lo) * torch.rand(x.shape, generator=gen, dtype=x.dtype)
        for _ in range(steps):
            z.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(z), y, reduction="sum"), z)
            z = torch.minimum(torch.maximum(z.detach() + eps / 4 * g.sign(), lo), hi)
        found.append(z)
    return torch.stack(found)


@settings(max_examples=25)
@given(seed=seeds, eps=st.sampled_from([0.0, 1e-3, 0.02, 0.1]), kind=kinds, in_channels=channels, size=sizes,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_loss_fusion_bounds_the_worst_case_cross_entropy(seed, eps, kind, in_channels, size, dtype):
    model, shape = _any_model(kind, seed, in_channels, size)
    model = model.to(dtype)
    x, y = _inputs(shape, 3, seed, dtype)
    bound = crown_ibp_robust_ce(model, x, y, eps)
    assert bound.shape == (3,) and torch.isfinite(bound).all() and (bound >= 0).all()
    points = torch.cat([sample_box(x, torch.tensor(eps, dtype=dtype), 500,
                                   generator=torch.Generator().manual_seed(seed)),
                        _ce_attack_points(model, x, y, eps, seed=seed)])
    with torch.no_grad():
        logits = model(points.flatten(0, 1))
        ce = F.cross_entropy(logits, y.repeat(points.shape[0]), reduction="none").view(points.shape[0], -1)
    worst = ce.amax(0)
    slack = (1e-4 if dtype == torch.float32 else 1e-10) * max(1.0, float(logits.abs().max()))
    assert (bound >= worst - slack).all()
    # IBP's own bound of the loss, CE(-m_IBP), is the fused bound's fallback: both are sound.
    assert (F.cross_entropy(-pyibp.margin_bounds(model, x, y, eps), y, reduction="none") >= worst - slack).all()


def test_loss_fusion_is_exact_at_zero_eps_and_tighter_than_ibp_on_a_random_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 10)).eval()
    x, y = torch.rand(16, 1, 14, 14), torch.randint(0, 10, (16,))
    torch.testing.assert_close(crown_ibp_robust_ce(model, x, y, 0.0), F.cross_entropy(model(x), y, reduction="none"))
    fused = crown_ibp_robust_ce(model, x, y, 0.02)
    ibp = F.cross_entropy(-pyibp.margin_bounds(model, x, y, 0.02), y, reduction="none")
    assert (fused < ibp).float().mean() > 0.9


def test_crown_ibp_is_much_tighter_than_ibp_on_a_random_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 20), nn.ReLU(), nn.Linear(20, 10)).eval()
    x, y = torch.rand(16, 1, 14, 14), torch.randint(0, 10, (16,))
    gap = margin_pass(model, x, y, 0.05).crown - pyibp.margin_bounds(model, x, y, 0.05)
    off_diagonal = torch.ones_like(gap).scatter(1, y[:, None], 0.0).bool()
    assert (gap[off_diagonal] > 0).float().mean() > 0.9


def test_zero_eps_gives_the_exact_margins():
    model, shape = random_model(7)
    model = model.double()
    x, y = _inputs(shape, 4, 7)
    out = model(x)
    exact = out.gather(1, y[:, None]) - out
    torch.testing.assert_close(margin_pass(model, x, y, 0.0).crown, exact, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# gradients
def test_relu_step_matches_the_plain_formula_in_both_layouts():
    gen = torch.Generator().manual_seed(0)
    for channels_last in (False, True):
        A = torch.randn(2 * 3, 4, 5, 5, generator=gen, dtype=torch.float64)
        A = A + A.sign() * 0.1                 # away from the kink at A = 0, for gradcheck
        if channels_last:                      # as conv_transpose2d leaves it
            A = A.contiguous(memory_format=torch.channels_last)
        A = A.view(2, 3, 4, 5, 5).requires_grad_(True)
        mu = torch.randn(2, 4, 5, 5, generator=gen, dtype=torch.float64).requires_grad_(True)
        rad = (torch.rand(2, 4, 5, 5, generator=gen, dtype=torch.float64) + 0.1).requires_grad_(True)
        const = torch.randn(2, 3, generator=gen, dtype=torch.float64)
        out, new_const = _back_relu(A, const, mu, rad)
        low, up, icpt = (t[:, None] for t in pyibp.ops.relu_relaxation(mu - rad, mu + rad))
        torch.testing.assert_close(out, A.clamp(min=0) * low + A.clamp(max=0) * up)
        torch.testing.assert_close(new_const, const + (A.clamp(max=0) * icpt).sum((2, 3, 4)))
        assert torch.autograd.gradcheck(lambda a, m, r: _back_relu(a, const, m, r), (A, mu, rad))


class _Margins(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return crown_ibp_mixed_margins(self.model, x, y, 0.05, 1.0)


def test_gradcheck_of_crown_ibp_margins_with_respect_to_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 5))
    wrapper = _Margins(_randomize_batchnorm(model, torch.Generator().manual_seed(0)).double())
    x, y = _inputs((2, 4, 4), 3, 21)
    names = [n for n, _ in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in wrapper.parameters())

    def margins(*ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps)), (x, y))

    assert torch.autograd.gradcheck(margins, params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("bound", ["beta=0", "beta=0.5", "beta=1", "loss-fusion"])
def test_gradients_reach_every_weight(bound):
    model, shape = random_model(2)
    x, y = _inputs(shape, 4, 2, torch.float32)
    if bound == "loss-fusion":
        crown_ibp_robust_ce(model, x, y, 0.05).sum().backward()
    else:
        crown_ibp_mixed_margins(model, x, y, 0.05, float(bound[5:])).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    assert all(p.grad.abs().sum() > 0 for p in weights)


def test_beta_mix_and_its_endpoints():
    model, shape = random_model(9)
    x, y = _inputs(shape, 3, 9, torch.float32)
    p = margin_pass(model, x, y, 0.05)
    torch.testing.assert_close(crown_ibp_mixed_margins(model, x, y, 0.05, 0.0),
                               pyibp.margin_bounds(model, x, y, 0.05))
    torch.testing.assert_close(crown_ibp_mixed_margins(model, x, y, 0.05, 1.0), p.crown)
    torch.testing.assert_close(crown_ibp_mixed_margins(model, x, y, 0.05, 0.25), 0.25 * p.crown + 0.75 * p.ibp)


@pytest.mark.parametrize("make", [random_model, residual_model])
def test_backward_pass_in_chunks_of_examples_equals_the_whole_batch(make, monkeypatch):
    model, shape = make(5)
    model = model.double()
    x, y = _inputs(shape, 5, 5)

    def bounds_and_grads():
        model.zero_grad()
        m = margin_pass(model, x, y, 0.05).crown
        m.sum().backward()
        return m.detach(), [p.grad.clone() for p in model.parameters()]

    whole, whole_grads = bounds_and_grads()
    monkeypatch.setattr(pyibp.bounds.coefficients, "_CPU_CHUNK_BYTES", 1)       # one example at a time
    chunked, chunked_grads = bounds_and_grads()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# shapes, devices, errors
def test_per_example_eps_and_empty_batch():
    model, shape = random_model(3)
    x, y = _inputs(shape, 3, 3, torch.float32)
    eps = torch.tensor([0.0, 0.05, 0.2])
    m = crown_ibp_margin_bounds(model, x, y, eps)
    for i in range(3):
        alone = crown_ibp_margin_bounds(model, x[i:i + 1], y[i:i + 1], float(eps[i]))
        torch.testing.assert_close(m[i:i + 1], alone)
    empty = crown_ibp_margin_bounds(model, x[:0], y[:0], 0.1)
    assert empty.shape == (0, 5)


def test_pre_activations_are_recorded_in_network_order():
    model, shape = residual_model(0)
    model = model.double()
    x, y = _inputs(shape, 2, 0)
    p = margin_pass(model, x, y, 0.01, crown=False)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert p.crown is None and len(p.pre_activations) == len(relus)
    assert all((lo <= hi).all() for lo, hi in p.pre_activations)
    # at eps = 0 each box is the point: the stem's BatchNorm(Conv(x)), then the first block's first BatchNorm
    stem = model[1](model[0](x))
    block = model[3].body
    exact = [stem, block[1](block[0](stem.relu()))]
    boxes = margin_pass(model, x, y, 0.0, crown=False).pre_activations
    for (lo, hi), z in zip(boxes, exact):
        torch.testing.assert_close(lo, z, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(hi, z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", devices)
def test_devices_agree_with_cpu(device):
    model, shape = random_model(13)
    x, y = _inputs(shape, 4, 13, torch.float32)
    expected = crown_ibp_margin_bounds(model, x, y, 0.05), crown_ibp_robust_ce(model, x, y, 0.05)
    model, x, y = model.to(device), x.to(device), y.to(device)
    got = crown_ibp_margin_bounds(model, x, y, 0.05), crown_ibp_robust_ce(model, x, y, 0.05)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call,message", [
    (lambda m, x, y: crown_ibp_mixed_margins(m, x, y, 0.1, 1.5), r"beta must lie in \[0, 1\], got 1.5"),
    (lambda m, x, y: crown_ibp_margin_bounds(m, x, y, -0.1), r"eps must be >= 0, got -0.1"),
    (lambda m, x, y: crown_ibp_margin_bounds(m, x, torch.tensor([0, 9]), 0.1),
     r"labels y must lie in \[0, 3\), got values in \[0, 9\]"),
    (lambda m, x, y: crown_ibp_margin_bounds(m, x * 3, y, 0.1), r"outside the input domain"),
    (lambda m, x, y: crown_ibp_robust_ce(m, x, y, -0.1), r"eps must be >= 0, got -0.1"),
])
def test_bad_input_is_a_value_error(call, message):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=message):
        call(model, torch.rand(2, 4) * 0.5 + 0.25, torch.tensor([0, 2]))


@pytest.mark.parametrize("make", [lambda m, x, y: crown_ibp_margin_bounds(m, x, y, 0.05),
                                  lambda m, x, y: crown_ibp_robust_ce(m, x, y, 0.05),
                                  lambda m, x, y: margin_pass(m, x, y, 0.05).pre_activations[0][0]])
def test_autocast_is_ignored(make):
    model, shape = random_model(3)
    x, y = _inputs(shape, 3, 3, torch.float32)
    expected = make(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = make(model, x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
