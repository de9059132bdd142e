"""Wires the subcommands into one parser and runs them: ``main`` is the ``pyibp`` command."""
from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Optional, Sequence, Set

from . import bench, certify, export, landscape, reproduce, train, verify
from . import eval as evaluate   # the module of `pyibp eval` (not the builtin)
from ..distributed import launched_by_torchrun
from ..runs import RunFolderError
from ..training import ScheduleWarning
from .common import EXIT_USAGE, PROG, CLIError, Formatter, Output, Parser

__all__ = ["main", "build_parser", "COMMANDS"]

# Each subcommand's module: add_parser(command) and run(args, out, explicit) -> exit code.
COMMANDS = {"train": train, "eval": evaluate, "certify": certify, "landscape": landscape, "bench": bench,
            "reproduce": reproduce, "verify": verify, "export": export}
DESCRIPTION = ("The ``pyibp`` command: train, attack, certify, plot and reproduce, verify ONNX networks and "
               "export runs to ONNX, from a shell.")


def build_parser() -> argparse.ArgumentParser:
    """The ``pyibp`` argument parser with its subcommands."""
    from .. import __version__
    parser = Parser(prog=PROG, formatter_class=Formatter, allow_abbrev=False,
                    description=DESCRIPTION + "\n\nRun `pyibp COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"pyibp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def command(name: str, help: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=Formatter,
                              allow_abbrev=False)

    for module in COMMANDS.values():
        module.add_parser(command)
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


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, ``kill``): stops the command as Ctrl-C does."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``pyibp`` command line; returns the exit code (0 ok, 2 a one-line error, 130/143
    interrupted by SIGINT/SIGTERM; ``bench`` returns 1 when a benchmark failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = _explicit_options(_subparser(parser, args.command), argv)
    out = Output(args.quiet, args.json)
    prog = f"{PROG} {args.command}"
    resumable = args.command in ("train", "reproduce")
    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(prog, warnings.showwarning)
            if args.command != "train" and launched_by_torchrun():
                raise CLIError("only `pyibp train` runs under torchrun; run this command as one process")
            return COMMANDS[args.command].run(args, out, explicit)
    except (CLIError, RunFolderError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as err:
        # DatasetNotFoundError is a FileNotFoundError whose message names the folder; pyibp's
        # ValueErrors name the bad argument and its value.
        print(f"{prog}: error: {err}", file=sys.stderr)
    except ModuleNotFoundError as err:
        print(f"{prog}: error: {err} (a dependency of this command is missing)", file=sys.stderr)
    except OSError as err:   # a read-only folder, a full disk, a file without permission: in one line
        print(f"{prog}: error: {_os_error(err)}", file=sys.stderr)
    except KeyboardInterrupt as interrupt:
        how = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"{prog}: {how}" + ("; continue with --resume" if resumable else ""), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_USAGE


def _os_error(err: OSError) -> str:
    what = f"{err.strerror or err}"
    if err.filename is None:
        return what
    if err.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {err.filename}: {what}"
    return f"{err.filename}: {what}"


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _one_line_warnings(prog: str, show: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` printing pyibp's own warnings as one ``prog: warning:`` line."""
    def shown(message: Warning, category: type, filename: str, lineno: int, file: Any = None,
              line: Optional[str] = None) -> None:
        if issubclass(category, ScheduleWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        else:
            show(message, category, filename, lineno, file, line)
    return shown
