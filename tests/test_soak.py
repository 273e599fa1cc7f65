"""The quick soak (``eval/soak.py``): 500 compressed ``generate`` calls per method leave nothing behind.

Measured with ``gc`` (live tensors, their storage bytes, objects the collector tracks), never with time or RSS.
The long run (10,000 calls, RSS slope per call) is ``python eval/soak.py --method fastv --calls 10000``.
"""

import sys
from pathlib import Path

import pytest

import vtc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import soak  # noqa: E402

CALLS, WARMUP = 500, 50


@pytest.mark.parametrize("method", [m.name for m in vtc.list_methods()])
def test_500_compressed_generate_calls_leave_nothing_behind(method):
    # measured after a warm-up: the last call's state stays until the next call, by design
    first, last = soak.soak(method, CALLS, WARMUP, at={WARMUP, CALLS})
    assert (first.calls, last.calls) == (WARMUP, CALLS)
    assert last.tensors - first.tensors <= 2, (first, last)
    assert last.tensor_kib - first.tensor_kib <= 16, (first, last)
    assert last.objects - first.objects <= (CALLS - WARMUP) // 5, (first, last)  # under one object per 5 calls
