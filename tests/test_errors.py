"""Invariant 8: bad input gets a clear error naming the problem, and the model is left unchanged."""

import warnings

import pytest
import torch

import vtc
from vtc.testing import llama_text_config, llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=2)


@pytest.fixture(scope="module")
def inputs(model):
    return llava_inputs(model, ((3, 4), (5, 1)))


def _unchanged(model, inputs, ref):
    assert not vtc.is_compressed(model)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


@pytest.fixture(scope="module")
def ref(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    "budget, exc, words",
    [
        (0, ValueError, "budget=0"),
        (-1, ValueError, "budget=-1"),
        (1.5, ValueError, "(0, 1]"),
        (float("nan"), ValueError, "finite"),
        (True, TypeError, "bool"),
        ("0.2", TypeError, "str"),
    ],
)
def test_bad_budget(model, inputs, ref, budget, exc, words):
    with pytest.raises(exc) as err:
        vtc.compress(model, "hired", budget=budget)
    assert words in str(err.value)
    _unchanged(model, inputs, ref)


def test_unknown_method_lists_the_known_ones(model, inputs, ref):
    with pytest.raises(ValueError) as err:
        vtc.compress(model, "hiredd", budget=0.2)
    assert "hiredd" in str(err.value) and "hired" in str(err.value) and "divprune" in str(err.value)
    _unchanged(model, inputs, ref)


def test_unknown_option_lists_the_valid_ones(model, inputs, ref):
    with pytest.raises(TypeError) as err:
        vtc.compress(model, "hired", budget=0.2, alfa=0.3)
    assert "alfa" in str(err.value) and "alpha" in str(err.value)
    _unchanged(model, inputs, ref)


def test_bad_option_value(model, inputs, ref):
    with pytest.raises(ValueError, match="alpha"):
        vtc.compress(model, "hired", budget=0.2, alpha=2.0)
    _unchanged(model, inputs, ref)


def test_unsupported_model_is_refused_and_untouched():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM._from_config(llama_text_config()).eval()
    ids = torch.randint(3, 300, (1, 7))
    with torch.no_grad():
        before = llama(input_ids=ids).logits
    with pytest.raises(vtc.adapters.UnsupportedModelError) as err:
        vtc.compress(llama, "hired", budget=0.2)
    assert "llama" in str(err.value) and "llava" in str(err.value)
    assert type(llama) is LlamaForCausalLM and not vtc.is_compressed(llama)
    with torch.no_grad():
        assert torch.equal(llama(input_ids=ids).logits, before)


def test_restore_of_a_model_never_compressed(model, inputs, ref):
    with pytest.raises(ValueError, match="not compressed"):
        vtc.restore(model)
    _unchanged(model, inputs, ref)


def test_last_record_without_compression(model):
    with pytest.raises(ValueError, match="not compressed"):
        vtc.last_record(model)


def test_compressing_twice_warns_and_replaces(model, inputs, ref):
    vtc.compress(model, "random", budget=0.5)
    with pytest.warns(UserWarning, match="already compressed"):
        vtc.compress(model, "hired", budget=0.25)
    with torch.no_grad():
        model(**inputs)
    rec = vtc.last_record(model)
    assert rec.method == "hired" and all(im.num_kept == 4 for im in rec.images)
    vtc.restore(model)
    _unchanged(model, inputs, ref)


def test_compressed_context_restores_the_previous_compression(model, inputs, ref):
    vtc.compress(model, "random", budget=0.5)
    with vtc.compressed(model, "divprune", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        assert vtc.last_record(model).method == "divprune"
    with torch.no_grad():
        model(**inputs)
    assert vtc.last_record(model).method == "random"
    vtc.restore(model)
    _unchanged(model, inputs, ref)


def test_bad_call_inputs_raise_clearly(model, inputs, ref):
    with vtc.compressed(model, "hired", budget=0.25):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="input_ids"):
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"])
        bad = dict(inputs, input_ids=inputs["input_ids"][:, :-3].clone())
        bad["input_ids"][0, 2] = 1  # break a placeholder run
        bad["attention_mask"] = inputs["attention_mask"][:, :-3]
        with pytest.raises(ValueError, match="placeholder"):
            model(**bad)
    _unchanged(model, inputs, ref)


def test_positions_conflicting_with_the_method(model, inputs, ref):
    with pytest.raises(ValueError, match="positions"):
        vtc.compress(model, "hired", budget=0.2, positions="sideways")
    _unchanged(model, inputs, ref)


def test_options_and_config_object_together(model, inputs, ref):
    from vtc.pruners.hired import HiREDConfig

    with pytest.raises(TypeError, match="inside the config"):
        vtc.compress(model, HiREDConfig(budget=0.3), alpha=0.2)
    vtc.compress(model, HiREDConfig(budget=0.25, alpha=0.3))
    with torch.no_grad():
        model(**inputs)
    assert vtc.last_record(model).config["alpha"] == 0.3
    vtc.restore(model)
    _unchanged(model, inputs, ref)


def test_calls_without_images_are_untouched(model):
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with vtc.compressed(model, "hired", budget=0.25):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                assert torch.equal(model(input_ids=ids).logits, ref)


def test_the_record_outlives_restore_and_a_compressed_block(model, inputs, ref):
    with vtc.compressed(model, "divprune", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        rec = vtc.last_record(model)
    assert vtc.last_record(model) is rec  # after the block: the block's last call
    vtc.compress(model, "random", budget=0.5)
    with pytest.raises(ValueError, match="no call"):  # compressed again: that compression's calls only
        vtc.last_record(model)
    vtc.restore(model)
    _unchanged(model, inputs, ref)


def test_restore_inside_a_compressed_block_is_allowed(model, inputs, ref):
    with vtc.compressed(model, "divprune", budget=0.25):
        with torch.no_grad():
            model(**inputs)
        vtc.restore(model)
    _unchanged(model, inputs, ref)
    with vtc.compressed(model, "divprune", budget=0.25):
        with pytest.warns(UserWarning, match="already compressed"):
            vtc.compress(model, "random", budget=0.5)  # replaced inside the block: the exit removes it too
    _unchanged(model, inputs, ref)
