"""PGD-40 and AutoAttack on the tutorial CNN: pyibp against a tutorial-style loop, torchattacks, and the floor.

One process, one run. For every device (CPU, and CUDA when present) it times l∞ PGD (ε=0.1,
α=0.01, 40 steps, no random start) on ``pyibp.models.tutorial_cnn()`` with a batch of 100
MNIST-shaped inputs:

* ``tutorial``: the loop of "Adversarial Robustness: Theory and Practice" (``pgd_linf``):
  ``loss.backward()`` with parameter gradients enabled, then separate sign / add / clamp ops
  (plus the clamp onto [0, 1] that the tutorial leaves out, so all methods solve one problem);
* ``pyibp``: :func:`pyibp.attacks.pgd`;
* ``torchattacks``: ``torchattacks.PGD`` when it is importable (skipped otherwise);
* ``floor``: ``steps`` × (forward + input-only backward through ``torch.autograd.grad`` with the
  parameters' requires_grad off), no update at all: what any PGD must at least spend.

Reports the median of ``--repeats`` timed runs after a warm-up round, the methods taking turns
(``torch.cuda.synchronize()`` around each run on CUDA), prints a table with the ratios
tutorial/pyibp and pyibp/floor, and writes JSON (default ``benchmarks/results/bench_attacks.json``).

AutoAttack (standard, l∞, ε=0.1, on the CPU): :func:`pyibp.autoattack` and torchattacks'
``AutoAttack(version="standard")`` side by side on the same examples of tutorial CNNs trained
here on mnist-5k, each run once: one standard epoch, then ``--aa-epochs`` of FGSM adversarial
training (ε=0.1, Adam), and ``--aa-ibp-epochs`` of IBP training (ε=0.1, where pyibp's sound
pre-certification spares most examples the cascade): robust error and seconds, and their ratios. torchattacks is no dependency: install it anywhere
(``pip install --no-deps --target /tmp/ta torchattacks``); the benchmark imports it from the
environment or from ``/tmp/ta`` and says when it is absent. Its AutoAttack takes 10 steps per
APGD/FAB run (the original and pyibp: 100) and rescales Square's schedule, so its numbers are
not the original's.

Usage:
    python benchmarks/bench_attacks.py [--device cpu|cuda|all] [--repeats 5] [--quick] [--out PATH]
                                       [--aa-examples 100] [--aa-epochs 2] [--aa-ibp-epochs 8]
                                       [--aa-models fgsm ibp] [--no-autoattack]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyibp  # noqa: E402
from pyibp.attacks import pgd  # noqa: E402
from pyibp.models import tutorial_cnn  # noqa: E402

EPS, ALPHA, BATCH = 0.1, 0.01, 100
TARGETS = {"tutorial/pyibp (cpu)": ">= 1.3", "pyibp/floor": "<= 1.1"}


def tutorial_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int) -> Tensor:
    """The tutorial's pgd_linf, with the [0, 1] clamp, as people write it."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        loss = nn.CrossEntropyLoss()(model(x + delta), y)
        loss.backward()
        delta.data = (delta + alpha * delta.grad.detach().sign()).clamp(-eps, eps)
        delta.data = torch.min(torch.max(delta.detach(), -x), 1 - x)
        delta.grad.zero_()
    return delta.detach()


def floor_pgd(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    """Only the gradient work: forward and input-only backward, ``steps`` times."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        delta = torch.zeros_like(x, requires_grad=True)
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y, reduction="sum")
            torch.autograd.grad(loss, delta)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


TORCHATTACKS_FOLDER = Path("/tmp/ta")   # where the benchmark's instructions install it


def import_torchattacks():
    """torchattacks from the environment, else from TORCHATTACKS_FOLDER; None when absent."""
    try:
        import torchattacks
        return torchattacks
    except ImportError:
        pass
    if not TORCHATTACKS_FOLDER.is_dir():
        return None
    sys.path.append(str(TORCHATTACKS_FOLDER))
    try:
        import torchattacks
        return torchattacks
    except ImportError:
        return None
    finally:
        sys.path.remove(str(TORCHATTACKS_FOLDER))


def torchattacks_pgd() -> Optional[Callable]:
    torchattacks = import_torchattacks()
    if torchattacks is None:
        return None

    def run(model, x, y, eps, alpha, steps):
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y) - x
    return run


def time_interleaved(methods: Dict[str, Callable[[], object]], model: nn.Module, device: torch.device,
                     repeats: int) -> Dict[str, List[float]]:
    """Seconds per run of every method; the methods take turns, so drifting load hits all alike."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: Dict[str, List[float]] = {name: [] for name in methods}
    for round_ in range(repeats + 1):  # round 0 is the warm-up: allocator, kernels, lazy imports
        for name, fn in methods.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)  # the tutorial loop leaves parameter gradients behind
    return times


