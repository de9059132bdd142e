"""Every operator three ways: against its plain-PyTorch twin (devices × dtypes, non-contiguous,
channels_last and empty inputs), float64 gradcheck of its backward, and torch.library.opcheck."""
import itertools

import pytest
import torch

from pyibp import ops, reference
from pyibp.testing import devices, float_dtypes, rtol

CASES = list(itertools.product(devices, float_dtypes))


def close(actual, expected, dtype):
    for a, e in zip(actual if isinstance(actual, tuple) else (actual,),
                    expected if isinstance(expected, tuple) else (expected,)):
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=rtol[dtype], atol=rtol[dtype] * scale)


def noncontiguous(t):
    """The same values in a strided, non-contiguous layout."""
    big = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
    big[..., 0] = t
    return big[..., 0]


def pair(shape, dtype, device, batch_first=True):
    mu = torch.randn(shape, dtype=dtype, device=device)
    rad = torch.rand(shape, dtype=dtype, device=device)
    return mu, rad


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "empty"])
def test_elementwise_ops_match_reference(device, dtype, layout):
    shape = (0, 3, 5, 5) if layout == "empty" else (4, 3, 5, 5)
    mu, rad = pair(shape, dtype, device)
    if layout == "strided":
        mu, rad = noncontiguous(mu), noncontiguous(rad)
        assert not mu.is_contiguous()
    close(ops.interval_relu(mu, rad), reference.interval_relu_ref(mu, rad), dtype)
    close(ops.center_to_interval(mu, rad), reference.center_to_interval_ref(mu, rad), dtype)
    close(ops.interval_to_center(mu - rad, mu + rad), reference.interval_to_center_ref(mu - rad, mu + rad), dtype)
    scale, shift = torch.randn(3, dtype=dtype, device=device), torch.randn(3, dtype=dtype, device=device)
    close(ops.interval_affine(mu, rad, scale, shift), reference.interval_affine_ref(mu, rad, scale, shift), dtype)
    lo, hi = mu - rad, mu + rad
    close(ops.relu_relaxation(lo, hi), reference.relu_relaxation_ref(lo, hi), dtype)


def _crown_relu_inputs(batch, rows, n, dtype, device):
    """A with entries of both signs and exact zeros; boxes active, inactive and unstable (both
    sides of u = -l, where the lower slope flips)."""
    A = torch.randn(batch, rows, n, dtype=dtype, device=device)
    A[A.abs() < 0.2] = 0.0
    mu, rad = torch.randn(batch, n, dtype=dtype, device=device), torch.rand(batch, n, dtype=dtype, device=device) * 2
    return A, mu, rad


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", [(5, 9, 37), (3, 1, 1000), (0, 9, 4), (2, 0, 4), (2, 3, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_crown_relu_step_matches_reference(device, dtype, shape, layout):
    A, mu, rad = _crown_relu_inputs(*shape, dtype, device)
    if layout == "strided":
        A, mu = noncontiguous(A), noncontiguous(mu)
    out = ops.crown_relu_step(A, mu, rad)
    assert out[0].shape == A.shape and out[1].shape == A.shape[:2]
    close(out, reference.crown_relu_step_ref(A, mu, rad), dtype)


@pytest.mark.parametrize("device", devices)
def test_crown_relu_step_gradients_match_reference_autograd(device):
    torch.manual_seed(1)
    A, mu, rad = _crown_relu_inputs(4, 3, 50, torch.float64, device)
    A[A == 0] = 0.5  # A = 0 is a kink, where either one-sided derivative is right
    inputs = [t.requires_grad_() for t in (A, mu, rad)]
    g = torch.randn_like(A), torch.randn(4, 3, dtype=torch.float64, device=device)
    fused = torch.autograd.grad(ops.crown_relu_step(*inputs), inputs, g)
    expected = torch.autograd.grad(reference.crown_relu_step_ref(*inputs), inputs, g)
    for a, e in zip(fused, expected):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device,dtype", CASES)
