"""eval/bench_tome_tower.py on a tiny OneVision video layout: the rows, what the LLM gets, the tower clock."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        spec = importlib.util.spec_from_file_location("bench_tome_tower", ROOT / "eval" / "bench_tome_tower.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "eval"))
    return module


def test_a_tiny_run_times_every_row_and_counts_what_the_llm_gets(bench, tmp_path):
    assert bench.main(["--frames", "2", "--vision", "32,64,2,2", "--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = __import__("json").loads((tmp_path / "bench_tome_tower.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["none", "tome @ 0.5", "tome @ 0.25", "divprune @ 0.1", "tome+divprune @ 0.1"]
    full = 2 * 196 + 1  # two frames of 27 x 27 patches pooled to 14 x 14, one newline
    assert [r["llm_visual_tokens"] for r in rows[:3]] == [full] * 3  # ToMe alone: the tower only
    assert rows[3]["llm_visual_tokens"] == rows[4]["llm_visual_tokens"] < full // 5
    assert all(0 < r["tower_s"] < r["prefill_s"] for r in rows) and rows[0]["tower_speedup"] == 1.0
    assert "| tome @ 0.25 |" in (tmp_path / "bench_tome_tower.md").read_text()


def test_the_qwen2vl_preset_runs_tome_in_its_tower(bench, tmp_path):
    out = tmp_path / "q"
    assert bench.main(["--preset", "qwen2vl", "--vision", "32,0,2,2", "--rounds", "1", "--out", str(out)]) == 0
    rows = __import__("json").loads((out / "bench_tome_tower.json").read_text())["rows"]
    assert [r["llm_visual_tokens"] for r in rows[:3]] == [1176] * 3  # ToMe alone keeps every merge group
    assert rows[4]["llm_visual_tokens"] == 118  # 10 % after the stack


def test_bad_vision_shape_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--vision", "64,128,2"])
