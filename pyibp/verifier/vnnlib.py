"""VNN-LIB 1.0 properties: read into a :class:`~pyibp.verifier.spec.Property`, and written back.

A VNN-LIB file declares the inputs ``X_0 .. X_{n-1}`` and outputs ``Y_0 .. Y_{m-1}`` (flattened
in row-major order) and asserts the region of counterexamples::

    (declare-const X_0 Real)
    (declare-const Y_0 Real)
    (assert (>= X_0 -1.0))  (assert (<= X_0 1.0))
    (assert (or (and (>= Y_0 Y_1)) (and (<= Y_0 -3.5))))

Every top-level ``assert`` holds at once; ``and``/``or`` nest freely (the shapes of the VNN-COMP
benchmarks: input bounds at the top level, or inside each disjunct as in ACAS Xu's
``(or (and X-bounds Y-constraints) ...)``). Comparisons are ``<=``, ``>=``, ``<``, ``>`` (a strict
comparison is read as its closure) and ``=``, between linear terms (``(+ ..)``, ``(- ..)``,
``(* c v)``, variables, numbers). The formula is brought to disjunctive normal form; in each
disjunct the constraints on inputs must be bounds of single variables and those on outputs are
rows of ``C y <= d``; disjuncts with the same input box share a :class:`~pyibp.verifier.spec.Case`.
Errors are :class:`VNNLibError`, a ValueError saying ``file:line: what is wrong``.
"""
from __future__ import annotations

import gzip
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .spec import Case, Conjunction, Property

__all__ = ["read_vnnlib", "parse_vnnlib", "write_vnnlib", "format_vnnlib", "VNNLibError"]

MAX_DISJUNCTS = 100_000
_VARIABLE = re.compile(r"^([XY])_(\d+)$")
_TOKEN = re.compile(r"(;[^\n]*)|\(|\)|[^\s();]+")

# An expression: (coefficient per variable, constant); an atom: expression <= 0, with its line.
Expr = Tuple[Dict[str, float], float]
Atom = Tuple[Dict[str, float], float, int]


class VNNLibError(ValueError):
    """A VNN-LIB file that cannot be read: the message starts with ``file:line:``."""


class _Sexp(list):
    """A parenthesised list, with the line it opens on."""

    line = 0


def _tokens(text: str):
    """``(token, line)`` pairs; comments (``;`` to the end of the line) are skipped."""
    line, seen = 1, 0
    for m in _TOKEN.finditer(text):
        line += text.count("\n", seen, m.start())
        seen = m.start()
        if m.group(1) is None:
            yield m.group(0), line


def _sexps(text: str, where: str) -> List[_Sexp]:
    stack: List[_Sexp] = [_Sexp()]
    for token, line in _tokens(text):
        if token == "(":
            node = _Sexp()
            node.line = line
            stack[-1].append(node)
            stack.append(node)
        elif token == ")":
            if len(stack) == 1:
                raise VNNLibError(f"{where}:{line}: ')' without a matching '('")
            stack.pop()
        else:
            stack[-1].append(token)
    if len(stack) > 1:
        raise VNNLibError(f"{where}:{stack[-1].line}: '(' is never closed")
    return stack[0]


