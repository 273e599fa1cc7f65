"""eval/bench_scaling.py: every pre-LLM method runs at its hook point on synthetic inputs of any size, keeps
exactly k, and the report fits growth exponents from the sizes it measured."""

import json

import pytest

from .conftest import load_eval


def test_every_pre_llm_method_runs_on_synthetic_inputs_and_keeps_k(tmp_path):
    bench = load_eval("bench_scaling")
    methods = bench.pre_llm_methods()
    assert {"divprune", "hired", "visionzip", "cdpruner", "scope", "vispruner"} <= set(methods)
    assert bench.main(["--sizes", "36,64", "--dim", "16", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert set(report["results"]) == set(methods)
    for name, result in report["results"].items():
        assert [r["n"] for r in result["rows"]] == [36, 64], name
    assert "| divprune |" in (tmp_path / "scaling.md").read_text()


def test_exponent_fit_uses_the_large_sizes():
    bench = load_eval("bench_scaling")
    assert bench.exponent([(576, 1.0), (6272, 2.0), (25088, 8.0)]) == pytest.approx(1.0)
    assert bench.exponent([(576, 1.0), (2304, 4.0)]) is None  # below the fitting range
