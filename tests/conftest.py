"""Shared test setup: offline, one torch thread, tiny models from ``vtc.testing``."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
