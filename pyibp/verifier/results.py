"""VNN-COMP result files: the verdict on the first line; after ``sat``, the counterexample.

::

    sat
    ((X_0 0.123456789)
     (X_1 -0.5)
     (Y_0 3.25)
     (Y_1 3.5))

Values are written with ``repr`` (the shortest text that reads back to the same float64, so a
float32 value is exact).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Tuple, Union

from .complete import STATUSES, VerificationOutcome

__all__ = ["format_results", "write_results", "read_results"]


def format_results(outcome: VerificationOutcome) -> str:
    """The result file's text for ``outcome``.

    Example:
        >>> format_results(VerificationOutcome("unsat"))
        'unsat\\n'
    """
    if outcome.status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {outcome.status!r}")
    if outcome.status != "sat":
        return outcome.status + "\n"
    cex = outcome.counterexample
    if cex is None:
        raise ValueError("a 'sat' outcome needs its counterexample")
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(cex.x.flatten().tolist())]
    pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(cex.y.flatten().tolist())]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def write_results(path: Union[str, Path], outcome: VerificationOutcome) -> None:
    """Writes :func:`format_results` of ``outcome`` to ``path``."""
    Path(path).write_text(format_results(outcome))


def read_results(path: Union[str, Path]) -> Tuple[str, Optional[List[float]], Optional[List[float]]]:
    """``(status, x, y)`` of a result file (x and y flattened; None unless ``sat``).

    Example:
        >>> status, x, y = read_results("out.txt")
    """
    lines = Path(path).read_text().split("\n")
    status = lines[0].strip()
    if status not in STATUSES and status not in ("violated", "holds"):
        raise ValueError(f"{path}:1: expected one of {STATUSES}, got {status!r}")
    if status not in ("sat", "violated"):
        return status, None, None
    values: dict = {"X": {}, "Y": {}}
    for number, line in enumerate(lines[1:], start=2):
        text = line.strip().strip("()").strip()
        if not text:
            continue
        name, _, value = text.partition(" ")
        if len(name) < 3 or name[0] not in "XY" or name[1] != "_" or not name[2:].isdigit():
            raise ValueError(f"{path}:{number}: expected (X_i value) or (Y_j value), got {line.strip()!r}")
        values[name[0]][int(name[2:])] = float(value.strip("()"))
    for kind, d in values.items():
        if sorted(d) != list(range(len(d))):
            raise ValueError(f"{path}: the counterexample's {kind}_i are not numbered 0 .. {len(d) - 1}")
    x, y = ([d[i] for i in range(len(d))] for d in (values["X"], values["Y"]))
    if not all(math.isfinite(v) for v in x + y):
        raise ValueError(f"{path}: the counterexample has non-finite values")
    return status, x, y