def test_channels_last_layout_is_kept_and_correct(device, dtype):
    mu, rad = pair((2, 4, 3, 3), dtype, device)
    mu_cl, rad_cl = mu.to(memory_format=torch.channels_last), rad.to(memory_format=torch.channels_last)
    scale, shift = torch.randn(4, dtype=dtype, device=device), torch.randn(4, dtype=dtype, device=device)
    out = ops.interval_affine(mu_cl, rad_cl, scale, shift)
    assert out[0].is_contiguous(memory_format=torch.channels_last)
    close(out, reference.interval_affine_ref(mu, rad, scale, shift), dtype)
    w = torch.randn(5, 4, 3, 3, dtype=dtype, device=device)
    b = torch.randn(5, dtype=dtype, device=device)
    args = (w, w.abs(), b, (1, 1), (1, 1), (1, 1), 1, True)
    close(ops.interval_conv2d(mu_cl, rad_cl, *args), reference.interval_conv2d_ref(mu, rad, *args), dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", [0, 1, 7])
def test_interval_linear_matches_reference(device, dtype, relu, bias, batch):
    mu, rad = pair((batch, 6), dtype, device)
    w = torch.randn(4, 6, dtype=dtype, device=device)
    b = torch.randn(4, dtype=dtype, device=device) if bias else None
    close(ops.interval_linear(noncontiguous(mu), rad, w, w.abs(), b, relu),
          reference.interval_linear_ref(mu, rad, w, w.abs(), b, relu), dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("conv", [
    dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
    dict(stride=(2, 1), padding=(0, 2), dilation=(2, 1), groups=1),
    dict(stride=(1, 2), padding=(1, 0), dilation=(1, 1), groups=2),
])
def test_interval_conv2d_matches_reference(device, dtype, relu, conv):
    mu, rad = pair((3, 4, 7, 6), dtype, device)
    w = torch.randn(6, 4 // conv["groups"], 3, 2, dtype=dtype, device=device)
    b = torch.randn(6, dtype=dtype, device=device)
    args = (w, w.abs(), b, conv["stride"], conv["padding"], conv["dilation"], conv["groups"], relu)
    close(ops.interval_conv2d(noncontiguous(mu), rad, *args), reference.interval_conv2d_ref(mu, rad, *args), dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("batch", [0, 5])
def test_input_box_matches_reference(device, dtype, batch):
    x = torch.rand(batch, 2, 3, dtype=dtype, device=device)
    for eps in (torch.tensor(0.3, dtype=dtype, device=device), torch.rand(batch, dtype=dtype, device=device)):
        close(ops.input_box(noncontiguous(x), eps, 0.0, 1.0), reference.input_box_ref(x, eps, 0.0, 1.0), dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_margin_elision_matches_reference_and_tutorial(device, dtype, bias):
    mu, rad = pair((6, 9), dtype, device)
    w = torch.randn(5, 9, dtype=dtype, device=device)
    b = torch.randn(5, dtype=dtype, device=device) if bias else None
    y = torch.tensor([0, 4, 2, 2, 1, 3], device=device)
    out = ops.margin_elision(noncontiguous(mu), rad, w, b, y)
    close(out, reference.margin_elision_ref(mu, rad, w, b, y), dtype)
    close(out, reference.TutorialBackend().margins((mu - rad, mu + rad), w, b, y), dtype)
    assert (out.gather(1, y[:, None]) == 0).all()


def test_margin_elision_rejects_labels_out_of_range():
    mu, rad = pair((2, 3), torch.float32, "cpu")
    w = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 4\)"):
        ops.margin_elision(mu, rad, w, None, torch.tensor([0, 4]))


def test_cpp_checks_name_the_argument():
    mu, rad = pair((2, 3), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="mu and rad must have the same shape"):
        ops.interval_relu(mu, rad[:, :2])
    with pytest.raises(RuntimeError, match="mu has 3 features but weight expects 4"):
        w = torch.randn(5, 4)
        ops.interval_linear(mu, rad, w, w.abs(), None, False)
    with pytest.raises(RuntimeError, match="eps must hold one value or one per example"):
        ops.input_box(mu, torch.ones(3), 0.0, 1.0)


# --- gradients ----------------------------------------------------------------------------------
def _d(*shape, positive=False):
    t = torch.rand(shape, dtype=torch.float64) + 0.1 if positive else torch.randn(shape, dtype=torch.float64)
    return t.requires_grad_()


def _away_from_kinks(mu, rad, margin=0.05):
    """Moves mu so that no interval end sits within `margin` of 0, where ReLU has no derivative."""
    with torch.no_grad():
        for end in (mu - rad, mu + rad):
            near = end.abs() < margin
            mu[near] += 3 * margin
    return mu


def test_gradcheck_interval_relu_and_its_backward():
    rad = _d(3, 4, positive=True)
    mu = _away_from_kinks(_d(3, 4), rad)
    assert torch.autograd.gradcheck(ops.interval_relu, (mu, rad))
    out = tuple(t.detach() for t in ops.interval_relu(mu, rad))
    bwd = lambda gm, gr: torch.ops.pyibp.interval_relu_backward(gm, gr, *out)  # noqa: E731
    assert torch.autograd.gradcheck(bwd, (_d(3, 4), _d(3, 4)))


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_interval_linear(relu):
    w = _d(4, 5)
    fn = lambda mu, rad, w, aw, b: ops.interval_linear(mu, rad, w, aw, b, relu)  # noqa: E731
    mu, rad = _d(3, 5), _d(3, 5, positive=True)
    if relu:  # keep pre-activation ends away from 0
        with torch.no_grad():
            pre = ops.interval_linear(mu, rad, w, w.abs(), None, False)
        assume_ok = ((pre[0] - pre[1]).abs() > 1e-3).all() and ((pre[0] + pre[1]).abs() > 1e-3).all()
        assert assume_ok
    assert torch.autograd.gradcheck(fn, (mu, rad, w, w.detach().abs().requires_grad_(), _d(4)))


@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_interval_conv2d(relu):
    w = _d(3, 2, 2, 2)
    fn = lambda mu, rad, w, aw, b: ops.interval_conv2d(mu, rad, w, aw, b, (2, 1), (1, 0), (1, 1), 1, relu)  # noqa
    assert torch.autograd.gradcheck(fn, (_d(2, 2, 4, 3), _d(2, 2, 4, 3, positive=True), w,
                                         w.detach().abs().requires_grad_(), _d(3)))


def test_gradcheck_affine_conversions_input_box_margins_relaxation():
    assert torch.autograd.gradcheck(ops.interval_affine, (_d(2, 3, 2), _d(2, 3, 2, positive=True), _d(3), _d(3)))
    assert torch.autograd.gradcheck(ops.center_to_interval, (_d(2, 3), _d(2, 3)))
    assert torch.autograd.gradcheck(ops.interval_to_center, (_d(2, 3), _d(2, 3)))
    x = (torch.rand(3, 4, dtype=torch.float64) * 0.6 + 0.2).requires_grad_()
    for eps in (torch.tensor(0.05, dtype=torch.float64), torch.tensor([0.05, 0.5, 0.1], dtype=torch.float64)):
        assert torch.autograd.gradcheck(lambda x, e: ops.input_box(x, e, 0.0, 1.0), (x, eps.requires_grad_()))
    y = torch.tensor([1, 0, 3])
    fn = lambda mu, rad, w, b: ops.margin_elision(mu, rad, w, b, y)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (_d(3, 5), _d(3, 5, positive=True), _d(4, 5), _d(4)))
    lower = -(torch.rand(6, dtype=torch.float64) + 0.1)
    upper = torch.rand(6, dtype=torch.float64) + 0.1
    lower[0], upper[1] = 0.5, -0.5  # one active and one inactive neuron besides the unstable ones
    upper[0] = 1.5
    lower[1] = -1.5
    assert torch.autograd.gradcheck(ops.relu_relaxation, (lower.requires_grad_(), upper.requires_grad_()))
    # Away from the kinks (A = 0, l = 0, u = 0, u = -l), where the step is smooth.
    A = _d(2, 3, 6)
    A = (A + A.detach().sign() * 0.3).detach().requires_grad_()
    mu = torch.tensor([[0.5, -0.5, 0.2, -0.2, 1.5, -1.5]] * 2, dtype=torch.float64, requires_grad=True)
    rad = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5, 0.5]] * 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.crown_relu_step, (A, mu, rad))


