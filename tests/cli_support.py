"""Shared by the command-line tests: the repository, the subprocess environment, and ``main`` run
in this process."""
import os
from pathlib import Path

from pyibp.cli import main

REPO = Path(__file__).resolve().parent.parent
# One thread: a killed-and-resumed run must compute exactly what the reference run computed.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_main(argv, capsys):
    """``main(argv)`` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
