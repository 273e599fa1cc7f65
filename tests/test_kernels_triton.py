"""Runs each Triton parity file of ``tests/triton_interp/`` in a child pytest under ``TRITON_INTERPRET=1``.

The interpreter must be switched on before triton is imported, which this process cannot promise, so every
file gets a fresh interpreter; a failure shows the child's report (test ids, assertion, replay seed).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
FILES = sorted(p.name for p in (HERE / "triton_interp").glob("test_*.py"))


@pytest.mark.slow
@pytest.mark.parametrize("name", FILES)
def test_triton_kernels_match_references_under_the_interpreter(name):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 already: tests/triton_interp is collected in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/triton_interp/{name}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        report = f"{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"
        pytest.fail(f"TRITON_INTERPRET=1 {' '.join(cmd[1:])} exited {proc.returncode}:\n{report}", pytrace=False)


def test_importing_vtc_never_imports_triton():
    code = (
        "import sys\n"
        "import vtc, vtc.kernels, vtc.kernels.triton_common\n"
        "assert 'triton' not in sys.modules, 'import vtc pulled in triton'\n"
        "sys.modules['triton'] = None  # from here on, triton is 'not installed'\n"
        "import torch\n"
        "from vtc.kernels import dispatch\n"
        "assert not dispatch._triton_available()\n"
        "assert vtc.kernels.topk_sorted(torch.tensor([3.0, 1.0, 2.0]), 2).tolist() == [0, 2]\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VTC_KERNEL_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
