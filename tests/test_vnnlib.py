"""VNN-LIB properties (pyibp.verifier.vnnlib, pyibp.verifier.spec): the shapes of VNN-COMP files, the
writer's round trip, gzip, and errors that name the file and line."""
from __future__ import annotations

import gzip

import pytest
import torch

from pyibp.verifier import (Conjunction, Property, VNNLibError, format_vnnlib, parse_vnnlib, read_vnnlib,
                          robustness_property, write_vnnlib)

F64 = dict(dtype=torch.float64)


def declare(inputs: int, outputs: int) -> str:
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(inputs)) + "".join(
        f"(declare-const Y_{j} Real)\n" for j in range(outputs))


def test_mnist_fc_style():
    """Top-level input bounds, then one disjunction of single-row conjunctions."""
    text = ("; mnist_fc prop\n" + declare(3, 3) + "\n; input bounds\n"
            + "".join(f"(assert (<= X_{i} {0.5 + i}))\n(assert (>= X_{i} {-0.5 + i}))\n" for i in range(3))
            + "(assert (or\n  (and (>= Y_1 Y_0))\n  (and (>= Y_2 Y_0))\n))\n")
    prop = parse_vnnlib(text)
    assert len(prop.cases) == 1
    case = prop.cases[0]
    assert torch.equal(case.lower, torch.tensor([-0.5, 0.5, 1.5], **F64))
    assert torch.equal(case.upper, torch.tensor([0.5, 1.5, 2.5], **F64))
    assert [cj.C.tolist() for cj in case.conjunctions] == [[[1.0, -1.0, 0.0]], [[1.0, 0.0, -1.0]]]
    assert all(cj.d.tolist() == [0.0] for cj in case.conjunctions)


def test_acasxu_style_input_bounds_inside_disjuncts():
    text = declare(2, 2) + """
    (assert (or
        (and (<= X_0 1) (>= X_0 0) (<= X_1 1) (>= X_1 0) (<= Y_0 Y_1) (<= Y_0 3.5))
        (and (<= X_0 1) (>= X_0 0) (<= X_1 1) (>= X_1 0) (>= Y_1 -2))
        (and (<= X_0 2) (>= X_0 1.5) (<= X_1 1) (>= X_1 0) (<= Y_0 Y_1))))"""
    prop = parse_vnnlib(text)
    assert len(prop.cases) == 2                        # the first two disjuncts share a box
    first, second = prop.cases
    assert len(first.conjunctions) == 2 and len(second.conjunctions) == 1
    assert first.conjunctions[0].C.tolist() == [[1.0, -1.0], [1.0, 0.0]]
    assert first.conjunctions[0].d.tolist() == [0.0, 3.5]
    assert first.conjunctions[1].C.tolist() == [[0.0, -1.0]] and first.conjunctions[1].d.tolist() == [2.0]
    assert second.lower.tolist() == [1.5, 0.0]


