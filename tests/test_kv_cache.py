"""The KV_CACHE stage (vtc.kv): LOOK-M and Elastic Cache by hand and against the official code's arithmetic, the
cache bound per layer after the prefill and at every decode step, budget 1.0, restore, generate against a by-hand
replay on the stock model, stacking with a visual method, and bad options."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import vtc
from vtc.kv import ElasticCacheConfig, LookMConfig, RandomKVConfig, compressor_for
from vtc.kv.random_kv import RandomKV
from vtc.testing import compressed_inputs, llava_inputs, tiny_llava

BATCH = ((3, 4), (6, 2))  # two samples of different lengths: one is left-padded


# -- the compressors by hand ---------------------------------------------------------------------------
def _example():
    """One head, 6 rows: text 0, 4, 5; visual 1, 2, 3."""
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.1, 3.0], [1.0, 0.2], [0.0, 1.0], [-1.0, 0.0]])[None]
    values = torch.tensor([[float(i), 10.0 * i] for i in range(6)])[None]
    scores = torch.tensor([[0.5, 3.0, 1.0, 2.0, 0.2, 9.0]])
    visual = torch.tensor([False, True, True, True, False, False])
    return keys, values, scores, visual


def test_lookm_pivot_by_hand():
    keys, values, scores, visual = _example()
    # k = floor(0.5 * 6 + 0.5) = 3; recent = int(6 * 0.5 * 0.5) = 1 (row 5); hh = 2 from rows 0..4, text first: 0, 4
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.5)).prefill(keys, values, scores, visual)
    # evicted 1 -> 0, 2 -> 4, 3 -> 0 (cosine of keys); pivot: kept <- mean(kept, (evicted + kept) / 2, ...)
    k0 = (keys[0, 0] + (keys[0, 1] + keys[0, 0]) / 2 + (keys[0, 3] + keys[0, 0]) / 2) / 3
    v0 = (values[0, 0] + (values[0, 1] + values[0, 0]) / 2 + (values[0, 3] + values[0, 0]) / 2) / 3
    k4 = (keys[0, 4] + (keys[0, 2] + keys[0, 4]) / 2) / 2
    v4 = (values[0, 4] + (values[0, 2] + values[0, 4]) / 2) / 2
    torch.testing.assert_close(k[0], torch.stack([k0, k4, keys[0, 5]]))
    torch.testing.assert_close(v[0], torch.stack([v0, v4, values[0, 5]]))


def test_lookm_avg_weighted_and_no_text_prior_by_hand():
    keys, values, scores, visual = _example()
    sim = {j: float(F.cosine_similarity(keys[0, j], keys[0, t], dim=0)) for j, t in ((1, 0), (2, 4), (3, 0))}
    mean = sum(sim.values()) / 3
    chosen = [j for j in (1, 2, 3) if sim[j] >= mean]  # the official filter: best similarity >= the mean
    assert chosen == [1, 2]  # 3 is left out (it is evicted, not merged)
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.5, merge="avg")).prefill(keys, values, scores, visual)
    torch.testing.assert_close(k[0, 0], (keys[0, 0] + keys[0, 1]) / 2)
    torch.testing.assert_close(v[0, 1], (values[0, 4] + values[0, 2]) / 2)
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.5, merge="weighted")).prefill(keys, values, scores, visual)
    torch.testing.assert_close(k[0, 0], (keys[0, 0] + sim[1] * keys[0, 1]) / 2)
    torch.testing.assert_close(v[0, 1], (values[0, 4] + sim[2] * values[0, 2]) / 2)
    # without the text prior the first 4 rows are pinned: 10 rows at 0.9 keep 9, the recent int(4.5) = 4, and
    # hh = 5: rows 0..3 whatever their scores, then the better of rows 4 (0.3) and 5 (0.6)
    keys, values = torch.randn(1, 10, 4), torch.randn(1, 10, 4)
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.3, 0.6, 5.0, 5.0, 5.0, 5.0]])
    lookm = compressor_for(LookMConfig(kv_budget=0.9, merge="none", text_prior=False))
    k, _, _ = lookm.prefill(keys, values, scores, torch.ones(10, dtype=torch.bool))
    torch.testing.assert_close(k[0], keys[0, [0, 1, 2, 3, 5, 6, 7, 8, 9]])


def _official_text_pivot(keys, values, hh_score, image, hh, recent):
    """``TextPivotMerge_LayerWise.__call__`` of the official LOOK-M code, for one sample (bsz 1), line by line."""
    heads, _, d = keys.shape
    score = hh_score.clone()
    anti = torch.zeros_like(score)
    anti[:, image] = -65516
    anti[:, -recent:] = -65516
    score = score + anti
    _, keep_topk = torch.topk(score[:, :-recent], hh, dim=-1)
    score.scatter_(1, keep_topk.sort().values, 0)
    score[:, -recent:] = 0
    mask = score >= 0
    k_keep, v_keep = keys[mask].view(heads, -1, d), values[mask].view(heads, -1, d)
    k_pruned, v_pruned = keys[~mask].view(heads, -1, d), values[~mask].view(heads, -1, d)
    sim = (k_pruned / k_pruned.norm(dim=-1, keepdim=True)) @ (k_keep / k_keep.norm(dim=-1, keepdim=True)).transpose(
        -1, -2
    )
    idx = sim.max(dim=-1).indices.unsqueeze(-1).repeat(1, 1, d)
    k_merged = (k_pruned + torch.gather(k_keep, 1, idx)) / 2
    v_merged = (v_pruned + torch.gather(v_keep, 1, idx)) / 2
    k_keep = torch.scatter_reduce(k_keep, 1, idx, k_merged, reduce="mean", include_self=True)
    v_keep = torch.scatter_reduce(v_keep, 1, idx, v_merged, reduce="mean", include_self=True)
    return k_keep, v_keep


@pytest.mark.parametrize("seed", range(5))
def test_lookm_equals_the_official_text_pivot_merge(seed):
    gen = torch.Generator().manual_seed(seed)
    heads, length, d = 3, 20, 8
    keys, values = torch.randn(heads, length, d, generator=gen), torch.randn(heads, length, d, generator=gen)
    scores = torch.rand(heads, length, generator=gen) * 5
    visual = torch.zeros(length, dtype=torch.bool)
    visual[2:14] = True  # 4 text rows before the recent window: no more than hh (the official count then agrees)
    # official hh_ratio = recent_ratio = 0.2 on 20 rows: hh = recent = 4; here kv_budget 0.4, recent_share 0.5
    k, v, _ = compressor_for(LookMConfig(kv_budget=0.4)).prefill(keys, values, scores, visual)
    k_ref, v_ref = _official_text_pivot(keys, values, scores, visual, 4, 4)
    torch.testing.assert_close(k, k_ref)
    torch.testing.assert_close(v, v_ref)


def test_lookm_caps_text_at_the_budget():
    """More text than ``hh``: the official mask keeps all of it; here the top-``hh`` text rows (the budget holds)."""
    keys, values = torch.randn(1, 10, 4), torch.randn(1, 10, 4)
    scores = torch.arange(10.0)[None]
    visual = torch.zeros(10, dtype=torch.bool)
    k, _, _ = compressor_for(LookMConfig(kv_budget=0.4, merge="none")).prefill(keys, values, scores, visual)
    torch.testing.assert_close(k[0], keys[0, [6, 7, 8, 9]])  # recent 8, 9; hh 2 by score: 6, 7


def test_elastic_cache_by_hand():
    keys = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    values = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1))
    scores = torch.tensor([9.0, 1.0, 5.0, 2.0, 7.0, 0.5, 3.0, 4.0])
    method = compressor_for(ElasticCacheConfig(kv_budget=0.5, start_size=1, distance=-2))
    k, v, fixed = method.prefill(keys, values, scores, torch.zeros(8, dtype=torch.bool))
    # k = 4: sink 0, last 7, the top 2 of rows 1..6 by importance: 4 (7.0), 2 (5.0); evicted 1, 3, 5, 6 merge into
    # the nearest kept row among 2, 4 (3 is as near to both: the first, 2)
    for x, out in ((keys, k), (values, v)):
        expected = torch.stack([x[:, 0], x[:, [2, 1, 3]].mean(1), x[:, [4, 5, 6]].mean(1), x[:, 7]], dim=1)
        torch.testing.assert_close(out, expected)
    assert fixed == 2  # 4 kept rows, distance -2
    # decode: evict at the fixed index whenever the cache holds more than the budget of the rows seen
    assert method.evict(fixed, seen=9, length=5) is None  # keep(9) = 5
    assert method.evict(fixed, seen=10, length=6) == 2  # keep(10) = 5
    nomerge = compressor_for(ElasticCacheConfig(kv_budget=0.5, merge=False))
    k, _, fixed = nomerge.prefill(keys, values, scores, torch.zeros(8, dtype=torch.bool))
    torch.testing.assert_close(k, keys[:, [0, 2, 4, 7]])
    assert fixed == 1  # -25 reaches before the cache: clamped after the sinks


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"kv_budget": 0.0}, ValueError),
        ({"kv_budget": 1.5}, ValueError),
        ({"kv_budget": "0.2"}, TypeError),
        ({"merge": "max"}, ValueError),
        ({"recent_share": 2.0}, ValueError),
        ({"text_prior": 1}, TypeError),
    ],
)
def test_lookm_bad_options(kwargs, error):
    with pytest.raises(error):
        LookMConfig(**kwargs)


def test_random_kv_keeps_the_window_then_text_then_random_visual_rows_the_same_everywhere():
    visual = torch.tensor([False] * 3 + [True] * 12 + [False] * 5)  # 20 rows: text, 12 visual, text
    method = RandomKV(RandomKVConfig(kv_budget=0.5, recent_share=0.2))
    kept = method.select(visual)
    k, recent = 10, 2  # floor(0.5 * 20 + 0.5); int(20 * 0.5 * 0.2)
    assert int(kept.sum()) == k and kept[-recent:].all()
    assert kept[:3].all() and kept[15:18].all()  # every text row before the window: 6 of the 8 left
    chosen = kept[3:15].nonzero().flatten()
    assert chosen.numel() == k - recent - 6 == 2
    assert torch.equal(method.select(visual), kept)  # the same rows for every layer and head, and on a rerun
    others = {tuple(RandomKV(RandomKVConfig(kv_budget=0.5, recent_share=0.2, seed=s)).select(visual)[3:15].nonzero()
                    .flatten().tolist()) for s in range(20)}  # fmt: skip
    assert len(others) > 5  # the visual rows are drawn at random
    keys = torch.randn(2, 20, 4)
    k_out, v_out, state = method.prefill(keys, keys + 1, torch.zeros(20), visual)
    assert state is None and torch.equal(k_out, keys[:, kept]) and torch.equal(v_out, keys[:, kept] + 1)  # no merge
    loose = RandomKV(RandomKVConfig(kv_budget=0.5, recent_share=0.2, text_prior=False)).select(visual)
    assert int(loose.sum()) == k and loose[-recent:].all()
    with pytest.raises(TypeError):
        RandomKVConfig(seed=1.5)


def test_elastic_bad_options():
    with pytest.raises(ValueError):
        ElasticCacheConfig(start_size=-1)
    with pytest.raises(TypeError):
        ElasticCacheConfig(distance=2.5)


# -- on the tiny LLaVA ----------------------------------------------------------------------------------
KV = {
    "lookm": LookMConfig(kv_budget=0.4),
    "lookm-avg": LookMConfig(kv_budget=0.3, merge="avg", recent_share=0.25),
    "elastic_cache": ElasticCacheConfig(kv_budget=0.6, distance=-3),
    "random_kv": RandomKVConfig(kv_budget=0.4),
}
STEPS = 8


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=4)


@pytest.fixture(scope="module")
def eager():
    return tiny_llava(seed=4, attn_implementation="eager")


def _inputs(model, batch=BATCH):
    return llava_inputs(model, batch, seed=1)


def _right_align(parts, dtype_like):
    size = max(k.shape[1] for k, _ in parts)
    bsz = len(parts)
    heads, d = parts[0][0].shape[0], parts[0][0].shape[-1]
    keys = dtype_like.new_zeros(bsz, heads, size, d)
    values = torch.zeros_like(keys)
    mask = torch.zeros(bsz, size, dtype=torch.bool)
    for b, (k, v) in enumerate(parts):
        keys[b, :, size - k.shape[1] :], values[b, :, size - k.shape[1] :] = k, v
        mask[b, size - k.shape[1] :] = True
    return keys, values, mask


def _drop_slot(keys, values, mask, b, slot):
    """Sample ``b`` loses cache slot ``slot``; it becomes padding at the front; columns nobody uses go."""
    order = torch.arange(mask.shape[1]).repeat(mask.shape[0], 1)
    order[b] = torch.cat([torch.tensor([slot]), order[b][order[b] != slot]])
    idx = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
    keys, values, mask = keys.gather(2, idx), values.gather(2, idx), mask.gather(1, order)
    mask[b, 0] = False
    first = int(torch.nonzero(mask.any(0)).flatten()[0])
    return keys[:, :, first:], values[:, :, first:], mask[:, first:]


@torch.no_grad()
def _replay(eager, inputs, config, steps=STEPS):
    """The stock model by hand: an eager prefill that returns its attention maps, the compressor on every layer's
    cache per sample (scores: the attention each row received, summed over the real queries), then greedy steps
    on a stock cache holding the kept entries, with the kept slots as the 2-D mask and positions that continue
    from each sample's prompt; Elastic Cache evicts by its rule after every step."""
    method = compressor_for(config)
    inputs = dict(inputs)
    valid = inputs["attention_mask"].bool()
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)  # as generate numbers a left-padded prompt
    assert torch.equal(inputs.pop("position_ids", positions), positions)
    out = eager(**inputs, position_ids=positions, use_cache=True, output_attentions=True)
    visual = inputs["input_ids"] == eager.config.image_token_id
    prompt = valid.sum(1)
    cache, masks, states = DynamicCache(), [], []
    for i, attn in enumerate(out.attentions):  # [B, H, L, L]
        received = (attn.float() * valid[:, None, :, None]).sum(2)  # [B, H, L]
        keys, values = out.cache.layers[i].keys, out.cache.layers[i].values
        hkv = keys.shape[1]
        if method.scores == "heads":
            received = received.view(received.shape[0], hkv, -1, received.shape[-1]).sum(2)
        else:
            received = received.mean(1)
        parts, layer_states = [], []
        for b in range(keys.shape[0]):
            rows = torch.nonzero(valid[b]).flatten()
            k, v, state = method.prefill(keys[b][:, rows], values[b][:, rows], received[b][..., rows], visual[b, rows])
            parts.append((k, v))
            layer_states.append(state)
        k, v, mask = _right_align(parts, keys)
        cache.update(k, v, i)
        masks.append(mask)
        states.append(layer_states)
    tokens, logits = [out.logits[:, -1].argmax(-1)], [out.logits[:, -1]]
    for t in range(1, steps):
        for i in range(len(masks)):
            masks[i] = torch.cat([masks[i], torch.ones(len(prompt), 1, dtype=torch.bool)], dim=1)
        assert all(torch.equal(m, masks[0]) for m in masks)  # one 2-D mask serves every layer of the stock model
        step = eager(
            input_ids=tokens[-1][:, None],
            attention_mask=masks[0].long(),
            position_ids=(prompt + t - 1)[:, None],
            cache=cache,
            use_cache=True,
        )
        for i, layer in enumerate(cache.layers):
            for b in range(len(prompt)):
                slots = torch.nonzero(masks[i][b]).flatten()
                at = method.evict(states[i][b], int(prompt[b]) + t, slots.numel())
                if at is not None:
                    layer.keys, layer.values, masks[i] = _drop_slot(layer.keys, layer.values, masks[i], b, slots[at])
        tokens.append(step.logits[:, -1].argmax(-1))
        logits.append(step.logits[:, -1])
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def _generate(model, inputs, steps=STEPS):
    out = model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences[:, -steps:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("name", sorted(KV))
def test_generate_equals_a_replay_on_the_stock_model(model, eager, name):
    inputs = _inputs(model)
    config = KV[name]
    vtc.compress(model, config.method, **{k: v for k, v in config.to_dict().items() if k not in ("kv",)})
    try:
        tokens, logits = _generate(model, inputs)
    finally:
        vtc.restore(model)
    ref_tokens, ref_logits = _replay(eager, inputs, config)
    full, _ = _generate(model, inputs)
    assert not torch.equal(full, tokens)  # the compression changes the answer here: the replay is not trivial
    torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def _bound_watch(model, config):
    """Per LM call, per layer: the entries each sample holds and the cache's physical length (checked below)."""
    session = vtc.session_of(model)
    seen = []

    def hook(module, args, kwargs, output):
        call = session.kv.calls.get(kwargs["cache"])
        if call is not None:
            layers = kwargs["cache"].layers
            counts = [call.masks[i].sum(1).tolist() for i in range(len(layers))]
            seen.append((call.appended, call.prompt.tolist(), counts, [lay.keys.shape[-2] for lay in layers]))

    return seen, session.kv.decoder.lm.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name", sorted(KV))
def test_cache_holds_at_most_the_budget_after_prefill_and_every_step(model, name):
    config = KV[name]
    method = compressor_for(config)
    vtc.compress(model, config.method, **{k: v for k, v in config.to_dict().items() if k != "kv"})
    seen, handle = _bound_watch(model, config)
    try:
        model.generate(**_inputs(model), max_new_tokens=STEPS, do_sample=False)
    finally:
        handle.remove()
        vtc.restore(model)
    assert [s[0] for s in seen] == list(range(STEPS))  # the prefill, then one call per decode step
    for appended, prompt, counts, lengths in seen:
        for layer_counts, length in zip(counts, lengths, strict=True):
            assert length == max(layer_counts)  # no slot nobody uses
            for n, count in zip(prompt, layer_counts, strict=True):
                if config.method == "elastic_cache":  # the budget of every row seen, at every step
                    assert count <= method.keep(n + appended)
                else:  # the prompt's budget, plus the rows generated since (LOOK-M evicts once)
                    assert count == method.keep(n) + appended
                assert count < n + appended


@pytest.mark.parametrize("name", ["lookm", "elastic_cache"])
def test_budget_one_is_the_untouched_model_and_restore_is_exact(model, name):
    inputs = _inputs(model)
    before = model(**inputs).logits
    full_tokens, full_logits = _generate(model, inputs)
    hooks = [(m, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]
    vtc.compress(model, name, budget=1.0)
    try:
        tokens, logits = _generate(model, inputs)
        assert torch.equal(model(**inputs).logits, before)
    finally:
        vtc.restore(model)
    assert torch.equal(tokens, full_tokens)
    assert torch.equal(logits, full_logits)
    vtc.compress(model, name, budget=0.3)
    model.generate(**inputs, max_new_tokens=3)
    vtc.restore(model)
    assert torch.equal(model(**inputs).logits, before)
    assert [(m, dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()] == hooks
    assert type(model).__name__ == "LlavaForConditionalGeneration"


def test_stacks_with_a_visual_method(model, eager):
    """DivPrune keeps half the visual tokens before the LLM; LOOK-M then compresses the cache of that prompt: the
    same as the replay of the prompt DivPrune left."""
    inputs = _inputs(model)
    config = LookMConfig(kv_budget=0.5)
    vtc.compress(model, "divprune", budget=0.5, kv=config)
    try:
        short = compressed_inputs(model, inputs, for_generate=True)
        seen, handle = _bound_watch(model, config)
        tokens, logits = _generate(model, inputs)
        handle.remove()
        assert vtc.last_record(model).method == "divprune"
    finally:
        vtc.restore(model)
    assert short["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    prompt = short["attention_mask"].sum(1).tolist()
    assert seen[0][1] == prompt  # the KV stage saw the prompt DivPrune left
    assert seen[0][2][0] == [compressor_for(config).keep(n) for n in prompt]
    ref_tokens, ref_logits = _replay(eager, short, config)
    torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_bad_kv_options_leave_the_model_untouched(model):
    inputs = _inputs(model)
    before = model(**inputs).logits
    cases = [
        (dict(method="fastv", kv="lookm"), ValueError, "prunes inside"),
        (dict(method="divprune", kv="h2o"), ValueError, "unknown KV-cache method"),
        (dict(method="divprune", kv_budget=0.5), TypeError, "pass kv="),
        (dict(method="lookm", budget=0.0), ValueError, "kv_budget"),
        (dict(method="lookm", merge="max"), ValueError, "merge"),
        (dict(method="lookm", bogus=1), TypeError, "unknown option"),
        (dict(method="divprune", kv=LookMConfig(), kv_budget=0.3), TypeError, "inside the KV config"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            vtc.compress(model, **kwargs)
        assert not vtc.is_compressed(model)
        assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert torch.equal(model(**inputs).logits, before)


def test_unsupported_families_are_refused():
    from vtc.testing import FAMILIES

    qwen = FAMILIES["qwen2_vl"].build(seed=0)
    with pytest.raises(ValueError, match="M-RoPE"):
        vtc.compress(qwen, "lookm")
    assert not vtc.is_compressed(qwen)


def test_a_new_turn_on_a_compressed_cache_is_refused_not_misplaced():
    """generate slices a new turn by the cache's physical length, which the KV stage shortened: it would re-feed
    tokens the cache already holds, so the call is refused with the way out."""
    from vtc.testing import llava_inputs, tiny_llava

    model = tiny_llava(seed=0)
    inputs = llava_inputs(model, ((3, 4),))
    with vtc.compressed(model, "lookm", budget=0.5):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([out.sequences, torch.tensor([[5, 6, 7]])], 1)
        with pytest.raises(ValueError, match="compressed by the KV stage"):
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), cache=out.past_key_values, max_new_tokens=2
            )
