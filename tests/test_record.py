import json

import torch

import vtc
from vtc.testing import llava_inputs, tiny_llava


def test_record_contents_and_json_round_trip():
    model = tiny_llava(seed=3)
    inputs = llava_inputs(model, ((3, 4), (5, 1)))
    with vtc.compressed(model, "hired", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    assert rec.method == "hired" and rec.family == "llava" and rec.positions == "compact"
    assert rec.config["budget"] == 0.25 and rec.config["alpha"] == 0.5
    assert len(rec.images) == 2 and [im.sample for im in rec.images] == [0, 1]
    im = rec.images[0]
    assert im.grids == [[4, 4]] and im.prefix == 1 and im.num_input == 16
    assert len(im.scores) == 16 and im.kept == sorted(im.kept)
    top = sorted(range(16), key=lambda i: (-im.scores[i], i))[:4]
    assert sorted(top) == im.kept  # kept = the highest scores
    assert [g >= 0 for g in im.groups].count(True) == 4
    assert rec.visual_tokens == {"input": 32, "kept": 8, "last_stage": 8}
    assert 0 < rec.flops["ratio"] < 1 and rec.flops["prefill_compressed"] < rec.flops["prefill_full"]
    assert rec.samples[0].input_length - rec.samples[0].output_length == 12
    again = vtc.Record.from_json(json.dumps(json.loads(rec.to_json())))
    assert again == rec
    # the record is JSON-serialisable as it is (a dict of plain data), as the README says
    assert json.loads(json.dumps(rec)) == json.loads(rec.to_json()) == rec.to_dict()
    assert vtc.Record.from_dict(json.loads(json.dumps(rec))) == rec and rec.images[0].num_kept == 4


def test_instance_level_forward_wrappers_are_respected_and_restored():
    """accelerate's dispatch hooks set ``model.forward`` on the instance; compression must still apply."""
    model = tiny_llava(seed=3)
    inputs = llava_inputs(model, ((3, 4),))
    calls = []
    original = model.forward

    def wrapper(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    model.forward = wrapper
    with vtc.compressed(model, "random", budget=0.25):
        with torch.no_grad():
            out = model(**inputs)
    assert calls == [inputs["input_ids"].shape[1] - 12] and out.logits.shape[1] == calls[0]
    assert model.forward is wrapper


def test_flops_helper_formulas():
    from vtc.flops import layer_flops, prefill_flops

    cfg = tiny_llava().config.text_config
    d, m = cfg.hidden_size, cfg.intermediate_size
    assert layer_flops(cfg, 10, "fastv") == 4 * 10 * d * d + 2 * 100 * d + 2 * 10 * d * m
    assert prefill_flops(cfg, 10) == cfg.num_hidden_layers * layer_flops(cfg, 10)
    assert prefill_flops(cfg, [10, 10, 5, 5]) < prefill_flops(cfg, 10)


def test_time_in_vtc_excludes_the_models_own_computation():
    import time

    model = tiny_llava(seed=3)
    inputs = llava_inputs(model, ((3, 4),))
    with vtc.compressed(model, "hired", budget=0.25):
        with torch.no_grad():
            start = time.perf_counter()
            model(**inputs)
            total = time.perf_counter() - start
        rec = vtc.last_record(model)
        timer = vtc.session_of(model).recorder.timer
    assert 0 < rec.seconds_in_vtc < total
    assert timer.model_seconds > 0  # the vision tower ran, and was not counted as vtc's time
    assert rec.seconds_in_vtc + timer.model_seconds - timer.signal_seconds < total
