"""Every operator three ways: against its plain-PyTorch twin (devices × dtypes, non-contiguous,
channels_last and empty inputs), float64 gradcheck of its backward, and torch.library.opcheck."""
import itertools
import math

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


ALPHA_SHARING = ["per_row", "shared_rows", "shared_examples", "shared_both"]


def _alpha_inputs(batch, rows, n, dtype, device, sharing="per_row"):
    """(A, lower, upper, alpha) as _crown_relu_inputs gives them, with slopes in [0, 1] of shape
    (B or 1, R or 1, N) as ``sharing`` says."""
    A, mu, rad = _crown_relu_inputs(batch, rows, n, dtype, device)
    shape = (1 if sharing in ("shared_examples", "shared_both") else batch,
             1 if sharing in ("shared_rows", "shared_both") else rows, n)
    return A, mu - rad, mu + rad, torch.rand(shape, dtype=dtype, device=device)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("shape", [(5, 9, 37), (3, 1, 1000), (0, 9, 4), (2, 0, 4), (2, 3, 0)])
@pytest.mark.parametrize("sharing", ALPHA_SHARING)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_crown_relu_alpha_step_matches_reference(device, dtype, shape, sharing, layout):
    args = _alpha_inputs(*shape, dtype, device, sharing)
    if layout == "strided":
        args = tuple(noncontiguous(t) for t in args)
    out = ops.crown_relu_alpha_step(*args)
    assert out[0].shape == args[0].shape and out[0].is_contiguous() and out[1].shape == args[0].shape[:2]
    close(out, reference.crown_relu_alpha_step_ref(*args), dtype)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("sharing", ALPHA_SHARING)
def test_crown_relu_alpha_step_gradients_match_reference_autograd(device, sharing):
    """All four gradients, exact zeros of A included (both sides take the lower line at A = 0),
    with alpha's summed over the rows and examples it shares."""
    torch.manual_seed(1)
    inputs = [t.requires_grad_() for t in _alpha_inputs(4, 3, 50, torch.float64, device, sharing)]
    assert (inputs[0] == 0).any()
    g = torch.randn(4, 3, 50, dtype=torch.float64, device=device), torch.randn(4, 3, dtype=torch.float64,
                                                                              device=device)
    fused = torch.autograd.grad(ops.crown_relu_alpha_step(*inputs), inputs, g)
    expected = torch.autograd.grad(reference.crown_relu_alpha_step_ref(*inputs), inputs, g)
    for a, e, x in zip(fused, expected, inputs):
        assert a.shape == x.shape
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("sharing", ALPHA_SHARING)
def test_gradcheck_crown_relu_alpha_step(sharing):
    """Away from the kinks (A = 0, l = 0, u = 0), where the step is smooth in all four inputs."""
    A = _d(2, 3, 6)
    A = (A + A.detach().sign() * 0.3).detach().requires_grad_()
    lower = torch.tensor([[0.5, -1.5, -0.8, -0.2, -2.0, 0.3]] * 2, dtype=torch.float64, requires_grad=True)
    upper = torch.tensor([[1.5, -0.5, 1.2, 1.8, 0.4, 0.9]] * 2, dtype=torch.float64, requires_grad=True)
    alpha = torch.rand(2 if sharing in ("per_row", "shared_rows") else 1,
                       3 if sharing in ("per_row", "shared_examples") else 1, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(ops.crown_relu_alpha_step, (A, lower, upper, alpha.requires_grad_()))


@pytest.mark.parametrize("device", devices)
def test_crown_relu_alpha_step_is_a_sound_lower_bound(device):
    """For slopes anywhere in [0, 1] (the ends included), A relu(z) >= out z + shift at sampled z
    of the box, and alpha = CROWN's adaptive slope gives crown_relu_step exactly."""
    torch.manual_seed(2)
    A, lower, upper, alpha = _alpha_inputs(3, 4, 30, torch.float64, device)
    alpha[..., ::3] = alpha[..., ::3].round()
    out, shift = ops.crown_relu_alpha_step(A, lower, upper, alpha)
    z = lower + (upper - lower) * torch.rand(200, *lower.shape, dtype=torch.float64, device=device)
    exact = torch.einsum("brn,sbn->sbr", A, z.relu())
    assert (exact >= torch.einsum("brn,sbn->sbr", out, z) + shift - 1e-12).all()
    adaptive = (upper > -lower).double()[:, None].expand_as(A)
    mu, rad = (upper + lower) / 2, (upper - lower) / 2
    for a, e in zip(ops.crown_relu_alpha_step(A, lower, upper, adaptive), ops.crown_relu_step(A, mu, rad)):
        torch.testing.assert_close(a, e)


def test_crown_relu_alpha_step_refuses_bad_arguments():
    A, lower, upper, alpha = _alpha_inputs(2, 3, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"alpha must have shape \(B or 1, R or 1, N\) = \(2 or 1, 3 or 1, 4\)"):
        ops.crown_relu_alpha_step(A, lower, upper, alpha[:, :2])
    with pytest.raises(RuntimeError, match=r"lower and upper must have shape \(B, N\) = \(2, 4\)"):
        ops.crown_relu_alpha_step(A, lower[:, :3], upper[:, :3], alpha)
    with pytest.raises(RuntimeError, match="lower and upper must have the same shape"):
        ops.crown_relu_alpha_step(A, lower, upper[:1], alpha)
    with pytest.raises(RuntimeError, match="alpha must have A's dtype Float, got Double"):
        ops.crown_relu_alpha_step(A, lower, upper, alpha.double())
    with pytest.raises(RuntimeError, match="grad_shift must have shape \\(2, 3\\)"):
        torch.ops.pyibp.crown_relu_alpha_step_backward(A, torch.ones(2, 4), A, lower, upper, alpha)


def _sound_relu_inputs(batch, rows, n, dtype, device, weights=True):
    """A with both signs and zeros; lines of dead (0, 0, 0), active (1, 1, 0) and unstable neurons."""
    A, mu, rad = _crown_relu_inputs(batch, rows, n, dtype, device)
    alpha, sigma, tau = ops.relu_relaxation(mu - rad, mu + rad)
    m = (lambda: torch.rand(batch, n, dtype=dtype, device=device)) if weights else (lambda: None)
    return A, alpha, sigma, tau, m(), m()


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 9, 37), (3, 1, 1000), (0, 9, 4), (2, 0, 4), (2, 3, 0)])
@pytest.mark.parametrize("weights", [True, False])
def test_sound_crown_relu_step_matches_reference(device, dtype, shape, weights):
    args = _sound_relu_inputs(*shape, dtype, device, weights)
    out = ops.sound_crown_relu_step(*args)
    assert out[0].shape == args[0].shape and all(t.shape == args[0].shape[:2] for t in out[1:])
    expected = reference.sound_crown_relu_step_ref(*args)
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)      # one rounded product each
    close(out[1:], expected[1:], dtype)


