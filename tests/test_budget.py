import math

import pytest

from vtc.budget import keep_count, split_count, validate_budget


@pytest.mark.parametrize("good", [0.2, 1.0, 1e-6, 1, 64, 10**6])
def test_valid_budgets(good):
    assert validate_budget(good) == good


@pytest.mark.parametrize(
    "bad, exc",
    [
        (0, ValueError),
        (-1, ValueError),
        (1.5, ValueError),
        (0.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        ("0.2", TypeError),
        (None, TypeError),
        ([0.2], TypeError),
    ],
)
def test_invalid_budgets(bad, exc):
    with pytest.raises(exc, match="budget"):
        validate_budget(bad)


def test_float_above_one_suggests_int():
    with pytest.raises(ValueError, match="budget=2"):
        validate_budget(2.0)


@pytest.mark.parametrize("budget, n", [(0.2, 576), (0.25, 16), (0.111, 576), (0.05, 576), (0.5, 3), (1e-6, 576)])
def test_keep_count_formula(budget, n):
    assert keep_count(budget, n) == max(1, math.floor(budget * n + 0.5))


def test_keep_count_rounds_half_up_and_caps():
    assert keep_count(0.5, 5) == 3  # 2.5 -> 3 (round half up, not banker's rounding)
    assert keep_count(0.125, 4) == 1  # 0.5 -> 1
    assert keep_count(1.0, 576) == 576
    assert keep_count(100, 16) == 16  # an int larger than n keeps all
    assert keep_count(4, 16) == 4
    assert keep_count(0.2, 0) == 0


def test_split_count_sums_and_is_proportional():
    assert split_count(10, [1, 1, 1]) == [4, 3, 3]
    assert split_count(576, [576, 576, 576, 576, 576]) == [116, 115, 115, 115, 115]
    assert sum(split_count(7, [5, 0, 3])) == 7
    assert split_count(7, [5, 0, 3])[1] == 0
    assert split_count(0, [3, 3]) == [0, 0]