def _number(token: str) -> Optional[float]:
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class _Reader:
    def __init__(self, where: str):
        self.where = where
        self.declared: Dict[str, int] = {}

    def error(self, line: int, message: str) -> VNNLibError:
        return VNNLibError(f"{self.where}:{line}: {message}")

    def term(self, t, line: int) -> Expr:
        if isinstance(t, str):
            value = _number(t)
            if value is not None:
                return {}, value
            if t not in self.declared:
                raise self.error(line, f"{t!r} is neither a number nor a declared variable")
            return {t: 1.0}, 0.0
        if not t or not isinstance(t[0], str):
            raise self.error(t.line, f"expected a term, got {_show(t)}")
        op, args = t[0], [self.term(a, t.line) for a in t[1:]]
        if op == "+" and args:
            return _combine(args, [1.0] * len(args))
        if op == "-" and len(args) == 1:
            return _combine(args, [-1.0])
        if op == "-" and args:
            return _combine(args, [1.0] + [-1.0] * (len(args) - 1))
        if op == "*" and len(args) == 2:
            (ca, ka), (cb, kb) = args
            if ca and cb:
                raise self.error(t.line, f"{_show(t)} multiplies two variables; only linear terms are supported")
            return ({v: c * kb for v, c in ca.items()}, ka * kb) if ca else ({v: c * ka for v, c in cb.items()},
                                                                             ka * kb)
        raise self.error(t.line, f"unsupported term {_show(t)}; expected a number, a variable, (+ ..), (- ..) or "
                                 "(* number term)")

    def conjoin(self, dnf: List[List[Atom]], other: List[List[Atom]], line: int) -> List[List[Atom]]:
        """``dnf and other`` in normal form (a single disjunct is appended in place: files of
        thousands of top-level bounds stay linear)."""
        if len(other) == 1:
            for conjunction in dnf:
                conjunction.extend(other[0])
            return dnf
        if len(dnf) * len(other) > MAX_DISJUNCTS:
            raise self.error(line, f"the formula has more than {MAX_DISJUNCTS} disjuncts in normal form")
        return [a + b for a in dnf for b in other]

    def formula(self, f) -> List[List[Atom]]:
        """The formula in disjunctive normal form: a list of conjunctions of atoms."""
        if not isinstance(f, list) or not f or not isinstance(f[0], str):
            line = f.line if isinstance(f, _Sexp) else 0
            raise self.error(line, f"expected (and ..), (or ..) or a comparison, got {_show(f)}")
        op, line = f[0], f.line
        if op == "and":
            dnf: List[List[Atom]] = [[]]
            for g in f[1:]:
                dnf = self.conjoin(dnf, self.formula(g), line)
            return dnf
        if op == "or":
            return [c for g in f[1:] for c in self.formula(g)]
        if op in ("<=", ">=", "<", ">", "=") and len(f) == 3:
            (ca, ka), (cb, kb) = self.term(f[1], line), self.term(f[2], line)
            diff = _combine([(ca, ka), (cb, kb)], [1.0, -1.0])            # a - b
            neg = _combine([diff], [-1.0])
            atoms = {"<=": [diff], "<": [diff], ">=": [neg], ">": [neg], "=": [diff, neg]}[op]
            return [[(c, k, line) for c, k in atoms]]
        raise self.error(line, f"unsupported formula {_show(f)}; expected and, or, <=, >=, <, >, =")


def _combine(exprs: Sequence[Expr], weights: Sequence[float]) -> Expr:
    coefs: Dict[str, float] = {}
    const = 0.0
    for (c, k), w in zip(exprs, weights):
        for v, a in c.items():
            coefs[v] = coefs.get(v, 0.0) + w * a
        const += w * k
    return {v: a for v, a in coefs.items() if a != 0.0}, const


def _show(t) -> str:
    if isinstance(t, list):
        text = "(" + " ".join(_show(u) for u in t) + ")"
        return text if len(text) <= 60 else text[:57] + "..."
    return str(t)


