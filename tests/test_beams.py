"""Beam search and several returned sequences: ``generate`` repeats every prompt after vtc planned it.

The reference is a beam search written out here over cache-free forwards of the compressed model that replay
the prefill's in-LLM selection (as invariant 4 does for greedy decoding); DyCoke's decode-time selection
depends on the cache, so its reference runs the same search over cached forwards, reordering the cache by hand.
"""

from types import SimpleNamespace

import pytest
import torch

import vtc
from vtc.testing import (
    FAMILIES,
    IMAGE_TOKEN,
    QWEN_VISION_END,
    QWEN_VISION_START,
    VIDEO_TOKEN,
    llava_inputs,
    llava_video_inputs,
    tiny_llava,
    tiny_llava_onevision,
)

#: every in-LLM method, with the options that make all of its stages act on the tiny models
CASES = {
    "fastv": ("image", {}),
    "dart": ("image", {}),
    "pdrop": ("image", {}),
    "transprune": ("image", {}),
    "aim": ("image", {"start": 0.25}),
    "mustdrop": ("image", {"merge_thr": -1.0}),  # every window passes: the tower merges one window of the 4 x 4 grid
    "todre": ("image", {"layer": 2, "tau": 1.0}),
    "holitom": ("video", {}),
    "dycoke": ("video", {"kv_prune": 0.5, "kv_layer": 2}),
}
STEPS = 4
EOS = 2
#: ids the tiny models must not generate: a cache-free forward would read them as new visual placeholders
SUPPRESS = [IMAGE_TOKEN, VIDEO_TOKEN, QWEN_VISION_START, QWEN_VISION_END]


def test_every_llm_layer_method_is_covered():
    from vtc.contexts import Stage

    assert {m.name for m in vtc.list_methods() if Stage.LLM_LAYER in m.stages} == set(CASES)


def _setup(name):
    modality, opts = CASES[name]
    if modality == "image":
        tiny, model = FAMILIES["llava"], tiny_llava(seed=4)
        inputs = llava_inputs(model, ((3, 4), (6, 2)), padding_side="left", seed=7)
    else:
        tiny, model = FAMILIES["llava_onevision"], tiny_llava_onevision(seed=0)
        inputs = llava_video_inputs(model, ((3, 4), (5, 2)), frames=4, padding_side="left", seed=3)
    return tiny, model, inputs, opts


def _repeat(tiny, inputs, n):
    """Every sample of ``inputs`` ``n`` times in a row, as ``generate`` repeats them (visual inputs per sample:
    the Qwen families flatten their patches over the batch)."""
    out = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items() if k not in tiny.image_keys}
    visual = [tiny.sample_visual(inputs, b) for b in range(inputs["input_ids"].shape[0]) for _ in range(n)]
    out.update({k: torch.cat([v[k] for v in visual]) for k in tiny.image_keys})
    return out


