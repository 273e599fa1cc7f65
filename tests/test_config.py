import dataclasses
import json

import pytest

import vtc


@pytest.mark.parametrize("info", vtc.list_methods(), ids=lambda i: i.name)
def test_config_round_trip(info):
    cfg = info.config_class(budget=0.3)
    data = json.loads(json.dumps(cfg.to_dict()))
    again = info.config_class.from_dict(data)
    assert again == cfg
    assert again.method == info.name


@pytest.mark.parametrize("info", vtc.list_methods(), ids=lambda i: i.name)
def test_unknown_option_lists_valid_ones(info):
    with pytest.raises(TypeError) as err:
        info.config_class.from_dict({"budget": 0.2, "no_such_option": 1})
    assert "no_such_option" in str(err.value) and "budget" in str(err.value)


def test_every_config_field_is_documented_or_typed():
    for info in vtc.list_methods():
        for f in dataclasses.fields(info.config_class):
            assert f.type is not None


def test_invalid_method_options():
    from vtc.mergers.visionzip import VisionZipConfig
    from vtc.pruners.fopru import FoPruConfig
    from vtc.pruners.hired import HiREDConfig

    with pytest.raises(ValueError, match="alpha"):
        HiREDConfig(alpha=1.5)
    with pytest.raises(ValueError, match="strategy"):
        FoPruConfig(strategy="columns")
    with pytest.raises(ValueError, match="contextual"):
        VisionZipConfig(contextual=0.9)
    with pytest.raises(ValueError, match="positions"):
        HiREDConfig(positions="shuffled")


def test_list_methods_reports_stages_and_families():
    rows = {m.name: m.to_dict() for m in vtc.list_methods()}
    assert {"hired", "fopru", "visionzip", "divprune", "mmtok", "random", "uniform", "pool"} <= set(rows)
    assert rows["hired"]["stages"] == ["vision", "pre_llm"]
    assert "llava" in rows["divprune"]["families"]
    assert vtc.DEFAULT_METHOD in rows
