"""Triton kernel parity tests, run on the CPU under ``TRITON_INTERPRET=1``.

The variable has to be in the environment before triton (or a kernel module) is imported, so these files are
collected only by a pytest process started with it: ``tests/test_kernels_triton.py`` launches one such child
per file, or run them by hand with ``TRITON_INTERPRET=1 python -m pytest tests/triton_interp``. Any other pytest
process skips this folder.

Every test draws fresh random inputs; the seed is printed (pytest shows it with a failure) and
``VTC_TEST_SEED=<seed>`` replays it. ``VTC_KERNEL_POISON=1`` fills every buffer the wrappers allocate with
garbage, so a kernel that skips a write fails instead of passing on zeroed memory.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_ignore_collect(collection_path, config):
    if not INTERPRETING:
        return True  # needs its own process: see the module docstring
    return None


@pytest.fixture(autouse=True)
def _poison_and_backend(monkeypatch):
    monkeypatch.setenv("VTC_KERNEL_POISON", "1")
    monkeypatch.setenv("VTC_KERNEL_BACKEND", "triton")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed per test (printed, replayable with VTC_TEST_SEED)."""
    seed = int(os.environ.get("VTC_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"VTC_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
