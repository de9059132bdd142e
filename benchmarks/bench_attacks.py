"""PGD-40 and AutoAttack on the tutorial CNN: pyibp against a tutorial loop, torchattacks, the original and the floor.

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

AutoAttack (standard, l∞, ε=0.1, on the CPU): :func:`pyibp.autoattack` and the original AutoAttack
(fra31/auto-attack, ``version="standard"``, from its own source: ``--original PATH`` names a
checkout, the folder holding the ``autoattack`` package; without it that row is skipped and says
so) one after the other on the same examples of tutorial CNNs trained here on mnist-5k: one
standard epoch, then ``--aa-epochs`` of PGD-10 (``pgd``) or FGSM (``fgsm``) adversarial training
(ε=0.1, Adam), or ``--aa-ibp-epochs`` of IBP training (``ibp``, where pyibp's sound
pre-certification spares most examples the cascade). Per attack of the cascade (APGD-CE, APGD-T,
FAB-T, Square): examples attacked and broken, seconds of pyibp and of the original, and the
floor: the examples pyibp attacked times the original's iteration counts times the cost of one
step measured here on them (forward + input-only backward for APGD, plus FAB's forward check
of each iterate, one forward per Square query), as if no example broke. The per-attack seconds
are CPU seconds of this process (``time.process_time``; one thread): on a shared machine they
count this run's work only, where wall-clock seconds count the other jobs too (both totals are
printed). ``--aa-full`` adds pyibp with ``skip_verified=False`` (every example attacked, as the
original does).

Usage:
    python benchmarks/bench_attacks.py [--device cpu|cuda|all] [--repeats 5] [--quick] [--out PATH]
                                       [--aa-examples 100] [--aa-epochs 2] [--aa-ibp-epochs 8]
                                       [--aa-models pgd ibp] [--aa-full] [--original PATH] [--no-autoattack]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

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


def _adversarially_trained_cnn(method, epochs: int) -> nn.Module:
    """The tutorial CNN after one standard epoch and ``epochs`` of training with ``method`` (a
    pyibp.training method object) on mnist-5k with Adam (lr 1e-3), seeded; in eval mode."""
    from pyibp.data import loader, mnist5k
    from pyibp.training import Standard, train_epoch

    torch.manual_seed(0)
    train, _ = mnist5k()
    model = tutorial_cnn()
    batches = loader(train, 100, shuffle=True, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_epoch(model, Standard(), batches, opt, quiet=True)
    for _ in range(epochs):
        train_epoch(model, method, batches, opt, quiet=True, generator=torch.Generator().manual_seed(0))
    return model.eval()


def fgsm_trained_cnn(epochs: int, eps: float) -> nn.Module:
    """FGSM training (random start, step 1.25 eps): see :func:`_adversarially_trained_cnn`."""
    from pyibp.training import FGSMTraining
    return _adversarially_trained_cnn(FGSMTraining(eps), epochs)


def pgd_trained_cnn(epochs: int, eps: float) -> nn.Module:
    """PGD-10 training (random start, step eps / 4): see :func:`_adversarially_trained_cnn`."""
    from pyibp.training import PGDTraining
    return _adversarially_trained_cnn(PGDTraining(eps, alpha=eps / 4, steps=10), epochs)


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


TRAINED = {"pgd": pgd_trained_cnn, "fgsm": fgsm_trained_cnn, "ibp": ibp_trained_cnn}


def import_original(path: Optional[Path]):
    """The original AutoAttack class from the checkout ``path`` (the folder holding its
    ``autoattack`` package); ``(None, why)`` when it is not there."""
    if path is None:
        return None, "not given (--original PATH, a checkout of fra31/auto-attack): skipped"
    if not (path / "autoattack" / "__init__.py").is_file():
        return None, f"{path} holds no autoattack/__init__.py (a checkout of fra31/auto-attack): skipped"
    sys.path.insert(0, str(path))
    try:
        from autoattack import AutoAttack
    except ImportError as err:
        return None, f"importing autoattack from {path} failed ({err}): skipped"
    finally:
        sys.path.remove(str(path))
    return AutoAttack, "measured"


def run_original(AutoAttack, model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Dict[str, object]:
    """The original's standard cascade on (x, y), each attack's seconds taken by wrapping its
    ``perturb`` (the original does not report them)."""
    attack = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=0, verbose=False, device=x.device)
    seconds: Dict[str, float] = {}

    def timed(obj, name_of: Callable[[], str]) -> None:
        perturb = obj.perturb

        def run(*args, **kwargs):
            start = time.process_time()
            try:
                return perturb(*args, **kwargs)
            finally:
                name = name_of()
                seconds[name] = seconds.get(name, 0.0) + time.process_time() - start
        obj.perturb = run

    timed(attack.apgd, lambda: "apgd-" + attack.apgd.loss)
    timed(attack.apgd_targeted, lambda: "apgd-t")
    timed(attack.fab, lambda: "fab-t" if attack.fab.targeted else "fab")
    timed(attack.square, lambda: "square")
    start, cpu = time.perf_counter(), time.process_time()
    x_adv = attack.run_standard_evaluation(x, y, bs=len(y))
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    with torch.no_grad():
        error = (model(x_adv).argmax(1) != y).float().mean().item()
    return {"seconds": total, "cpu_seconds": cpu, "robust_error": error, "per_attack_cpu_seconds": seconds}


@contextlib.contextmanager
def cpu_clock() -> Iterator[None]:
    """pyibp.autoattack's per-attack seconds read the CPU time of this process instead of the
    wall clock (its module's ``time`` swapped for the while): on a shared machine they then
    count this process's work only, like the original's timed here."""
    module = importlib.import_module("pyibp.attacks.autoattack")
    saved = module.time
    module.time = types.SimpleNamespace(perf_counter=time.process_time)
    try:
        yield
    finally:
        module.time = saved


def step_seconds(model: nn.Module, x: Tensor, y: Tensor, repeats: int = 5) -> Dict[str, float]:
    """Median CPU seconds of one forward + input-only backward (``grad``) and of one forward
    (``forward``) of the model on (x, y)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    grad, forward = [], []
    try:
        for _ in range(repeats):
            delta = torch.zeros_like(x, requires_grad=True)
            start = time.process_time()
            torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
            grad.append(time.process_time() - start)
            start = time.process_time()
            with torch.no_grad():
                model(x)
            forward.append(time.process_time() - start)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {"grad": statistics.median(grad), "forward": statistics.median(forward)}


def floor_seconds(name: str, step: Dict[str, float], steps: int = 100, targets: int = 9, queries: int = 5000) -> float:
    """What the attack ``name`` must spend on its examples at the original's iteration counts,
    were none of them broken: one step's cost (``step``, on those examples) times the steps."""
    per_run = {"apgd-ce": (1, step["grad"]), "apgd-t": (targets, step["grad"]),
               "fab-t": (targets, step["grad"] + step["forward"])}
    if name == "square":
        return queries * step["forward"]
    runs, cost = per_run[name]
    return runs * steps * cost


def bench_autoattack(examples: int, epochs: int, eps: float = EPS, training: str = "pgd",
                     original: Optional[Path] = None, full: bool = False) -> Dict[str, object]:
    """pyibp.autoattack and the original AutoAttack, standard l∞, on one model and the same
    examples, one after the other, with each attack's seconds and floor."""
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
    for name, skip in (("pyibp", True), ("pyibp (all attacked)", False))[:2 if full else 1]:
        start, cpu = time.perf_counter(), time.process_time()
        with cpu_clock():
            result = pyibp.autoattack(model, x, y, eps, skip_verified=skip)
        runs[name] = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                      "robust_error": robust_error(x + result.delta),
                      "per_attack": result.report()["attacks"], "verified": int(result.verified.sum()),
                      "verification_seconds": result.verification_seconds}
    AutoAttack, status = import_original(original)
    if AutoAttack is not None:
        runs["original"] = run_original(AutoAttack, model, x, y, eps)
    # The floor on as many examples as pyibp attacked with each attack (a step's cost depends on
    # how many rows, not which).
    floors = {r["name"]: floor_seconds(r["name"], step_seconds(model, x[:r["attacked"]], y[:r["attacked"]]))
              if r["attacked"] else 0.0 for r in runs["pyibp"]["per_attack"]}
    out: Dict[str, object] = {"training": training, "examples": examples, "eps": eps, "train_epochs": epochs,
                              "train_seconds": train_seconds, "clean_error": clean, "runs": runs,
                              "floor_seconds": floors, "original": status}
    if "original" in runs:
        out["ratios"] = {"original/pyibp seconds": runs["original"]["seconds"] / runs["pyibp"]["seconds"],
                         "original/pyibp cpu seconds": runs["original"]["cpu_seconds"] / runs["pyibp"]["cpu_seconds"],
                         "pyibp - original robust error (points)":
                             100 * (runs["pyibp"]["robust_error"] - runs["original"]["robust_error"])}
    return out