def beam_search(logits_of, prompt_mask, beams, steps, returned):
    """Plain beam search: ``logits_of(seqs [N, T], mask [N, T], rows [N])`` gives each running beam's next-token
    logits (``rows``: the beam each new beam continues). No EOS (as with ``min_new_tokens == max_new_tokens``),
    so every hypothesis has the same length and the best ``returned`` are the highest scores."""
    bsz = prompt_mask.shape[0]
    mask = prompt_mask.repeat_interleave(beams, dim=0)
    seqs = torch.zeros(bsz * beams, 0, dtype=torch.long)
    scores = torch.zeros(bsz, beams)
    scores[:, 1:] = -1e9  # the beams start as copies: expand only the first one at step 0
    rows = torch.arange(bsz * beams)
    for _ in range(steps):
        logp = logits_of(seqs, mask, rows).float().log_softmax(-1)  # [B * beams, V]
        logp[:, [EOS, *SUPPRESS]] = float("-inf")  # after the softmax, as generate's logits processors do
        vocab = logp.shape[-1]
        top, idx = (scores.reshape(-1, 1) + logp).view(bsz, beams * vocab).topk(beams)
        rows = (torch.arange(bsz)[:, None] * beams + idx // vocab).flatten()
        seqs = torch.cat([seqs[rows], (idx % vocab).flatten()[:, None]], dim=1)
        mask = torch.cat([mask[rows], torch.ones_like(mask[:, :1])], dim=1)
        scores = top
    return seqs.view(bsz, beams, -1)[:, :returned].flatten(0, 1)


def _replay(session):
    """Make the method repeat the prefill's in-LLM selection (a cache-free forward would select again)."""
    kept = dict(session.adapter.llm.call.kept_rows)
    impl = session.method
    if hasattr(impl, "merge_into"):
        session.method.prune = lambda ctx: impl.merge_into(ctx, kept[ctx.layer])
    else:
        session.method.prune = lambda ctx: kept[ctx.layer]


def _cache_free(tiny, model, inputs, beams):
    expanded = _repeat(tiny, inputs, beams)

    def logits_of(seqs, mask, rows):
        step = {**expanded, "input_ids": torch.cat([expanded["input_ids"], seqs], dim=1), "attention_mask": mask}
        if "token_type_ids" in step:  # Gemma 3: the new tokens are text (outside the bidirectional image blocks)
            step["token_type_ids"] = torch.cat([step["token_type_ids"], torch.zeros_like(seqs)], dim=1)
        if "mm_token_type_ids" in step:  # M-RoPE: the model derives its 3-D positions from the token types
            step["mm_token_type_ids"] = torch.cat([step["mm_token_type_ids"], torch.zeros_like(seqs)], dim=1)
        else:
            step["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            return model(**step, use_cache=False).logits[:, -1]

    return logits_of


def _cached(tiny, model, inputs, beams):
    expanded = _repeat(tiny, inputs, beams)
    state = {}

    def logits_of(seqs, mask, rows):
        with torch.no_grad():
            if not seqs.shape[1]:
                out = model(**expanded, use_cache=True)
            else:
                cache = state["cache"]
                cache.reorder_cache(rows)
                # generate's own numbering: after the compressed prompt's valid rows, whatever the padding
                held = vtc.session_of(model).prefixes[cache].mask
                pos = held.sum(-1, keepdim=True) - 1 + seqs.shape[1]
                out = model(input_ids=seqs[:, -1:], attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        state["cache"] = out.cache
        return out.logits[:, -1]

    return logits_of


def _beams(model, inputs, beams, returned):
    return model.generate(
        **inputs,
        num_beams=beams,
        num_return_sequences=returned,
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        length_penalty=1.0,
        suppress_tokens=SUPPRESS,
    )


@pytest.mark.parametrize("returned", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_beam_search_equals_a_beam_search_by_hand(name, returned):
    tiny, model, inputs, opts = _setup(name)
    beams = 3
    with vtc.compressed(model, name, budget=0.5, **opts):
        out = _beams(model, inputs, beams, returned)
        length = inputs["input_ids"].shape[1]
        assert torch.equal(out[:, :length], inputs["input_ids"].repeat_interleave(returned, dim=0))
        rec = vtc.last_record(model)
        assert len(rec.samples) == 2 and all(len(im.layers) for im in rec.images) == (name != "dycoke")
        if name == "dycoke":
            logits_of = _cached(tiny, model, inputs, beams)
        else:
            _replay(vtc.session_of(model))
            logits_of = _cache_free(tiny, model, inputs, beams)
        by_hand = beam_search(logits_of, inputs["attention_mask"], beams, STEPS, returned)
    assert torch.equal(out[:, length:], by_hand)


def sample(logits_of, prompt_mask, copies, steps):
    """Plain sampling of ``copies`` sequences per prompt (temperature 1, no top-k): one multinomial draw per step
    over all rows, as ``generate`` draws."""
    mask = prompt_mask.repeat_interleave(copies, dim=0)
    seqs = torch.zeros(mask.shape[0], 0, dtype=torch.long)
    rows = torch.arange(mask.shape[0])
    for _ in range(steps):
        logits = logits_of(seqs, mask, rows).float()
        logits[:, SUPPRESS] = float("-inf")
        probs = logits.softmax(-1)
        seqs = torch.cat([seqs, torch.multinomial(probs, num_samples=1)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return seqs


@pytest.mark.parametrize("name", sorted(CASES))
def test_returned_sequences_equal_sampling_by_hand(name):
    """``num_return_sequences=2`` with sampling: each prompt planned once, then repeated by ``generate``."""
    tiny, model, inputs, opts = _setup(name)
    with vtc.compressed(model, name, budget=0.5, **opts):
        torch.manual_seed(0)
        out = model.generate(
            **inputs, num_return_sequences=2, max_new_tokens=STEPS, do_sample=True, top_k=0, suppress_tokens=SUPPRESS
        )
        if name == "dycoke":
            logits_of = _cached(tiny, model, inputs, 2)
        else:
            _replay(vtc.session_of(model))
            logits_of = _cache_free(tiny, model, inputs, 2)
        torch.manual_seed(0)
        by_hand = sample(logits_of, inputs["attention_mask"], 2, STEPS)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], by_hand)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pre_llm_beam_search_equals_a_beam_search_by_hand(family):
    """Every family's packed features are repeated per prompt as the rebuilt ids are (images and videos)."""
    tiny = FAMILIES[family]
    model = tiny.build(seed=4)
    inputs = tiny.inputs(model, ((3, 4), (6, 2)), padding_side="left", seed=7)
    with vtc.compressed(model, "divprune", budget=0.5):
        out = _beams(model, inputs, 3, 2)
        by_hand = beam_search(_cache_free(tiny, model, inputs, 3), inputs["attention_mask"], 3, STEPS, 2)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], by_hand)


def test_features_generate_cannot_repeat_per_prompt_are_refused():
    from vtc.testing import VIDEO_TOKEN

    model = tiny_llava_onevision(seed=0)
    vtc.compress(model, "divprune", budget=0.5)
    try:
        adapter = vtc.session_of(model).adapter
        ids = torch.tensor([[VIDEO_TOKEN] * 3 + [5], [VIDEO_TOKEN] * 2 + [5, 5]])
        one_row = SimpleNamespace(pooler_output=torch.zeros(1, 5, 8))  # two videos of 3 and 2 tokens, one row
        with pytest.raises(ValueError, match="num_return_sequences"):
            adapter.check_expandable({"input_ids": ids, "mm_encoder_outputs": {"video": one_row}})
        per_video = SimpleNamespace(pooler_output=[torch.zeros(3, 8), torch.zeros(2, 8)])
        adapter.check_expandable({"input_ids": ids, "mm_encoder_outputs": {"video": per_video}})
    finally:
        vtc.restore(model)