@pytest.mark.parametrize("device", devices)
def test_sound_crown_relu_step_sums_obey_the_error_model(device):
    """Each float32 sum of n terms lies within γ_n Σ|terms| + nη of the exact sum (computed in
    float64 from the same rounded float32 products, whose sum float64 holds to ~2^-29 relative),
    the bound the sound CROWN pass charges for it — with cancellation and magnitudes far apart."""
    from pyibp.bounds.sound import gamma, units
    torch.manual_seed(0)
    u, eta = units(torch.float32)
    A, alpha, sigma, tau, m_in, m_out = _sound_relu_inputs(4, 6, 5000, torch.float32, device)
    A = A * torch.logspace(-30, 30, 5000, device=device).float()
    m_in = m_in * torch.logspace(20, -20, 5000, device=device).float()
    out, shift, slack_in, slack_out = ops.sound_crown_relu_step(A, alpha, sigma, tau, m_in, m_out)
    n = A.shape[2]
    terms = [A.clamp(max=0) * tau[:, None], A.abs() * m_in[:, None], out.abs() * m_out[:, None]]
    for computed, t in zip((shift, slack_in, slack_out), terms):
        exact = t.double().sum(-1)
        bound = gamma(n, u) * t.double().abs().sum(-1) + n * eta
        assert ((computed.double() - exact).abs() <= bound).all()


