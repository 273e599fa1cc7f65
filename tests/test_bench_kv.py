"""eval/bench_kv.py on the tiny LLaVA: every configuration runs, the compressed caches are smaller, the uncompressed
row agrees with itself."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kv_runs_on_the_tiny_model(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kv", ROOT / "eval" / "bench_kv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kv.json"
    rows = bench.main(["--model", "tiny", "--device", "cpu", "--new-tokens", "6", "--repeats", "1", "--out", str(out)])
    assert out.exists()
    assert [r["config"] for r in rows][0] == "full cache"
    assert rows[0]["agreement"] == 1.0 and rows[0]["same_prefix"] == 6
    for row in rows[1:]:
        assert row["kv_prefill_mib"] < rows[0]["kv_prefill_mib"]
        assert row["kv_peak_mib"] < rows[0]["kv_peak_mib"]
        assert 0.0 <= row["agreement"] <= 1.0
