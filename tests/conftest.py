"""Shared test setup: offline, one torch thread, tiny models from ``vtc.testing``."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The repository's kernels/ folder is vtc.kernels (setup.cfg package_dir). With the repository root first on
# sys.path (``python -m pytest`` from the root) it would shadow Hugging Face's own ``kernels`` package, which
# transformers imports when it is installed; the root stays on the path, last, for ``tests`` itself.
_ROOT = str(Path(__file__).resolve().parents[1])
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _ROOT] + [_ROOT]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

#: every numeric tolerance the suite uses, in one table
TOL = {
    "logits_fp32": 1e-5,  # same computation, different batch/padding layout or attention kernel
    "attention_rows": 1e-5,  # recomputed attention probabilities vs eager weights (fp32)
}


@pytest.fixture
def tol():
    return TOL


def load_eval(name: str):
    """The script ``eval/<name>.py`` as a module (``eval/`` on the path only while it imports its siblings)."""
    import importlib.util

    eval_dir = Path(_ROOT) / "eval"
    spec = importlib.util.spec_from_file_location(name, eval_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(eval_dir))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(eval_dir))
    return module
