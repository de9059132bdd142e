"""``pyibp reproduce``: the tutorial's chapter 4 experiment end to end, its tables beside ours."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, Set

from .common import (CLIError, Output, checked, common_options, count, data_options, folder_checked, format_table, pct,
                     positive, torch_device)

__all__ = ["add_parser", "run"]


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Adds the subcommand to the ``pyibp`` parser (``command`` makes its sub-parser)."""
    p = command("reproduce", "the tutorial's chapter 4 experiment, end to end",
                "Trains a standard CNN, a PGD-trained CNN and an IBP-trained CNN with pyibp's defaults, evaluates\n"
                "them by FGSM, PGD-40, PGD-40 with a smaller step, randomised PGD with restarts, IBP and CROWN-IBP\n"
                "verification, and prints the tutorial's tables with its published numbers (MNIST) beside ours.\n"
                "--tutorial-recipe also re-runs the tutorial's own recipes (SGD lr 0.1, per-epoch ε list) on the\n"
                "same data. Runs go to OUT/<name>; the tables to OUT/reproduce.json.")
    p.add_argument("--quick", action="store_true", help="short budgets (about 15 minutes on 2 CPU cores)")
    p.add_argument("--tutorial-recipe", action="store_true", help="also run the tutorial's recipes as published")
    from ..runs import REPRODUCE_CERTIFIED
    from ..training import method_class, method_names
    p.add_argument("--certified-method", choices=[m for m in method_names() if method_class(m).certified],
                   default=REPRODUCE_CERTIFIED,
                   help=f"certified training method (default: {REPRODUCE_CERTIFIED} with its own defaults, also with "
                        "--quick)")
    p.add_argument("--out", default="runs/reproduce", help="folder of the runs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue (or reuse) the runs already in OUT")
    mode.add_argument("--overwrite", action="store_true", help="start the runs in OUT over")
    p.add_argument("--eps", type=positive, default=0.1, help="ε")
    p.add_argument("--restarts", type=count(1), help="restarts of randomised PGD (default: 10; 3 with --quick)")
    p.add_argument("--autoattack-examples", type=count(0),
                   help="AutoAttack (standard) on the first N test images (default: all; 100 with --quick; "
                        "0 skips the row); on fewer than all, PGD-40's error on the same images is shown beside it")
    p.add_argument("--epochs", type=count(1), help="epochs of every run (for smoke tests)")
    p.add_argument("--train-subset", type=count(1), help="train on this many examples (for smoke tests)")
    p.add_argument("--test-subset", type=count(1), help="evaluate on this many test examples")
    data_options(p, with_dataset=True)
    common_options(p, seed_help="seed of every run and attack")


# The tutorial's numbers ("Adversarial Robustness: Theory and Practice", chapter 4; full MNIST,
# 60,000 training / 10,000 test images), test error in %. "~" marks a value the text gives only
# roughly; rows the tutorial does not report are left out.
PUBLISHED: Dict[str, Dict[str, str]] = {
    "standard": {"clean": "~1%", "pgd40": "~100%", "ibp": "~100%"},
    "pgd": {"clean": "0.85%", "pgd40": "2.83%"},
    "certified": {"clean": "5.15%", "pgd40": "7.79%", "ibp": "9.67%"},
}
ROWS = (("clean", "clean"), ("fgsm", "FGSM"), ("pgd40", "PGD-40, α = ε/10"),
        ("pgd40_small", "PGD-40, smaller step α = ε/40"), ("pgd40_random", "PGD-40, random start, restarts"),
        ("pgd40_autoattack_examples", "PGD-40, α = ε/10, on AutoAttack's images"),
        ("autoattack", "AutoAttack (standard)"), ("ibp", "IBP-verified"), ("crown-ibp", "CROWN-IBP-verified"))
MODEL_TITLES = {"standard": "standard CNN", "pgd": "PGD-trained CNN", "certified": "certified-trained CNN"}

# The tutorial's recipes as published: plain SGD at lr 0.1, batch 100, no random start, no IBP
# initialisation; standard and PGD training for 10 epochs with lr 0.01 from epoch 6 on (its
# ``if t == 4``); PGD training with its pgd_linf defaults (20 steps of 0.01); IBP training on the
# pure robust loss (κ = 0) with its per-epoch ε list, at a constant lr (its lr change is commented out).
TUTORIAL_EPS_LIST = (0.0, 0.0001, 0.001, 0.01, 0.01, 0.05, 0.05, 0.05, 0.05, 0.05) + (0.1,) * 15
_TUTORIAL_SGD = dict(optimizer="sgd", lr=0.1, momentum=0.0, batch_size=100, grad_clip=None, ibp_init=False,
                     reg_weight=0.0)
