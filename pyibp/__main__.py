"""``python -m pyibp``: the ``pyibp`` command (see :mod:`pyibp.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
