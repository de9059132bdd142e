"""Complete verification (pyibp.verifier): the falsifier's finds are checked, complete_verify never
contradicts a brute-force reference on 2-d networks, timeouts hold, result files, and the
``pyibp verify`` / ``pyibp export`` commands."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from cli_support import run_main
from pyibp.verifier import (Case, Conjunction, Property, VerificationOutcome, check_counterexample, complete_verify,
                          falsify, format_results, read_results, robustness_property, write_results, write_vnnlib)
from pyibp.verifier.falsify import rounded_box

F64 = dict(dtype=torch.float64)


def mlp(seed: int, sizes=(2, 12, 12, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def grid(lo: torch.Tensor, hi: torch.Tensor, n: int = 201) -> torch.Tensor:
    t = torch.linspace(0, 1, n, **F64)
    g = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    return (lo + g * (hi - lo)).float()


def test_rounded_box_directions():
    lo, hi = torch.tensor([0.1, -0.3], **F64), torch.tensor([0.7, 1 / 3], **F64)
    inner, outer = rounded_box(lo, hi, torch.float32, inward=True), rounded_box(lo, hi, torch.float32, inward=False)
    assert bool((inner[0].double() >= lo).all() and (inner[1].double() <= hi).all())
    assert bool((outer[0].double() <= lo).all() and (outer[1].double() >= hi).all())


def test_falsifier_finds_a_planted_counterexample():
    """A net that is 'safe' everywhere but in a small corner of its box: PGD must find the corner."""
    net = mlp(0, (4, 16, 2))
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.zero_()
        net[0].weight[0] = torch.tensor([1.0, 1.0, 1.0, 1.0])
        net[0].bias[0] = -3.6                  # active only where the inputs sum to more than 3.6
        net[2].weight.zero_()
        net[2].weight[1, 0] = 10.0
        net[2].bias.copy_(torch.tensor([1.0, 0.0]))
    # counterexample region: y_1 >= y_0, i.e. 10 relu(sum x - 3.6) >= 1: sum x >= 3.7 in [0, 1]^4
    prop = Property.product([(torch.zeros(4), torch.ones(4))],
                            [Conjunction(torch.tensor([[1.0, -1.0]], **F64), torch.zeros(1, **F64))])
    cex = falsify(net, prop, deadline=time.monotonic() + 10)
    assert cex is not None and float(cex.x.sum()) >= 3.7 - 1e-5
    assert bool(((cex.x >= 0) & (cex.x <= 1)).all())
    assert check_counterexample(net, prop, cex.x) is not None
    assert check_counterexample(net, prop, torch.zeros(4)) is None           # not in the region
    assert check_counterexample(net, prop, torch.full((4,), 1.5)) is None    # outside the box


def random_property(seed: int, net: nn.Module):
    """A box in [-1, 1]^2 and a conjunction of 1-2 rows whose thresholds sit at a quantile of the
    grid's values or below their minimum (no exact ties, which float rounding could decide either
    way); returns (property, grid says sat)."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(2, generator=gen, **F64) * 2 - 1
    width = torch.rand(2, generator=gen, **F64) * 0.6 + 0.05
    lo, hi = centre - width, centre + width
    rows = 1 + seed % 2
    C = torch.randn(rows, 3, generator=gen, **F64)
    points = grid(lo, hi)
    with torch.no_grad():
        values = net(points).double() @ C.T
    q = [0.05, 0.3, -0.02, -0.2][seed % 4]       # < 0: below the grid minimum, so the grid finds no point
    d = values.quantile(q, dim=0) if q > 0 else values.min(0).values + q * values.std(0)
    prop = Property((Case(lo, hi, (Conjunction(C, d),)),))
    return prop, bool((values <= d).all(1).any())