def bench_device(device: torch.device, steps: int, repeats: int) -> Dict[str, object]:
    torch.manual_seed(0)
    model = tutorial_cnn().to(device).eval()
    x = torch.rand(BATCH, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    methods: Dict[str, Callable[[], object]] = {
        "tutorial": lambda: tutorial_pgd(model, x, y, EPS, ALPHA, steps),
        "pyibp": lambda: pgd(model, x, y, EPS, alpha=ALPHA, steps=steps),
        "floor": lambda: floor_pgd(model, x, y, steps),
    }
    ta = torchattacks_pgd()
    if ta is not None:
        methods["torchattacks"] = lambda: ta(model, x, y, EPS, ALPHA, steps)
    runs = time_interleaved(methods, model, device, repeats)
    medians = {name: statistics.median(t) for name, t in runs.items()}
    # The two implementations take the same steps; gradients may differ in the last bits (weight
    # gradients on or off change the backward kernels), which can flip a few signs.
    ours, theirs = pgd(model, x, y, EPS, alpha=ALPHA, steps=steps), tutorial_pgd(model, x, y, EPS, ALPHA, steps)
    model.zero_grad(set_to_none=True)
    agree = (ours == theirs).float().mean().item()
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "median_s": medians,
        "min_s": {name: min(t) for name, t in runs.items()},
        "runs_s": runs,
        "ratios": {"tutorial/pyibp": medians["tutorial"] / medians["pyibp"],
                   "pyibp/floor": medians["pyibp"] / medians["floor"],
                   **({"torchattacks/pyibp": medians["torchattacks"] / medians["pyibp"]}
                      if "torchattacks" in medians else {})},
        "delta_agreement_with_tutorial": agree,
        "torchattacks": "measured" if ta is not None else "not installed (skipped)",
    }


def print_table(results: List[Dict[str, object]], steps: int, repeats: int) -> None:
    print(f"\nl∞ PGD-{steps} (eps={EPS}, alpha={ALPHA}) on tutorial_cnn, batch {BATCH} x 1x28x28; "
          f"median of {repeats} interleaved runs after a warm-up")
    header = f"{'device':<8}{'method':<14}{'median (s)':>12}{'per step (ms)':>15}{'vs pyibp':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        med = r["median_s"]
        for name in ("tutorial", "torchattacks", "pyibp", "floor"):
            if name in med:
                print(f"{r['device']:<8}{name:<14}{med[name]:>12.4f}{1e3 * med[name] / steps:>15.2f}"
                      f"{med[name] / med['pyibp']:>9.2f}x")
        ratios = ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items())
        print(f"{'':<8}{ratios}; deltas identical to the tutorial's: "
              f"{100 * r['delta_agreement_with_tutorial']:.2f}%; torchattacks {r['torchattacks']}")
    print("targets: " + ", ".join(f"{k} {v}" for k, v in TARGETS.items()))


