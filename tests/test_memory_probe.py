"""No n x n buffer in vtc's own computation: kernel references and methods under an address-space limit.

``eval/memory_probe.py`` sets ``RLIMIT_AS`` to the inputs plus less than one ``n x n`` fp32 matrix, then runs
the calls; an allocation past the limit raises. In a child process (the limit cannot be lifted once set).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_kernel_references_and_methods_stay_under_a_limit_below_n_by_n():
    n, limit = 8192, 160  # an n x n fp32 matrix is 256 MiB
    methods = "divprune,visionzip,cdpruner,todre,hired,pool"
    cmd = [sys.executable, "eval/memory_probe.py", "--n", str(n), "--limit-mib", str(limit), "--methods", methods]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "every call stayed under the limit" in proc.stdout
    for name in ("kernel cosine_argmax", "kernel attention_received", "kernel nearest_distance", *methods.split(",")):
        assert f"  {name}: " in proc.stdout


def test_the_probe_refuses_a_limit_that_holds_n_by_n():
    cmd = [sys.executable, "eval/memory_probe.py", "--n", "64", "--limit-mib", "1", "--methods", "none"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "nothing is proved" in proc.stderr