TUTORIAL_RECIPES: Dict[str, Dict[str, Any]] = {
    "standard": dict(method="standard", epochs=10, lr_schedule="step", lr_decay_at=(0.5,), lr_decay=0.1,
                     **_TUTORIAL_SGD),
    "pgd": dict(method="pgd", epochs=10, lr_schedule="step", lr_decay_at=(0.5,), lr_decay=0.1, attack_steps=20,
                attack_alpha=0.01, attack_random_start=False, **_TUTORIAL_SGD),
    "certified": dict(method="ibp", epochs=len(TUTORIAL_EPS_LIST), lr_schedule="constant", eps_list=TUTORIAL_EPS_LIST,
                      kappa_start=0.0, kappa_end=0.0, **_TUTORIAL_SGD),
}
# --quick: budgets that fit `make demo` (about 15 minutes on 2 CPU cores for all of reproduce).
QUICK: Dict[str, Dict[str, Any]] = {
    "standard": dict(epochs=8),
    "pgd": dict(epochs=12, attack_steps=7),
    "certified": dict(epochs=25),      # ibp and crown-ibp; REPRODUCE_CERTIFIED keeps its defaults (30 epochs)
}
QUICK_TARGETS = (  # (model, row, bound in %) on mnist-5k at ε = 0.1: what --quick must reach
    ("certified", "ibp", 15.0), ("certified", "clean", 8.0), ("pgd", "clean", 5.0), ("pgd", "pgd40", 12.0))


def _reproduce_configs(args: argparse.Namespace):
    from ..runs import REPRODUCE_CERTIFIED, TrainConfig
    common = dict(dataset=args.dataset, eps=args.eps, seed=args.seed, train_subset=args.train_subset,
                  test_subset=args.test_subset, eval_pgd_steps=0)  # the attacks of the table replace it
    if args.epochs is not None:
        common["epochs"] = args.epochs
    methods = {"standard": "standard", "pgd": "pgd", "certified": args.certified_method}
    runs = {}
    for kind, method in methods.items():
        budget = QUICK[kind] if args.quick and method != REPRODUCE_CERTIFIED else {}
        runs[kind] = ("pyibp", method, TrainConfig.for_method(method, **{**budget, **common}))
        if args.tutorial_recipe:
            recipe = dict(TUTORIAL_RECIPES[kind])
            recipe_method = recipe.pop("method")
            runs[f"tutorial-{kind}"] = ("tutorial", f"tutorial-{recipe_method}",
                                        TrainConfig.for_method(recipe_method, **{**recipe, **common}))
    return runs


def _evaluate_all(model, test, eps: float, restarts: int, seed: int, device, quiet: bool,
                  log: Callable[[str], None], autoattack_examples: int) -> Dict[str, float]:
    """Every row of the tutorial's table for one model (errors as fractions). AutoAttack on fewer
    than all test images comes with PGD-40's error on the same images (like with like)."""
    import torch
    from ..attacks import FGSM, PGD, autoattack
    from ..data import loader
    from ..evaluation import evaluate, verify
    from ..runs import eval_batch_size
    batches = loader(test, eval_batch_size(device))
    attacks = {
        "fgsm": FGSM(model, eps),
        "pgd40": PGD(model, eps, alpha=eps / 10, steps=40, random_start=False),
        "pgd40_small": PGD(model, eps, alpha=eps / 40, steps=40, random_start=False),
        "pgd40_random": PGD(model, eps, alpha=eps / 10, steps=40, restarts=restarts, random_start=True,
                            generator=torch.Generator(device).manual_seed(seed)),
    }
    results: Dict[str, float] = {}
    n = min(autoattack_examples, len(test))
    for key, attack in attacks.items():
        start = time.perf_counter()
        r = evaluate(model, batches, attack=attack, device=device, quiet=quiet, return_correct=key == "pgd40")
        results["clean"], results[key] = r["error"], r["adv_error"]
        log(f"  {key:<13} {100 * r['adv_error']:6.2f}%  ({time.perf_counter() - start:.1f}s)")
        if key == "pgd40" and 0 < n < len(test):
            results["pgd40_autoattack_examples"] = 1 - r["adv_correct"][:n].double().mean().item()
    if n:
        start = time.perf_counter()
        x, y = (t[:n] for t in test.tensors)
        results["autoattack"] = autoattack(model.eval(), x, y, eps, seed=seed,
                                           batch_size=eval_batch_size(device)).robust_error
        log(f"  {'autoattack':<13} {100 * results['autoattack']:6.2f}%  ({time.perf_counter() - start:.1f}s, "
            f"{len(y)} images)")
    for method in ("ibp", "crown-ibp"):
        start = time.perf_counter()
        results[method] = verify(model, batches, eps, method=method, device=device, quiet=quiet).verified_error
        log(f"  {method:<13} {100 * results[method]:6.2f}%  ({time.perf_counter() - start:.1f}s)")
    return results