def test_gradients_match_reference_autograd():
    torch.manual_seed(0)
    mu, rad = torch.randn(4, 6, requires_grad=True), torch.rand(4, 6, requires_grad=True)
    w, b = torch.randn(3, 6, requires_grad=True), torch.randn(3, requires_grad=True)
    g = torch.randn(4, 3), torch.randn(4, 3)
    for fn in (ops.interval_linear, reference.interval_linear_ref):
        out = fn(mu, rad, w, w.abs(), b, True)
        grads = torch.autograd.grad(out, (mu, rad, w, b), g)
        if fn is ops.interval_linear:
            fused = grads
    for a, e in zip(fused, grads):
        torch.testing.assert_close(a, e)


# --- opcheck ------------------------------------------------------------------------------------
def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", devices)
def test_opcheck_all_operators(device):
    kw = dict(dtype=torch.float32, device=device)
    mu, rad = torch.randn(3, 4, 5, 5, **kw), torch.rand(3, 4, 5, 5, **kw)
    mu.requires_grad_(), rad.requires_grad_()
    w = torch.randn(2, 4, 3, 3, **kw, requires_grad=True)
    aw = w.detach().abs().requires_grad_()
    b = torch.randn(2, **kw, requires_grad=True)
    _opcheck(torch.ops.pyibp.input_box.default, (torch.rand(3, 4, **kw), torch.rand(3, **kw), 0.0, 1.0))
    _opcheck(torch.ops.pyibp.interval_relu.default, (mu, rad))
    _opcheck(torch.ops.pyibp.interval_relu_backward.default, (mu.detach(), rad.detach(), mu.detach(), rad.detach()))
    _opcheck(torch.ops.pyibp.interval_affine.default, (mu, rad, torch.randn(4, **kw), torch.randn(4, **kw)))
    _opcheck(torch.ops.pyibp.center_to_interval.default, (mu, rad))
    _opcheck(torch.ops.pyibp.interval_to_center.default, (mu, rad))
    _opcheck(torch.ops.pyibp.relu_relaxation.default, (mu - rad, mu + rad))
    flat_mu, flat_rad = mu.flatten(1), rad.flatten(1)
    A = torch.randn(3, 2, flat_mu.shape[1], **kw, requires_grad=True)
    _opcheck(torch.ops.pyibp.crown_relu_step.default, (A, flat_mu, flat_rad))
    _opcheck(torch.ops.pyibp.crown_relu_step_backward.default,
             (torch.randn_like(A), torch.randn(3, 2, **kw), A.detach(), flat_mu.detach(), flat_rad.detach()))
    for relu in (False, True):
        _opcheck(torch.ops.pyibp.interval_conv2d.default, (mu, rad, w, aw, b, [1, 1], [1, 1], [1, 1], 1, relu))
        lw = torch.randn(3, 4, **kw, requires_grad=True)
        _opcheck(torch.ops.pyibp.interval_linear.default,
                 (mu[:, :, 0, 0], rad[:, :, 0, 0], lw, lw.detach().abs(), None, relu))
    _opcheck(torch.ops.pyibp.margin_elision.default,
             (mu[:, :, 0, 0], rad[:, :, 0, 0], torch.randn(6, 4, **kw), torch.randn(6, **kw),
              torch.tensor([0, 5, 2], device=device)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_cuda_matches_float32_reference(dtype):
    mu, rad = pair((4, 3, 5, 5), torch.float32, "cuda")
    low = lambda *ts: [t.to(dtype) for t in ts]  # noqa: E731
    mu_l, rad_l = low(mu, rad)
    ref = reference.interval_relu_ref(mu_l.float(), rad_l.float())
    close(tuple(t.float() for t in ops.interval_relu(mu_l, rad_l)), ref, dtype)
    w = torch.randn(6, 3, 3, 3, device="cuda")
    w_l, b_l = low(w, torch.randn(6, device="cuda"))
    args = ((1, 1), (1, 1), (1, 1), 1, True)
    out = ops.interval_conv2d(mu_l, rad_l, w_l, w_l.abs(), b_l, *args)
    ref = reference.interval_conv2d_ref(mu_l.float(), rad_l.float(), w_l.float(), w_l.abs().float(), b_l.float(), *args)
    close(tuple(t.float() for t in out), ref, dtype)
    delta, grad = torch.zeros_like(mu_l), torch.randn_like(mu_l)
    x = torch.rand_like(mu_l)
    eps = torch.tensor(0.1, device="cuda")
    ops.pgd_linf_step_(delta, grad, x, eps, eps / 2, 0.0, 1.0)
    assert (delta.float().abs() <= 0.1).all()
    moved = (x + delta).float()
    assert (moved >= 0).all() and (moved <= 1).all()
