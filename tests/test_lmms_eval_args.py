"""vtc's ``--model_args`` for lmms-eval: values typed from the method's config, validated by vtc's own code.

No lmms-eval needed: the parsing module imports nothing from it.
"""

from __future__ import annotations

import pytest

import vtc
from vtc.api import DEFAULT_METHOD, _build_config
from vtc.apps.lmms_eval.args import coerce, split_args

UPSTREAM = {"pretrained", "device", "device_map", "batch_size", "seed"}


def _config(**kwargs):
    args, upstream = split_args(kwargs, UPSTREAM)
    return args.config, upstream


def test_upstream_keys_stay_upstream_and_method_options_go_to_the_config():
    config, upstream = _config(pretrained="p", device="cpu", method="hired", budget=0.2, alpha=0.3)
    assert upstream == {"pretrained": "p", "device": "cpu"}
    assert config == _build_config("hired", 0.2, {"alpha": 0.3})


@pytest.mark.parametrize(
    "given, expected",
    [
        # as lmms-eval's handle_arg_string delivers them
        ({"method": "fastv", "budget": 0.25, "layer": 3}, ("fastv", 0.25, {"layer": 3})),
        ({"method": "fastv", "budget": 64}, ("fastv", 64, {})),
        ({"method": "fastv", "budget": 1.0}, ("fastv", 1.0, {})),
        ({"method": "todre", "layer": 3.0, "stage2": False}, ("todre", 0.2, {"layer": 3, "stage2": False})),
        ({"method": "mmtok", "alpha": 1}, ("mmtok", 0.2, {"alpha": 1.0})),
        # as plain strings (Python callers, other front ends)
        ({"method": "fastv", "budget": "0.25", "layer": "3"}, ("fastv", 0.25, {"layer": 3})),
        ({"method": "fastv", "budget": "64"}, ("fastv", 64, {})),
        ({"method": "pdrop", "layers": "1;2"}, ("pdrop", 0.2, {"layers": (1, 2)})),
        ({"method": "pdrop", "layers": "[1,3]"}, ("pdrop", 0.2, {"layers": (1, 3)})),
        ({"method": "pdrop", "layers": 2}, ("pdrop", 0.2, {"layers": (2,)})),
        (
            {"method": "hired", "final_layer": "feature", "positions": "none"},
            ("hired", 0.2, {"final_layer": "feature"}),
        ),
        (
            {"method": "hired", "final_layer": "5", "positions": "original"},
            ("hired", 0.2, {"final_layer": 5, "positions": "original"}),
        ),
        ({"method": "visionzip", "keep_cls": "false"}, ("visionzip", 0.2, {"keep_cls": False})),
    ],
)
def test_values_take_the_config_field_types(given, expected):
    config, _ = _config(**given)
    method, budget, options = expected
    assert config == _build_config(method, budget, options)
    assert type(config.budget) is type(budget)
    for name, value in options.items():
        assert type(getattr(config, name)) is type(value), name


def test_omitted_method_and_budget_mean_what_they_mean_in_compress():
    config, _ = _config()
    assert config.method == DEFAULT_METHOD and config.budget == 0.2
    assert _config(budget=32)[0] == _build_config(DEFAULT_METHOD, 32, {})


def test_method_none_runs_uncompressed_and_takes_no_vtc_options():
    args, upstream = split_args({"method": "none", "pretrained": "p"}, UPSTREAM)
    assert args.config is None and args.strict and upstream == {"pretrained": "p"}
    assert split_args({"method": "None"}, UPSTREAM)[0].config is None
    with pytest.raises(ValueError, match=r"method=none .* got \['budget', 'alpha'\]"):
        split_args({"method": "none", "budget": 0.2, "alpha": 0.5}, UPSTREAM)


@pytest.mark.parametrize(
    "given, options",
    [
        ({"method": "hired", "alpa": 0.3}, {"alpa": 0.3}),
        ({"method": "hired", "alpha": "high"}, {"alpha": "high"}),
        ({"method": "fastv", "query": 3}, {"query": 3}),
        ({"method": "hired", "budget": 0}, {}),
        ({"method": "hired", "budget": "abc"}, {}),
        ({"method": "hired", "budget": 1.5}, {}),
        ({"method": "hired", "budget": -1}, {}),
        ({"method": "nope"}, {}),
    ],
)
def test_errors_are_the_errors_of_compress(given, options):
    with pytest.raises((TypeError, ValueError)) as ours:
        _config(**given)
    budget = given.get("budget", 0.2)
    budget = coerce(budget, float | int)
    with pytest.raises(type(ours.value)) as theirs:
        _build_config(given["method"], budget, options)
    assert str(ours.value) == str(theirs.value)


def test_prefix_marks_a_method_option_that_collides_with_an_upstream_parameter():
    args, upstream = split_args({"method": "random", "seed": 3, "vtc_seed": 5}, UPSTREAM)
    assert upstream == {"seed": 3} and args.config.seed == 5


def test_strict():
    assert split_args({"strict": False}, UPSTREAM)[0].strict is False
    assert split_args({"strict": "false"}, UPSTREAM)[0].strict is False
    with pytest.raises(TypeError, match="strict must be true or false"):
        split_args({"strict": 3}, UPSTREAM)


def test_coerce_keeps_what_fits_and_leaves_the_rest_to_validation():
    assert coerce(-1.0, int) == -1 and type(coerce(-1.0, int)) is int
    assert coerce(0.5, int) == 0.5  # not an int: the config names the problem
    assert coerce(2, float) == 2.0 and type(coerce(2, float)) is float
    assert coerce(True, int | None) is True
    assert coerce("null", tuple[int, ...] | None) is None
    assert coerce("x", int) == "x"
    assert vtc.validate_budget(coerce("64", float | int)) == 64