def print_autoattack(r: Dict[str, object]) -> None:
    trained = {"pgd": f"1 + {r['train_epochs']} epochs of PGD-10 training",
               "fgsm": f"1 + {r['train_epochs']} epochs of FGSM training",
               "ibp": f"{r['train_epochs']} epochs of IBP training"}[r["training"]]
    print(f"\nAutoAttack standard (l∞, eps={r['eps']}) on tutorial_cnn after {trained}, {r['examples']} mnist-5k "
          f"test images, cpu, {torch.get_num_threads()} threads; clean error {100 * r['clean_error']:.1f}%")
    header = f"{'method':<22}{'robust error (%)':>18}{'seconds':>10}{'cpu seconds':>13}"
    print(header)
    print("-" * len(header))
    for name, run in r["runs"].items():
        print(f"{name:<22}{100 * run['robust_error']:>18.1f}{run['seconds']:>10.1f}{run['cpu_seconds']:>13.1f}")
    ours = r["runs"]["pyibp"]
    print(f"  pyibp verified {ours['verified']} examples first (sound IBP + CROWN-IBP, "
          f"{ours['verification_seconds']:.2f} s): not attacked")
    original, full = r["runs"].get("original"), r["runs"].get("pyibp (all attacked)")
    print("  per attack, CPU seconds of this process (the machine may be shared):")
    print(f"  {'attack':<9}{'attacked':>9}{'broken':>8}{'pyibp s':>9}{'floor s':>9}{'pyibp/floor':>12}"
          + (f"{'all attacked s':>15}" if full else "")
          + (f"{'original s':>12}{'original/pyibp':>16}" if original else ""))
    for i, a in enumerate(ours["per_attack"]):
        floor = r["floor_seconds"][a["name"]]
        of_floor = f"{a['seconds'] / floor:.2f}" if floor else "-"      # "-": nothing attacked
        line = f"  {a['name']:<9}{a['attacked']:>9}{a['broken']:>8}{a['seconds']:>9.1f}{floor:>9.1f}{of_floor:>12}"
        if full:
            line += f"{full['per_attack'][i]['seconds']:>15.1f}"
        if original:
            theirs = original["per_attack_cpu_seconds"].get(a["name"], 0.0)
            ratio = f"{theirs / a['seconds']:.2f}" if a["attacked"] and a["seconds"] else "-"   # nothing to attack
            line += f"{theirs:>12.1f}{ratio:>16}"
        print(line)
    if "ratios" in r:
        print("  " + ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items()))
    else:
        print(f"  original AutoAttack: {r['original']}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="'all': the CPU, and CUDA when available (default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (default 5)")
    parser.add_argument("--quick", action="store_true", help="10 steps and 3 repeats: a smoke run")
    parser.add_argument("--steps", type=int, default=40, help="PGD steps (default 40)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_attacks.json")
    parser.add_argument("--aa-examples", type=int, default=100, help="AutoAttack test images (default 100; 50 with --quick)")
    parser.add_argument("--aa-epochs", type=int, default=2,
                        help="PGD / FGSM training epochs of the adversarially trained model (default 2)")
    parser.add_argument("--aa-ibp-epochs", type=int, default=8, help="IBP training epochs of the second model (default 8)")
    parser.add_argument("--aa-models", nargs="+", choices=sorted(TRAINED), default=["pgd", "ibp"],
                        help="the trained models AutoAttack runs on (default: pgd ibp)")
    parser.add_argument("--aa-full", action="store_true",
                        help="also pyibp with skip_verified=False (every example attacked)")
    parser.add_argument("--original", type=Path, default=None,
                        help="a checkout of fra31/auto-attack (the folder holding autoattack/): the original's row")
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
            epochs = args.aa_ibp_epochs if training == "ibp" else args.aa_epochs
            autoattack.append(bench_autoattack(50 if args.quick else args.aa_examples, 1 if args.quick else epochs,
                                               training=training, original=args.original, full=args.aa_full))
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