@pytest.mark.parametrize("seed", range(16))
def test_complete_verify_agrees_with_brute_force(seed):
    net = mlp(seed)
    prop, grid_sat = random_property(seed, net)
    out = complete_verify(net, prop, timeout=20, falsify_fraction=0.01, sound=seed % 4 == 2)
    assert out.status in ("sat", "unsat"), out
    if out.status == "sat":
        cj = prop.cases[0].conjunctions[0]
        assert bool(cj.holds(out.counterexample.y.double()))
        assert bool(cj.holds(net(out.counterexample.x[None]).double()[0]))
    if grid_sat:
        assert out.status == "sat"             # never unsat where a grid point is a counterexample


def test_several_boxes_and_conjunctions():
    points = grid(torch.tensor([-1.0, -1.0], **F64), torch.tensor([1.0, 1.0], **F64), 41)
    net = next(n for n in map(mlp, range(20)) if n(points).argmax(1).unique().numel() > 1)
    x = points[len(points) // 2]
    label = int(net(x[None]).argmax())
    safe = robustness_property(x, label, 0.001, num_classes=3, lower=-1.0, upper=1.0)
    assert complete_verify(net, safe, timeout=20, falsify_fraction=0.01).status == "unsat"
    # a second, distant box in which some other class wins makes the property sat
    other = points[net(points).argmax(1) != label][0].double()
    wide = Property.product([(safe.cases[0].lower, safe.cases[0].upper), (other - 1e-3, other + 1e-3)],
                            safe.cases[0].conjunctions)
    out = complete_verify(net, wide, timeout=20, falsify_fraction=0.01)
    assert out.status == "sat" and out.counterexample.case == 1


def test_timeout_is_honoured_and_the_queue_is_capped():
    net = mlp(5, (2, 64, 64, 64, 3))
    prop, _ = random_property(2, net)          # just below the grid minimum: many subdomains
    start = time.monotonic()
    out = complete_verify(net, prop, timeout=0.5, falsify_fraction=0.2)
    assert time.monotonic() - start < 1.5 and out.status in ("timeout", "unsat")
    capped = complete_verify(net, prop, timeout=20, falsify_fraction=0.01, batch=4, max_domains=8)
    assert capped.status in ("unknown", "unsat", "timeout")
    if capped.status == "unknown":
        assert capped.stats["domains"] > 0


@pytest.mark.parametrize("eps", [0.02, 0.1, 0.5])
def test_large_inputs_without_relu_bab_are_not_decided_wrongly(eps):
    """Above 16 inputs the ReLU branch and bound decides what the bounds leave open; without it the
    result may be 'unknown', never a wrong 'unsat'."""
    net = mlp(1, (20, 16, 3))
    x = torch.rand(20)
    prop = robustness_property(x, int(net(x[None]).argmax()), eps, num_classes=3)
    out = complete_verify(net, prop, timeout=2, falsify_fraction=0.1)
    if out.status == "sat":
        assert check_counterexample(net, prop, out.counterexample.x) is not None
    if out.status == "unsat":
        case = prop.cases[0]
        samples = (case.lower + torch.rand(20000, 20, **F64) * (case.upper - case.lower)).float()
        assert not any(bool(cj.holds(net(samples).double()).any()) for cj in case.conjunctions)


def test_result_files(tmp_path):
    net = mlp(0)
    prop = Property.product([(torch.full((2,), -1.0), torch.ones(2))],
                            [Conjunction(torch.zeros(0, 3, **F64), torch.zeros(0, **F64))])   # holds everywhere
    out = complete_verify(net, prop, timeout=5)
    assert out.status == "sat"
    write_results(tmp_path / "r.txt", out)
    text = (tmp_path / "r.txt").read_text()
    assert text.startswith("sat\n((X_0 ") and text.endswith(")\n") and text.count("\n") == 6
    status, x, y = read_results(tmp_path / "r.txt")
    assert status == "sat" and x == out.counterexample.x.tolist() and y == out.counterexample.y.tolist()
    assert format_results(VerificationOutcome("unsat")) == "unsat\n"
    with pytest.raises(ValueError, match="needs its counterexample"):
        format_results(VerificationOutcome("sat"))


# -- the commands -------------------------------------------------------------------------------
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """An exported 2-d net and two properties: one robust (unsat), one with a counterexample."""
    from pyibp.cli.export import export_onnx
    folder = tmp_path_factory.mktemp("verify")
    net = mlp(7)
    export_onnx(net, torch.zeros(1, 2), str(folder / "net.onnx"))
    x = torch.tensor([0.1, 0.3])
    label = int(net(x[None]).argmax())
    write_vnnlib(robustness_property(x, label, 0.001, num_classes=3, lower=-1.0, upper=1.0), folder / "safe.vnnlib")
    write_vnnlib(robustness_property(x, label, 1.0, num_classes=3, lower=-1.0, upper=1.0), folder / "unsafe.vnnlib")
    (folder / "instances.csv").write_text("net.onnx,safe.vnnlib,20\nnet.onnx,unsafe.vnnlib,20\n")
    return folder, net


def test_verify_command(problem, capsys, tmp_path):
    folder, net = problem
    net_path = str(folder / "net.onnx")
    code, out, _ = run_main(["verify", net_path, str(folder / "safe.vnnlib"), "--results", str(tmp_path / "s.txt"),
                             "--device", "cpu", "--timeout", "20"], capsys)
    assert code == 0 and out.startswith("unsat") and (tmp_path / "s.txt").read_text() == "unsat\n"
    code, out, _ = run_main(["verify", net_path, str(folder / "unsafe.vnnlib"), "--results", str(tmp_path / "u.txt"),
                             "--device", "cpu", "--json"], capsys)
    status, x, y = read_results(tmp_path / "u.txt")
    assert code == 0 and status == "sat" and '"status": "sat"' in out
    assert len(x) == 2 and len(y) == 3 and y[0] != y[1]
    with torch.no_grad():
        assert net(torch.tensor([x])).tolist()[0] == pytest.approx(y, abs=1e-5)


def test_verify_instances(problem, capsys, tmp_path):
    """Rows relative to the csv's folder; files found gzip-compressed as VNN-COMP ships them; a
    missing file is an 'error' row and exit code 2, after the other rows ran."""
    import gzip
    import shutil
    folder, _ = problem
    bench = tmp_path / "bench"
    (bench / "onnx").mkdir(parents=True)
    (bench / "onnx" / "net.onnx.gz").write_bytes(gzip.compress((folder / "net.onnx").read_bytes()))
    (bench / "unsafe.vnnlib.gz").write_bytes(gzip.compress((folder / "unsafe.vnnlib").read_bytes()))
    shutil.copy(folder / "safe.vnnlib", bench)
    (bench / "instances.csv").write_text("onnx/net.onnx,safe.vnnlib,20\n\nonnx/net.onnx,unsafe.vnnlib,20\n")
    results = tmp_path / "results.csv"
    code, out, _ = run_main(["verify", "--instances", str(bench / "instances.csv"), "--results", str(results),
                             "--quiet", "--device", "cpu"], capsys)
    assert code == 0
    rows = [line.split(",") for line in results.read_text().splitlines()]
    assert rows[0][:4] == ["onnx", "vnnlib", "timeout", "status"]
    assert [r[3] for r in rows[1:]] == ["unsat", "sat"]
    assert "instances  solved  sat  unsat" in out
    (bench / "instances.csv").write_text("onnx/net.onnx,gone.vnnlib,5\nonnx/net.onnx,safe.vnnlib,20\n")
    code, _, err = run_main(["verify", "--instances", str(bench / "instances.csv"), "--results", str(results),
                             "--quiet", "--device", "cpu"], capsys)
    assert code == 2 and "gone.vnnlib" in err
    assert [line.split(",")[3] for line in results.read_text().splitlines()[1:]] == ["error", "unsat"]


def test_verify_bad_input_exits_2(problem, capsys, tmp_path):
    folder, _ = problem
    spec = str(folder / "safe.vnnlib")
    code, _, err = run_main(["verify", str(tmp_path / "missing.onnx"), spec], capsys)
    assert code == 2 and "missing.onnx" in err and err.count("\n") == 1
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07not an onnx file at all" * 2)
    code, _, err = run_main(["verify", str(damaged), spec], capsys)
    assert code == 2 and "damaged.onnx" in err and err.count("\n") == 1
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(assert (<= X_0")
    code, _, err = run_main(["verify", str(folder / "net.onnx"), str(bad)], capsys)
    assert code == 2 and f"{bad}:3:" in err
    wrong_outputs = tmp_path / "four.vnnlib"
    write_vnnlib(robustness_property(torch.zeros(2), 0, 0.1, num_classes=4), wrong_outputs)
    code, _, err = run_main(["verify", str(folder / "net.onnx"), str(wrong_outputs)], capsys)
    assert code == 2 and "declares 4 outputs" in err
    code, _, err = run_main(["verify", "--instances", str(tmp_path / "none.csv")], capsys)
    assert code == 2 and "none.csv" in err


def test_export_round_trip(capsys, tmp_path):
    """A trained run exported as ONNX converts back to the same function, and its VNN-LIB
    properties read back to the robustness properties of its test examples."""
    from pyibp.cli.common import load
    from pyibp.verifier import load_onnx, read_vnnlib
    run = tmp_path / "run"
    code, _, err = run_main(["train", "--method", "ibp", "--epochs", "1", "--train-subset", "100", "--test-subset",
                             "20", "--batch-size", "50", "--warmup-steps", "1", "--ramp-steps", "1",
                             "--eval-pgd-subset", "20", "--eval-pgd-steps", "1", "--device", "cpu", "--out", str(run),
                             "--quiet"], capsys)
    assert code == 0, err
    props = tmp_path / "props"
    code, out, err = run_main(["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--vnnlib", str(props),
                               "--eps", "0.05", "--examples", "2", "--json"], capsys)
    assert code == 0, err
    config, model, _ = load(str(run), "cpu")
    net = load_onnx(tmp_path / "m.onnx")
    x = torch.rand(4, *net.onnx_input_shape[1:])
    with torch.no_grad():
        assert torch.allclose(net(x), model(x), atol=1e-5)
    lines = (props / "instances.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[0].split(",")[0] == "../m.onnx" and lines[0].endswith(",60")
    prop = read_vnnlib(props / lines[0].split(",")[1], input_shape=net.onnx_input_shape[1:])
    from pyibp.cli.common import test_set
    import argparse
    test = test_set(config, argparse.Namespace(data_dir=None, download=False), "cpu", None)
    x0, y0 = test.tensors[0][0], int(test.tensors[1][0])
    expected = robustness_property(x0, y0, 0.05, num_classes=10)
    assert torch.equal(prop.cases[0].lower, expected.cases[0].lower)
    assert torch.equal(prop.cases[0].upper, expected.cases[0].upper)
    assert [cj.C.tolist() for cj in prop.cases[0].conjunctions] == [cj.C.tolist()
                                                                    for cj in expected.cases[0].conjunctions]


def test_a_network_pyibp_cannot_bound_is_unknown_or_sat():
    """torch.sin has no bound rule: the bounds step fails by name, the falsifier still runs."""
    class Sine(nn.Module):
        def forward(self, x):
            return torch.cat([torch.sin(x), -torch.sin(x)], 1)

    prop = robustness_property(torch.tensor([0.5]), 0, 0.01, num_classes=2, lower=-1.0, upper=1.0)
    out = complete_verify(Sine(), prop, timeout=1, falsify_fraction=0.1)
    assert out.status == "unknown" and "sin" in out.stats["bound_error"]
    unsafe = robustness_property(torch.tensor([0.0]), 0, 0.5, num_classes=2, lower=-1.0, upper=1.0)
    assert complete_verify(Sine(), unsafe, timeout=1).status == "sat"


def test_pyibp_verify_stays_the_function_once_the_verifier_is_imported():
    """pyibp.verifier (complete verification) and pyibp.verify (certify a data set) are two names."""
    import pyibp
    import pyibp.verifier.spec  # noqa: F401
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    data = [(torch.rand(5, 1, 2, 2), torch.zeros(5, dtype=torch.long))]
    result = pyibp.verify(net, data, 0.01)
    assert len(result) == 5
