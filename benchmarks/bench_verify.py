"""Complete verification on properties of small pyibp models: how many instances the bound alone and
:func:`pyibp.verifier.complete_verify` solve within 1, 10 and 60 seconds.

Models (on mnist-5k, trained here for ``--epochs`` epochs with Adam: IBP training at ε =
``--train-eps`` for the MLPs, standard training for the CNN; random weights with ``--epochs 0``):
``mlp-2x64`` (784-64-64-10), ``mlp-1x100`` (784-100-10), the tutorial CNN
(``pyibp.models.tutorial_cnn``), and ``acas-like`` (a random 5-50-50-5 network on boxes of
[-1, 1]^5, where complete_verify splits the input box). For every model and ε of ``--eps`` (20 ε
for acas-like), the l∞ robustness properties of the first ``--examples`` correctly classified
test images (``pyibp.verifier.robustness_property``):

* ``bound``: one call of the bound on the whole box (``complete.py``'s bound step:
  ``pyibp.bounds.spec_bounds`` by alpha-CROWN when present, else IBP), solved when every
  conjunction is proved impossible;
* ``complete``: ``complete_verify(timeout=--timeout)``; solved within t when it answered sat or
  unsat in at most t seconds.

Prints a table and writes JSON (default ``benchmarks/results/bench_verify.json``). The default run
takes a few minutes on 2 CPU cores; ``--timeout 60`` measures the 60 s column.

Usage:
    python benchmarks/bench_verify.py [--device cpu|cuda] [--examples 5] [--timeout 10] [--epochs 1]
                                      [--eps 0.005 0.01 0.02] [--models mlp-2x64 tutorial-cnn ...] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyibp  # noqa: E402
from pyibp.certified_training import ibp_loss  # noqa: E402
from pyibp.data import load_dataset  # noqa: E402
from pyibp.models import tutorial_cnn  # noqa: E402
from pyibp.verifier import Property, complete_verify, robustness_property  # noqa: E402
from pyibp.verifier.complete import _lower_bounds  # noqa: E402
from pyibp.verifier.falsify import _stack, rounded_box  # noqa: E402

LIMITS = (1.0, 10.0, 60.0)
ACAS_SCALE = 20     # acas-like boxes have radius 20 ε in [-1, 1]^5: wide enough for input splitting to matter


def mlp(*sizes: int) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


MODELS = {"mlp-2x64": lambda: mlp(784, 64, 64, 10), "mlp-1x100": lambda: mlp(784, 100, 10),
          "tutorial-cnn": tutorial_cnn, "acas-like": lambda: mlp(5, 50, 50, 5)}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, eps: float) -> nn.Module:
    """IBP training, ε and κ (1 -> 0.75) ramped linearly over the first epoch (a short recipe)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * (len(y) // 100)
    for step in range(steps):
        idx = torch.randint(len(y), (100,), generator=gen)
        ramp = min(1.0, step / max(1, steps // max(1, epochs)))
        loss = ibp_loss(model, x[idx], y[idx], eps * ramp, 1.0 - 0.25 * ramp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def properties(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n: int) -> List[Property]:
    if name == "acas-like":
        gen = torch.Generator().manual_seed(1)
        centres = torch.rand(n, 5, generator=gen) * 2 - 1
        with torch.no_grad():
            labels = model(centres).argmax(1)
        return [robustness_property(c, int(k), eps * ACAS_SCALE, num_classes=5, lower=-1.0, upper=1.0)
                for c, k in zip(centres, labels)]
    with torch.no_grad():
        correct = (model(x[:20 * n]).argmax(1) == y[:20 * n]).nonzero().flatten()[:n]
    return [robustness_property(x[i], int(y[i]), eps, num_classes=10) for i in correct.tolist()]


def bound_alone(model: nn.Module, prop: Property, device: torch.device) -> Dict[str, float]:
    case = prop.cases[0]
    start = time.perf_counter()
    lo, hi = rounded_box(case.lower, case.upper, torch.float32, inward=False)
    C, d = _stack(case.conjunctions, torch.float64, device)
    J = C.shape[0]
    with torch.no_grad():
        lb = _lower_bounds(model, lo.to(device).expand(J, *lo.shape), hi.to(device).expand(J, *hi.shape), C, -d,
                           "alpha-crown", False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"verified": bool((lb.amax(1) > 0).all()), "seconds": time.perf_counter() - start}


def bench(name: str, model: nn.Module, props: List[Property], eps: float, timeout: float,
          device: torch.device) -> Dict:
    rows = []
    for prop in props:
        b = bound_alone(model, prop, device)
        out = complete_verify(model, prop, timeout=timeout, device=device)
        rows.append({"bound_verified": b["verified"], "bound_seconds": b["seconds"], "status": out.status,
                     "seconds": out.seconds, "stats": out.stats})
    solved = lambda rows, t: sum(r["status"] in ("sat", "unsat") and r["seconds"] <= t for r in rows)  # noqa: E731
    return {"model": name, "eps": eps, "instances": len(rows),
            "bound": {f"{t:g}s": sum(r["bound_verified"] and r["bound_seconds"] <= t for r in rows) for t in LIMITS},
            "complete": {f"{t:g}s": solved(rows, t) for t in LIMITS if t <= timeout},
            "sat": sum(r["status"] == "sat" for r in rows), "unsat": sum(r["status"] == "unsat" for r in rows),
            "median_seconds": statistics.median(r["seconds"] for r in rows) if rows else None, "rows": rows}


def print_table(results: List[Dict], timeout: float) -> None:
    limits = [f"{t:g}s" for t in LIMITS]
    head = (["model", "eps", "n"] + [f"bound<={t}" for t in limits]
            + [f"complete<={t}" for t in limits if float(t[:-1]) <= timeout] + ["sat", "unsat", "median s"])
    median = lambda r: "-" if r["median_seconds"] is None else f"{r['median_seconds']:.2f}"  # noqa: E731
    body = [[r["model"], f"{r['eps']:g}", str(r["instances"])] + [str(r["bound"][t]) for t in limits]
            + [str(v) for v in r["complete"].values()] + [str(r["sat"]), str(r["unsat"]), median(r)] for r in results]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for b in body:
        print("  ".join(v.ljust(w) for v, w in zip(b, widths)))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--examples", type=int, default=5, help="properties per model and ε (default 5)")
    parser.add_argument("--timeout", type=float, default=10.0, help="complete_verify's timeout (default 10 s)")
    parser.add_argument("--epochs", type=int, default=2, help="IBP training epochs on mnist-5k (0: random weights)")
    parser.add_argument("--train-eps", type=float, default=0.05, help="ε of the IBP training (default 0.05)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.005, 0.01, 0.02], help="ε of the properties")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_verify.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    train_set, test_set = load_dataset("mnist-5k")
    results = []
    for name in args.models:
        model = MODELS[name]()
        if name != "acas-like" and args.epochs:
            # the CNN is trained normally: this short IBP recipe collapses it from a standard init
            model = train(model, *train_set.tensors, args.epochs, 0.0 if name == "tutorial-cnn" else args.train_eps)
        model = model.to(device).eval()
        x, y = (t.to(device) for t in test_set.tensors)
        for eps in args.eps:
            props = properties(name, model, x.cpu(), y.cpu(), eps, args.examples)
            results.append(bench(name, model, props, eps, args.timeout, device))
            print(f"{name} eps={eps:g}: {results[-1]['sat']} sat, {results[-1]['unsat']} unsat of "
                  f"{results[-1]['instances']}", flush=True)
    print_table(results, args.timeout)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "complete_verify", "device": str(device), "timeout": args.timeout,
              "examples": args.examples, "epochs": args.epochs, "train_eps": args.train_eps,
              "spec_bounds": hasattr(pyibp.bounds, "spec_bounds"), "torch": torch.__version__,
              "pyibp": pyibp.__version__, "python": platform.python_version(), "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