def fgsm_trained_cnn(epochs: int, eps: float) -> nn.Module:
    """The tutorial CNN after one standard epoch and ``epochs`` of FGSM training (random start,
    step 1.25 eps) on mnist-5k with Adam (lr 1e-3), seeded; in eval mode."""
    from pyibp.data import loader, mnist5k
    from pyibp.training import FGSMTraining, Standard, train_epoch

    torch.manual_seed(0)
    train, _ = mnist5k()
    model = tutorial_cnn()
    batches = loader(train, 100, shuffle=True, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epoch(model, Standard(), batches, opt, quiet=True)
    for _ in range(epochs):
        train_epoch(model, FGSMTraining(eps), batches, opt, quiet=True, generator=torch.Generator().manual_seed(0))
    return model.eval()


def ibp_trained_cnn(epochs: int, eps: float) -> nn.Module:
    """The tutorial CNN after ``epochs`` of IBP training on mnist-5k (Gowal et al.: ε ramped up and κ
    from 1 down to 0.5 over the first half, Adam lr 1e-3), seeded; in eval mode."""
    from pyibp.data import loader, mnist5k
    from pyibp.training import IBP, train_epoch

    torch.manual_seed(0)
    train, _ = mnist5k()
    model = tutorial_cnn()
    batches = loader(train, 100, shuffle=True, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ramp = 0.5 * epochs * len(batches)
    step = 0
    for _ in range(epochs):
        method = IBP(lambda t: eps * min(1.0, t / ramp), lambda t: max(0.5, 1 - 0.5 * t / ramp))
        _, step = train_epoch(model, method, batches, opt, step=step, quiet=True)
    return model.eval()


TRAINED = {"fgsm": fgsm_trained_cnn, "ibp": ibp_trained_cnn}


def bench_autoattack(examples: int, epochs: int, eps: float = EPS, training: str = "fgsm") -> Dict[str, object]:
    """pyibp.autoattack and torchattacks.AutoAttack, standard l∞, on one model and the same examples."""
    from pyibp.data import mnist5k

    start = time.perf_counter()
    model = TRAINED[training](epochs, eps)
    train_seconds = time.perf_counter() - start
    test = mnist5k()[1].tensors
    chosen = torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(0))[:examples]  # all classes
    x, y = test[0][chosen], test[1][chosen]

    def robust_error(x_adv: Tensor) -> float:
        with torch.no_grad():
            return (model(x_adv).argmax(1) != y).float().mean().item()

    with torch.no_grad():
        clean = (model(x).argmax(1) != y).float().mean().item()
    runs: Dict[str, Dict[str, object]] = {}
    start = time.perf_counter()
    result = pyibp.autoattack(model, x, y, eps)
    runs["pyibp"] = {"seconds": time.perf_counter() - start, "robust_error": robust_error(x + result.delta),
                     "per_attack": result.report()["attacks"], "verified": int(result.verified.sum()),
                     "verification_seconds": result.verification_seconds}
    torchattacks = import_torchattacks()
    if torchattacks is not None:
        attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
        start = time.perf_counter()
        x_adv = attack(x, y)
        runs["torchattacks"] = {"seconds": time.perf_counter() - start, "robust_error": robust_error(x_adv),
                                "version": getattr(torchattacks, "__version__", "?")}
    out: Dict[str, object] = {"training": training, "examples": examples, "eps": eps, "train_epochs": epochs,
                              "train_seconds": train_seconds, "clean_error": clean, "runs": runs,
                              "torchattacks": "measured" if torchattacks is not None else
                              f"not installed (import failed, nor found in {TORCHATTACKS_FOLDER}): skipped"}
    if "torchattacks" in runs:
        out["ratios"] = {"torchattacks/pyibp seconds": runs["torchattacks"]["seconds"] / runs["pyibp"]["seconds"],
                         "pyibp - torchattacks robust error (points)":
                             100 * (runs["pyibp"]["robust_error"] - runs["torchattacks"]["robust_error"])}
    return out


def print_autoattack(r: Dict[str, object]) -> None:
    trained = (f"1 + {r['train_epochs']} epochs of FGSM training" if r["training"] == "fgsm"
               else f"{r['train_epochs']} epochs of IBP training")
    print(f"\nAutoAttack standard (l∞, eps={r['eps']}) on tutorial_cnn after {trained}, {r['examples']} mnist-5k "
          f"test images, cpu; clean error {100 * r['clean_error']:.1f}%")
    header = f"{'method':<14}{'robust error (%)':>18}{'seconds':>10}"
    print(header)
    print("-" * len(header))
    for name, run in r["runs"].items():
        print(f"{name:<14}{100 * run['robust_error']:>18.1f}{run['seconds']:>10.1f}")
    print(f"  pyibp verified {r['runs']['pyibp']['verified']} examples first (sound IBP + CROWN-IBP, "
          f"{r['runs']['pyibp']['verification_seconds']:.2f} s): not attacked")
    for a in r["runs"]["pyibp"]["per_attack"]:
        print(f"  pyibp {a['name']:<8} broke {a['broken']:>4} of {a['attacked']:>4}   robust error after "
              f"{100 * a['robust_error']:5.1f}%   {a['seconds']:7.1f} s")
    if "ratios" in r:
        print("  " + ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items()))
    else:
        print(f"  torchattacks {r['torchattacks']}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="'all': the CPU, and CUDA when available (default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (default 5)")
    parser.add_argument("--quick", action="store_true", help="10 steps and 3 repeats: a smoke run")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (default 40)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_attacks.json")
    parser.add_argument("--aa-examples", type=int, default=100, help="AutoAttack test images (default 100; 50 with --quick)")
    parser.add_argument("--aa-epochs", type=int, default=2, help="FGSM training epochs of the AutoAttack model (default 2)")
    parser.add_argument("--aa-ibp-epochs", type=int, default=8, help="IBP training epochs of the second model (default 8)")
    parser.add_argument("--aa-models", nargs="+", choices=sorted(TRAINED), default=["fgsm", "ibp"],
                        help="the trained models AutoAttack runs on (default: fgsm ibp)")
    parser.add_argument("--no-autoattack", action="store_true", help="only the PGD timings")
    args = parser.parse_args(argv)
    steps, repeats = (10, 3) if args.quick else (args.steps, args.repeats)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    results = [bench_device(d, steps, repeats) for d in devices]
    print_table(results, steps, repeats)
    autoattack = None
    if not args.no_autoattack:
        autoattack = []
        for training in args.aa_models:
            epochs = args.aa_epochs if training == "fgsm" else args.aa_ibp_epochs
            autoattack.append(bench_autoattack(50 if args.quick else args.aa_examples, 1 if args.quick else epochs,
                                               training=training))
            print_autoattack(autoattack[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "pgd_linf", "model": "tutorial_cnn", "batch": BATCH, "eps": EPS, "alpha": ALPHA,
              "steps": steps, "repeats": repeats, "quick": args.quick, "torch": torch.__version__,
              "pyibp": pyibp.__version__, "python": platform.python_version(), "targets": TARGETS,
              "results": results, "autoattack": autoattack}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
