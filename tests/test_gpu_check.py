"""The GPU check script (eval/gpu_check.py) runs end to end on its CPU path and refuses a machine with no GPU."""

import json

import pytest
import torch

from .conftest import load_eval


def test_smoke_run_writes_one_results_file_with_every_kernel(tmp_path, capsys):
    check = load_eval("gpu_check")
    assert check.main(["--smoke", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = result["kernels"]["rows"]
    assert {(r["op"], r["N"]) for r in rows} == {
        (op, n) for op in ("cosine_argmax", "attention_received", "greedy_maxmin") for n in (64, 128)
    }
    assert all(r["ref_ms"] > 0 for r in rows) and result["speed"] == {} and result["skipped_presets"] == []
    assert "attention_received" in (tmp_path / "gpu_check.json").with_suffix(".md").read_text()
    assert check.peak_bandwidth("NVIDIA H200") == 4800.0 and check.peak_bandwidth("a CPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_it_says_so(tmp_path, capsys):
    check = load_eval("gpu_check")
    assert check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().out