def parse_vnnlib(text: str, *, where: str = "<string>", input_shape: Optional[Sequence[int]] = None) -> Property:
    """The :class:`Property` a VNN-LIB text asserts.

    Args:
        text: the file's content.  where: the name errors give.
        input_shape: the model input's shape without batch (e.g. (1, 28, 28)); the inputs are
            read in row-major order. Default: (n,) for n declared inputs.
    Example:
        >>> prop = parse_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)(declare-const Y_1 Real)"
        ...                     "(assert (<= X_0 1))(assert (>= X_0 0))(assert (>= Y_0 Y_1))")
        >>> prop.cases[0].conjunctions[0].C
        tensor([[-1.,  1.]], dtype=torch.float64)
    """
    reader = _Reader(where)
    asserts = []
    for command in _sexps(text, where):
        if not isinstance(command, list) or not command or not isinstance(command[0], str):
            raise VNNLibError(f"{where}:{getattr(command, 'line', 1)}: expected (declare-const ..) or "
                              f"(assert ..), got {_show(command)}")
        head = command[0]
        if head == "declare-const":
            if len(command) != 3 or not isinstance(command[1], str) or command[2] != "Real":
                raise reader.error(command.line, f"expected (declare-const X_i Real), got {_show(command)}")
            m = _VARIABLE.match(command[1])
            if m is None:
                raise reader.error(command.line, f"variables must be named X_i (inputs) or Y_j (outputs), got "
                                                 f"{command[1]!r}")
            reader.declared[command[1]] = command.line
        elif head == "assert" and len(command) == 2:
            asserts.append(command[1])
        else:
            raise reader.error(command.line, f"expected (declare-const ..) or (assert ..), got {_show(command)}")
    inputs, outputs = (_indices(reader, "X"), _indices(reader, "Y"))
    if not asserts:
        raise VNNLibError(f"{where}: the file asserts nothing")
    dnf: List[List[Atom]] = [[]]
    for f in asserts:
        dnf = reader.conjoin(dnf, reader.formula(f), getattr(f, "line", 0))
    shape = tuple(input_shape) if input_shape is not None else (inputs,)
    if math.prod(shape) != inputs:
        raise VNNLibError(f"{where}: declares {inputs} inputs X_i, but the model's input shape {shape} has "
                          f"{math.prod(shape)} elements")
    boxes: Dict[Tuple[bytes, bytes], Tuple[torch.Tensor, torch.Tensor, List[Conjunction]]] = {}
    for atoms in dnf:
        box, conjunction = _disjunct(reader, atoms, inputs, outputs)
        if box is None:                 # an empty input box: the disjunct holds nowhere
            continue
        lo, hi = box
        key = (lo.numpy().tobytes(), hi.numpy().tobytes())
        boxes.setdefault(key, (lo, hi, []))[2].append(conjunction)
    if not boxes:
        raise VNNLibError(f"{where}: every disjunct of the property has an empty input box")
    return Property(tuple(Case(lo.reshape(shape), hi.reshape(shape), tuple(cs)) for lo, hi, cs in boxes.values()))


def _indices(reader: _Reader, kind: str) -> int:
    found = sorted(int(name[2:]) for name in reader.declared if name[0] == kind)
    if found != list(range(len(found))):
        missing = next(i for i in range(len(found) + 1) if i not in found)
        raise VNNLibError(f"{reader.where}: {kind}_{missing} is not declared, but {kind}_{found[-1]} is; declare "
                          f"{kind}_0 .. {kind}_{found[-1]}")
    if not found:
        raise VNNLibError(f"{reader.where}: no {kind}_i variable is declared")
    return len(found)


def _disjunct(reader: _Reader, atoms: List[Atom], inputs: int, outputs: int):
    lo, hi = [-math.inf] * inputs, [math.inf] * inputs
    rows, ds = [], []
    for coefs, const, line in atoms:
        kinds = {v[0] for v in coefs}
        if kinds == {"X"}:
            if len(coefs) != 1:
                raise reader.error(line, "a constraint between several inputs is not a box; only bounds of single "
                                         "inputs (X_i <= c, X_i >= c) are supported")
            (v, a), = coefs.items()
            i, bound = int(v[2:]), -const / a
            if a > 0:
                hi[i] = min(hi[i], bound)
            else:
                lo[i] = max(lo[i], bound)
        elif kinds == {"Y"}:
            row = torch.zeros(outputs, dtype=torch.float64)
            for v, a in coefs.items():
                row[int(v[2:])] = a
            rows.append(row)
            ds.append(0.0 - const)
        elif not kinds:
            if const > 0:   # a false comparison of constants: the disjunct holds nowhere
                return None, None
        else:
            raise reader.error(line, "a constraint mixes inputs X_i and outputs Y_j; only X bounds and linear "
                                     "constraints among outputs are supported")
    unbounded = [i for i in range(inputs) if not (math.isfinite(lo[i]) and math.isfinite(hi[i]))]
    if unbounded:
        i = unbounded[0]
        side = "lower" if not math.isfinite(lo[i]) else "upper"
        raise VNNLibError(f"{reader.where}: X_{i} has no {side} bound in a disjunct of the property; every input "
                          f"needs both bounds")
    if any(a > b for a, b in zip(lo, hi)):
        return None, None
    box = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    C = torch.stack(rows) if rows else torch.zeros(0, outputs, dtype=torch.float64)
    return box, Conjunction(C, torch.tensor(ds, dtype=torch.float64))


