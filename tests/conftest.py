import os

import torch
from hypothesis import HealthCheck, settings

# The suite's models are small: more than two threads only add contention. OMP_NUM_THREADS, when
# set, wins (e.g. 1 while other jobs share the cores).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

settings.register_profile("ci", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
