"""Branch and bound (pyibp.verifier.bab) against alpha-CROWN alone on a small MNIST MLP.

Trains a ReLU MLP on mnist-5k (seeded, a few epochs of Adam; no download), then for each eps and
each of the first test examples the model classifies correctly asks whether some x in
``[x - eps, x + eps] ∩ [0, 1]`` has ``f_y(x) <= f_j(x)`` for some j != y:

* alpha-CROWN: every margin ``f_y - f_j`` bounded > 0 by ``spec_bounds(method="alpha-crown")``;
* BaB: the margins alpha-CROWN leaves open, one :func:`relu_split_bab` each (one row ``e_y - e_j``,
  d = 0), worst first, within one time budget per example: verified when every one is ``unsat``,
  falsified when one is ``sat``.

Prints a table per eps and writes JSON.

    python benchmarks/bench_bab.py [--eps 0.02 0.04] [--examples 20] [--timeout 10] [--hidden 100 100]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_json  # noqa: E402
from pyibp.bounds import spec_bounds  # noqa: E402
from pyibp.data import mnist5k  # noqa: E402
from pyibp.verifier.bab import relu_split_bab  # noqa: E402


def train_mlp(hidden, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers, width = [nn.Flatten()], 784
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, 10))
    train, _ = mnist5k()
    x, y = train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def verify_example(model: nn.Module, x: torch.Tensor, y: int, eps: float, timeout: float) -> dict:
    began = time.monotonic()
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    others = [j for j in range(10) if j != y]
    C = torch.zeros(len(others), 10)
    C[:, y] = 1.0
    C[torch.arange(len(others)), others] = -1.0
    alpha = spec_bounds(model, lo, hi, C, method="alpha-crown")[0]
    alpha_seconds = time.monotonic() - began
    row = {"alpha": bool((alpha > 0).all()), "alpha_s": alpha_seconds, "bab": "verified", "domains": 0}
    for k in alpha.argsort().tolist():
        if alpha[k] > 0:
            continue
        out = relu_split_bab(model, lo, hi, C[k:k + 1], torch.zeros(1), deadline=began + timeout)
        row["domains"] += out.domains
        if out.status == "sat":
            row["bab"] = "falsified"
            break
        if out.status != "unsat":
            row["bab"] = out.status
            break
    row["bab_s"] = time.monotonic() - began
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.04])
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", default="benchmarks/results/bench_bab.json")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = train_mlp(args.hidden, args.epochs)
    _, test = mnist5k()
    xs, ys = test.tensors
    with torch.no_grad():
        correct = (model(xs).argmax(1) == ys).nonzero()[:, 0][:args.examples]
    print(f"MLP 784-{'-'.join(map(str, args.hidden))}-10, clean accuracy "
          f"{float((model(xs).argmax(1) == ys).float().mean()):.3f}; {len(correct)} examples, {args.timeout} s each")
    rows, records = [], []
    for eps in args.eps:
        results = [verify_example(model, xs[i:i + 1], int(ys[i]), eps, args.timeout) for i in correct.tolist()]
        records.append({"eps": eps, "examples": results})
        count = lambda key, value: sum(r[key] == value for r in results)  # noqa: E731
        rows.append({"eps": eps, "examples": len(results), "alpha-crown verified": count("alpha", True),
                     "bab verified": count("bab", "verified"), "bab falsified": count("bab", "falsified"),
                     "bab open": len(results) - count("bab", "verified") - count("bab", "falsified"),
                     "alpha s/ex": sum(r["alpha_s"] for r in results) / len(results),
                     "bab s/ex": sum(r["bab_s"] for r in results) / len(results),
                     "domains": sum(r["domains"] for r in results)})
    print_table(rows, list(rows[0]))
    write_json(args.json, {"hidden": args.hidden, "timeout": args.timeout, "table": rows, "runs": records})


if __name__ == "__main__":
    main()