def run(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    """Runs ``pyibp reproduce``; returns the exit code."""
    from ..runs import (CHECKPOINT, check_run_folder, load_checkpoint, load_data, load_run, locked,
                         prepare_run_folder, read_config, train_run, write_json)
    device = torch_device(args.device)
    root = Path(args.out)
    restarts = args.restarts or (3 if args.quick else 10)
    autoattack_examples = args.autoattack_examples
    if autoattack_examples is None:
        autoattack_examples = 100 if args.quick else 10 ** 9
    runs = _reproduce_configs(args)
    for name, (_, _, config) in runs.items():  # refuse before training anything
        folder = root / name
        folder_checked(lambda: check_run_folder(folder, resume=args.resume, overwrite=args.overwrite))
        if args.resume and (folder / "config.json").exists() and read_config(folder) != config:
            raise CLIError(f"{folder} holds a run of another recipe than this reproduce's; start it over with "
                           "--overwrite")
    started = time.perf_counter()
    # Every run shares the data set and its subsets.
    data = checked(lambda: load_data(next(iter(runs.values()))[2], data_dir=args.data_dir, download=args.download,
                                     device=device))
    test = data[1]
    report: Dict[str, Any] = {"dataset": args.dataset, "train_examples": len(data[0]), "test_examples": len(test),
                              "eps": args.eps, "quick": args.quick, "device": str(device), "restarts": restarts,
                              "autoattack_examples": min(autoattack_examples, len(test)),
                              "runs": {}}
    for name, (source, label, config) in runs.items():
        with locked(root / name) as folder:   # one writer from preparing the folder to the last epoch
            prepare_run_folder(folder, config, resume=args.resume, overwrite=args.overwrite)
            done = (folder / CHECKPOINT).exists() and load_checkpoint(folder / CHECKPOINT)["epoch"] >= config.epochs
            out.progress(f"[{time.perf_counter() - started:5.0f}s] {name}: {label}, {config.epochs} epochs"
                         + (" (trained already)" if done else ""))
            start = time.perf_counter()
            records = train_run(folder, device=device, data=data, quiet=args.quiet,
                                log=lambda line: out.progress("  " + line))
        train_seconds = time.perf_counter() - start
        _, model, _ = load_run(folder, device)
        out.progress(f"[{time.perf_counter() - started:5.0f}s] {name}: evaluating on {len(test)} test images")
        start = time.perf_counter()
        results = _evaluate_all(model, test, args.eps, restarts, args.seed, device, args.quiet, out.progress,
                                autoattack_examples)
        report["runs"][name] = {"source": source, "method": config.method, "config": config.to_json(),
                                "results": results, "train_seconds": train_seconds,
                                "eval_seconds": time.perf_counter() - start,
                                "epochs": records[-1]["epoch"] if records else 0}
    report["seconds"] = time.perf_counter() - started
    report["published"] = PUBLISHED
    _print_reproduce(report, args, out)   # the tables first: a failing write loses nothing
    out.result(report)
    write_json(root / "reproduce.json", report)
    return 0


def _print_reproduce(report: Dict[str, Any], args: argparse.Namespace, out: Output) -> None:
    data = f"{report['dataset']}, {report['test_examples']} test images"
    for kind, title in MODEL_TITLES.items():
        ours = report["runs"][kind]
        recipe = report["runs"].get(f"tutorial-{kind}")
        headers = ["test error at ε = %g" % report["eps"], "published (tutorial, MNIST)"]
        if recipe:
            headers.append(f"tutorial recipe ({data})")
        headers.append(f"pyibp {ours['method']} defaults{' --quick' if report['quick'] else ''} ({data})")
        rows = []
        for key, row_title in ROWS:
            if key == "pgd40_random":
                row_title = f"PGD-40, random start, {report['restarts']} restarts"
            n = report.get("autoattack_examples", 0)
            if key == "pgd40_autoattack_examples":
                if not 0 < n < report["test_examples"]:
                    continue
                row_title = f"PGD-40, α = ε/10, first {n} images (AutoAttack's)"
            if key == "autoattack":
                if not n:
                    continue
                if n < report["test_examples"]:
                    row_title = f"AutoAttack (standard), first {n} images"
            row = [row_title, PUBLISHED[kind].get(key)]
            if recipe:
                row.append(pct(recipe["results"][key]))
            row.append(pct(ours["results"][key]))
            rows.append(row)
        name = title if kind != "certified" else f"{ours['method'].upper()}-trained CNN"
        out.show("\n" + format_table(headers, rows, title=name))
    timing = ", ".join(f"{n} {r['train_seconds']:.0f}s + {r['eval_seconds']:.0f}s" for n, r in report["runs"].items())
    out.show(f"\ntime (train + evaluate): {timing}; total {report['seconds']:.0f}s on {report['device']}")
    if report["dataset"] == "mnist-5k" and report["eps"] == 0.1 and report["test_examples"] == 1000:
        checks = []
        for kind, key, bound in QUICK_TARGETS:
            value = 100 * report["runs"][kind]["results"][key]
            checks.append(f"{MODEL_TITLES[kind]} {key} {value:.2f}% {'<=' if value <= bound else '>'} {bound:g}%")
        out.show("quality targets of --quick: " + "; ".join(checks))
    out.show(f"runs and reproduce.json in {args.out}")

