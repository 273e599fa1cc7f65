"""Continuing from a cache that holds a compressed prompt: multi-turn generate and manual decoding loops."""

import pytest
import torch

import vtc
from vtc.testing import IMAGE_TOKEN, llava_inputs, tiny_llava


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=6)


def _turn(seed, n=5):
    return torch.randint(3, IMAGE_TOKEN, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "method, positions",
    [
        ("hired", "compact"),
        ("hired", "original"),
        ("divprune", None),
        ("fastv", None),
        ("pdrop", None),
    ],
)
def test_second_turn_on_the_cache_equals_a_fresh_run_on_the_whole_history(model, method, positions):
    inputs = llava_inputs(model, ((3, 4),), seed=11)
    opts = {} if positions is None else {"positions": positions}
    with vtc.compressed(model, method, budget=0.25, **opts):
        first = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        prompt_len = inputs["input_ids"].shape[1]
        assert torch.equal(first.sequences[:, :prompt_len], inputs["input_ids"])  # caller's prompt comes back
        llm = vtc.session_of(model).adapter.llm
        kept = dict(llm.call.kept_rows) if llm else None
        history = torch.cat([first.sequences, _turn(1)], dim=1)
        second = model.generate(
            input_ids=history,
            attention_mask=torch.ones_like(history),
            cache=first.cache,
            max_new_tokens=4,
            do_sample=False,
        )
        assert torch.equal(second[:, : history.shape[1]], history)
        # reference: the whole history from scratch, with the image and the same selection
        if kept is not None:
            vtc.session_of(model).method.prune = lambda ctx: kept[ctx.layer]
        fresh = model.generate(
            input_ids=history,
            attention_mask=torch.ones_like(history),
            pixel_values=inputs["pixel_values"],
            max_new_tokens=4,
            do_sample=False,
        )
    assert torch.equal(second, fresh)


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_manual_decoding_loop_on_the_returned_cache_matches_generate(model, positions):
    inputs = llava_inputs(model, ((3, 4),), seed=12)
    with vtc.compressed(model, "hired", budget=0.25, positions=positions):
        expect = model.generate(**inputs, max_new_tokens=5, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            cache = out.cache
            for _ in range(4):
                step = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
                cache = step.cache
                tokens.append(int(step.logits[0, -1].argmax()))
    assert tokens == expect.tolist()


def test_new_images_on_a_compressed_cache_are_refused(model):
    inputs = llava_inputs(model, ((3, 4),), seed=13)
    with vtc.compressed(model, "hired", budget=0.25):
        first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        more = llava_inputs(model, ((2, 2),), seed=14)
        history = torch.cat([first.sequences, more["input_ids"]], dim=1)
        with pytest.raises(ValueError, match="cache that already holds tokens"):
            model.generate(input_ids=history, pixel_values=more["pixel_values"], cache=first.cache, max_new_tokens=2)


def test_a_continuation_that_does_not_extend_the_cached_sequence_is_refused(model):
    inputs = llava_inputs(model, ((3, 4),), seed=15)
    with vtc.compressed(model, "hired", budget=0.25):
        first = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        wrong = torch.cat([first.sequences[:, 1:], _turn(2)], dim=1)
        with pytest.raises(ValueError, match="start with the previous"):
            model.generate(input_ids=wrong, cache=first.cache, max_new_tokens=2)
