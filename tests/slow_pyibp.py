"""``python tests/slow_pyibp.py DELAY ARGS...``: the ``pyibp`` command with a pause of DELAY seconds
after every training batch, so that a test can interrupt a run in the middle of an epoch (also as
the script of ``torchrun ... tests/slow_pyibp.py DELAY train ...``)."""
import sys
import time

from pyibp.cli import main
from pyibp.distributed import ShardedLoader

_batches = ShardedLoader.__iter__


def _slow_batches(self):
    for batch in _batches(self):
        yield batch
        time.sleep(DELAY)


if __name__ == "__main__":
    DELAY = float(sys.argv[1])
    ShardedLoader.__iter__ = _slow_batches
    sys.exit(main(sys.argv[2:]))