def test_nested_formulas_linear_terms_and_equality():
    text = declare(1, 3) + """(assert (and (>= X_0 -1) (<= X_0 1)))
    (assert (and (or (<= (+ Y_0 (* 2 Y_1) (- Y_2 1)) 0.5) (> Y_2 Y_0)) (= Y_1 0.25)))"""
    prop = parse_vnnlib(text)
    rows = [(cj.C.tolist(), cj.d.tolist()) for cj in prop.cases[0].conjunctions]
    # (Y_0 + 2 Y_1 + Y_2 - 1 <= 0.5 or Y_0 - Y_2 <= 0) and Y_1 = 0.25
    assert rows == [([[1.0, 2.0, 1.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], [1.5, 0.25, -0.25]),
                    ([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], [0.0, 0.25, -0.25])]


def test_input_shape_and_holds():
    text = declare(4, 2) + "".join(f"(assert (<= X_{i} {i + 1}))(assert (>= X_{i} {i}))" for i in range(4)) + \
        "(assert (>= Y_0 Y_1))"
    prop = parse_vnnlib(text, input_shape=(1, 2, 2))
    assert prop.input_shape == (1, 2, 2)
    assert prop.cases[0].lower.tolist() == [[[0.0, 1.0], [2.0, 3.0]]]
    cj = prop.cases[0].conjunctions[0]
    assert bool(cj.holds(torch.tensor([2.0, 1.0], **F64))) and not bool(cj.holds(torch.tensor([1.0, 2.0], **F64)))
    with pytest.raises(VNNLibError, match="declares 4 inputs"):
        parse_vnnlib(text, input_shape=(1, 28, 28))


def test_write_read_round_trip_and_gzip(tmp_path):
    x = torch.rand(1, 3, 3)
    prop = robustness_property(x, label=2, eps=0.1, num_classes=4)
    for name in ("p.vnnlib", "p.vnnlib.gz"):
        write_vnnlib(prop, tmp_path / name)
        back = read_vnnlib(tmp_path / name, input_shape=(1, 3, 3))
        assert torch.equal(back.cases[0].lower, prop.cases[0].lower)
        assert torch.equal(back.cases[0].upper, prop.cases[0].upper)
        for a, b in zip(back.cases[0].conjunctions, prop.cases[0].conjunctions):
            assert torch.equal(a.C, b.C) and torch.equal(a.d, b.d)
    assert gzip.decompress((tmp_path / "p.vnnlib.gz").read_bytes()).startswith(b";")
    # several boxes and general rows go through one disjunction
    multi = Property.product([(torch.zeros(2), torch.ones(2)), (torch.ones(2), 2 * torch.ones(2))],
                             [Conjunction(torch.tensor([[0.5, -3.0]], **F64), torch.tensor([0.1], **F64))])
    again = parse_vnnlib(format_vnnlib(multi))
    assert [c.lower.tolist() for c in again.cases] == [[0.0, 0.0], [1.0, 1.0]]
    assert again.cases[1].conjunctions[0].C.tolist() == [[0.5, -3.0]]
    assert again.cases[1].conjunctions[0].d.tolist() == [0.1]


def test_robustness_property_clips_to_the_domain():
    prop = robustness_property(torch.tensor([0.05, 0.5, 0.97]), label=0, eps=0.1, num_classes=3)
    assert prop.cases[0].lower.tolist() == pytest.approx([0.0, 0.4, 0.87])
    assert prop.cases[0].upper.tolist() == pytest.approx([0.15, 0.6, 1.0])
    assert [cj.C.tolist() for cj in prop.cases[0].conjunctions] == [[[1.0, -1.0, 0.0]], [[1.0, 0.0, -1.0]]]


BAD = [
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1)\n", r":3: '\(' is never closed"),
    ("(declare-const X_0 Real))", r":1: '\)' without a matching '\('"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
     "(assert (<= (* Y_0 Y_0) 1))", ":5: .* multiplies two variables"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 Z_3))",
     ":4: 'Z_3' is neither a number nor a declared variable"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (>= X_0 0))\n"
     "(assert (<= X_0 Y_0))", ":5: a constraint mixes inputs"),
    ("(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n"
     "(assert (>= X_0 0))\n(assert (<= X_1 1))\n(assert (>= X_1 X_0))", ":7: a constraint between several inputs"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (<= X_0 1))\n(assert (>= Y_0 0))",
     r"X_0 has no lower bound"),
    ("(declare-const X_0 Real)\n(declare-const X_2 Real)\n(declare-const Y_0 Real)", "X_1 is not declared"),
    ("(declare-const X_0 Int)", ":1: expected \\(declare-const X_i Real\\)"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(check-sat)", ":3: expected \\(declare-const"),
    ("(declare-const X_0 Real)\n(declare-const Y_0 Real)\n(assert (xor (<= X_0 1)))", ":3: unsupported formula"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.vnnlib"
    path.write_text(text)
    with pytest.raises(VNNLibError, match="bad.vnnlib" + message if message.startswith(":") else message) as err:
        read_vnnlib(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.vnnlib"):
        read_vnnlib(tmp_path / "nope.vnnlib")
    broken = tmp_path / "broken.vnnlib.gz"
    broken.write_bytes(gzip.compress(b"(declare-const X_0 Real)")[:12])
    with pytest.raises(VNNLibError, match="broken.vnnlib.gz: cannot read"):
        read_vnnlib(broken)
