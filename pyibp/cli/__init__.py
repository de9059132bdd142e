"""The ``pyibp`` command: train, attack, certify, plot and reproduce, from a shell.

    pyibp train --method ibp --eps 0.1 --out runs/ibp          # a run folder, resumable
    pyibp eval runs/ibp --attack pgd --steps 40 --restarts 5    # error under attack
    pyibp certify runs/ibp --method ibp crown-ibp               # verified error
    pyibp landscape runs/standard runs/ibp --out loss.png       # the tutorial's loss surfaces
    pyibp bench                                                 # the benchmarks, with a bar chart
    pyibp reproduce --quick                                     # the tutorial's chapter 4, end to end

Every command takes ``--device``, ``--seed``, ``--quiet`` and ``--json`` (the result as JSON on
stdout, nothing else there). Bad arguments, missing data sets, run folders in the way or in use,
damaged run files and folders that cannot be written end with a one-line message and exit code
2; SIGINT and SIGTERM stop a command with 130 / 143 (``train`` continues with ``--resume``).

``pyibp train`` also runs unchanged under torchrun, on one node or several (rank 0 prints and
writes the run folder; see :mod:`pyibp.runs`)::

    torchrun --nproc_per_node 2 -m pyibp train --method ibp --out runs/ibp
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m pyibp train --method crown-ibp --amp bf16 --compile --out runs/crown

One module per subcommand (train, eval, certify, landscape, bench, reproduce), each with
``add_parser`` and ``run``; :mod:`~pyibp.cli.common` holds what they share and
:mod:`~pyibp.cli.main` wires them.
"""
from .common import CLIError
from .main import build_parser, main

__all__ = ["main", "build_parser", "CLIError"]
