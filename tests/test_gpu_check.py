"""`make gpu-check` on a machine without a GPU says so and runs nothing."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="needs a machine without an NVIDIA GPU")
def test_gpu_check_without_a_gpu_exits_nonzero_and_runs_nothing(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True,
                            env={**os.environ, "GPU_CHECK_OUT": str(out)}, timeout=120)
    assert result.returncode == 1
    assert "no NVIDIA GPU found" in result.stderr and "nothing was run" in result.stderr
    assert not out.exists()