def test_sound_crown_relu_step_refuses_bad_arguments():
    A, alpha, sigma, tau, m_in, m_out = _sound_relu_inputs(2, 3, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.sound_crown_relu_step(A.half(), alpha.half(), sigma.half(), tau.half())
    with pytest.raises(RuntimeError, match=r"sigma must have shape \(B, N\) = \(2, 4\)"):
        ops.sound_crown_relu_step(A, alpha, sigma[:, :3], tau)
    with pytest.raises(RuntimeError, match="m_out must have A's dtype"):
        ops.sound_crown_relu_step(A, alpha, sigma, tau, m_in, m_out.double())


def _sound_boxes(dtype, device, layout="contiguous"):
    """Boxes (B, C, H, W) of random values and, in the last example, the values that break naive
    formulas: NaN, ±inf, ±0, subnormals (odd multiples of the smallest, whose half rounds), the
    largest float (whose mu + rad overflows) and boxes that are exactly active or touch 0."""
    torch.manual_seed(0)
    mu, rad = torch.randn(4, 3, 5, 6, dtype=dtype), torch.rand(4, 3, 5, 6, dtype=dtype)
    info = torch.finfo(dtype)
    tiny = info.smallest_normal
    eta = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    specials = [(float("nan"), 1.0), (1.0, float("nan")), (float("inf"), 1.0), (-float("inf"), 1.0),
                (1.0, float("inf")), (0.0, 0.0), (-0.0, 0.0), (float(eta), 0.0), (0.0, float(eta)),
                (float(3 * eta), 0.0), (-float(eta), float(3 * eta)), (info.max, info.max), (info.max, 0.0),
                (2.0, 2.0), (-2.0, 2.0), (float(tiny), float(tiny)), (-1.0, 0.5), (0.25, 1.0)]
    flat_mu, flat_rad = mu[-1].view(-1), rad[-1].view(-1)
    for k, (m, r) in enumerate(specials):
        flat_mu[k], flat_rad[k] = m, r
    mu[1].view(-1)[0] = float("inf")          # one more example whose flag is False
    mu, rad = mu.to(device), rad.to(device)
    if layout == "channels_last":
        mu, rad = (t.contiguous(memory_format=torch.channels_last) for t in (mu, rad))
    elif layout == "strided":
        mu, rad = noncontiguous(mu), noncontiguous(rad)
    elif layout == "empty":
        mu, rad = mu[:0], rad[:0]
    return mu, rad


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided", "empty"])
def test_sound_relu_matches_reference_bit_for_bit(device, dtype, layout):
    mu, rad = _sound_boxes(dtype, device, layout)
    out_mu, out_rad, finite = ops.sound_relu(mu, rad)
    exp_mu, exp_rad, exp_finite = reference.sound_relu_ref(mu, rad)
    torch.testing.assert_close(out_mu, exp_mu, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out_rad, exp_rad, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(finite, exp_finite)
    if layout != "empty":
        assert finite.tolist() == [True, False, True, False]
    if layout == "channels_last":
        assert out_mu.is_contiguous(memory_format=torch.channels_last)
    # in place: the same values, written into the inputs
    mu2, rad2 = (t.clone(memory_format=torch.preserve_format).contiguous() if layout == "strided" else t.clone()
                 for t in (mu, rad))
    assert torch.equal(ops.sound_relu_(mu2, rad2), finite)
    torch.testing.assert_close(mu2, exp_mu, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(rad2, exp_rad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sound_relu_encloses_the_exact_image(device, dtype):
    """[mu' - rad', mu' + rad'] contains [relu(mu - rad), relu(mu + rad)], both evaluated exactly
    (as Fractions) — for subnormals, values one ulp apart, exact zeros and large magnitudes; and
    no NaN becomes a finite box."""
    from fractions import Fraction
    mu, rad = _sound_boxes(dtype, device)
    torch.manual_seed(1)
    eta = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
    k = torch.randint(-40, 40, (2, 500), dtype=dtype)
    extra_mu = torch.cat([k[0] * eta, torch.randn(500, dtype=dtype) * 1e30])
    extra_rad = torch.cat([k[1].abs() * eta, torch.nextafter(extra_mu[500:].abs(), torch.tensor(0, dtype=dtype))])
    mu = torch.cat([mu.flatten(), extra_mu.to(device)])[None]
    rad = torch.cat([rad.flatten(), extra_rad.to(device)])[None]
    out_mu, out_rad, _ = ops.sound_relu(mu, rad)
    for m, r, om, orad in zip(*(t.flatten().tolist() for t in (mu, rad, out_mu, out_rad))):
        if m != m or r != r:
            assert om != om or orad != orad, (m, r, om, orad)
            continue
        if not all(math.isfinite(v) for v in (m, r, m + r)):
            continue        # its example's flag is False: the caller voids it
        fm, fr, fom, forad = (Fraction(v) for v in (m, r, om, orad))
        low, high = max(fm - fr, Fraction(0)), max(fm + fr, Fraction(0))
        assert fom - forad <= low and high <= fom + forad, (m, r, om, orad)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sound_radius_operand_rounds_its_factor_up(device, dtype):
    mu, rad = _sound_boxes(dtype, device)
    for c in (0.0, 0.1, 2.0 ** -20, 1 / 3):
        out = ops.sound_radius_operand(mu, rad, c)
        torch.testing.assert_close(out, reference.sound_radius_operand_ref(mu, rad, c), rtol=0, atol=0,
                                   equal_nan=True)
    # the factor the kernel used is c rounded up into the dtype: |mu| = 1, rad = 0 reads it back
    from pyibp.bounds.sound import ceil_to
    one = torch.ones(1, 1, dtype=dtype, device=device)
    c_up = ceil_to(torch.tensor(0.1, dtype=torch.float64), dtype)
    assert float(c_up) >= 0.1 and float(ops.sound_radius_operand(one, one * 0, 0.1)) == float(c_up)


def test_sound_relu_and_operand_refuse_bad_arguments():
    mu, rad = torch.randn(2, 3), torch.rand(2, 3)
    with pytest.raises(RuntimeError, match="sound_relu computes in float32 or float64, got mu of dtype Half"):
        ops.sound_relu(mu.half(), rad.half())
    with pytest.raises(RuntimeError, match=r"needs a batch dimension: mu must have shape \(B, \.\.\.\), got \[\]"):
        ops.sound_relu(mu[0, 0], rad[0, 0])
    with pytest.raises(RuntimeError, match="must both be row-major or both channels-last, got strides"):
        ops.sound_relu_(mu.t(), rad.t().contiguous())
    buf = torch.rand(2, 6)
    with pytest.raises(RuntimeError, match="must not share memory"):
        ops.sound_relu_(buf, buf)
    with pytest.raises(RuntimeError, match="finite error factor c >= 0, got -1"):
        ops.sound_radius_operand(mu, rad, -1.0)
    with pytest.raises(RuntimeError, match="finite error factor c >= 0, got inf"):
        ops.sound_radius_operand(mu, rad, float("inf"))
    with pytest.raises(RuntimeError, match="sound_radius_operand computes in float32 or float64"):
        ops.sound_radius_operand(mu.bfloat16(), rad.bfloat16(), 0.5)


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


def _laid_out(t, layout):
    """t as the kernels may receive it: row-major, channels_last (4-d), or strided (a view)."""
    if layout == "channels_last" and t.dim() == 4:
        return t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(t.requires_grad)
    if layout == "strided":
        return noncontiguous(t.detach()).requires_grad_(t.requires_grad)
    return t


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_opcheck_all_operators(device, layout):
    """Schema, autograd registration, fake tensors (strides included) and AOT dispatch of every
    operator, on row-major, channels_last and strided inputs: the layouts conv nets hand them."""
    kw = dict(dtype=torch.float32, device=device)
    L = lambda t: _laid_out(t, layout)  # noqa: E731
    mu, rad = L(torch.randn(3, 4, 5, 5, **kw).requires_grad_()), L(torch.rand(3, 4, 5, 5, **kw).requires_grad_())
    w = torch.randn(2, 4, 3, 3, **kw, requires_grad=True)
    aw = w.detach().abs().requires_grad_()
    b = torch.randn(2, **kw, requires_grad=True)
    _opcheck(torch.ops.pyibp.input_box.default, (L(torch.rand(3, 4, 5, 5, **kw)), torch.rand(3, **kw), 0.0, 1.0))
    _opcheck(torch.ops.pyibp.interval_relu.default, (mu, rad))
    out_mu, out_rad = (t.detach() for t in ops.interval_relu(mu, rad))
    _opcheck(torch.ops.pyibp.interval_relu_backward.default,
             (L(torch.randn(3, 4, 5, 5, **kw)), L(torch.randn(3, 4, 5, 5, **kw)), out_mu, out_rad))
    _opcheck(torch.ops.pyibp.interval_affine.default, (mu, rad, torch.randn(4, **kw), torch.randn(4, **kw)))
    _opcheck(torch.ops.pyibp.center_to_interval.default, (mu, rad))
    _opcheck(torch.ops.pyibp.interval_to_center.default, (mu, rad))
    _opcheck(torch.ops.pyibp.relu_relaxation.default, (L(mu.detach() - rad.detach()), L(mu.detach() + rad.detach())))
    flat_mu = L(torch.randn(3, 100, **kw).requires_grad_())
    flat_rad = L(torch.rand(3, 100, **kw).requires_grad_())
    A = L(torch.randn(3, 2, 100, **kw).requires_grad_())
    _opcheck(torch.ops.pyibp.crown_relu_step.default, (A, flat_mu, flat_rad))
    bounds = [L((flat_mu - flat_rad).detach().requires_grad_()), L((flat_mu + flat_rad).detach().requires_grad_())]
    for shape in ((3, 2, 100), (1, 1, 100)):      # a slope per row, and one shared by every row and example
        slopes = L(torch.rand(shape, **kw).requires_grad_())
        _opcheck(torch.ops.pyibp.crown_relu_alpha_step.default, (A, *bounds, slopes))
        _opcheck(torch.ops.pyibp.crown_relu_alpha_step_backward.default,
                 (L(torch.randn(3, 2, 100, **kw)), torch.randn(3, 2, **kw), A.detach(), *(b.detach() for b in bounds),
                  slopes.detach()))
    _opcheck(torch.ops.pyibp.sound_crown_relu_step.default,
             tuple(_laid_out(t, layout) for t in _sound_relu_inputs(3, 2, 100, torch.float32, device)))
    plain_mu, plain_rad = mu.detach(), rad.detach()
    _opcheck(torch.ops.pyibp.sound_relu.default, (plain_mu, plain_rad))
    _opcheck(torch.ops.pyibp.sound_radius_operand.default, (plain_mu, plain_rad, 0.1))
    if layout != "strided":     # in place needs a dense layout
        _opcheck(torch.ops.pyibp.sound_relu_.default, (plain_mu.clone(), plain_rad.clone()))
    _opcheck(torch.ops.pyibp.crown_relu_step_backward.default,
             (L(torch.randn(3, 2, 100, **kw)), torch.randn(3, 2, **kw), A.detach(), flat_mu.detach(),
              flat_rad.detach()))
    for relu in (False, True):
        _opcheck(torch.ops.pyibp.interval_conv2d.default, (mu, rad, w, aw, b, [1, 1], [1, 1], [1, 1], 1, relu))
        lw = torch.randn(3, 4, **kw, requires_grad=True)
        _opcheck(torch.ops.pyibp.interval_linear.default,
                 (L(torch.randn(3, 4, **kw).requires_grad_()), L(torch.rand(3, 4, **kw).requires_grad_()), lw,
                  lw.detach().abs(), None, relu))
    _opcheck(torch.ops.pyibp.margin_elision.default,
             (L(torch.randn(3, 4, **kw)), L(torch.rand(3, 4, **kw)), torch.randn(6, 4, **kw), torch.randn(6, **kw),
              torch.tensor([0, 5, 2], device=device)))


@pytest.mark.slow
def test_compiled_channels_last_backward_of_the_fused_relu():
    """Inductor checks the strides the fakes promise against the kernels': the backward of a fused
    convolution + ReLU on channels_last boxes (the usual layout of conv nets on GPUs) once failed."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)

    def loss(mu, rad):
        m, r = ops.interval_conv2d(mu, rad, w, w.abs(), b, (1, 1), (1, 1), (1, 1), 1, True)
        m, r = ops.interval_relu(m, r)
        return (m * m + r).sum()

    cl = torch.channels_last
    mu = torch.randn(2, 4, 6, 6).contiguous(memory_format=cl).requires_grad_()
    rad = torch.rand(2, 4, 6, 6).contiguous(memory_format=cl).requires_grad_()
    expected = torch.autograd.grad(loss(mu, rad), (mu, rad, w, b))
    torch._dynamo.reset()
    # Inductor's on-disk graph cache does not key on the Python fakes: compile afresh.
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled = torch.compile(loss, backend="inductor", fullgraph=True)
        got = torch.autograd.grad(compiled(mu, rad), (mu, rad, w, b))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


# --- defects found by review, each with the input that showed it ---------------------------------
@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fused_relu_reads_a_strided_bias_by_its_strides(device, kind):
    torch.manual_seed(0)
    bias = torch.randn(4, 2, device=device)[:, 0]        # stride 2
    assert not bias.is_contiguous()
    if kind == "linear":
        mu, rad = pair((3, 5), torch.float32, device)
        w = torch.randn(4, 5, device=device)
        args = (w, w.abs(), bias, True)
        fused, ref = ops.interval_linear(mu, rad, *args), reference.interval_linear_ref(mu, rad, *args)
    else:
        mu, rad = pair((2, 3, 5, 5), torch.float32, device)
        w = torch.randn(4, 3, 3, 3, device=device)
        args = (w, w.abs(), bias, (1, 1), (1, 1), (1, 1), 1, True)
        fused, ref = ops.interval_conv2d(mu, rad, *args), reference.interval_conv2d_ref(mu, rad, *args)
    close(fused, ref, torch.float32)


@pytest.mark.parametrize("device", devices)
def test_margin_elision_checks_its_bias(device):
    mu, rad = pair((2, 3), torch.float32, device)
    w, y = torch.randn(4, 3, device=device), torch.tensor([0, 1], device=device)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4,\)"):
        ops.margin_elision(mu, rad, w, torch.randn(3, device=device), y)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4,\)"):
        ops.margin_elision(mu, rad, w, torch.randn(4, 1, device=device), y)
    with pytest.raises(RuntimeError, match="mu and bias must have the same dtype"):
        ops.margin_elision(mu, rad, w, torch.randn(4, dtype=torch.float64, device=device), y)
    with pytest.raises(RuntimeError, match="labels must be integers"):
        ops.margin_elision(mu, rad, w, None, torch.tensor([True, False], device=device))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_refuse_arguments_on_the_host():
    mu, rad = pair((2, 3, 4, 4), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="mu and bias must be on the same device"):
        ops.margin_elision(mu[:, :, 0, 0], rad[:, :, 0, 0], torch.randn(4, 3, device="cuda"), torch.randn(4),
                           torch.tensor([0, 1], device="cuda"))
    with pytest.raises(RuntimeError, match="mu and scale must be on the same device"):
        ops.interval_affine(mu, rad, torch.randn(3), torch.randn(3, device="cuda"))
    with pytest.raises(RuntimeError, match="mu and shift must be on the same device"):
        ops.interval_affine(mu, rad, torch.randn(3, device="cuda"), torch.randn(3))
    with pytest.raises(RuntimeError, match="grad_mu and out_mu must be on the same device"):
        torch.ops.pyibp.interval_relu_backward(mu.cpu(), rad.cpu(), mu, rad)


def test_relu_backward_refuses_gradients_of_another_dtype():
    mu, rad = pair((2, 3), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="grad_mu and out_mu must have the same dtype"):
        torch.ops.pyibp.interval_relu_backward(mu.double(), rad.double(), mu, rad)


@pytest.mark.parametrize("device", devices)
def test_a_nan_never_becomes_a_finite_box(device):
    nan = float("nan")
    mu = torch.tensor([[nan, 0.5, nan, -2.0]], device=device)
    rad = torch.tensor([[1.0, nan, nan, 1.0]], device=device)
    for out in ops.interval_relu(mu, rad):
        assert out[0, :3].isnan().all() and out[0, 3] == 0
    x = torch.tensor([[nan, 0.5]], device=device)
    for out in ops.input_box(x, torch.tensor(0.1, device=device), 0.0, 1.0):
        assert out[0, 0].isnan() and not out[0, 1].isnan()
    for out in ops.input_box(torch.tensor([[0.5]], device=device), torch.tensor(nan, device=device), 0.0, 1.0):
        assert out.isnan().all()
    for out in ops.relu_relaxation(torch.tensor([nan, -1.0, nan], device=device),
                                   torch.tensor([1.0, nan, nan], device=device)):
        assert out.isnan().all()
    A = torch.tensor([[[1.0, -1.0, 0.0]]], device=device)
    step, shift = ops.crown_relu_step(A, torch.tensor([[nan, 0.0, nan]], device=device),
                                      torch.tensor([[1.0, nan, 1.0]], device=device))
    assert step.isnan().all() and shift.isnan().all()
    t = lambda *v: torch.tensor(v, device=device)  # noqa: E731
    step, shift = ops.crown_relu_alpha_step(A, t([nan, -1.0, nan]), t([1.0, nan, nan]), torch.full((1, 1, 3), 0.5,
                                                                                                  device=device))
    assert step.isnan().all() and shift.isnan().all()
    # A NaN slope reaches the coefficients of its unstable neuron where A >= 0; a stable neuron's is never read.
    step, _ = ops.crown_relu_alpha_step(t([[1.0, -1.0, 0.0, 1.0]]), t([-1.0, -1.0, -1.0, 1.0]),
                                        t([1.0, 1.0, 1.0, 2.0]), torch.full((1, 1, 4), nan, device=device))
    assert step[0, 0, [0, 2]].isnan().all() and step[0, 0, 1] == -0.5 and step[0, 0, 3] == 1.0
    scale = torch.tensor([nan, 1.0], device=device)
    for out in ops.interval_affine(torch.zeros(1, 2, device=device), torch.ones(1, 2, device=device), scale,
                                   torch.zeros(2, device=device)):
        assert out[0, 0].isnan() and not out[0, 1].isnan()
    # A dead lane's gradient is the product mask * gradient on every backend: 0 * inf is NaN.
    out_mu, out_rad = torch.tensor([[0.0, 1.0]], device=device), torch.tensor([[0.0, 0.5]], device=device)
    g = torch.tensor([[float("inf"), 1.0]], device=device)
    g_mu, g_rad = torch.ops.pyibp.interval_relu_backward(g, torch.zeros_like(g), out_mu, out_rad)
    assert g_mu[0, 0].isnan() and g_mu[0, 1] == 1.0


def _run_with_timeout(code: str, seconds: float = 120.0):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds)


def test_pgd_steps_refuse_impossible_inputs_at_once():
    """An input outside the domain once made the projection walk one ulp at a time towards zero:
    11.8 s for one float32 element, no end for float64. In a subprocess, so a hang fails the test."""
    code = """
import itertools, torch, pyibp
for dtype, step, (x, eps) in itertools.product(
        (torch.float32, torch.float64), ("pgd_linf_step_", "pgd_l2_step_"),
        ((1.5, 0.1), (-0.25, 0.1), (0.5, -0.1), (float("nan"), 0.1))):
    d = torch.full((1, 4), 0.05, dtype=dtype)
    try:
        getattr(pyibp.ops, step)(d, torch.ones_like(d), torch.full_like(d, x), torch.tensor(eps),
                                 torch.tensor(0.01), 0.0, 1.0)
        print("accepted", dtype, step, x, eps)
    except RuntimeError as err:
        assert "outside [lower, upper]" in str(err), err
        print("refused")
"""
    result = _run_with_timeout(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused"] * 16, result.stdout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_pgd_projection_is_exact_at_the_edges_of_the_domain(dtype):
    """Values whose rounding lands just outside the ball or the domain are moved inside, in few steps."""
    torch.manual_seed(0)
    x = torch.cat([torch.rand(4, 256), torch.ones(1, 256), torch.zeros(1, 256)]).to(dtype)
    eps = torch.tensor(1 / 3)
    delta = torch.zeros_like(x)
    for _ in range(5):
        ops.pgd_linf_step_(delta, torch.randn_like(x), x, eps, torch.tensor(0.3), 0.0, 1.0)
        moved = x + delta
        assert (delta.abs().double() <= float(eps)).all()
        assert (moved >= 0).all() and (moved <= 1).all()


def _elision_in_lane_order(mu, rad, w, b, y):
    """margin_elision by the order math/elision.h fixes (32 lanes, shuffle-down tree, bias last),
    written independently in float64 Python."""
    B, F = mu.shape
    out = torch.zeros(B, w.shape[0], dtype=torch.float64)
    for bi in range(B):
        for j in range(w.shape[0]):
            if j == int(y[bi]):
                continue
            lanes = [0.0] * 32
            for f in range(F):
                d = float(w[y[bi], f]) - float(w[j, f])
                lanes[f % 32] += d * float(mu[bi, f]) - abs(d) * float(rad[bi, f])
            offset = 16
            while offset:
                for lane in range(offset):
                    lanes[lane] += lanes[lane + offset]
                offset //= 2
            out[bi, j] = lanes[0] + (float(b[y[bi]]) - float(b[j]))
    return out


@pytest.mark.parametrize("device", devices)
def test_margin_elision_sums_in_the_order_both_backends_share(device):
    torch.manual_seed(0)
    mu, rad = pair((3, 77), torch.float32, "cpu")
    w, b, y = torch.randn(5, 77), torch.randn(5), torch.tensor([0, 4, 2])
    expected = _elision_in_lane_order(mu, rad, w, b, y).float()
    args = [t.to(device) for t in (mu, rad, w, b, y)]
    assert torch.equal(ops.margin_elision(*args).cpu(), expected)


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_matches_float32_reference(device, dtype):
    """Half and bfloat16 on every backend (the CPU ones are computed in float, as on CUDA): every
    operator against its float32 twin on the same rounded inputs."""
    torch.manual_seed(0)
    mu, rad = pair((4, 3, 5, 5), torch.float32, device)
    low = lambda *ts: [t.to(dtype) for t in ts]  # noqa: E731
    up = lambda out: tuple(t.float() for t in out) if isinstance(out, tuple) else out.float()  # noqa: E731
    mu_l, rad_l = low(mu, rad)
    m32, r32 = mu_l.float(), rad_l.float()
    close(up(ops.interval_relu(mu_l, rad_l)), reference.interval_relu_ref(m32, r32), dtype)
    close(up(ops.center_to_interval(mu_l, rad_l)), reference.center_to_interval_ref(m32, r32), dtype)
    close(up(ops.interval_to_center(mu_l, rad_l)), reference.interval_to_center_ref(m32, r32), dtype)
    close(up(ops.relu_relaxation(mu_l - rad_l, mu_l + rad_l)),
          reference.relu_relaxation_ref((mu_l - rad_l).float(), (mu_l + rad_l).float()), dtype)
    scale, shift = low(torch.randn(3, device=device), torch.randn(3, device=device))
    close(up(ops.interval_affine(mu_l, rad_l, scale, shift)),
          reference.interval_affine_ref(m32, r32, scale.float(), shift.float()), dtype)
    x = torch.rand(4, 6, device=device).to(dtype)
    eps = torch.tensor(0.1, device=device)
    close(up(ops.input_box(x, eps, 0.0, 1.0)), reference.input_box_ref(x.float(), eps, 0.0, 1.0), dtype)
    w, b = low(torch.randn(6, 3, 3, 3, device=device), torch.randn(6, device=device))
    for relu in (False, True):
        args = ((1, 1), (1, 1), (1, 1), 1, relu)
        close(up(ops.interval_conv2d(mu_l, rad_l, w, w.abs(), b, *args)),
              reference.interval_conv2d_ref(m32, r32, w.float(), w.abs().float(), b.float(), *args), dtype)
        lw = torch.randn(5, 6, device=device).to(dtype)
        close(up(ops.interval_linear(x, x, lw, lw.abs(), b[:5], relu)),
              reference.interval_linear_ref(x.float(), x.float(), lw.float(), lw.abs().float(), b[:5].float(), relu),
              dtype)
    lw, y = torch.randn(5, 6, device=device).to(dtype), torch.tensor([0, 4, 1, 2], device=device)
    close(up(ops.margin_elision(x, x, lw, b[:5], y)),
          reference.margin_elision_ref(x.float(), x.float(), lw.float(), b[:5].float(), y), dtype)
    A = torch.randn(4, 2, 6, device=device).to(dtype)
    close(up(ops.crown_relu_step(A, x - 0.5, x)), reference.crown_relu_step_ref(A.float(), x.float() - 0.5, x.float()),
          dtype)
    slopes = torch.rand(1, 2, 6, device=device).to(dtype)
    args32 = (A.float(), (x - 0.5).float(), x.float(), slopes.float())
    close(up(ops.crown_relu_alpha_step(A, x - 0.5, x, slopes)), reference.crown_relu_alpha_step_ref(*args32), dtype)
    g = torch.randn(4, 2, 6, device=device).to(dtype), torch.randn(4, 2, device=device).to(dtype)
    close(up(torch.ops.pyibp.crown_relu_alpha_step_backward(*g, A, x - 0.5, x, slopes)),
          torch.autograd.grad(reference.crown_relu_alpha_step_ref(*(a.requires_grad_() for a in args32)), args32,
                              tuple(t.float() for t in g)), dtype)
    delta, grad = torch.zeros_like(mu_l), torch.randn_like(mu_l)
    xb = torch.rand_like(mu_l)
    for step in (ops.pgd_linf_step_, ops.pgd_l2_step_):
        step(delta, grad, xb, eps, eps / 2, 0.0, 1.0)
        moved = xb + delta
        assert (delta.float().abs() <= 0.1).all()
        assert (moved >= 0).all() and (moved <= 1).all()
