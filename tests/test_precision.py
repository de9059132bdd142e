"""Bounds run in IEEE float32 whatever the user's global precision settings are (TF32 on Ampere and
Hopper, bf16 fp32-modes of oneDNN, autocast), and the user's settings are restored afterwards."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import pyibp
from pyibp.precision import FP32_PRECISION_SETTINGS, full_precision


def _settings():
    return [torch._C._get_fp32_precision_getter(b, o) for b, o in FP32_PRECISION_SETTINGS]


@pytest.fixture
def reduced_precision_settings():
    """The user's settings as a throughput-minded user leaves them: TF32 everywhere on CUDA, bf16
    products in oneDNN; restored after the test."""
    saved = _settings()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    yield _settings()
    for (backend, op), value in zip(FP32_PRECISION_SETTINGS, saved):
        torch._C._set_fp32_precision_setter(backend, op, value)


class _RecordPrecision(TorchDispatchMode):
    """Records, for every operator the bound code dispatches (pyibp's own and aten's), the
    fp32-precision settings in force when it ran."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((str(func), tuple(_settings()), torch.is_autocast_enabled("cpu")))
        return func(*args, **(kwargs or {}))


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 10)).eval()


PRODUCTS = ("convolution", "mm", "matmul", "linear", "conv")

BOUND_CALLS = {
    "interval_bounds": lambda m, x, y: pyibp.interval_bounds(m, x, 0.1),
    "margin_bounds ibp": lambda m, x, y: pyibp.margin_bounds(m, x, y, 0.1),
    "margin_bounds crown-ibp": lambda m, x, y: pyibp.margin_bounds(m, x, y, 0.1, method="crown-ibp"),
    "crown_ibp_robust_ce": lambda m, x, y: pyibp.crown_ibp_robust_ce(m, x, y, 0.1),
    "verify ibp": lambda m, x, y: pyibp.verify(m, (x, y), 0.1),
    "verify crown-ibp": lambda m, x, y: pyibp.verify(m, (x, y), 0.1, method="crown-ibp"),
}


@pytest.mark.parametrize("call", sorted(BOUND_CALLS))
def test_every_bound_operator_runs_in_ieee_float32_and_settings_are_restored(call, reduced_precision_settings):
    model, x, y = _conv_net(), torch.rand(3, 1, 9, 9), torch.tensor([0, 3, 9])
    mode = _RecordPrecision()
    with torch.autocast("cpu", dtype=torch.bfloat16), mode:
        BOUND_CALLS[call](model, x, y)
    assert mode.seen, "no operator was dispatched"
    ieee = tuple(["ieee"] * len(FP32_PRECISION_SETTINGS))
    # Argument checks may run before the scope; every product and every pyibp kernel runs inside it.
    computing = [(op, settings, autocast) for op, settings, autocast in mode.seen
                 if op.startswith("pyibp.") or any(k in op for k in PRODUCTS)]
    assert any(op.startswith("pyibp.") for op, *_ in computing)
    reduced = [(op, settings) for op, settings, _ in computing if settings != ieee]
    assert not reduced, f"{call} ran operators under reduced precision: {reduced[:3]}"
    assert not any(autocast for *_, autocast in computing), f"{call} ran operators under autocast"
    assert _settings() == reduced_precision_settings


def test_full_precision_restores_settings_when_the_block_raises(reduced_precision_settings):
    with pytest.raises(ValueError):
        with full_precision("cuda"):
            assert torch.backends.cudnn.conv.fp32_precision == "ieee"
            raise ValueError("boom")
    assert _settings() == reduced_precision_settings


def test_the_clean_forward_pass_keeps_the_users_settings(reduced_precision_settings):
    model, x = _conv_net(), torch.rand(2, 1, 9, 9)
    pyibp.interval_bounds(model, x, 0.1)
    mode = _RecordPrecision()
    with mode:
        model(x)
    assert all(settings == tuple(reduced_precision_settings) for _, settings, _ in mode.seen)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_box_vertices_of_a_conv_net_lie_inside_interval_bounds_with_tf32_on(reduced_precision_settings):
    """The vertex test of a TF32-capable GPU: with the global TF32 settings on, every output at the
    box's vertices (where TF32's input rounding moves results the most) lies in the bounds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10)).cuda().eval()
    x = torch.rand(8, 3, 16, 16, device="cuda")
    for eps in (1e-4, 1e-3):
        lb, ub = pyibp.interval_bounds(model, x, eps)
        signs = torch.randint(0, 2, (64,) + x.shape, device="cuda") * 2 - 1
        with torch.no_grad():
            vertices = (x[None] + eps * signs).clamp(0, 1)
            # The model's own forward pass in IEEE float32: the network the bound is about.
            with full_precision("cuda"):
                out = model(vertices.flatten(0, 1)).view(64, *lb.shape)
        assert (out >= lb).all() and (out <= ub).all(), f"eps={eps}"
