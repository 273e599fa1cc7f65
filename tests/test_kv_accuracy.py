"""Scoring of the long-answer KV benchmark (eval/kv_accuracy.py): items read in order, exact matches."""

import importlib
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _bench():
    if str(EVAL) not in sys.path:
        sys.path.insert(0, str(EVAL))
    return importlib.import_module("kv_accuracy")


def test_each_object_counts_when_the_item_at_its_index_names_it():
    bench = _bench()
    truth = "red 7, blue circle, green 3"
    assert bench.score("red 7, blue circle, green 3", truth) == [1, 1, 1]
    assert bench.score(" Red  7 ,blue circle", truth) == [1, 1, 0]  # case and spaces do not matter; a missing item
    assert bench.score("blue circle, green 3", truth) == [0, 0, 0]  # a dropped first item shifts the rest
    assert bench.score("red 7, blue square, green 3, yellow 1", truth) == [1, 0, 1]  # extra items cost nothing
    assert bench.score("", truth) == [0, 0, 0]
    assert bench.items_of("a, , b") == ["a", "b"]