def read_vnnlib(path: Union[str, Path], input_shape: Optional[Sequence[int]] = None) -> Property:
    """The :class:`Property` of a VNN-LIB file (``.vnnlib`` or gzip-compressed ``.vnnlib.gz``).

    Example:
        >>> prop = read_vnnlib("prop_7.vnnlib", input_shape=(1, 28, 28))
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"{path}: no such VNN-LIB file") from None
        raise VNNLibError(f"{path}: cannot read the file: {err}") from None
    return parse_vnnlib(text, where=str(path), input_shape=input_shape)


def _value(v: float) -> str:
    return repr(float(v))


def _row(c: torch.Tensor, d: float) -> str:
    nonzero = c.nonzero().flatten().tolist()
    coefs = [(j, c[j].item()) for j in nonzero]
    if len(coefs) == 2 and d == 0 and sorted(a for _, a in coefs) == [-1.0, 1.0]:
        (pos, _), (neg, _) = sorted(coefs, key=lambda t: -t[1])
        return f"(<= Y_{pos} Y_{neg})"
    if len(coefs) == 1 and abs(coefs[0][1]) == 1.0:
        j, a = coefs[0]
        return f"(<= Y_{j} {_value(d)})" if a > 0 else f"(>= Y_{j} {_value(-d)})"
    terms = " ".join(f"(* {_value(a)} Y_{j})" for j, a in coefs) or "0.0"
    return f"(<= (+ {terms}) {_value(d)})"


def _conjunction(parts: List[str]) -> str:
    return "(and " + " ".join(parts) + ")" if parts else "(and (<= 0.0 0.0))"


def format_vnnlib(prop: Property) -> str:
    """The VNN-LIB text of ``prop`` (the inputs flattened in row-major order; values exact, as repr).

    A single case is written with its input bounds as top-level asserts and one
    ``(assert (or (and ..) ..))`` of its conjunctions; several cases as one disjunction of
    ``(and input-bounds output-rows)``. :func:`parse_vnnlib` reads it back to the same property.
    """
    inputs = math.prod(prop.input_shape)
    outputs = prop.num_outputs or 0
    lines = [f"; {len(prop.cases)} input box(es), {sum(len(c.conjunctions) for c in prop.cases)} output "
             "conjunction(s); sat means a counterexample exists"]
    lines += [f"(declare-const X_{i} Real)" for i in range(inputs)] + [""]
    lines += [f"(declare-const Y_{j} Real)" for j in range(outputs)] + [""]

    def bounds(case: Case) -> List[str]:
        lo, hi = case.lower.flatten().tolist(), case.upper.flatten().tolist()
        return [f"(>= X_{i} {_value(lo[i])})" for i in range(inputs)] + [f"(<= X_{i} {_value(hi[i])})"
                                                                           for i in range(inputs)]

    def rows(cj: Conjunction) -> List[str]:
        return [_row(cj.C[r], cj.d[r].item()) for r in range(cj.C.shape[0])]

    if len(prop.cases) == 1:
        case = prop.cases[0]
        lines += [f"(assert {b})" for b in bounds(case)] + [""]
        lines.append("(assert (or")
        lines += ["    " + _conjunction(rows(cj)) for cj in case.conjunctions]
        lines.append("))")
    else:
        lines.append("(assert (or")
        lines += ["    " + _conjunction(bounds(case) + rows(cj)) for case in prop.cases for cj in case.conjunctions]
        lines.append("))")
    return "\n".join(lines) + "\n"


def write_vnnlib(prop: Property, path: Union[str, Path]) -> None:
    """Writes :func:`format_vnnlib` of ``prop`` to ``path`` (gzip-compressed when it ends in ``.gz``)."""
    path = Path(path)
    text = format_vnnlib(prop).encode("utf-8")
    path.write_bytes(gzip.compress(text) if path.suffix == ".gz" else text)
