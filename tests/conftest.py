import os

import torch
from hypothesis import HealthCheck, settings

# Two cores are shared by everything on the CI machine; extra threads only add contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile("ci", deadline=None, max_examples=25, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
